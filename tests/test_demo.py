"""The README's first command: ``scripts/demo`` runs ``python -m fabstir_jupyter demo`` (scripted backend here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fabstir_jupyter.host.scripted import scripted_text

PROMPT = "Say hi"


def test_the_demo_streams_a_paid_answer_and_prints_its_settlement(tmp_path: Path) -> None:
    """A user with no configuration: the demo starts the embedded network, streams 12 tokens paid from
    the local test account, and prints the job's settlement as the chain recorded it (minimum billing
    of 100 tokens; paid and refunded add up to the deposit), then exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABSTIR_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "fabstir_jupyter", "demo", PROMPT, "--backend", "scripted",
                           "--max-tokens", "12"], capture_output=True, text=True, env=env, timeout=180,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert scripted_text(PROMPT, 12) in done.stdout
    assert "12 tokens, finish=length" in done.stdout
    assert re.search(r"paid from 0x[0-9a-fA-F]{40} \(the local test account\)", done.stderr), done.stderr
    settled = re.search(r"job (\d+) settled on the chain: 100 tokens billed for 12 streamed \(minimum billing.*?\); "
                        r"([\d.]+) USDC paid \(host ([\d.]+), treasury ([\d.]+)\), ([\d.]+) refunded", done.stdout)
    assert settled is not None, done.stdout[-1500:]
    paid, host, treasury, refunded = (float(settled[i]) for i in range(2, 6))
    assert abs(host + treasury - paid) < 1e-9 and paid > 0 and refunded > 0
    assert abs(paid + refunded - 0.5) < 1e-9  # the contract's minimum deposit of 0.5 USDC, all accounted for
