"""Settings for the whole suite (tests/ and the notebooks under nbval).

The suite never reads or writes the user's own fabstir settings or usage ledger: before any test
is collected, the config and data directories point into a temporary directory (the kernels and
host processes the tests start inherit that), and ``FABSTIR_*`` variables are cleared.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_USER_DIRS = tempfile.mkdtemp(prefix="fabstir-tests-user-")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_USER_DIRS, "config")
os.environ["XDG_DATA_HOME"] = os.path.join(_USER_DIRS, "data")
for _name in [name for name in os.environ if name.startswith("FABSTIR_") and name != "FABSTIR_TEST_ARTIFACTS"]:
    del os.environ[_name]


def pytest_unconfigure(config: object) -> None:
    shutil.rmtree(_USER_DIRS, ignore_errors=True)
