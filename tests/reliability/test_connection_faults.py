"""Issue 8: connection and probe failures against real peers on loopback say why, per host.

Peers: Python's ``http.server`` in a thread (speaks HTTP/1.0, is not a fabstir host), a closed
port (bound, then closed), a silent TCP listener (accepts, never answers), a plain ``HostServer``
reached with ``https://``/``wss://``, a ``HostServer`` whose connections are all held (the upgrade
gets 503 while ``/health`` answers) and a ``HostServer`` on the IPv6 loopback.
"""

from __future__ import annotations

import asyncio
import http.server
import random
import re
import socket
import threading

import httpx
import pytest

from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.errors import ConnectionFailed, HostBusy, NoHostsAvailable
from fabstir_jupyter.hosts import HostManager
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.transport import WebSocketClient
from fabstir_jupyter.usage import ListSink

T = 2.0  # connection timeout of these clients: every peer here answers (or not) at once
CONFIG = InferenceConfig(connection_timeout=T, first_token_timeout=5.0, idle_timeout=5.0,
                         backoff_initial=0.0, backoff_max=0.01, usage_db=":memory:")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def http_server():
    """Python's http.server on loopback, serving from a thread (HTTP/1.0, 404 for /v1/ws)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _closed_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on: bound together (so none repeats), then closed."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _closed_port() -> int:
    return _closed_ports(1)[0]


@pytest.fixture
async def silent_listener():
    """A TCP listener that accepts and never answers; its connections are closed afterwards."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in writers:
        writer.close()
    server.close()


async def _connect_error(url: str) -> ConnectionFailed:
    with pytest.raises(ConnectionFailed) as info:
        await asyncio.wait_for(WebSocketClient(url, CONFIG).connect(), 10)
    return info.value


def _reason(error: ConnectionFailed) -> str:
    """The text after ``connect: ``: the cause, which must never be empty."""
    assert error.message.startswith("connect: "), error.message
    return error.message.removeprefix("connect: ").strip()


# ---------------------------------------------------------------------------- transport: cause and hint


@pytest.mark.parametrize("form", ["https", "wss"])
async def test_tls_client_to_a_plain_host_names_the_tls_failure_and_the_fix(start_host, form):
    """https:// or wss:// to a plain-HTTP HostServer: 'tls handshake failed (...)' with a non-empty
    reason and the hint to use ws:// or http:// (was: 'connect: ' and nothing after it); the host
    keeps serving plain clients."""
    server = await start_host()
    url = f"{form}://127.0.0.1:{server.port}" + ("/v1/ws" if form == "wss" else "")
    error = await _connect_error(url)
    reason = _reason(error)
    assert re.fullmatch(r"tls handshake failed \(.+\)", reason), reason
    assert error.hint and "ws://" in error.hint and "http://" in error.hint
    assert error.host == f"wss://127.0.0.1:{server.port}/v1/ws"
    async with WebSocketClient(server.ws_url, CONFIG) as client:
        assert client.is_open


async def test_tls_client_to_http_server_names_the_tls_failure(http_server):
    """https:// to a plain http.server: the TLS error's own reason ('wrong version number'), with the hint."""
    error = await _connect_error(http_server.replace("http://", "https://"))
    assert _reason(error) == "tls handshake failed (wrong version number)"
    assert "ws://" in error.hint


async def test_http_server_is_named_not_a_fabstir_host_without_the_tls_hint(http_server):
    """ws:// to http.server: the message quotes its HTTP/1.0 answer, and the hint is about the url's
    path, not TLS (was: 'did not receive a valid HTTP response' + 'if this host serves TLS')."""
    error = await _connect_error(http_server)
    assert "HTTP/1.0 404" in _reason(error) and "instead of a websocket upgrade" in _reason(error)
    assert "TLS" not in error.hint and "/v1/ws" in error.hint


async def test_closed_port_says_connection_refused_with_a_hint():
    """A closed port: 'connection refused' (not asyncio's 'Connect call failed (...)'), and what to check."""
    error = await _connect_error(f"http://127.0.0.1:{_closed_port()}")
    assert _reason(error) == "connection refused"
    assert "port" in error.hint


async def test_silent_listener_says_what_did_not_arrive_within_the_timeout(silent_listener):
    """A listener that accepts and never answers says how far it got (was: 'timed out')."""
    error = await _connect_error(silent_listener)
    assert _reason(error) == (
        f"the host accepted the tcp connection but did not answer the websocket handshake within {T:g} s"
    )


async def test_every_connection_error_names_a_cause(start_host, http_server, silent_listener):
    """Over every peer, the message after 'connect:' is a real cause, never empty or a bare class name."""
    server = await start_host()
    urls = [http_server, http_server.replace("http://", "https://"), f"http://127.0.0.1:{_closed_port()}",
            silent_listener, f"https://127.0.0.1:{server.port}", f"wss://127.0.0.1:{server.port}/v1/ws"]
    for url in urls:
        reason = _reason(await _connect_error(url))
        assert len(reason) > 5 and not re.fullmatch(r"[A-Za-z]+Error", reason), (url, reason)


# ---------------------------------------------------------------------------- the probe path: why, per host


async def test_no_usable_host_names_each_host_and_why(start_host, http_server, silent_listener):
    """Five unusable hosts of five kinds: NO_HOSTS_AVAILABLE lists each (ws url, path kept) with its own
    reason, and each HostInfo keeps it in last_error (was: the same 'none of N hosts is reachable: URL'
    for all, path dropped)."""
    server = await start_host()
    closed = _closed_port()
    urls = {
        "http.server": http_server,
        "closed": f"http://127.0.0.1:{closed}",
        "silent": silent_listener,
        "https-to-plain": f"https://127.0.0.1:{server.port}",
        "with-path": f"http://127.0.0.1:{closed}/tenant/a",
    }
    expected = {
        "http.server": (f"{http_server.replace('http', 'ws')}/v1/ws", "HTTP/1.0 404"),
        "closed": (f"ws://127.0.0.1:{closed}/v1/ws", "connection refused"),
        "silent": (f"{silent_listener.replace('http', 'ws')}/v1/ws", "no websocket greeting within 1 s"),
        "https-to-plain": (f"wss://127.0.0.1:{server.port}/v1/ws", "tls handshake failed"),
        "with-path": (f"ws://127.0.0.1:{closed}/tenant/a/v1/ws", "connection refused"),
    }
    manager = HostManager(list(urls.values()), config=CONFIG, probe_timeout=1.0)
    try:
        with pytest.raises(NoHostsAvailable) as info:
            await asyncio.wait_for(manager.select_best_host(), 15)
    finally:
        await manager.aclose()
    message = info.value.message
    assert message.startswith("none of 5 hosts is usable: ")
    entries = message.removeprefix("none of 5 hosts is usable: ").split("; ")
    assert len(entries) == 5
    by_url = {h.ws_url: h for h in manager.hosts}
    for name, (ws, reason) in expected.items():
        entry = next((e for e in entries if e.startswith(ws + " (")), None)
        assert entry is not None, (name, ws, message)
        assert "CONNECTION_FAILED: connect: " in entry and reason in entry, (name, entry)
        host = by_url[ws]
        assert host.health == "unreachable" and host.last_error.code == "CONNECTION_FAILED"
        assert reason in host.last_error.message
        assert host.last_error.__traceback__ is None and host.last_error.__cause__ is None  # nothing held alive


async def test_one_unusable_host_gives_its_reason_and_hint(start_host):
    """One host reached with https:// that serves plain http: the message names it and why, and the
    error carries the host's hint."""
    server = await start_host()
    manager = HostManager([f"https://127.0.0.1:{server.port}"], config=CONFIG, probe_timeout=2.0)
    try:
        with pytest.raises(NoHostsAvailable) as info:
            await manager.select_best_host()
    finally:
        await manager.aclose()
    assert info.value.message.startswith(f"no usable host: wss://127.0.0.1:{server.port}/v1/ws (CONNECTION_FAILED: "
                                         "connect: tls handshake failed (")
    assert "ws://" in info.value.hint


async def test_many_unusable_hosts_are_listed_up_to_five_and_counted():
    """Eight closed ports: the first five are listed with reasons, then 'and 3 more'."""
    ports = _closed_ports(8)
    manager = HostManager([f"http://127.0.0.1:{p}" for p in ports], config=CONFIG, probe_timeout=2.0)
    try:
        with pytest.raises(NoHostsAvailable) as info:
            await manager.select_best_host()
    finally:
        await manager.aclose()
    message = info.value.message
    assert message.startswith("none of 8 hosts is usable: ") and message.endswith("; and 3 more")
    assert message.count("(CONNECTION_FAILED: connect: connection refused)") == 5


async def _connections_drop_below(server, count: int, timeout: float = 5.0) -> bool:
    """Poll the host's /health until it counts fewer than ``count`` connections (the close is async)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while asyncio.get_running_loop().time() < deadline:
            if (await http.get(server.http_url + "/health")).json()["connections"] < count:
                return True
            await asyncio.sleep(0.02)
    return False


async def _hold_all_slots(server, count: int) -> list[WebSocketClient]:
    return [await WebSocketClient(server.ws_url, CONFIG).connect() for _ in range(count)]


async def test_full_host_is_host_busy_not_no_hosts_available(start_host):
    """A host whose max_connections are all held: /health answers, the probe marks it busy with
    HOST_BUSY (was: unreachable, NO_HOSTS_AVAILABLE); it stays selectable, a request fails with the
    retryable HOST_BUSY after its retries, and once a slot frees the same manager is served."""
    server = await start_host(max_connections=3)
    held = await _hold_all_slots(server, 3)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            health = (await http.get(server.http_url + "/health")).json()
        assert health["connections"] == 3
        manager = InferenceManager([server.http_url], CONFIG.replace(max_retries=2), usage=ListSink())
        try:
            assert await manager.host_manager.select_best_host() is manager.host_manager.hosts[0]
            host = manager.host_manager.hosts[0]
            assert host.health == "busy" and host.reachable
            assert host.last_error.code == "HOST_BUSY" and "503" in host.last_error.message
            assert "too many connections" in host.last_error.message  # the host's own words
            with pytest.raises(HostBusy) as info:
                await manager.ainfer("hello", max_tokens=2)
            assert info.value.retryable and info.value.code == "HOST_BUSY"
            assert host.health == "busy" and host.requests == 3 and host.failures == 3  # 1 try + 2 retries
            await held.pop().close()
            assert await _connections_drop_below(server, 3)
            result = await manager.ainfer("hello", max_tokens=2)
            assert result.text and host.health == "ok" and host.last_error is None
        finally:
            await manager.aclose()
    finally:
        for client in held:
            await client.close()


async def test_busy_host_is_chosen_only_after_free_ones(start_host):
    """Of a busy and a free host, selection always picks the free one (40 draws, random tie-breaks)."""
    busy, free = await start_host(max_connections=1), await start_host()
    held = await _hold_all_slots(busy, 1)
    manager = HostManager([busy.http_url, free.http_url], config=CONFIG, rng=random.Random(1))
    try:
        picks = [await manager.select_best_host() for _ in range(40)]
        assert {h.api_url for h in picks} == {free.http_url}
        assert manager.find(busy.http_url).health == "busy"
    finally:
        await manager.aclose()
        for client in held:
            await client.close()


# ---------------------------------------------------------------------------- IPv6


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


@needs_ipv6
async def test_ipv6_host_prints_with_brackets(start_host):
    """A HostServer on ::1 is reached by its bracketed url; errors for an IPv6 host print
    ws://[::1]:PORT/v1/ws (was: ws://::1:PORT/v1/ws) with the plain cause."""
    server = await start_host(host="::1")
    assert server.ws_url.startswith("ws://[::1]:")
    async with WebSocketClient(server.ws_url, CONFIG) as client:
        assert client.is_open and "[::1]" in repr(client)
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    error = await _connect_error(f"http://[::1]:{port}")
    assert error.host == f"ws://[::1]:{port}/v1/ws"
    assert str(error) == f"[CONNECTION_FAILED] host ws://[::1]:{port}/v1/ws: connect: connection refused"
    manager = HostManager([f"http://[::1]:{port}"], config=CONFIG, probe_timeout=2.0)
    try:
        with pytest.raises(NoHostsAvailable) as info:
            await manager.select_best_host()
    finally:
        await manager.aclose()
    assert f"ws://[::1]:{port}/v1/ws (CONNECTION_FAILED" in info.value.message
