"""The reference host: WebSocket protocol at ``/v1/ws`` and a few HTTP endpoints.

:class:`HostServer` speaks spec/PROTOCOL.md sections 2, 3, 3a and 5 over ``websockets`` (asyncio):
it parses frames with :func:`~fabstir_jupyter.protocol.parse_client_frame`, enforces the limits of
:class:`HostConfig` with coded errors, runs one stream per connection on a backend
(:mod:`fabstir_jupyter.host.backends`), cuts stop sequences host-side, and always ends a stream
with ``usage`` and ``finish_reason``. Nothing is dropped silently, except in ``legacy`` mode, which
imitates a production host on purpose (spec §4) so clients can be tested against its quirks.

Replies to a request:

* rejected before it starts (rate limit, bad option, unknown model or session, host busy, a second
  request on a busy connection): one ``error`` frame carrying the request's ``id``;
* started: ``stream_chunk`` × N then ``stream_end``; a failure after the start sends ``error``
  then ``stream_end(reason="error")``; ``stream_cancel`` ends it with ``reason="cancelled"``, and
  the frame after the cancel is read only once that ``stream_end`` is out (as production does:
  a client may "stop, then send" without being told the connection is busy).

With ``HostConfig.operator_key`` the host also serves encrypted sessions (spec §6): per connection a
:class:`~fabstir_jupyter.encryption.HostEncryption` holds the session keys (bounded lifetime, wiped
when the connection closes); ``encrypted_session_init`` is acknowledged with ``session_init_ack``;
``encrypted_message`` runs through the same admission, limits and session memory as a plaintext
prompt, and its answer is ``encrypted_chunk`` × N (the last one empty and ``final``),
``encrypted_response`` and a plaintext ``stream_end``. ``error``, ``stream_end`` and
``stream_cancel`` stay plaintext. Without a key an encrypted frame gets ``ENCRYPTION_NOT_SUPPORTED``.

With ``HostConfig.payment`` the host is paid (spec §10; :mod:`fabstir_jupyter.host.payments`): a
``session_init`` carrying ``job_id`` (or an encrypted init whose payload carries ``jobId``) is
answered with a coded error instead of an ack unless the job is usable by this host (the host
serves while its chain client connects in the background; a job check waits for it); a generation
request is served only in a session bound to such a job on this connection (``PAYMENT_REQUIRED``
otherwise, stateless ``inference`` included); the tokens streamed are metered per job and proven
in the background (the stream never waits for the chain); a stream ends with ``BUDGET_EXCEEDED``
before the token its job's deposit could not pay for; and each job is settled when the connection
that carried it closes.

HTTP: ``GET /health``, ``GET /v1/version`` (with ``max_concurrent_streams``, the limit above which
a request gets ``HOST_BUSY``), ``GET /v1/models``; every other path but ``/v1/ws`` is a 404. With
``HostConfig.auth_token`` the upgrade to ``/v1/ws`` and ``/v1/models`` need
``Authorization: Bearer <token>`` (HTTP 401 otherwise, before any frame is read); ``/health`` and
``/v1/version`` stay public. With ``HostConfig.certfile`` all of it is served over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import http
import json
import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import _compat
from ..errors import (
    FabstirError,
    HostBusy,
    HostError,
    InvalidOptions,
    InvalidPrompt,
    ModelNotAvailable,
    PaymentRequired,
    RateLimitExceeded,
    SessionNotFound,
)
from ..limits import TokenBucket
from ..protocol import (
    FEATURES,
    WS_PATH,
    InferenceRequest,
    Ping,
    PromptRequest,
    SessionInit,
    StopMatcher,
    StreamCancel,
    Usage,
    chunk_frame,
    connected_frame,
    decode_frame,
    encode,
    end_frame,
    error_frame,
    parse_client_frame,
    pong_frame,
    session_init_ack_frame,
)
from .backends import AbortConnection, Backend, GenerationParams, GenerationStats
from .config import DEFAULT_VERSION, HostConfig
from .legacy import (
    PRODUCTION_DEFAULT_MAX_TOKENS,
    legacy_encrypted_error_frames,
    legacy_encrypted_final_frames,
    legacy_encrypted_init_ack,
    legacy_encrypted_rejection_frames,
    legacy_encrypted_reply,
    legacy_error_frame,
    legacy_final_frames,
    legacy_rejection_frames,
    production_job_id,
    production_validation_error,
)
from .limits import AddressLimiter, HostSession, SessionStore, per_minute_bucket
from .metering import JobMeter
from .payments import PAID_FEATURE, PaymentManager

if TYPE_CHECKING:  # the crypto extra is imported only by a host that has a key
    from ..encryption import EncryptedPrompt, EncryptedReplyWriter, EncryptedSessionInit, HostEncryption

__all__ = ["DEFAULT_VERSION", "HostConfig", "HostServer"]

#: A generation request: stateless, in a plaintext session, or decrypted from an ``encrypted_message``.
_Request = Union[InferenceRequest, PromptRequest, "EncryptedPrompt"]

logger = logging.getLogger("fabstir_jupyter.host")

DEFAULT_TEMPERATURE = 0.7
_ENCRYPTED_TYPES = ("encrypted_session_init", "encrypted_message")
_WRITE_LIMIT = 1 << 16  # bytes a connection's write buffer holds before send() waits for the client
# The longest text frame whose send cannot wait when the write buffer is empty: 4 UTF-8 bytes a
# character, plus room for the frame header and a deflate block that did not shrink.
_UNBLOCKED_FRAME_CHARS = (_WRITE_LIMIT - 64) // 4
AUTH_FEATURE = "auth-bearer"
#: Listed by /v1/version when the host has an operator key and serves encrypted sessions.
E2EE_FEATURE = "e2ee"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class _RedactSecretHeaders(logging.Filter):
    """Hide the values of credential headers in the ``websockets`` handshake debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str) \
                and args[0].lower() in _SECRET_HEADERS:
            record.args = (args[0], "[redacted]")
        return True


class _DropFrames(logging.Filter):
    """Drop websockets' per-frame DEBUG lines ("< TEXT '...'"), which show prompt text."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.DEBUG and record.msg in ("< %s", "> %s"))


def _websockets_logger(name: str, *, frames: bool) -> logging.Logger:
    ws_logger = logging.getLogger(name)
    if not any(isinstance(f, _RedactSecretHeaders) for f in ws_logger.filters):
        ws_logger.addFilter(_RedactSecretHeaders())
    if not frames and not any(isinstance(f, _DropFrames) for f in ws_logger.filters):
        ws_logger.addFilter(_DropFrames())
    return ws_logger


# Frames (and so prompts) reach the log only for a host started with log_prompts.
_ws_logger = _websockets_logger("fabstir_jupyter.host.websockets", frames=False)
_ws_frame_logger = _websockets_logger("fabstir_jupyter.host.wire", frames=True)


@dataclass(eq=False)
class _Stream:
    """One running request on a connection."""

    request_id: str | None
    params: GenerationParams
    stream: bool
    context_window: int
    session: HostSession | None = None
    memory: SessionStore | None = None  # the store ``session`` lives in
    writer: EncryptedReplyWriter | None = None  # encrypts the reply of an encrypted request
    meter: JobMeter | None = None  # the paid job the request's tokens count against
    turn_input: list[tuple[str, str]] = field(default_factory=list)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    text: list[str] = field(default_factory=list)
    generated: int = 0
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    generating: bool = True
    forced: bool = False
    finished: bool = False
    started: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Connection:
    """One client WebSocket."""

    ws: ServerConnection
    address: str
    bucket: TokenBucket | None  # None: no per-connection limit
    stream: _Stream | None = None
    session_id: str | None = None
    encryption: HostEncryption | None = None  # None: the host has no operator key
    # The encrypted session memories this connection's inits were granted, by session id: a message
    # uses a memory only while it is still the one its init was given (see _bind_memory).
    memories: OrderedDict[str | None, HostSession] = field(default_factory=OrderedDict)
    # A paid host's jobs bound by this connection's inits, by session id.
    jobs: dict[str | None, JobMeter] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_activity: float = field(default_factory=time.monotonic)  # last frame in, or end of a stream


class _ConnectionGone(Exception):
    """Raised when a frame cannot be delivered: the client left or stopped reading."""


class HostServer:
    """The reference host: serve a backend over the WebSocket protocol and HTTP.

    Use as ``async with HostServer(config, backend) as server:`` or call :meth:`start` and
    :meth:`close`. The server owns the backend: :meth:`close` closes it too.

    Args:
        config: limits and behaviour (default: :class:`HostConfig`).
        backend: what generates tokens (default: a fast ``ScriptedBackend``).
    """

    def __init__(self, config: HostConfig | None = None, backend: Backend | None = None) -> None:
        if backend is None:
            from .scripted import ScriptedBackend

            backend = ScriptedBackend()
        self.config = config or HostConfig()
        self.backend = backend
        self.sessions = SessionStore(
            max_sessions=self.config.max_sessions,
            max_messages=self.config.max_session_messages,
            idle_timeout=self.config.session_idle_timeout,
        )
        # Encrypted sessions remember their turns apart from plaintext ones: a plaintext prompt
        # naming an encrypted session's id must never see (and so echo) its transcript.
        self.encrypted_sessions = SessionStore(
            max_sessions=self.config.max_sessions,
            max_messages=self.config.max_session_messages,
            idle_timeout=self.config.session_idle_timeout,
        )
        self._address_limiter = AddressLimiter(self.config.rate_limit_per_address)
        payment, key = self.config.payment, self.config.operator_key
        self.payments = PaymentManager(payment, key) if payment is not None and key is not None else None
        self._server: Server | None = None
        self._connections: set[_Connection] = set()
        self._active = 0
        self._closed = asyncio.Event()
        self.port: int = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the backend and bind the listening socket; :attr:`port` is set on return.

        Raises:
            RuntimeError: the server was already started.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("host server already started")
        ssl_context = self._ssl_context()
        if self.payments is not None:
            await self.payments.start()  # connects in the background: job checks wait for it
        await self.backend.start()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            compression="deflate" if self.config.compression else None,
            max_size=self.config.max_frame_bytes,
            max_queue=16,
            write_limit=_WRITE_LIMIT,
            logger=_ws_frame_logger if self.config.log_prompts else _ws_logger,
            ssl=ssl_context,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("listening on %s (backend %s)", self.ws_url, type(self.backend).__name__)
        key = self.config.operator_key
        if key is not None:
            logger.info("encrypted sessions on: operator address %s, public key %s", key.address, key.public_key)
        else:
            logger.info("encrypted sessions off: no operator key")

    def _ssl_context(self) -> ssl.SSLContext | None:
        """Load ``certfile``/``keyfile`` into a server TLS context (``None`` without TLS).

        Raises:
            OSError: a file cannot be read; ssl.SSLError: the certificate or key is not valid PEM.
        """
        if self.config.certfile is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.config.certfile, self.config.keyfile)
        return context

    async def close(self) -> None:
        """Stop listening, cancel every stream, close every connection (1001), close the backend.

        A paid host first settles the jobs of those connections, waiting at most
        ``PaymentConfig.shutdown_timeout``.
        """
        if self._server is not None and not self._closed.is_set():
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        self._closed.set()
        if self.payments is not None:
            await self.payments.aclose()  # settles the jobs of the connections just closed (bounded)
        await self.backend.close()

    async def serve_forever(self) -> None:
        """Start if needed, then serve until :meth:`close` is called (or the task is cancelled)."""
        if self._server is None:
            await self.start()
        await self._closed.wait()

    async def __aenter__(self) -> HostServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def ws_url(self) -> str:
        """The WebSocket URL clients use (``ws://127.0.0.1:PORT/v1/ws`` for a wildcard bind; ``wss://`` with TLS)."""
        scheme = "wss" if self.config.tls else "ws"
        return f"{scheme}://{self._url_host()}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        """The HTTP base URL of the host (no path; ``https://`` with TLS)."""
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self._url_host()}:{self.port}"

    def _url_host(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    @property
    def active_streams(self) -> int:
        """Streams admitted and not finished, on the whole host."""
        return self._active

    @property
    def features(self) -> list[str]:
        """What ``/v1/version`` lists: the guarantees of this host and backend."""
        if self.config.legacy:
            return []
        features = [f for f in FEATURES if f not in self.backend.unsupported_features]
        if self.config.auth_token is not None:
            features.append(AUTH_FEATURE)
        if self.config.operator_key is not None:
            features.append(E2EE_FEATURE)
        if self.payments is not None:
            features.append(PAID_FEATURE)
        return features

    # ------------------------------------------------------------------ HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in (WS_PATH, "/v1/models") and not self._authorized(request):
            logger.info("refused %s from %s: missing or wrong bearer token", path, _remote(connection))
            return _json_response(
                401,
                {"error": {"code": "AUTH_FAILED", "message": "this host needs Authorization: Bearer <token>"}},
                extra=[("WWW-Authenticate", 'Bearer realm="fabstir-host"')],
            )
        if path == WS_PATH:
            if len(self._connections) >= self.config.max_connections:
                return _json_response(503, {"error": {"code": "HOST_BUSY", "message": "too many connections"}})
            return None
        if path == "/health":
            return _json_response(200, self._health())
        if path == "/v1/version":
            return _json_response(200, self._version())
        if path == "/v1/models":
            if self.config.legacy:
                return _json_response(503, {"error": "model listing unavailable"})
            return _json_response(200, {"models": [m.to_dict() for m in self.backend.models]})
        return _json_response(404, {"error": {"code": "NOT_FOUND", "message": f"no route for {path[:200]}"}})

    def _authorized(self, request: Request) -> bool:
        """Whether the request carries the configured bearer token (always, when none is set)."""
        expected = self.config.auth_token
        if expected is None:
            return True
        values = request.headers.get_all("Authorization")
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), expected.encode())

    def _version(self) -> dict[str, Any]:
        """What ``/v1/version`` says: the version, the features and, except in legacy mode (production
        nodes do not say it), ``max_concurrent_streams``, so that clients schedule to the host's limit."""
        body: dict[str, Any] = {"version": self.config.version, "features": self.features}
        if not self.config.legacy:
            body["max_concurrent_streams"] = self.config.max_concurrent_streams
        return body

    def _health(self) -> dict[str, Any]:
        if self.config.legacy:
            return {"status": "degraded"}
        backend = self.backend
        status = "error" if backend.load_error else ("ok" if backend.loaded else "loading")
        body: dict[str, Any] = {
            "status": status,
            "model_loaded": backend.loaded,
            "models": [m.id for m in backend.models],
            "queue_depth": backend.queue_depth,
            "active_streams": self._active,
            "max_concurrent_streams": self.config.max_concurrent_streams,
            "connections": len(self._connections),
            "sessions": len(self.sessions),
            "encrypted_sessions": len(self.encrypted_sessions),
            "version": self.config.version,
        }
        if backend.load_error:
            body["error"] = backend.load_error
        if self.payments is not None:
            body["payments"] = self.payments.health()
        return body

    # ------------------------------------------------------------------ WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        remote = ws.remote_address
        address = str(remote[0]) if isinstance(remote, tuple) and remote else "unknown"
        conn = _Connection(ws, address, per_minute_bucket(self.config.rate_limit_per_connection),
                           encryption=self._new_encryption())
        self._connections.add(conn)
        logger.debug("connection from %s", address)
        try:
            await self._send(conn, connected_frame())
            while await self._next_frame(conn):
                pass
        except (ConnectionClosed, _ConnectionGone):
            pass
        finally:
            self._connections.discard(conn)
            job = conn.stream
            try:
                if job is not None and job.task is not None:
                    job.cancel.set()
                    job.task.cancel()
                    await asyncio.gather(job.task, return_exceptions=True)
            finally:
                if self.payments is not None:
                    self.payments.release(conn)  # settle its jobs, now that their counts are final
            conn.jobs.clear()
            if conn.encryption is not None:
                conn.encryption.wipe()  # zero every session key of the connection
            conn.memories.clear()
            logger.debug("connection from %s closed", address)

    def _new_encryption(self) -> HostEncryption | None:
        """A connection's key store, or None when the host has no operator key."""
        key = self.config.operator_key
        if key is None:
            return None
        from ..encryption import HostEncryption

        return HostEncryption(key, key_lifetime=self.config.session_key_lifetime,
                              max_keys=self.config.max_session_keys)

    async def _next_frame(self, conn: _Connection) -> bool:
        """Handle the next frame; return False once the connection has been idle too long.

        A connection counts as idle while no stream runs on it and no frame arrives for
        ``idle_connection_timeout`` seconds; it is then closed with 1001 ("going away").
        """
        limit = self.config.idle_connection_timeout
        while True:
            try:
                async with _compat.timeout(limit):
                    data = await conn.ws.recv()
                break
            except asyncio.TimeoutError:
                if conn.stream is None and time.monotonic() - conn.last_activity >= limit:
                    logger.debug("closing a connection from %s idle for %g s", conn.address, limit)
                    await conn.ws.close(1001, "idle")
                    return False
        conn.last_activity = time.monotonic()
        await self._on_frame(conn, data)
        return True

    async def _on_frame(self, conn: _Connection, data: str | bytes) -> None:
        # Decode once, with the protocol layer's depth guard: a frame that fails later is still
        # known as an object (for its id and type), and none is ever decoded without the guard.
        obj: dict[str, Any] | None = None
        try:
            obj = decode_frame(data)
            if obj["type"] in _ENCRYPTED_TYPES:
                await self._on_encrypted(conn, obj)
                return
            event = parse_client_frame(obj)
        except FabstirError as exc:
            await self._reject_frame(conn, obj, exc)
            return
        if isinstance(event, Ping):
            if not self.config.legacy:
                await self._send(conn, pong_frame())
        elif isinstance(event, StreamCancel):
            await self._cancel_and_wait(conn)
        elif conn.stream is not None:
            if self.config.legacy:
                logger.debug("legacy: dropped a %s on a busy connection", type(event).__name__)
                return
            await self._send(conn, error_frame(
                HostBusy.code,
                "a stream is already running on this connection; "
                "wait for stream_end, send stream_cancel or use another connection",
                request_id=getattr(event, "id", None),
            ))
        elif isinstance(event, SessionInit):
            if not await self._bind_job(conn, event.session_id, event.job_id, event.chain_id, event.id):
                return
            self.sessions.open(event.session_id, job_id=event.job_id, chain_id=event.chain_id)
            conn.session_id = event.session_id
            await self._send(conn, self._session_init_ack(event))
        else:
            await self._start(conn, event)

    async def _bind_job(self, conn: _Connection, session_id: str | None, job_id: str | None,
                        chain_id: int | None, request_id: str | None) -> bool:
        """On a paid host, check the job an init names and bind it to the session on this connection.

        An init without a job leaves the session unpaid (its requests get ``PAYMENT_REQUIRED``).
        Returns False when the init was refused: the client got a coded error (naming the session)
        instead of an ack.
        """
        if self.payments is None:
            return True
        conn.jobs.pop(session_id, None)
        if not job_id:
            return True
        try:
            meter = await self.payments.open_job(job_id, chain_id, conn)
        except FabstirError as exc:
            logger.info("job %s refused for a session: %s", job_id, exc.code)
            frame = self._error_frame(exc.code, exc.message, request_id)
            if session_id is not None:
                frame["session_id"] = session_id
            await self._send(conn, frame)
            return False
        conn.jobs[session_id] = meter
        return True

    def _session_init_ack(self, event: SessionInit) -> dict[str, Any]:
        # Production echoes job_id as a number (null when it is not one).
        job_id: int | str | None = production_job_id(event.job_id)
        if self.config.legacy:
            return session_init_ack_frame(event.session_id, job_id=job_id, chain_id=event.chain_id,
                                          request_id=event.id, message="Session initialized successfully")
        if job_id is None:
            job_id = event.job_id  # a non-numeric id is kept as sent
        return session_init_ack_frame(event.session_id, job_id=job_id, chain_id=event.chain_id, request_id=event.id)

    async def _reject_frame(self, conn: _Connection, obj: dict[str, Any] | None, exc: FabstirError) -> None:
        """Answer a frame that could not be parsed (``obj``: its JSON object, if it decoded)."""
        if self.config.legacy:
            logger.debug("legacy: dropped a malformed frame (%s)", exc.code)
            return
        await self._send(conn, error_frame(exc.code, exc.message, request_id=_request_id(obj)))

    # ------------------------------------------------------------------ encrypted frames

    async def _on_encrypted(self, conn: _Connection, obj: dict[str, Any]) -> None:
        """Serve an ``encrypted_session_init`` or ``encrypted_message`` (spec §6)."""
        legacy = self.config.legacy
        if conn.encryption is None:
            if legacy:
                reply = legacy_encrypted_reply(obj, conn.session_id)
                assert reply is not None  # None only for frames that are not encrypted ones (see _on_frame)
            else:
                reply = error_frame("ENCRYPTION_NOT_SUPPORTED",
                                    "this host has no encryption key; use session_init", request_id=_request_id(obj))
            await self._send(conn, reply)
            return
        if conn.stream is not None:  # as for plaintext frames: decrypt nothing, use no message index
            if legacy:
                logger.debug("legacy: dropped an %s on a busy connection", obj["type"])
                return
            await self._send(conn, error_frame(
                HostBusy.code,
                "a stream is already running on this connection; "
                "wait for stream_end, send stream_cancel or use another connection",
                request_id=_request_id(obj),
            ))
            return
        try:
            event = conn.encryption.receive(obj, now=time.monotonic())
        except FabstirError as exc:
            logger.info("%s refused: %s", obj["type"], exc.code)
            if legacy:
                frames = legacy_encrypted_error_frames(obj, exc, conn.session_id)
            else:
                frame = error_frame(exc.code, exc.message, request_id=_request_id(obj))
                session_id = obj.get("session_id")
                if obj["type"] == "encrypted_session_init" and isinstance(session_id, str):
                    frame["session_id"] = session_id  # production names the session in init errors
                frames = [frame]
            async with conn.send_lock:
                for frame in frames:
                    await self._send_locked(conn, encode(frame))
            return
        from ..encryption import EncryptedSessionInit

        if isinstance(event, EncryptedSessionInit):
            await self._on_encrypted_init(conn, event, obj)
        else:
            await self._start(conn, event)

    async def _on_encrypted_init(self, conn: _Connection, event: EncryptedSessionInit, obj: dict[str, Any]) -> None:
        """Bind the session's job (on a paid host) and memory to this connection and acknowledge the init."""
        if not await self._bind_job(conn, event.session_id, event.job_id, event.chain_id, event.id):
            return
        if event.session_id is not None:
            conn.session_id = event.session_id  # as production: the connection's session from now on
            self._bind_memory(conn, event)
        logger.info("encrypted session %s initialised (job %s)", event.session_id, event.job_id)
        if self.config.legacy:
            ack = legacy_encrypted_init_ack(event, obj)
        else:
            job_id: int | str | None = production_job_id(event.job_id)
            ack = session_init_ack_frame(
                event.session_id if event.session_id is not None else "unknown",
                job_id=event.job_id if job_id is None else job_id,
                chain_id=event.chain_id,
                request_id=event.id,
                message="encrypted session initialised",
            )
            ack["client_address"] = event.signer_addresses[0]
        await self._send(conn, ack)

    def _bind_memory(self, conn: _Connection, event: EncryptedSessionInit) -> None:
        """Give the init's connection the session's memory: kept across re-inits by the same signer.

        The production SDK re-inits before every prompt, so the transcript must outlive an init.
        But an id alone must not open someone else's conversation: the memory is kept only when a
        signer address recovered from this init's signature is one recovered from every earlier
        init of that session; otherwise the session starts afresh (nothing is refused: a recovered
        address proves nothing by itself, it only keeps conversations apart). A connection whose
        memory was replaced this way runs its next messages without memory.
        """
        assert event.session_id is not None
        signers = frozenset(event.signer_addresses)
        session = self.encrypted_sessions.get(event.session_id)
        if session is None or not session.owners & signers:
            session = self.encrypted_sessions.open(event.session_id, job_id=event.job_id, chain_id=event.chain_id)
            session.owners = signers
        else:
            session.owners &= signers
            session.job_id = event.job_id
        conn.memories.pop(event.session_id, None)
        conn.memories[event.session_id] = session
        while len(conn.memories) > self.config.max_session_keys:
            conn.memories.popitem(last=False)

    def _encrypted_memory(self, conn: _Connection, session_id: str | None) -> HostSession | None:
        """The memory an encrypted message of ``session_id`` may use (None: answer it without memory)."""
        sid = conn.session_id if session_id is None else session_id
        bound = conn.memories.get(sid)
        if bound is None or self.encrypted_sessions.get(bound.session_id) is not bound:
            return None  # never bound, evicted, or re-opened by another signer
        return bound

    async def _cancel_and_wait(self, conn: _Connection) -> None:
        """Cancel the connection's stream and wait until its last frame is out.

        The next frame on the socket is read only then, so a client that sends its next request
        right after ``stream_cancel`` (production's SDK does) is served in order, never answered
        ``HOST_BUSY`` nor dropped. The wait is bounded: the backend gets ``cancel_grace`` seconds to
        stop before its task is interrupted, and a final frame that the client does not read drops
        the connection after ``send_timeout``.
        """
        job = conn.stream
        if job is None:
            return
        self._cancel(job)
        if job.task is not None:
            limit = self.config.cancel_grace + self.config.send_timeout + 1.0
            done, _ = await asyncio.wait({job.task}, timeout=limit)
            if not done:
                logger.warning("request %s: still running %g s after its cancel", job.request_id, limit)

    def _cancel(self, job: _Stream | None) -> None:
        if job is None or job.cancel.is_set():
            return
        job.cancel.set()
        job.timer = asyncio.get_running_loop().call_later(self.config.cancel_grace, self._force_cancel, job)

    @staticmethod
    def _force_cancel(job: _Stream) -> None:
        # The backend did not stop within the grace period: interrupt its await.
        if job.generating and job.task is not None and not job.task.done():
            job.forced = True
            job.task.cancel()

    # ------------------------------------------------------------------ admission

    async def _start(self, conn: _Connection, event: _Request) -> None:
        encrypted = not isinstance(event, (InferenceRequest, PromptRequest))
        try:
            job = self._admit(conn, event)
            if job is not None and encrypted:
                assert conn.encryption is not None and not isinstance(event, (InferenceRequest, PromptRequest))
                job.writer = conn.encryption.reply_writer(event.session_id, request_id=event.id, now=time.monotonic())
        except FabstirError as exc:
            logger.info("request %s rejected: %s", event.id, exc.code)
            if self.config.legacy:
                rejection = legacy_encrypted_rejection_frames if encrypted else legacy_rejection_frames
                async with conn.send_lock:
                    for frame in rejection(exc, event.id):
                        await self._send_locked(conn, encode(frame))
            else:
                await self._send(conn, self._error_frame(exc.code, exc.message, event.id))
            return
        if job is None:
            return
        self._active += 1
        conn.stream = job
        job.task = asyncio.create_task(self._run(conn, job))
        self._log_start(job, conn)

    def _admit(self, conn: _Connection, event: _Request) -> _Stream | None:
        """Check limits and build the stream of a request; None means "drop it" (legacy only).

        A plaintext ``prompt`` and an encrypted message run on their session's memory (plaintext
        and encrypted sessions are remembered apart); an encrypted message whose memory is gone
        runs without it, as a stateless request does.

        Raises:
            FabstirError: the request is refused; the caller answers it.
        """
        cfg, req, legacy = self.config, event.request, self.config.legacy
        # Defaults apply only to a prompt frame without request (the parser refuses other gaps).
        default_max_tokens = (
            PRODUCTION_DEFAULT_MAX_TOKENS if legacy else min(cfg.default_max_tokens, cfg.max_tokens_cap)
        )
        max_tokens = default_max_tokens if req.max_tokens is None else req.max_tokens
        temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        if legacy:  # production validates before it counts the request against its rate limit
            if max_tokens < 0:  # it cannot read a negative count, so it drops the request
                return None
            model_name = "default" if req.model is None else req.model
            problem = production_validation_error(req.prompt, model_name, max_tokens, temperature)
            if problem is not None:
                raise InvalidOptions(problem)
        self._check_rate(conn)
        if not legacy:
            if req.model == "":
                raise InvalidOptions("'model' is empty", field="model")
            if not req.prompt and not req.messages:
                raise InvalidPrompt("'prompt' is empty", field="prompt")
        model = self.backend.resolve_model(req.model)
        if model is None and legacy:
            model = self.backend.resolve_model(None)
        if model is None and self.payments is not None and req.model is not None \
                and req.model.lower() == self.payments.model_registry_id:
            model = self.backend.resolve_model(None)  # a paid host's model, named by its registry id
        if model is None:
            available = ", ".join(m.id for m in self.backend.models) or "none"
            raise ModelNotAvailable(f"model {req.model!r} is not served by this host; available: {available}")
        if not 1 <= max_tokens <= cfg.max_tokens_cap:
            raise InvalidOptions(f"'max_tokens' must be between 1 and {cfg.max_tokens_cap}, got {max_tokens}",
                                 field="max_tokens")
        if not 0.0 <= temperature <= 2.0:
            raise InvalidOptions(f"'temperature' must be between 0 and 2, got {temperature:g}", field="temperature")
        if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
            raise InvalidOptions(f"'top_p' must be in (0, 1], got {req.top_p:g}", field="top_p")
        if len(req.stop) > cfg.max_stop_sequences or any(len(s) > cfg.max_stop_chars for s in req.stop):
            raise InvalidOptions(
                f"at most {cfg.max_stop_sequences} stop sequences of at most {cfg.max_stop_chars} characters",
                field="stop",
            )
        chars = len(req.prompt) + sum(len(content) for _, content in req.messages)
        if chars > cfg.max_prompt_chars:
            raise InvalidPrompt(f"prompt has {chars} characters; this host accepts at most {cfg.max_prompt_chars}",
                                field="prompt")
        session, turn_input = None, self._turn_input(req.prompt, () if legacy else req.messages)
        memory = self.sessions
        if not isinstance(event, (InferenceRequest, PromptRequest)):  # encrypted: memory on both paths, as production
            memory = self.encrypted_sessions
            session = self._encrypted_memory(conn, event.session_id)
            if session is not None and (legacy or not req.messages):
                turn_input = [*session.messages, ("user", req.prompt)]
        elif isinstance(event, PromptRequest) and not legacy:  # production runs a prompt without a session too
            session_id = event.session_id or conn.session_id
            session = self.sessions.get(session_id) if session_id is not None else None
            if session is None:
                if session_id is None:
                    raise SessionNotFound("no session on this connection; send session_init first")
                raise SessionNotFound(f"session {session_id!r} is not open on this host; send session_init first")
            if not req.messages:
                turn_input = [*session.messages, ("user", req.prompt)]
        meter = self._paid_meter(conn, event, model.id) if self.payments is not None else None
        if self._active >= cfg.max_concurrent_streams:
            raise HostBusy(f"host is at its limit of {cfg.max_concurrent_streams} concurrent streams")
        params = GenerationParams(
            messages=tuple(turn_input),
            model=model.id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=None if legacy else req.top_p,
            seed=None if legacy else req.seed,
            stop=() if legacy else req.stop,
        )
        return _Stream(
            request_id=event.id,
            params=params,
            stream=req.stream or legacy,
            context_window=model.context_window,
            session=session,
            memory=memory if session is not None else None,
            turn_input=turn_input,
            meter=meter,
        )

    def _paid_meter(self, conn: _Connection, event: _Request, model_id: str) -> JobMeter:
        """The job a request on a paid host is billed to: its session's, bound on this connection.

        Raises:
            PaymentRequired: no job (stateless ``inference``, or a session opened without one), a
                job no longer usable, or a model other than the job's.
            BudgetExceeded: the job's deposit pays for no more tokens.
        """
        assert self.payments is not None
        chain = f" (chain {self.payments.chain_id})" if self.payments.chain_id is not None else ""
        where = (f"open a job for this host on marketplace {self.payments.config.marketplace}{chain} "
                 f"and send its id in session_init (job_id) or in the encrypted init (jobId)")
        if isinstance(event, InferenceRequest):
            raise PaymentRequired(f"this host serves paid sessions only: {where}")
        session_id = event.session_id if event.session_id is not None else conn.session_id
        meter = conn.jobs.get(session_id)
        if meter is None:
            raise PaymentRequired(f"session {session_id!r} has no job on this connection: {where}")
        refusal = meter.refusal()
        if refusal is not None:
            raise type(refusal)(refusal.message)
        default = self.backend.resolve_model(None)
        if default is None or model_id != default.id:
            raise PaymentRequired(f"job {meter.job_id} pays for model {self.payments.model_registry_id} "
                                  f"({default.id if default else 'none'}), not {model_id}")
        return meter

    def _check_rate(self, conn: _Connection) -> None:
        """Take one request from the connection's and the address's budgets.

        Raises:
            RateLimitExceeded: either budget is spent (``retry_after`` says for how long).
        """
        cfg = self.config
        if conn.bucket is not None and not conn.bucket.try_acquire():
            raise RateLimitExceeded(
                f"more than {cfg.rate_limit_per_connection:g} requests per minute on this connection",
                retry_after=conn.bucket.retry_after(),
            )
        if not self._address_limiter.try_acquire(conn.address):
            raise RateLimitExceeded(
                f"more than {cfg.rate_limit_per_address:g} requests per minute from {conn.address}",
                retry_after=self._address_limiter.retry_after(conn.address),
            )

    @staticmethod
    def _turn_input(prompt: str, messages: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        return list(messages) if messages else [("user", prompt)]

    def _log_start(self, job: _Stream, conn: _Connection) -> None:
        params = job.params
        logger.info(
            "request %s from %s: model=%s max_tokens=%d messages=%d prompt_chars=%d",
            job.request_id, conn.address, params.model, params.max_tokens, len(params.messages),
            sum(len(c) for _, c in params.messages),
        )
        if self.config.log_prompts:
            logger.info("request %s prompt: %r", job.request_id, params.messages)

    # ------------------------------------------------------------------ streaming

    async def _run(self, conn: _Connection, job: _Stream) -> None:
        error: FabstirError | None = None
        finish: str | None = None
        abort = False
        try:
            finish = await self._generate(conn, job)
        except asyncio.CancelledError:
            if not job.forced:
                self._release(conn, job)
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            finish = "cancelled"
        except AbortConnection:
            abort = True
        except FabstirError as exc:
            error, finish = exc, "error"
        except (ConnectionClosed, _ConnectionGone):
            finish = None
        except Exception as exc:  # a backend bug must not kill the connection
            logger.exception("request %s: backend failed", job.request_id)
            error, finish = HostError(f"backend failed: {type(exc).__name__}"), "error"
        finally:
            job.generating = False
            if job.timer is not None:
                job.timer.cancel()
            if job.meter is not None and self.payments is not None:
                self.payments.answer_ended(job.meter)  # production proves after each answer
        if abort:
            self._release(conn, job)
            logger.info("request %s: dropping the connection (fault injection)", job.request_id)
            if conn.ws.transport is not None:
                conn.ws.transport.abort()
            return
        if finish is None:
            self._release(conn, job)
            return
        if job.session is not None and job.memory is not None and finish != "error":
            job.memory.record_turn(job.session, job.turn_input, "".join(job.text))
        logger.info(
            "request %s: %s after %d tokens in %.3f s%s", job.request_id, finish, job.generated,
            time.monotonic() - job.started, f" ({error.code})" if error else "",
        )
        frames = self._final_frames(job, finish, error, conn.session_id)
        try:
            async with conn.send_lock:
                # Free the connection and the stream's host-wide slot before the last frames go
                # out (a client may send its next request, on this socket or another, as soon as it
                # reads stream_end), but under the send lock, so that no reply to a later frame can
                # overtake them.
                self._release(conn, job)
                for frame in frames:
                    await self._send_locked(conn, encode(frame))
        except (ConnectionClosed, _ConnectionGone):
            pass
        finally:
            self._release(conn, job)

    def _release(self, conn: _Connection, job: _Stream) -> None:
        if job.finished:
            return
        job.finished = True
        self._active -= 1
        if conn.stream is job:
            conn.stream = None
            conn.last_activity = time.monotonic()

    async def _generate(self, conn: _Connection, job: _Stream) -> str:
        """Stream the backend's tokens to the client; return the finish reason."""
        params, meter = job.params, job.meter
        stops = StopMatcher(params.stop)
        pending = 0  # tokens whose text is held back by the stop matcher
        reason: str | None = None
        unpaid: FabstirError | None = None  # why the job pays for no more tokens
        async with contextlib.aclosing(self.backend.generate(params, job.cancel, job.stats)) as tokens:
            async for piece in tokens:
                if job.cancel.is_set():
                    return "cancelled"
                if meter is not None:
                    unpaid = meter.refusal()
                    if unpaid is not None:  # this token is never sent: nothing would pay for it
                        break
                    assert self.payments is not None
                    self.payments.submit(meter, meter.add_token(piece))  # queued; never awaited
                job.generated += 1
                pending += 1
                out = stops.feed(piece)
                if out:
                    job.text.append(out)
                    if job.stream:
                        await self._send(conn, self._chunk_frame(job, out, pending))
                    pending = 0
                if stops.matched is not None:
                    return "stop"
                if job.generated >= params.max_tokens:
                    reason = "length"
                    break
        if job.cancel.is_set():
            return "cancelled"
        tail = stops.flush()
        if tail:
            job.text.append(tail)
            if job.stream:
                await self._send(conn, self._chunk_frame(job, tail, pending))
        if not job.stream and job.text:
            await self._send(conn, self._chunk_frame(job, "".join(job.text), job.generated))
        if unpaid is not None:
            raise type(unpaid)(unpaid.message)
        if stops.matched is not None:  # a stop found in the held-back tail
            return "stop"
        if reason is None:
            reason = job.stats.finish_reason or ("length" if job.generated >= params.max_tokens else "stop")
        return reason

    @staticmethod
    def _chunk_frame(job: _Stream, text: str, tokens: int) -> dict[str, Any]:
        """A piece of the answer: ``encrypted_chunk`` for an encrypted request, else ``stream_chunk``."""
        if job.writer is not None:
            return job.writer.chunk(text, tokens=tokens)
        return chunk_frame(text, tokens=tokens, request_id=job.request_id)

    def _usage(self, job: _Stream) -> Usage:
        completion = job.stats.completion_tokens or job.generated
        prompt = job.stats.prompt_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            context_window_size=job.context_window,
        )

    def _final_frames(
        self, job: _Stream, finish: str, error: FabstirError | None, session_id: str | None
    ) -> list[dict[str, Any]]:
        rid, writer = job.request_id, job.writer
        if self.config.legacy:
            if writer is not None:
                return legacy_encrypted_final_frames(finish, job.generated, error, writer, session_id=session_id)
            return legacy_final_frames(finish, job.generated, error, rid, session_id=session_id)
        reason = {"cancelled": "cancelled", "error": "error"}.get(finish, "complete")
        frames = []
        if error is not None:
            frames.append(self._error_frame(error.code, error.message, rid))
        elif writer is not None and reason == "complete":
            # The production reply: an empty last chunk marked final, then the finish reason, encrypted.
            frames += [writer.chunk("", tokens=0, final=True), writer.response(finish)]
        end = end_frame(reason=reason, finish_reason=finish, usage=self._usage(job), request_id=rid)
        if writer is not None and writer.session_id is not None:
            end["session_id"] = writer.session_id
        frames.append(end)
        return frames

    def _error_frame(self, code: str, message: str, request_id: str | None) -> dict[str, Any]:
        if self.config.legacy:
            return legacy_error_frame(code, message, request_id)
        return error_frame(code, message, request_id=request_id)

    # ------------------------------------------------------------------ sending

    async def _send(self, conn: _Connection, frame: dict[str, Any]) -> None:
        async with conn.send_lock:
            await self._send_locked(conn, encode(frame))

    async def _send_locked(self, conn: _Connection, text: str) -> None:
        """Send one frame (the caller holds ``conn.send_lock``); drop a client that stopped reading.

        ``send()`` waits only while the transport's write buffer is above its high-water mark (the
        client is not reading). A frame written into an empty buffer cannot fill it that far, so
        it goes without a timer; any other frame is bounded by ``send_timeout``.

        Raises:
            _ConnectionGone: the frame waited ``send_timeout`` for the client (the connection is aborted).
        """
        transport = conn.ws.transport
        if transport is not None and len(text) <= _UNBLOCKED_FRAME_CHARS and not transport.get_write_buffer_size():
            await conn.ws.send(text)
            return
        try:
            async with _compat.timeout(self.config.send_timeout):
                await conn.ws.send(text)
        except asyncio.TimeoutError:
            logger.warning("client %s stopped reading for %g s; dropping it", conn.address, self.config.send_timeout)
            if conn.ws.transport is not None:
                conn.ws.transport.abort()
            raise _ConnectionGone("send timed out") from None


def _request_id(obj: dict[str, Any] | None) -> str | None:
    """Return the ``id`` of a decoded frame as the host echoes it (a string), if it has a usable one."""
    rid = obj.get("id") if obj is not None else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def _remote(connection: ServerConnection) -> str:
    remote = connection.remote_address
    return str(remote[0]) if isinstance(remote, tuple) and remote else "unknown"


def _json_response(status: int, body: dict[str, Any], *, extra: list[tuple[str, str]] | None = None) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = Headers([
        *(extra or []),
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
    ])
    return Response(status, http.HTTPStatus(status).phrase, headers, data)
