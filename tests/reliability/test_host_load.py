"""Issue 5 / load: 50 concurrent clients, 1 000 requests, one scripted host in a subprocess.

Every request is served completely (text == scripted_text) or refused with a coded error
(RATE_LIMIT_EXCEEDED from the per-connection limit, HOST_BUSY from max_concurrent_streams).
Afterwards: no task leak in the client process, no connection/stream/fd leak in the host
process, and the host's RSS after a second identical run is within 10% of the first run's.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

import httpx
import pytest
from websockets.asyncio.client import connect

from _timing import wait_until
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.local.process import HostProcess

CLIENTS = 50
PER_CLIENT = 20  # 50 x 20 = 1000 requests
MAX_TOKENS = 5
FRAME_TIMEOUT = 10.0
HOST_ARGS = [
    "--token-rate", "0",
    "--max-concurrent-streams", "8",
    "--rate-limit", "15",
    "--rate-limit-per-address", "0",
]
REFUSALS = {"RATE_LIMIT_EXCEEDED", "HOST_BUSY"}


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _client(url: str, cid: int, outcomes: Counter, failures: list[str]) -> None:
    async with connect(url, open_timeout=FRAME_TIMEOUT, max_size=1 << 20) as ws:
        greeting = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
        assert greeting["type"] == "connected"
        for i in range(PER_CLIENT):
            rid = f"c{cid}-r{i}"
            prompt = f"load test client {cid} request {i}"
            await ws.send(json.dumps({
                "type": "inference", "id": rid,
                "request": {"prompt": prompt, "model": "scripted-1", "max_tokens": MAX_TOKENS,
                            "temperature": 0.0, "stream": True},
            }))
            text: list[str] = []
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
                if frame.get("id") != rid:
                    failures.append(f"{rid}: frame for another id {frame!r}")
                    return
                kind = frame["type"]
                if kind == "stream_chunk":
                    text.append(frame["content"])
                elif kind == "error":
                    code = frame.get("code")
                    if code in REFUSALS and not text:
                        outcomes[code] += 1
                    else:
                        outcomes["bad_error"] += 1
                        failures.append(f"{rid}: {frame!r}")
                    break  # a refusal is a single frame, no stream_end follows
                elif kind == "stream_end":
                    if "".join(text) == scripted_text(prompt, MAX_TOKENS) and frame.get("reason") == "complete":
                        outcomes["served"] += 1
                    else:
                        outcomes["bad_text"] += 1
                        failures.append(f"{rid}: got {''.join(text)!r} end {frame!r}")
                    break
                else:
                    failures.append(f"{rid}: unexpected {frame!r}")
                    return


async def _run_load(url: str) -> tuple[Counter, list[str], float]:
    outcomes: Counter = Counter()
    failures: list[str] = []
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(_client(url, c, outcomes, failures) for c in range(CLIENTS)), return_exceptions=True),
        timeout=60,
    )
    failures += [f"client {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    return outcomes, failures, time.monotonic() - started


async def _health(http_url: str) -> dict:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"{http_url}/health")).json()


async def _settle(http_url: str, pid: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = await _health(http_url)
        if (health["connections"] == 0 and health["active_streams"] == 0) or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_1000_requests_50_clients_served_or_refused_no_leaks_rss_plateau():
    """Two identical runs of 50 clients x 20 requests against a subprocess host.

    Each run: served + RATE_LIMIT_EXCEEDED + HOST_BUSY == 1000 and nothing else; then host
    connections/streams return to 0, host fds return to baseline, client tasks return to baseline,
    and run 2's host RSS is within 10% of run 1's.
    """
    host = HostProcess("scripted", HOST_ARGS, start_timeout=30)
    url = host.start()
    try:
        pid = host.pid
        assert pid is not None
        http_url = url.replace("ws://", "http://").rsplit("/v1/ws", 1)[0]
        baseline_tasks = len(asyncio.all_tasks())
        await _health(http_url)  # warm the HTTP path once so fd baseline includes nothing lingering
        await asyncio.sleep(0.2)
        baseline_fds = _fds(pid)
        baseline_client_fds = _fds(os.getpid())

        rss, summary = [], []
        for run in (1, 2):
            outcomes, failures, elapsed = await _run_load(url)
            assert not failures, failures[:5]
            total = outcomes["served"] + outcomes["RATE_LIMIT_EXCEEDED"] + outcomes["HOST_BUSY"]
            assert total == CLIENTS * PER_CLIENT, outcomes
            assert outcomes["served"] > 0 and outcomes["RATE_LIMIT_EXCEEDED"] > 0, outcomes
            health = await _settle(http_url, pid)
            assert health["connections"] == 0 and health["active_streams"] == 0, health
            # the client side: every connection task is gone
            await wait_until(lambda: len(asyncio.all_tasks()) <= baseline_tasks,
                             what=f"client tasks back to the baseline of {baseline_tasks}")
            # the host side: sockets closed (allow 2 s for closing handshakes to finish)
            await wait_until(lambda: _fds(pid) <= baseline_fds,
                             what=f"run {run}: host fds back to the baseline of {baseline_fds}")
            assert _fds(os.getpid()) <= baseline_client_fds, (run, _fds(os.getpid()), baseline_client_fds)
            rss.append(_rss_kb(pid))
            summary.append((run, dict(outcomes), round(elapsed, 2), rss[-1]))
        print("load runs (run, outcomes, seconds, host RSS kB):", summary)
        assert rss[1] <= rss[0] * 1.10, f"host RSS grew from {rss[0]} kB to {rss[1]} kB"
    finally:
        host.stop()
