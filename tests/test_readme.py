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


def _run_in_ipython(code: str, env: dict[str, str], tmp_path: Path) -> str:
    """Run ``code`` as a notebook cell runs it (top-level ``await`` allowed); return what it printed."""
    runner = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        f"result = shell.run_cell({code!r})\n"
        "result.raise_error()\n"
    )
    return _run(runner, env, tmp_path)


def test_readme_has_the_four_python_snippets():
    """The notebook-cell form, the paying one, the script form and the blocking form are all there."""
    assert len(_snippets()) == 4


def test_readme_notebook_cell_snippet_runs_in_ipython(user_env, tmp_path):
    """The top-level ``async with`` snippet runs in IPython (as in a notebook cell) and prints a batch."""
    code = _snippet("async with FabstirSDK() as sdk:                     # the embedded local network")
    out = _run_in_ipython(code, user_env, tmp_path)
    assert "prompt" in out and "tokens" in out  # the batch frame's columns
    assert re.search(r"\n\s*2\s+three\s", out), out[-800:]  # the third batch row


def test_readme_paying_snippet_settles_a_job_that_the_ledger_agrees_with(user_env, tmp_path):
    """The paying snippet (top-level ``async with``, as in a cell) opens a job, streams 40 tokens on
    it, settles it, and prints a receipt whose figures the ledger's reconciliation agrees with."""
    code = _snippet("create_session(deposit=1, budget=5)")
    out = _run_in_ipython(code, user_env, tmp_path)
    receipt = re.search(r"(\d+) (\d+) ([\d.e-]+) ([\d.e-]+)\n", out)
    assert receipt is not None, out[-800:]
    job_id, billed, cost, refund = int(receipt[1]), int(receipt[2]), float(receipt[3]), float(receipt[4])
    assert billed == 100  # 40 tokens, padded to the first proof's minimum of proofInterval (100)
    assert 0 < cost < 1 and abs(cost + refund - 1) < 1e-9  # the deposit of 1 USDC: billed, or refunded
    row = re.search(rf"\n\s*\d+\s+{job_id}\s+{billed}\s+\S+\s+True\s", out)
    assert row is not None, out[-800:]  # reconciled: the chain billed what the cadence implies


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
