"""Failover across real host processes: SIGKILL the serving host mid-stream, the answer continues."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.errors import FabstirError
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.local import HostProcess
from fabstir_jupyter.usage import ListSink

PROMPT = "a long answer about glaciers"


@pytest.fixture
def two_hosts():
    hosts = [HostProcess("scripted", ["--token-rate", "100"], start_timeout=30) for _ in range(2)]
    try:
        for host in hosts:
            host.start()
        yield hosts
    finally:
        for host in hosts:
            host.stop()


async def test_sigkill_of_the_serving_host_mid_stream_keeps_the_text_continuous(two_hosts):
    """The caller sees every token once, in order; the ledger says which host produced which."""
    config = InferenceConfig(usage_db=":memory:", backoff_initial=0.0, idle_timeout=5.0)
    async with InferenceManager([h.url for h in two_hosts], config, usage=ListSink()) as manager:
        killed = None
        async with manager.stream(PROMPT, max_tokens=60, seed=11) as stream:
            pieces = []
            async for piece in stream:
                pieces.append(piece)
                if len(pieces) == 10 and killed is None:
                    killed = next(h for h in two_hosts if h.url == stream.host.ws_url)
                    os.kill(killed.pid, signal.SIGKILL)
        assert "".join(pieces) == scripted_text(PROMPT, 60, seed=11)
        records = manager.usage.records
        assert records[0].host == killed.url.replace("ws://", "http://").removesuffix("/v1/ws")
        assert records[0].error_code == "CONNECTION_FAILED"
        assert records[-1].error_code is None and records[-1].host != records[0].host
        assert sum(r.received_tokens for r in records) == 60


def reaped(pid: int) -> bool:
    """Whether ``pid`` has exited and been reaped (a zombie still has its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def test_sigkill_of_the_only_host_keeps_the_partial_answer_and_reaps_the_process():
    """With the only host SIGKILLed mid-stream, the error carries the text already streamed (so does
    the stream's result), and the dead host is reaped at once, not left a zombie."""
    host = HostProcess("scripted", ["--token-rate", "100"], start_timeout=30)
    host.start()
    try:
        config = InferenceConfig(usage_db=":memory:", backoff_initial=0.0, backoff_max=0.01, idle_timeout=5.0)
        async with InferenceManager([host.url], config, usage=ListSink()) as manager:
            pid = host.pid
            pieces = []
            with pytest.raises(FabstirError) as info:
                async with manager.stream(PROMPT, max_tokens=200, seed=3) as stream:
                    async for piece in stream:
                        pieces.append(piece)
                        if len(pieces) == 10:
                            os.kill(pid, signal.SIGKILL)
            text = "".join(pieces)
            assert len(pieces) >= 10 and text == scripted_text(PROMPT, len(pieces), seed=3)
            assert info.value.partial_text == text
            result = stream.result()
            assert result.text == text and result.error is info.value and result.finish_reason == "error"
            assert wait_until(lambda: reaped(pid)), "the killed host is a zombie"
            assert not host.running and host.exit_status == -signal.SIGKILL
    finally:
        host.stop()
