"""Fixtures for the notebook layer: scripted hosts on their own loop thread, and a fresh IPython
shell per test with the extension loaded and the text output (no widget front end)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from fabstir_jupyter.host.server import HostServer

LOOP_THREAD = "fabstir-notebook-loop"


def wait_until(condition: Callable[[], bool], timeout: float = 3.0, step: float = 0.01) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def loop_thread_alive() -> bool:
    """Whether the notebook bridge's loop thread is running."""
    return any(t.name == LOOP_THREAD and t.is_alive() for t in threading.enumerate())


@pytest.fixture
def start_host(start_threaded_host):
    """Start scripted hosts on a private loop thread (``start_threaded_host`` in tests/conftest.py).

    A magic blocks the test's thread while it runs; the thread keeps the hosts serving meanwhile.
    """
    return start_threaded_host


@pytest.fixture
def host(start_host) -> HostServer:
    """One fast scripted host."""
    return start_host()


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No FABSTIR_* settings from the outside, no user config file, and the text output."""
    import os

    for name in list(os.environ):
        if name.startswith("FABSTIR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("FABSTIR_NO_WIDGETS", "1")
    return tmp_path


@pytest.fixture
def make_shell(isolated_env):
    """Build a fresh IPython shell (the singleton, so display() reaches it) with the extension loaded.

    ``make_shell(config=None)``; the usage ledger is in memory, and the network is not started as the
    extension loads (``start_network_on_load``) unless the config says so. The extension is
    unloaded and the singleton cleared afterwards.
    """
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    shells: list[InteractiveShell] = []

    def make(config: Config | None = None, *, load: bool = True) -> InteractiveShell:
        InteractiveShell.clear_instance()
        cfg = config or Config()
        cfg.HistoryManager.hist_file = ":memory:"
        if "usage_db" not in cfg.FabstirMagics:
            cfg.FabstirMagics.usage_db = ":memory:"
        if "start_network_on_load" not in cfg.FabstirMagics:  # no network starts behind a test's back
            cfg.FabstirMagics.start_network_on_load = False
        shell = InteractiveShell.instance(config=cfg)
        shells.append(shell)
        if load:
            shell.run_line_magic("load_ext", "fabstir_jupyter")
        return shell

    yield make
    for shell in shells:
        if "fabstir_jupyter" in shell.extension_manager.loaded:
            shell.run_line_magic("unload_ext", "fabstir_jupyter")
    from fabstir_jupyter.notebook.bridge import close_bridge

    close_bridge()
    InteractiveShell.clear_instance()


@pytest.fixture
def ip(make_shell, host):
    """A shell on the static network of one scripted host."""
    shell = make_shell()
    shell.run_line_magic("config", f"FabstirMagics.hosts = [{host.ws_url!r}]")
    return shell
