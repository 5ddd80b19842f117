"""What one attempt talks to a host through: a connection, and the channel over it.

A :class:`Channel` is the protocol over one socket as an attempt uses it: it turns a
:class:`~fabstir_jupyter.protocol.GenerationRequest` into the frame to send, opens a session, sends
``stream_cancel``, and reads events. It speaks plaintext frames. :class:`EncryptedChannel` is the
same four methods over the same socket speaking spec §6: before every request a fresh
``encrypted_session_init`` (a new session key, as the production SDK does), then the
``encrypted_message`` right behind it, and every received frame through
:meth:`~fabstir_jupyter.encryption.EncryptedSession.decrypt`; the attempt does not change when one
is swapped in, and :attr:`Channel.encrypted` says which it got.

A :class:`Connector` hands out :class:`Connection`\\ s, "the connection for this host": a socket
checked out for one attempt, its channel, and how to give it back. :class:`PoolConnector` is the
default: a stateless request checks any socket to the host out of the pool and back in; a session
pins one socket for its whole life (a plaintext ``session_init`` once on it) and keeps it after a
clean turn. It picks the channel per host and request with :func:`encryption_key_for`: encrypted
to a host whose key is known and checked (``encryption="auto"``, the default), plaintext to a host
without one, and a refusal (:class:`~fabstir_jupyter.errors.EncryptionUnavailable`, before anything
is sent) of a host without one under ``encryption="required"`` or of a host whose published key is
not its own.
Paid sessions (spec §10) plug in here: :class:`~fabstir_jupyter.paid_connector.PaidConnector` binds
each socket to an on-chain job (a few jobs per host for stateless requests, one job per session)
and passes the job id to ``session_init`` or the encrypted init.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import protocol
from .config import InferenceConfig
from .errors import EncryptionError, EncryptionUnavailable, FabstirError, InferenceTimeout, ProtocolError
from .hosts import HostInfo, HostKey, HostKeys
from .transport import ConnectionPool, WebSocketClient
from .urls import redact_url

if TYPE_CHECKING:
    from .crypto import PrivateKey, PublicKey
    from .encryption import EncryptedSession

__all__ = ["Channel", "EncryptedChannel", "Connection", "Connector", "PoolConnector", "encryption_key_for"]

logger = logging.getLogger("fabstir_jupyter.inference")

#: The error codes of the encrypted path (spec §6): from a host, a failure of that host's attempt.
ENCRYPTION_CODES = frozenset({
    "ENCRYPTION_NOT_SUPPORTED", "MISSING_PAYLOAD", "INVALID_PAYLOAD", "INVALID_HEX_ENCODING", "INVALID_NONCE_SIZE",
    "DECRYPTION_FAILED", "SESSION_KEY_NOT_FOUND",
})


def _event_id(event: protocol.HostEvent) -> str | None:
    if isinstance(event, protocol.UnknownFrame):  # encrypted_chunk and encrypted_response carry theirs here
        value = event.data.get("id")
        return None if value is None else str(value)
    return getattr(event, "id", None)


class Channel:
    """The plaintext protocol over one socket, as one attempt uses it.

    Args:
        socket: an open socket, checked out for the attempt.
    """

    #: Whether requests and answers cross the wire encrypted.
    encrypted = False

    def __init__(self, socket: WebSocketClient) -> None:
        self.socket = socket

    def __repr__(self) -> str:
        return f"<Channel {self.socket!r}>"

    async def open_session(self, session_id: str, *, request_id: str | None, timeout: float) -> None:
        """Send ``session_init`` and wait at most ``timeout`` seconds for its ``session_init_ack``.

        Raises:
            FabstirError: the host refused (its code), broke the protocol, or did not answer in time.
        """
        await self.socket.send(protocol.session_init_frame(session_id, request_id=request_id))
        await self.wait_for_ack(timeout)

    async def wait_for_ack(self, timeout: float) -> None:
        """Read frames until the ``session_init_ack``, at most ``timeout`` seconds in all (a host that
        sends only pings or unknown frames cannot hold the request).

        Raises:
            InferenceTimeout: no ack in time.
            FabstirError: the host refused the session (its code), or broke the protocol.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        late = InferenceTimeout(f"no session_init_ack within {timeout:g} s", host=redact_url(self.socket.url))
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise late
            try:
                event = await self.socket.recv_event(remaining)
            except InferenceTimeout:
                raise late from None
            if protocol.read_session_ack(event) is not None:
                return

    async def send_request(self, request: protocol.GenerationRequest, *, session_id: str | None,
                           request_id: str) -> None:
        """Send ``request``: an ``inference``, or a session's ``prompt`` when ``session_id`` is given."""
        await self.socket.send(protocol.request_frame(request, session_id=session_id, request_id=request_id))

    async def send_cancel(self, session_id: str | None) -> None:
        """Ask the host to stop the running request (it answers ``stream_end(reason="cancelled")``)."""
        await self.socket.send(protocol.cancel_frame(session_id, reason="client"))

    async def receive(self, timeout: float | None) -> protocol.HostEvent:
        """Read the next event, waiting at most ``timeout`` seconds (``InferenceTimeout`` after that)."""
        return await self.socket.recv_event(timeout)

    def open_frame(self, data: str | bytes) -> protocol.HostEvent | None:
        """Return the event a frame read off the socket carries (what :meth:`receive` returns for it).

        ``None`` is a frame the channel consumed itself (an encrypted init's ``session_init_ack``);
        for a plaintext channel there is none.

        Raises:
            ProtocolError: the frame cannot be interpreted (its ``host`` names the socket's).
        """
        try:
            return protocol.parse_host_frame(data)
        except FabstirError as exc:
            exc.host = redact_url(self.socket.url)
            raise

    def is_late(self, event: protocol.HostEvent) -> bool:
        """Whether ``event`` belongs to a request already finished on this socket (to be dropped)."""
        finished = self.socket.finished_ids
        return bool(finished) and _event_id(event) in finished

    def finish(self, request_id: str) -> None:
        """Note that ``request_id`` is over: frames still arriving for it are late."""
        self.socket.finished_ids.append(request_id)

    def has_unread_frames(self) -> bool:
        """Whether frames arrived that no request reads (a host talking past ``stream_end``)."""
        return self.socket.has_unread_frames()


class EncryptedChannel(Channel):
    """The encrypted protocol (spec §6) over one socket: :class:`Channel`'s methods, end to end encrypted.

    Each request re-keys: :meth:`send_request` sends a fresh ``encrypted_session_init`` (a new
    random session key, the message count back at 0, signed by the client's key) and, right behind
    it without waiting for the ``session_init_ack``, the ``encrypted_message`` (AAD ``message_0``).
    The production SDK sends them the same way; hosts read a socket's frames in order, so the init
    costs no extra round trip. Re-keying per request also means an earlier answer's chunks (whose
    AADs restart at ``chunk_0`` for every request) can never be replayed as a later one.

    :meth:`receive` consumes the ack, decrypts ``encrypted_chunk`` / ``encrypted_response`` into
    plaintext events, and raises for what must not become text: a frame that fails
    authentication, comes out of order or in clear (``ProtocolError``, retryable: the attempt fails
    and the stream goes on elsewhere). An ``error`` answering the init (the host refused it, even
    after the message was sent) and an encrypted-path code from the host are retryable
    :class:`~fabstir_jupyter.errors.EncryptionError`\\ s of this attempt. ``stream_cancel`` stays
    plaintext, as in production.

    Args:
        socket: an open socket, checked out for the attempt.
        session: the client half for this host's key; its ``session_id`` names the conversation
            (a fresh one per stateless attempt, so a host's memory never mixes requests).
    """

    encrypted = True

    def __init__(self, socket: WebSocketClient, session: EncryptedSession) -> None:
        super().__init__(socket)
        self.session = session
        self._awaiting_ack = False

    def __repr__(self) -> str:
        return f"<EncryptedChannel {self.socket!r} session={self.session.session_id!r}>"

    async def open_session(self, session_id: str, *, request_id: str | None, timeout: float) -> None:
        """Nothing to send: an encrypted session opens with the init that goes before each request."""

    async def send_request(self, request: protocol.GenerationRequest, *, session_id: str | None,
                           request_id: str) -> None:
        """Send a fresh ``encrypted_session_init`` and, at once, the ``encrypted_message`` carrying ``request``.

        ``session_id`` is ignored: the encrypted session's own id names the conversation.
        """
        session = self.session
        session.model = request.model or ""
        init = session.init_frame()
        message = session.request_frame(request, request_id=request_id)
        self._awaiting_ack = True
        await self.socket.send(init)
        await self.socket.send(message)

    async def send_cancel(self, session_id: str | None) -> None:
        """Ask the host to stop the running request: a plaintext ``stream_cancel`` naming the session."""
        await self.socket.send(protocol.cancel_frame(self.session.session_id, reason="client"))

    async def receive(self, timeout: float | None) -> protocol.HostEvent:
        """Read the next event, decrypted, within ``timeout`` seconds (the init's ack is read on the way).

        Raises:
            InferenceTimeout: nothing but the ack arrived in time.
            ProtocolError: a frame that does not authenticate, out of order, or plaintext text.
            EncryptionError: the host refused the init, or answered with an encrypted-path code
                (retryable: another host may do).
            FabstirError: another refusal of the init (``HOST_BUSY``...), or the socket failed.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise InferenceTimeout(f"no frame within {timeout:g} s", host=redact_url(self.socket.url))
            opened = self._open(await self.socket.recv_event(remaining))
            if opened is not None:
                return opened

    def open_frame(self, data: str | bytes) -> protocol.HostEvent | None:
        """Return the event a frame read off the socket carries, decrypted; ``None`` for the init's ack.

        Raises:
            ProtocolError, EncryptionError, FabstirError: as :meth:`receive`.
        """
        event = super().open_frame(data)
        assert event is not None
        return self._open(event)

    def _open(self, event: protocol.HostEvent) -> protocol.HostEvent | None:
        if self.is_late(event):
            return event  # a frame of a request already over on this socket: the stream drops it
        if self._awaiting_ack:
            if isinstance(event, protocol.SessionInitAck):
                self._awaiting_ack = False
                return None
            if isinstance(event, protocol.ErrorEvent):
                raise self._host_error(event, "refused the encrypted session init")
            if isinstance(event, protocol.UnknownFrame) and event.type.startswith("encrypted_"):
                self._awaiting_ack = False  # a host that does not acknowledge inits; the frame still authenticates
        if isinstance(event, protocol.ErrorEvent) and event.code in ENCRYPTION_CODES:
            raise self._host_error(event, "failed the encrypted request")
        try:
            return self.session.decrypt(event)
        except ProtocolError as exc:
            exc.host = redact_url(self.socket.url)
            raise

    def _host_error(self, event: protocol.ErrorEvent, what: str) -> FabstirError:
        error = event.error
        error.host = redact_url(self.socket.url)
        if isinstance(error, EncryptionError):
            error.message = f"{what}: {error.message}"
            error.args = (error.message,)
            error.retryable = True  # this host's key or state; another host may do
        return error


@dataclass(eq=False)
class Connection:
    """A socket checked out for one attempt, and the channel to use over it.

    Attributes:
        socket: the socket.
        channel: what the attempt sends and reads through.
        fresh: the socket was opened for this attempt, so the host holds none of a session's history.
        job: the paid job the attempt is billed to (a :class:`~fabstir_jupyter.payments.PaidJob`), or
            ``None`` when unpaid.
        notes: what the connector did for it that the stream should report (jobs opened or ended:
            :class:`~fabstir_jupyter.payments.StreamEvent`\\ s).
    """

    socket: WebSocketClient
    channel: Channel
    fresh: bool = False
    job: Any = None
    notes: tuple[Any, ...] = ()
    _give_back: Callable[[bool], None] = field(default=lambda clean: None, repr=False)

    def release(self, *, clean: bool) -> None:
        """Give the socket back: reusable after a clean end, else closed. Synchronous (safe in ``finally``)."""
        self._give_back(clean)


def encryption_key_for(host: HostInfo, found: HostKey, mode: str | bool) -> PublicKey | None:
    """Decide how to speak to ``host``: the key to encrypt to, or ``None`` for plaintext; no I/O.

    Args:
        host: the host about to be used.
        found: what :class:`~fabstir_jupyter.hosts.HostKeys` knows of its key.
        mode: ``"auto"``, ``"required"`` or ``False`` (see ``InferenceConfig.encryption``).

    Raises:
        EncryptionUnavailable: the host publishes a key that is not its own (unless ``mode`` is
            ``False``), or ``mode`` is ``"required"`` and the host has no usable key.
    """
    if mode is False:
        return None
    if found.suspicious:
        raise EncryptionUnavailable(
            f"not used: {found.problem}", host=host.api_url,
            hint="a host whose published key is not its own is refused; encryption=False would use it in clear",
        )
    if found.public_key is not None:
        return found.public_key
    if mode == "required":
        raise EncryptionUnavailable(
            f"encryption='required' and the host {found.problem}", host=host.api_url,
            hint="another host is tried; encryption='auto' speaks plaintext to hosts without a key",
        )
    return None


class Connector(Protocol):
    """Hands out the connection for a host (and, later, its paid job)."""

    async def connect(self, host: HostInfo, *, session_id: str | None, request_id: str,
                      encryption: str | bool = "auto", model: str | None = None,
                      max_tokens: int | None = None) -> Connection:
        """Return a connection to ``host`` for one attempt; a session's is its pinned socket.

        ``encryption`` is the request's mode (``"auto"``, ``"required"`` or ``False``); a host the
        mode refuses raises :class:`~fabstir_jupyter.errors.EncryptionUnavailable` before any I/O.
        ``model`` (the host's id) and ``max_tokens`` say what the attempt will ask for, so that a
        paying connector can bind the socket to a job that pays for it.
        """
        ...

    async def warm_up(self, host: HostInfo) -> None:
        """Open a socket to ``host`` ahead of the attempt (or fail now, naming why)."""
        ...

    def end_session(self, session_id: str) -> None:
        """Close the socket a session pins, if any."""
        ...


class PoolConnector:
    """The default connector: sockets from a :class:`~fabstir_jupyter.transport.ConnectionPool`.

    Stateless requests check a socket out and back in. A session pins one socket: the first turn
    opens it (a plaintext turn sends ``session_init`` on it); later turns on the same host reuse it
    while it stays open and every turn on it ended cleanly; a turn on another host, or after a
    broken one, opens a new one (:attr:`Connection.fresh`). A turn whose host memory differs from
    the last turn's (plaintext after encrypted or back, or another signer) counts as fresh too, so
    the session resends its transcript.

    Each connection gets an :class:`EncryptedChannel` or a plaintext :class:`Channel`, as
    :func:`encryption_key_for` decides from the request's mode and what ``keys`` knows of the host.
    An encrypted stateless attempt uses a session id of its own (a host remembers encrypted
    conversations by id); an encrypted session uses its own id on every host it moves to, with a
    fresh init, and so a fresh key, before each request.

    Args:
        pool: where sockets come from.
        config: ``first_token_timeout`` bounds the wait for ``session_init_ack``.
        keys: finds hosts' encryption keys; without it no host has one.
        signer: the client's key that signs encrypted inits (the user's key, so that a host can
            match a paid job's depositor); ``None``: a fresh key, made at the first encrypted
            request and kept for this connector's life (a host keeps an encrypted conversation's
            memory only for the signer that started it).
        job_id, chain_id: what encrypted inits carry (``""``: no paid job; ``None``: no chain id).
    """

    def __init__(self, pool: ConnectionPool, config: InferenceConfig, *, keys: HostKeys | None = None,
                 signer: PrivateKey | None = None, job_id: str = "", chain_id: int | None = None) -> None:
        self.pool = pool
        self.config = config
        self.keys = keys
        self.signer = signer
        self.job_id = job_id
        self.chain_id = chain_id
        self._pinned: dict[str, WebSocketClient] = {}
        self._plaintext_opened: set[str] = set()  # sessions whose pinned socket carried session_init
        # Which of the host's memories a session's last turn on its pinned socket fed: the plaintext
        # one, or the encrypted one of a signer (a host keeps the two apart, and an encrypted
        # conversation's memory only for the signer that started it).
        self._memory: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<PoolConnector pinned={len(self._pinned)} pool={self.pool!r}>"

    async def host_key(self, host: HostInfo, encryption: str | bool) -> PublicKey | None:
        """The key to encrypt to for ``host`` under ``encryption``, or ``None`` for plaintext.

        Raises:
            EncryptionUnavailable: the mode refuses the host (see :func:`encryption_key_for`).
        """
        if encryption is False:
            return None
        found = await self.keys.find(host) if self.keys is not None else HostKey(None, problem="has no known key")
        key = encryption_key_for(host, found, encryption)
        if key is None:
            logger.debug("host %s: plaintext (it %s)", host.api_url, found.problem)
        return key

    def _channel(self, socket: WebSocketClient, key: PublicKey | None, session_id: str | None, *,
                 job_id: str | None = None, chain_id: int | None = None) -> Channel:
        if key is None:
            return Channel(socket)
        from .crypto import PrivateKey
        from .encryption import EncryptedSession

        if self.signer is None:
            self.signer = PrivateKey.generate()
        session = EncryptedSession(key, session_id=session_id or uuid.uuid4().hex,
                                   job_id=self.job_id if job_id is None else job_id,
                                   chain_id=self.chain_id if chain_id is None else chain_id, model="",
                                   signer=self.signer)
        return EncryptedChannel(socket, session)

    async def connect(self, host: HostInfo, *, session_id: str | None, request_id: str,
                      encryption: str | bool = "auto", model: str | None = None,
                      max_tokens: int | None = None) -> Connection:
        """Return a connection to ``host``; see the class docstring for sessions and encryption.
        (``model`` and ``max_tokens`` are for paying connectors: unused here.)

        Raises:
            EncryptionUnavailable: ``encryption`` refuses the host (nothing was sent to it).
            FabstirError: the socket could not be opened, or the host refused the session.
        """
        key = await self.host_key(host, encryption)
        if session_id is None:
            socket = await self.pool.checkout(host.ws_url)
            return Connection(socket, self._channel(socket, key, None),
                              _give_back=functools.partial(self._check_in, socket))
        pinned = self._pinned.get(session_id)
        if pinned is not None and (not pinned.is_open or pinned.url != host.ws_url):
            self.end_session(session_id)
            pinned = None
        socket = pinned if pinned is not None else await self.pool.checkout(host.ws_url)
        channel = self._channel(socket, key, session_id)
        if not channel.encrypted and (pinned is None or session_id not in self._plaintext_opened):
            try:
                await channel.open_session(session_id, request_id=request_id,
                                           timeout=self.config.first_token_timeout)
            except FabstirError as exc:
                self._drop(session_id, socket)
                exc.host = exc.host or host.api_url
                raise
            except BaseException:
                self._drop(session_id, socket)
                raise
            self._plaintext_opened.add(session_id)
        memory = "plaintext" if not channel.encrypted or self.signer is None else f"encrypted:{self.signer.address}"
        fresh = pinned is None or self._memory.get(session_id) != memory
        self._pinned[session_id] = socket
        self._memory[session_id] = memory
        return Connection(socket, channel, fresh=fresh, _give_back=functools.partial(self._keep, session_id, socket))

    def _drop(self, session_id: str, socket: WebSocketClient) -> None:
        self.pool.discard(socket)
        if self._pinned.get(session_id) is socket:
            del self._pinned[session_id]
            self._plaintext_opened.discard(session_id)
            self._memory.pop(session_id, None)

    def _check_in(self, socket: WebSocketClient, clean: bool) -> None:
        self.pool.checkin(socket, reusable=clean)

    def _keep(self, session_id: str, socket: WebSocketClient, clean: bool) -> None:
        # Cancel is not close: a session keeps its socket after a clean (or cleanly cancelled) turn.
        if not clean:
            self._drop(session_id, socket)

    async def warm_up(self, host: HostInfo) -> None:
        """Open a socket to ``host`` and leave it idle in the pool for the attempt to take."""
        self.pool.checkin(await self.pool.checkout(host.ws_url))

    def end_session(self, session_id: str) -> None:
        """Close the socket the session pins, if any."""
        socket = self._pinned.pop(session_id, None)
        self._plaintext_opened.discard(session_id)
        self._memory.pop(session_id, None)
        if socket is not None:
            self.pool.discard(socket)

    def pinned_socket(self, session_id: str) -> WebSocketClient | None:
        """The socket a session pins now, if any (for diagnostics and tests)."""
        return self._pinned.get(session_id)
