"""A deeply nested frame in a process whose recursion limit is raised (py-evm raises it to 100 000).

The protocol layer refuses frames nested deeper than 64 levels before ``json.loads`` sees them. The
host once re-parsed a refused frame with plain ``json.loads`` to find its ``id``; with the limit
raised, the C decoder then recursed 100 000 levels on the C stack and the process died. The host runs
in a subprocess here, so that a crash is a failed test and not a dead test runner.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

DEPTH = 100_000

SCRIPT = textwrap.dedent(f"""
    import asyncio, json, sys
    sys.setrecursionlimit({DEPTH})
    from websockets.asyncio.client import connect
    from fabstir_jupyter.host import HostConfig, HostServer

    async def main():
        async with HostServer(HostConfig(max_frame_bytes=1 << 22)) as server:
            async with connect(server.ws_url, max_size=None) as ws:
                await asyncio.wait_for(ws.recv(), 10)
                replies = []
                for frame in ("[" * {DEPTH} + "]" * {DEPTH},
                              '{{"type":"inference","id":"deep","x":' + "[" * {DEPTH} + "]" * {DEPTH} + "}}",
                              '{{"type":"encrypted_message","x":' + '{{"a":' * {DEPTH} + "1" + "}}" * {DEPTH} + "}}"):
                    await ws.send(frame)
                    replies.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                await ws.send(json.dumps({{"type": "inference", "id": "after", "request": {{
                    "prompt": "hello", "model": "scripted-1", "max_tokens": 2, "temperature": 0.0}}}}))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if frame["type"] == "stream_end":
                        replies.append(frame)
                        break
        print(json.dumps(replies))

    asyncio.run(main())
""")


def test_deeply_nested_frames_get_protocol_error_with_a_raised_recursion_limit():
    """Three 100 000-deep frames (bare, inside a request, inside an encrypted frame) each get a coded
    PROTOCOL_ERROR without an id (the frame was never decoded); the process survives and serves."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"host process died (exit {done.returncode}):\n{done.stderr[-2000:]}"
    import json

    replies = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["type"] for r in replies] == ["error", "error", "error", "stream_end"]
    assert all(r["code"] == "PROTOCOL_ERROR" and "id" not in r for r in replies[:3])
    assert replies[3]["id"] == "after" and replies[3]["reason"] == "complete"
