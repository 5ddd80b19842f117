"""WebSocket connections to hosts, and a pool that checks them out and in.

:class:`WebSocketClient` is one socket to one host: open (until the host's ``connected``
greeting), send frames, receive parsed events, close. It carries one stream at a time.

:class:`ConnectionPool` hands out sockets: ``checkout`` reuses an idle open socket for the host or
opens a new one (at most ``pool_max_per_host`` per host; more callers wait), ``checkin`` takes it
back (or closes it when it is no longer clean), idle sockets close after ``pool_idle_timeout``. A
session pins a socket simply by not checking it in until it ends. Unlike the brief's
``InferencePool`` (one shared socket per URL), two streams never share a socket. A socket may be
*bound* (``checkout(url, bound_to=...)``): it then only ever serves checkouts with the same binding,
which is how a paid job, tied to one socket for its whole life, keeps its socket.

Errors from ``websockets`` and ``ssl`` are translated here, once, into
:class:`~fabstir_jupyter.errors.FabstirError` subclasses.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sized
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
    PayloadTooBig,
    WebSocketException,
)

from . import _compat, protocol
from .config import InferenceConfig
from .errors import (
    AuthFailed,
    ConnectionFailed,
    FabstirError,
    HostBusy,
    InferenceTimeout,
    InvalidOptions,
    ProtocolError,
    RateLimitExceeded,
)
from .urls import redact_url

__all__ = ["WebSocketClient", "ConnectionPool", "ssl_context_for", "redact_url"]

logger = logging.getLogger("fabstir_jupyter.transport")
_FINISHED_IDS_KEPT = 16
wire_logger = logging.getLogger("fabstir_jupyter.wire")


class _RedactAuthorization(logging.Filter):
    """Hide the ``Authorization`` value in the ``websockets`` client's handshake debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() == "authorization":
            record.args = (args[0], "[redacted]")
        return True


_handshake_logger = logging.getLogger("websockets.client")
if not any(isinstance(f, _RedactAuthorization) for f in _handshake_logger.filters):
    _handshake_logger.addFilter(_RedactAuthorization())


def ssl_context_for(url: str, verify: bool | str | ssl.SSLContext) -> ssl.SSLContext | None:
    """Return the TLS context for a ``wss://`` URL (``None`` for ``ws://``).

    ``verify`` is ``True`` (system CAs, the default), a CA bundle path, an ``SSLContext``, or
    ``False`` (an explicit opt-out: no certificate or host name check).
    """
    if not url.startswith("wss://"):
        return None
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


_TLS_HINT = "if this host serves TLS, use its wss:// or https:// url"
_PLAIN_HINT = "if this host serves plain http, use its ws:// or http:// url"
_NOT_A_HOST_HINT = "check the url: a fabstir host upgrades to a websocket at /v1/ws"

# Reasons for connection errors that carry no text of their own.
_SILENT_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionResetError, "connection reset by the host"),
    (ConnectionAbortedError, "connection aborted"),
    (BrokenPipeError, "the host closed the connection"),
    (EOFError, "the host closed the connection"),
)
# TLS failures that mean "the other side does not speak TLS".
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING"}
)


def _reason(exc: BaseException) -> str:
    """Return a short, never empty, lower-case reason for an OS, TLS or stream error."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).lower().replace("_", " ")
        return str(exc) or "tls error"
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number > 0:
        return os.strerror(number).lower()  # "connection refused", not "Connect call failed ('::1', 9, 0, 0)"
    text = str(exc).strip()
    if text:
        return text
    for kind, reason in _SILENT_ERRORS:
        if isinstance(exc, kind):
            return reason
    return type(exc).__name__


def _refusal_text(response: Any) -> str:
    """The ``error.message`` a host put in the body of a refused upgrade, or ``""``."""
    try:
        body = json.loads(bytes(response.body or b"")[:4096])
        message = body["error"]["message"]
    except (ValueError, TypeError, KeyError):
        return ""
    return message[:200] if isinstance(message, str) else ""


def _retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return None


def _translate(exc: BaseException, url: str, during: str) -> FabstirError:
    """Map a foreign exception raised while talking to ``url`` to our error tree.

    Every message names the cause; a hint is added where the cause suggests a fix (a wrong scheme,
    a server that is not a fabstir host, a token, a certificate).
    """
    host = redact_url(url)
    if isinstance(exc, FabstirError):
        return exc
    if isinstance(exc, InvalidStatus):
        return _translate_status(exc.response, host, during)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectionFailed(
            f"{during}: the host's tls certificate is not trusted ({exc.verify_message})", host=host,
            hint="pass verify_tls=<CA bundle path> for a private CA, or verify_tls=False to opt out",
        )
    if url.startswith("wss://") and during == "connect" and isinstance(
        exc, (ssl.SSLError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError)
    ):
        # Raised while opening the TLS session, before any HTTP: a plain-http host resets or
        # answers with bytes that are not a TLS record.
        plain = not isinstance(exc, ssl.SSLError) or exc.reason in _NOT_TLS_REASONS
        return ConnectionFailed(f"{during}: tls handshake failed ({_reason(exc)})", host=host,
                                hint=_PLAIN_HINT if plain else None)
    if isinstance(exc, InvalidMessage):
        return _translate_bad_response(exc, url, host, during)
    if isinstance(exc, PayloadTooBig) or (
        # websockets >= 14 reports an oversize frame as the close it sent: 1009 "message too big".
        isinstance(exc, ConnectionClosed) and exc.sent is not None and exc.sent.code == 1009
    ):
        return ProtocolError(f"{during}: frame larger than max_frame_bytes", host=host)
    if isinstance(exc, ConnectionClosed):
        return ConnectionFailed(f"{during}: connection closed ({exc})", host=host)
    if isinstance(exc, InvalidURI):
        return InvalidOptions(f"invalid host url: {exc}", field="host_url")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ConnectionFailed(f"{during}: timed out", host=host)
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailed(f"{during}: {_reason(exc)}", host=host,
                                hint="nothing listens on this port: check the url's port and that the host runs")
    if isinstance(exc, socket.gaierror):
        return ConnectionFailed(f"{during}: {_reason(exc)}", host=host, hint="check the host name in the url")
    if isinstance(exc, (OSError, InvalidHandshake, WebSocketException, EOFError)):
        return ConnectionFailed(f"{during}: {_reason(exc)}", host=host)
    return ConnectionFailed(f"{during}: unexpected {type(exc).__name__}: {_reason(exc)}", host=host)


def _translate_status(response: Any, host: str, during: str) -> FabstirError:
    """An HTTP answer other than 101 to the upgrade: auth, busy, rate limit, or not a websocket endpoint."""
    status = response.status_code
    said = _refusal_text(response)
    detail = f": {said}" if said else ""
    if status in (401, 403):
        return AuthFailed(
            f"host refused the connection with HTTP {status}", host=host,
            hint="set InferenceConfig(auth_token=...) or auth_tokens={host_url: token} to this host's token",
        )
    if status == 503:
        return HostBusy(f"{during}: host refused the websocket upgrade with HTTP 503{detail}", host=host,
                        retry_after=_retry_after(response))
    if status == 429:
        return RateLimitExceeded(f"{during}: host refused the websocket upgrade with HTTP 429{detail}", host=host,
                                 retry_after=_retry_after(response))
    return ConnectionFailed(f"{during}: host answered HTTP {status} instead of a websocket upgrade{detail}",
                            host=host, hint=_NOT_A_HOST_HINT if status in (400, 404, 405, 426) else None)


def _translate_bad_response(exc: InvalidMessage, url: str, host: str, during: str) -> ConnectionFailed:
    """An answer to the upgrade that websockets could not read as HTTP/1.1."""
    cause = exc.__cause__ or exc.__context__
    text = "" if cause is None else str(cause)
    if "HTTP/" in text:
        # A status line came back, only not one websockets takes (http.server answers HTTP/1.0):
        # this server speaks http, but it is not a websocket endpoint.
        status_line = text[text.rfind("HTTP/"):][:120]
        return ConnectionFailed(f"{during}: host answered {status_line} instead of a websocket upgrade",
                                host=host, hint=_NOT_A_HOST_HINT)
    detail = f" ({_reason(cause)})" if cause is not None else ""
    # No http at all (the connection closed, or bytes that are not http): a TLS port does that to
    # a plain client.
    return ConnectionFailed(f"{during}: {exc}{detail}", host=host,
                            hint=_TLS_HINT if url.startswith("ws://") else None)


class WebSocketClient:
    """One WebSocket to one host's ``/v1/ws``; one stream at a time.

    Args:
        url: any host URL form :func:`fabstir_jupyter.protocol.ws_url` accepts.
        config: timeouts, frame size, compression and TLS settings.
        headers: extra HTTP headers for the upgrade (e.g. an ``Authorization`` bearer token); never logged.
    """

    def __init__(
        self,
        url: str,
        config: InferenceConfig | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = protocol.ws_url(url)
        self.config = config or InferenceConfig()
        self._headers = dict(headers or {})
        self._ws: ClientConnection | None = None
        self.connected_latency: float | None = None
        self.last_used = time.monotonic()
        self.in_use = False
        self.bound_to: str | None = None  # what this socket is reserved for (a paid job), if anything
        # Ids of requests finished on this socket: a host that sends frames for one of them after its
        # stream_end has them dropped instead of mixed into (or failing) the next answer.
        self.finished_ids: collections.deque[str] = collections.deque(maxlen=_FINISHED_IDS_KEPT)
        self._trace = self.config.trace

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<WebSocketClient {redact_url(self.url)} {state}>"

    @property
    def is_open(self) -> bool:
        """Whether the socket is open and usable."""
        from websockets.protocol import State

        return self._ws is not None and self._ws.state is State.OPEN

    async def connect(self) -> WebSocketClient:
        """Open the socket and wait for the host's ``connected`` greeting.

        The whole opening is bounded by ``connection_timeout``; ``connected_latency`` records the
        seconds it took.

        Raises:
            ConnectionFailed: unreachable host, refused upgrade, TLS failure or timeout (the message
                says how far the opening got: no TCP connection, no handshake, no greeting).
            AuthFailed: the host answered 401 or 403.
        """
        started = time.perf_counter()
        tcp_open: list[ClientConnection] = []

        def track(*args: Any, **kwargs: Any) -> ClientConnection:
            # asyncio builds the protocol once the TCP connection is accepted: a timeout after this
            # point means the host took the connection and then went silent.
            tcp_open.append(ClientConnection(*args, **kwargs))
            return tcp_open[-1]

        try:
            async with _compat.timeout(self.config.connection_timeout):
                self._ws = await connect(
                    self.url,
                    compression="deflate" if self.config.compression_enabled else None,
                    max_size=self.config.max_frame_bytes,
                    open_timeout=None,  # bounded by the timeout above
                    ping_interval=20,
                    ping_timeout=20,
                    close_timeout=2,
                    ssl=ssl_context_for(self.url, self.config.verify_tls),
                    additional_headers=self._headers or None,
                    user_agent_header="fabstir-jupyter",
                    # websockets documents "a wrapper or a subclass" here but annotates only a subclass
                    create_connection=track,  # type: ignore[arg-type]
                )
                first = protocol.parse_host_frame(await self._ws.recv())
        except BaseException as exc:
            upgraded = self._ws is not None
            self.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, TimeoutError) and exc.errno is None:  # ours, not the kernel's ETIMEDOUT
                limit = f"{self.config.connection_timeout:g} s"
                why = ("the host accepted the websocket but sent no 'connected' greeting" if upgraded
                       else "the host accepted the tcp connection but did not answer the websocket handshake"
                       if tcp_open else "no tcp connection")
                raise ConnectionFailed(f"connect: {why} within {limit}", host=redact_url(self.url)) from exc
            raise _translate(exc, self.url, "connect") from exc
        try:
            protocol.read_greeting(first)
        except FabstirError as error:
            await self.close()
            error.host = redact_url(self.url)
            raise
        self.connected_latency = time.perf_counter() - started
        self.last_used = time.monotonic()
        logger.debug("connected to %s in %.1f ms", redact_url(self.url), self.connected_latency * 1000)
        return self

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one JSON frame.

        Raises:
            ConnectionFailed: the socket is closed or breaks.
        """
        if self._ws is None:
            raise ConnectionFailed("send: not connected", host=redact_url(self.url))
        text = protocol.encode(frame)
        if self._trace:
            wire_logger.debug("→ %s %s", redact_url(self.url), _summarise(frame))
        try:
            await self._ws.send(text)
        except Exception as exc:
            raise _translate(exc, self.url, "send") from exc

    def frame_reader(self) -> tuple[Callable[[], Awaitable[str | bytes]], Sized]:
        """Return the socket's own receive and its buffer of unread frames, for a reader's hot loop.

        The receive is ``websockets``' ``recv`` (cancel-safe, no timeout, no parsing): the caller
        bounds the wait and passes what it raises to :meth:`receive_error`. The buffer is
        non-empty while frames that already arrived wait to be read, so the caller knows that the
        next receive will not wait; with a ``websockets`` that does not expose it, it stays empty.

        Raises:
            ConnectionFailed: the socket is not connected.
        """
        if self._ws is None:
            raise ConnectionFailed("receive: not connected", host=redact_url(self.url))
        unread: Sized
        try:
            unread = self._ws.recv_messages.frames.queue
        except AttributeError:
            unread = ()
        return (self._recv_traced if self._trace else self._ws.recv), unread

    def receive_error(self, exc: Exception) -> FabstirError:
        """Translate what the receive of :meth:`frame_reader` raised into our error tree."""
        return _translate(exc, self.url, "receive")

    async def _recv_traced(self) -> str | bytes:
        assert self._ws is not None
        data = await self._ws.recv()
        wire_logger.debug("← %s %s", redact_url(self.url), data[:200] if isinstance(data, str) else "<binary>")
        return data

    async def recv_raw(self) -> str | bytes:
        """Receive one frame as sent (no timeout: callers bound the wait).

        Raises:
            ConnectionFailed: the socket closed; ProtocolError: the frame is too large.
        """
        if self._ws is None:
            raise ConnectionFailed("receive: not connected", host=redact_url(self.url))
        try:
            return await (self._recv_traced() if self._trace else self._ws.recv())
        except Exception as exc:
            raise _translate(exc, self.url, "receive") from exc

    async def recv_event(self, timeout: float | None = None) -> protocol.HostEvent:
        """Receive and parse one frame, waiting at most ``timeout`` seconds.

        Raises:
            InferenceTimeout: nothing arrived in time; ConnectionFailed; ProtocolError.
        """
        try:
            async with _compat.timeout(timeout):
                data = await self.recv_raw()
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"no frame within {timeout:g} s", host=redact_url(self.url)) from None
        try:
            return protocol.parse_host_frame(data)
        except FabstirError as exc:
            exc.host = redact_url(self.url)
            raise

    def has_unread_frames(self) -> bool:
        """Whether frames already arrived that nobody has read (a host talking past stream_end)."""
        try:
            return len(self._ws.recv_messages.frames) > 0  # type: ignore[union-attr]
        except AttributeError:  # not connected, or a websockets version without this buffer
            return False

    async def close(self) -> None:
        """Close the socket with a normal close frame (bounded by a short timeout); idempotent."""
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await ws.close()
            except Exception:  # already broken: nothing to tell the caller
                ws.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without a close frame (a pending receive fails); idempotent."""
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.transport.abort()

    async def __aenter__(self) -> WebSocketClient:
        if not self.is_open:
            await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _summarise(frame: Mapping[str, Any]) -> str:
    """A log line for a frame that shows its shape but not the prompt text."""
    shown = {k: v for k, v in frame.items() if k not in ("request", "prompt")}
    request = frame.get("request")
    if isinstance(request, Mapping):
        shown["request"] = {k: v for k, v in request.items() if k not in ("prompt", "messages")}
        shown["request"]["prompt_chars"] = len(str(request.get("prompt", "")))
    return protocol.encode(shown)


class ConnectionPool:
    """Check WebSocket connections out and in, per host.

    Args:
        config: pool limits and socket settings.
        headers_for: returns extra upgrade headers for a host URL (auth tokens); optional.
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        config: InferenceConfig | None = None,
        *,
        headers_for: Callable[[str], Mapping[str, str] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or InferenceConfig()
        self._headers_for = headers_for if headers_for is not None else self.config.auth_headers
        self._clock = clock
        self._idle: dict[tuple[str, str | None], list[WebSocketClient]] = defaultdict(list)
        self._in_use: dict[str, set[WebSocketClient]] = defaultdict(set)
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        stats = self.stats()
        return f"<ConnectionPool idle={stats['idle']} in_use={stats['in_use']}>"

    def stats(self) -> dict[str, int]:
        """Counts of idle and checked-out sockets over all hosts."""
        return {
            "idle": sum(len(v) for v in self._idle.values()),
            "in_use": sum(len(v) for v in self._in_use.values()),
        }

    async def checkout(self, url: str, *, bound_to: str | None = None) -> WebSocketClient:
        """Return an open socket to ``url`` for the caller's exclusive use.

        Reuses an idle socket when one is open, else opens one. When the host already has
        ``pool_max_per_host`` sockets checked out, waits (within ``connection_timeout``) for one.
        ``bound_to`` (a paid job's id, say) asks for a socket reserved for that binding: an idle one
        is reused only by checkouts with the same binding, and a new one is reserved for it.

        Raises:
            ConnectionFailed: the pool is closed, no slot freed in time, or opening failed.
        """
        if self._closed:
            raise ConnectionFailed("connection pool is closed")
        key = protocol.ws_url(url)
        slots = self._slots.setdefault(key, asyncio.Semaphore(self.config.pool_max_per_host))
        try:
            async with _compat.timeout(self.config.connection_timeout):
                await slots.acquire()
        except asyncio.TimeoutError:
            raise ConnectionFailed(
                f"all {self.config.pool_max_per_host} sockets to this host stayed busy for "
                f"{self.config.connection_timeout:g} s", host=redact_url(key)) from None
        try:
            client = self._take_idle((key, bound_to))
            if client is None:
                headers = self._headers_for(key)
                client = WebSocketClient(key, self.config, headers=headers)
                client.bound_to = bound_to
                await client.connect()
        except BaseException:
            slots.release()
            raise
        client.in_use = True
        self._in_use[key].add(client)
        return client

    def _take_idle(self, key: tuple[str, str | None]) -> WebSocketClient | None:
        self._reap_idle()
        idle = self._idle.get(key)
        while idle:
            client = idle.pop()
            if client.is_open:
                return client
            self._close_later(client)
        return None

    def checkin(self, client: WebSocketClient, *, reusable: bool = True) -> None:
        """Take a socket back. ``reusable=False`` (a stream was not cleanly ended) closes it."""
        key = client.url
        if client not in self._in_use.get(key, ()):
            return  # checked in twice, or not ours
        self._in_use[key].discard(client)
        client.in_use = False
        client.last_used = self._clock()
        self._slots[key].release()
        if reusable and client.is_open and not self._closed:
            self._idle[(key, client.bound_to)].append(client)
        else:
            self._close_later(client)
        self._reap_idle()

    def discard(self, client: WebSocketClient) -> None:
        """Take a socket back and close it."""
        self.checkin(client, reusable=False)

    def _reap_idle(self) -> None:
        now = self._clock()
        for idle in self._idle.values():
            keep = []
            for client in idle:
                if client.is_open and now - client.last_used < self.config.pool_idle_timeout:
                    keep.append(client)
                else:
                    self._close_later(client)
            idle[:] = keep

    def _close_later(self, client: WebSocketClient) -> None:
        try:
            task = asyncio.get_running_loop().create_task(client.close())
        except RuntimeError:  # no loop: nothing to wait for, drop the transport
            if client._ws is not None:
                client._ws.transport.abort()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Close every socket, idle or checked out; later checkouts fail. Idempotent."""
        self._closed = True
        clients = [c for idle in self._idle.values() for c in idle]
        clients += [c for used in self._in_use.values() for c in used]
        self._idle.clear()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
