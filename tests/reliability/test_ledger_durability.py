"""Issue 5 / nothing lost: the usage ledger survives ``kill -9`` of the client mid-batch.

A real child process starts an in-process scripted host, runs ``InferenceManager.batch`` over N
prompts with a :class:`UsageLedger` at a path in ``tmp_path``, and prints ``done <request_id>``
(flushed) for every finished request. "Finished" here means *recorded and committed*: the child's
usage sink calls ``ledger.record(rec)`` then ``ledger.flush()`` (which returns once the writer
thread has committed everything queued before it) and only then prints. The test SIGKILLs the
child after about half the lines, then checks ``PRAGMA integrity_check`` and that every printed
request id is in the database.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

N = 200

CHILD = textwrap.dedent(r"""
    import asyncio, sys
    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.host.scripted import ScriptedBackend
    from fabstir_jupyter.host.server import HostConfig, HostServer
    from fabstir_jupyter.inference import InferenceManager
    from fabstir_jupyter.usage import UsageLedger

    path, n = sys.argv[1], int(sys.argv[2])
    ledger = UsageLedger(path)

    class CommittedSink:
        # "done" is printed only after the record is committed by the ledger's writer thread.
        def record(self, rec):
            ledger.record(rec)
            if rec.error_code is None and rec.finish_reason is not None:
                ledger.flush()
                print(f"done {rec.request_id}", flush=True)

    async def main():
        server = HostServer(HostConfig(max_concurrent_streams=16), ScriptedBackend(token_rate=200.0))
        await server.start()
        config = InferenceConfig(connection_timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0,
                                 backoff_initial=0.0, backoff_max=0.01, usage_db=":memory:")
        manager = InferenceManager([server.ws_url], config, usage=CommittedSink())
        print("ready", flush=True)
        await manager.batch([f"durability prompt {i}" for i in range(n)], max_tokens=5, max_concurrency=4)
        print("finished", flush=True)
        await manager.aclose()
        await server.close()
        ledger.close()

    asyncio.run(main())
""")


@pytest.mark.timeout(60)
def test_ledger_survives_sigkill_mid_batch(tmp_path):
    """200-prompt batch, SIGKILL after 100 committed 'done' lines: DB ok, every printed id present."""
    db = tmp_path / "usage.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(N)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )
    done: list[str] = []
    deadline = time.monotonic() + 45
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("done "):
                done.append(line.split(" ", 1)[1])
                if len(done) >= N // 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            assert line != "finished", "the batch ended before the kill: slow the host down"
            assert time.monotonic() < deadline, "child too slow"
        else:
            pytest.fail(f"child exited early: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert len(done) == N // 2

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(t for t in tables if any(c[1] == "request_id" for c in conn.execute(f"PRAGMA table_info({t})")))
        stored = {r[0] for r in conn.execute(f"SELECT request_id FROM {table}")}
    finally:
        conn.close()
    missing = [rid for rid in done if rid not in stored]
    assert not missing, f"{len(missing)} of {len(done)} finished requests lost: {missing[:5]}"
    print(f"killed after {len(done)} done; ledger holds {len(stored)} rows; integrity ok")
