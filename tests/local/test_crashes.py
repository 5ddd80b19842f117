"""Local hosts that die on their own: reaped at once, restarted on their port, marked down meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.errors import ConnectionFailed
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.hosts import HostManager
from fabstir_jupyter.local.network import LocalNetwork
from fabstir_jupyter.notebook.tables import host_rows

PROMPT = "tell me about the local chain"


def reaped(pid: int) -> bool:
    """Whether ``pid`` has exited and been reaped (a zombie keeps its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


async def eventually(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition`` on the event loop until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_the_only_host_killed_mid_stream_is_reaped_restarted_and_serves_the_next_request():
    """SIGKILL the only local host mid-stream: the error keeps the partial answer, the process is reaped
    (no zombie), restarted on the same URL and still registered, marked ok again, and the next
    request is answered."""
    with LocalNetwork(1, "scripted", seed=5, host_args=["--token-rate", "100"]) as local:
        config = InferenceConfig(usage_db=":memory:", max_retries=0)
        async with InferenceManager(HostManager(sources=[local.source()]), config) as manager:
            local.supervise(manager.host_manager)
            (info,) = await manager.host_manager.discover_all_active_hosts()
            process = local.processes[0]
            events: list[str] = []
            process.add_listener(lambda _, event: events.append(event))
            old_pid, url = process.pid, process.url
            pieces = []
            with pytest.raises(ConnectionFailed) as caught:
                async with manager.stream(PROMPT, max_tokens=500) as stream:
                    async for piece in stream:
                        pieces.append(piece)
                        if len(pieces) == 8:
                            os.kill(old_pid, signal.SIGKILL)
            assert caught.value.partial_text == stream.text == "".join(pieces)
            assert stream.text == scripted_text(PROMPT, len(pieces))
            assert await eventually(lambda: events == ["down", "up"]), events
            assert reaped(old_pid), "the killed host is a zombie"
            assert process.pid != old_pid and process.url == url and process.restarts == 1
            assert process.exit_status == -signal.SIGKILL
            assert info.health == "ok"
            assert local.hosts[0].address in {h.address for h in local.source().discover_sync()}
            again = await manager.ainfer(PROMPT, max_tokens=5)
            assert again.text == scripted_text(PROMPT, 5) and again.host == info.api_url


async def test_a_host_killed_for_good_is_shown_unreachable_not_ok():
    """Two hosts, no restarts: the one SIGKILLed mid-stream is marked unreachable in the dashboard rows
    at once, while the answer continues on the other host."""
    with LocalNetwork(2, "scripted", seed=6, host_args=["--token-rate", "100"], restarts=0) as local:
        config = InferenceConfig(usage_db=":memory:", backoff_initial=0.0)
        async with InferenceManager(HostManager(sources=[local.source()]), config) as manager:
            local.supervise(manager.host_manager)
            await manager.host_manager.discover_all_active_hosts()
            by_url = {p.url: p for p in local.processes}
            events: list[str] = []
            for process in local.processes:
                process.add_listener(lambda p, event: events.append(event))
            pieces, killed = [], None
            async with manager.stream(PROMPT, max_tokens=40) as stream:
                async for piece in stream:
                    pieces.append(piece)
                    if len(pieces) == 8:
                        killed = by_url[stream.host.ws_url]
                        killed_pid = killed.pid
                        os.kill(killed_pid, signal.SIGKILL)
            assert "".join(pieces) == scripted_text(PROMPT, 40)
            assert stream.host.ws_url != killed.url  # continued on the other host
            assert await eventually(lambda: events == ["down", "failed"]), events
            assert reaped(killed_pid) and not killed.running and killed.restarts == 0
            status = {row["url"]: row["status"] for row in host_rows(manager.host_manager.hosts)}
            killed_api = killed.url.replace("ws://", "http://").removesuffix("/v1/ws")
            assert status[killed_api] == "unreachable"
            assert [s for u, s in status.items() if u != killed_api] == ["ok"]
