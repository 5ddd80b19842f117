"""The widgets' front end: js/ builds into the committed static/ bundle, type-checks, and its tests pass.

Like the contracts' artifacts, the bundle is committed (installing the package needs no Node) and a
fresh build must reproduce it byte for byte. These tests run ``npm ci`` in ``js/`` when
``js/node_modules`` is missing (npm caches the packages afterwards), build into a temporary folder,
compare, run ``tsc --noEmit`` and then the widget tests under Node's test runner on that build. They
skip only when ``node`` or ``npm`` is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fabstir_jupyter.notebook import widgets

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "js"
STATIC = Path(widgets.__file__).parent / "static"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = [
    pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are needed to build the widgets (js/)"),
    pytest.mark.timeout(600),
]


def _run(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=JS, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, (f"{' '.join(args)} exited {done.returncode}:\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """js/node_modules, installed from the lock file with ``npm ci`` if missing."""
    modules = JS / "node_modules"
    if not (modules / ".package-lock.json").is_file():
        _run([NPM, "ci", "--no-audit", "--no-fund"], timeout=300)
    return modules


@pytest.fixture(scope="module")
def fresh_build(node_modules: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The widgets built from js/src into a temporary folder."""
    out = tmp_path_factory.mktemp("widgets") / "static"
    _run([NODE, "build.mjs", "--outdir", str(out)], timeout=120)
    return out


def test_committed_bundle_matches_a_fresh_build(fresh_build: Path):
    """Rebuilding js/ reproduces every file in the package's static folder byte for byte, and no other."""
    built = sorted(p.name for p in fresh_build.iterdir())
    committed = sorted(p.name for p in STATIC.iterdir() if p.name != "__pycache__")
    assert built == committed, "run `npm run build` in js/ and commit fabstir_jupyter/notebook/static/"
    stale = [name for name in built if (fresh_build / name).read_bytes() != (STATIC / name).read_bytes()]
    assert stale == [], f"stale bundle files {stale}: run `npm run build` in js/ and commit them"
    assert "THIRD_PARTY_LICENSES.txt" in built


def test_widget_sources_type_check(node_modules: Path):
    """tsc --noEmit accepts js/src (strict; the models typed with @anywidget/types)."""
    _run([NODE, str(node_modules / "typescript" / "bin" / "tsc"), "--noEmit", "-p", "."], timeout=300)


def test_widget_tests_pass_under_node(fresh_build: Path):
    """js/test/*.test.mjs pass under node --test against the fresh build (DOM from happy-dom)."""
    tests = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.mjs"))
    assert tests, "no widget tests found in js/test"
    done = _run([NODE, "--test", *tests], timeout=300, env={"FABSTIR_WIDGETS_DIR": str(fresh_build)})
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout, done.stdout[-2000:]
