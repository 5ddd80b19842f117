"""Browser tests: JupyterLab in Debian's Chromium, driven by Playwright (``-m "not browser"`` skips them)."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: drives JupyterLab in a real Chromium (Playwright with /usr/bin/chromium)"
    )
