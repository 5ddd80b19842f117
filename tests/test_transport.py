"""WebSocketClient and ConnectionPool against a real host on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from _timing import FakeClock, wait_until
from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.errors import ConnectionFailed, InvalidOptions
from fabstir_jupyter.protocol import Pong, ping_frame
from fabstir_jupyter.transport import ConnectionPool, WebSocketClient, redact_url

CONFIG = InferenceConfig(connection_timeout=2.0, pool_max_per_host=2, pool_idle_timeout=30.0)


async def test_client_connects_and_exchanges_frames(start_host):
    """The client waits for the greeting, times it, and can ping."""
    host = await start_host()
    async with WebSocketClient(host.http_url, CONFIG) as client:
        assert client.is_open and client.connected_latency > 0
        await client.send(ping_frame())
        assert isinstance(await client.recv_event(2.0), Pong)
    assert not client.is_open


async def test_refused_connection_is_connection_failed():
    """A closed port is CONNECTION_FAILED, retryable, naming the host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionFailed) as info:
        await WebSocketClient(f"ws://127.0.0.1:{port}/v1/ws", CONFIG).connect()
    assert info.value.retryable and f"127.0.0.1:{port}" in str(info.value)


async def test_wrong_path_is_connection_failed_with_the_status(start_host):
    """A host that answers 404 instead of upgrading gives a clear error."""
    host = await start_host()
    with pytest.raises(ConnectionFailed) as info:
        await WebSocketClient(host.http_url.replace("http", "ws") + "/elsewhere", CONFIG).connect()
    assert "404" in str(info.value)


async def test_silent_server_times_out_at_connection_timeout():
    """A TCP server that never upgrades fails within connection_timeout."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionFailed):
            await asyncio.wait_for(
                WebSocketClient(f"ws://127.0.0.1:{port}", CONFIG.replace(connection_timeout=0.3)).connect(), 5)
    finally:
        server.close()


def test_bad_url_is_invalid_options():
    """Unsupported schemes are refused before any I/O."""
    with pytest.raises(InvalidOptions):
        WebSocketClient("ftp://example.org", CONFIG)


def test_redact_url_drops_credentials_and_query():
    """URLs are logged without user info or query strings."""
    assert redact_url("wss://user:pw@h.example:8443/v1/ws?token=abc") == "wss://h.example:8443/v1/ws"


def test_redact_url_keeps_ipv6_brackets():
    """An IPv6 host prints as ws://[::1]:8196/v1/ws, not ws://::1:8196/v1/ws."""
    assert redact_url("ws://[::1]:8196/v1/ws") == "ws://[::1]:8196/v1/ws"
    assert redact_url("wss://u:p@[2001:db8::1]/v1/ws?t=1") == "wss://[2001:db8::1]/v1/ws"


async def test_busy_upgrade_is_host_busy_with_the_hosts_words(start_host):
    """An upgrade refused with 503 (the host's max_connections) is HOST_BUSY, retryable, quoting the host."""
    from fabstir_jupyter.errors import HostBusy

    host = await start_host(max_connections=1)
    async with WebSocketClient(host.http_url, CONFIG):
        with pytest.raises(HostBusy) as info:
            await WebSocketClient(host.http_url, CONFIG).connect()
    assert info.value.retryable
    assert info.value.message == "connect: host refused the websocket upgrade with HTTP 503: too many connections"


async def test_pool_reuses_idle_sockets(start_host):
    """A checked-in socket is handed out again."""
    host = await start_host()
    async with ConnectionPool(CONFIG) as pool:
        first = await pool.checkout(host.ws_url)
        pool.checkin(first)
        second = await pool.checkout(host.ws_url)
        assert second is first
        pool.checkin(second)
        assert pool.stats() == {"idle": 1, "in_use": 0}


async def test_pool_never_shares_a_socket_and_waits_at_the_per_host_limit(start_host):
    """Two checkouts get two sockets; a third waits until one is checked in."""
    host = await start_host()
    async with ConnectionPool(CONFIG) as pool:
        a = await pool.checkout(host.ws_url)
        b = await pool.checkout(host.ws_url)
        assert a is not b
        third = asyncio.create_task(pool.checkout(host.ws_url))
        for _ in range(10):  # let it run until it blocks: reaching the wait needs no I/O
            await asyncio.sleep(0)
        assert not third.done()
        pool.checkin(a)
        c = await asyncio.wait_for(third, 2)
        assert c is a  # the freed socket, not a third one
        pool.checkin(b), pool.checkin(c)


async def test_pool_times_out_when_no_slot_frees(start_host):
    """Waiting for a slot is bounded by connection_timeout."""
    host = await start_host()
    async with ConnectionPool(CONFIG.replace(pool_max_per_host=1, connection_timeout=0.2)) as pool:
        held = await pool.checkout(host.ws_url)
        with pytest.raises(ConnectionFailed) as info:
            await pool.checkout(host.ws_url)
        assert "busy" in str(info.value)
        pool.checkin(held)


async def test_pool_closes_sockets_idle_too_long(start_host):
    """Idle sockets older than pool_idle_timeout (fake clock) are closed, not reused."""
    host = await start_host()
    clock = FakeClock()
    async with ConnectionPool(CONFIG, clock=clock) as pool:
        old = await pool.checkout(host.ws_url)
        pool.checkin(old)
        clock.advance(31)
        fresh = await pool.checkout(host.ws_url)
        assert fresh is not old
        await wait_until(lambda: not old.is_open, what="the stale socket closed")
        pool.checkin(fresh)


async def test_unclean_checkin_closes_the_socket(start_host):
    """checkin(reusable=False) closes; checking in twice is harmless."""
    host = await start_host()
    async with ConnectionPool(CONFIG) as pool:
        client = await pool.checkout(host.ws_url)
        pool.checkin(client, reusable=False)
        pool.checkin(client)
        await wait_until(lambda: not client.is_open, what="the socket closed")
        assert pool.stats() == {"idle": 0, "in_use": 0}


async def test_closed_pool_refuses_checkouts(start_host):
    """After close, every socket is closed and checkout fails clearly."""
    host = await start_host()
    pool = ConnectionPool(CONFIG)
    client = await pool.checkout(host.ws_url)
    await pool.close()
    assert not client.is_open
    with pytest.raises(ConnectionFailed):
        await pool.checkout(host.ws_url)
