"""The README's Python snippets run as written (scripted hosts stand in for the embedded model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fabstir_jupyter.local import HostProcess

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _snippets() -> list[str]:
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def _snippet(marker: str) -> str:
    found = [block for block in _snippets() if marker in block]
    assert len(found) == 1, f"expected one README python block holding {marker!r}, found {len(found)}"
    return found[0]


@pytest.fixture
def user_env(tmp_path):
    """A user with no fabstir configuration and the scripted backend for the local network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABSTIR_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"),
               FABSTIR_LOCAL_BACKEND="scripted")
    return env


def _run(code: str, env: dict[str, str], tmp_path: Path) -> str:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_readme_has_the_three_python_snippets():
    """The notebook-cell form, the script form and the blocking form are all there."""
    assert len(_snippets()) == 3


def test_readme_notebook_cell_snippet_runs_in_ipython(user_env, tmp_path):
    """The top-level ``async with`` snippet runs in IPython (as in a notebook cell) and prints a batch."""
    code = _snippet("async with FabstirSDK() as sdk:                     # the embedded local network")
    runner = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        f"result = shell.run_cell({code!r})\n"
        "result.raise_error()\n"
    )
    out = _run(runner, user_env, tmp_path)
    assert "prompt" in out and "tokens" in out  # the batch frame's columns
    assert re.search(r"\n\s*2\s+three\s", out), out[-800:]  # the third batch row


def test_readme_script_snippet_runs_with_asyncio_run(user_env, tmp_path):
    """The ``asyncio.run(main())`` form streams an answer from a script."""
    out = _run(_snippet("asyncio.run(main())"), user_env, tmp_path)
    assert len(out.split()) == 64  # max_tokens=64 scripted words


def test_readme_blocking_snippet_runs_against_a_host_started_as_shown(user_env, tmp_path):
    """``InferenceManager([...]).infer(...)`` works against a ``fabstir-host`` started by hand."""
    code = _snippet("manager = InferenceManager([")
    assert "http://127.0.0.1:8080" in code
    with HostProcess("scripted") as host:
        assert host.url is not None
        port = host.url.split(":")[-1].split("/")[0]
        out = _run(code.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{port}"), user_env, tmp_path)
    assert "UsageRecord" in out or "received_tokens" in out
