"""Idle connections are closed, so silent sockets cannot hold every connection slot."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from fabstir_jupyter.host import ScriptedBackend
from fabstir_jupyter.protocol import inference_frame


async def test_host_closes_a_connection_that_stays_silent(start_host, make_peer):
    """A peer that sends nothing is closed with 1001 after idle_connection_timeout."""
    server = await start_host(idle_connection_timeout=0.3)
    peer = await make_peer(server)
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(peer.ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_a_long_stream_is_not_idle_and_the_window_restarts_after_it(start_host, make_peer):
    """A stream longer than the timeout runs to its end; the idle clock starts when it ends."""
    server = await start_host(backend=ScriptedBackend(token_rate=20), idle_connection_timeout=0.4)
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="slow", model="scripted-1", max_tokens=16, temperature=0.0,
                                    request_id="r1"))
    frames = await peer.until_end(timeout=5)  # ~0.8 s of streaming, twice the idle timeout
    assert frames[-1]["type"] == "stream_end" and frames[-1]["finish_reason"] == "length"
    assert await peer.silent_for(0.2)  # still open shortly after the stream ended
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(peer.ws.recv(), 5)


def test_idle_timeout_must_be_positive():
    """A zero or negative idle_connection_timeout is refused."""
    from fabstir_jupyter.errors import InvalidOptions
    from fabstir_jupyter.host import HostConfig

    with pytest.raises(InvalidOptions):
        HostConfig(idle_connection_timeout=0)
