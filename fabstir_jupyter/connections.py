"""What one attempt talks to a host through: a connection, and the channel over it.

A :class:`Channel` is the protocol over one socket as an attempt uses it: it turns a
:class:`~fabstir_jupyter.protocol.GenerationRequest` into the frame to send, opens a session, sends
``stream_cancel``, and reads events. It speaks plaintext frames; an encrypted channel (spec §6:
``encrypted_session_init`` and ``encrypted_message`` out, every received frame through
``EncryptedSession.decrypt``) is the same four methods over the same socket, so the attempt does not
change when one is swapped in.

A :class:`Connector` hands out :class:`Connection`\\ s, "the connection for this host": a socket
checked out for one attempt, its channel, and how to give it back. :class:`PoolConnector` is the
default: a stateless request checks any socket to the host out of the pool and back in; a session
pins one socket for its whole life (``session_init`` once on it) and keeps it after a clean turn.
Paid sessions (spec §10) plug in here: a connector that binds each socket to an on-chain job
(:meth:`~fabstir_jupyter.transport.ConnectionPool.checkout` with ``bound_to``), one open job per
host for stateless requests and one job per session.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Protocol

from . import protocol
from .config import InferenceConfig
from .errors import FabstirError
from .hosts import HostInfo
from .transport import ConnectionPool, WebSocketClient

__all__ = ["Channel", "Connection", "Connector", "PoolConnector"]


class Channel:
    """The plaintext protocol over one socket, as one attempt uses it.

    Args:
        socket: an open socket, checked out for the attempt.
    """

    def __init__(self, socket: WebSocketClient) -> None:
        self.socket = socket

    def __repr__(self) -> str:
        return f"<Channel {self.socket!r}>"

    async def open_session(self, session_id: str, *, request_id: str | None, timeout: float) -> None:
        """Send ``session_init`` and wait for its ``session_init_ack``, ``timeout`` seconds per frame.

        Raises:
            FabstirError: the host refused (its code), broke the protocol, or did not answer in time.
        """
        await self.socket.send(protocol.session_init_frame(session_id, request_id=request_id))
        while protocol.read_session_ack(await self.socket.recv_event(timeout)) is None:
            pass

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

    def is_late(self, event: protocol.HostEvent) -> bool:
        """Whether ``event`` belongs to a request already finished on this socket (to be dropped)."""
        finished = self.socket.finished_ids
        return bool(finished) and getattr(event, "id", None) in finished

    def finish(self, request_id: str) -> None:
        """Note that ``request_id`` is over: frames still arriving for it are late."""
        self.socket.finished_ids.append(request_id)

    def has_unread_frames(self) -> bool:
        """Whether frames arrived that no request reads (a host talking past ``stream_end``)."""
        return self.socket.has_unread_frames()


@dataclass(eq=False)
class Connection:
    """A socket checked out for one attempt, and the channel to use over it.

    Attributes:
        socket: the socket.
        channel: what the attempt sends and reads through.
        fresh: the socket was opened for this attempt, so the host holds none of a session's history.
    """

    socket: WebSocketClient
    channel: Channel
    fresh: bool = False
    _give_back: Callable[[bool], None] = field(default=lambda clean: None, repr=False)

    def release(self, *, clean: bool) -> None:
        """Give the socket back: reusable after a clean end, else closed. Synchronous (safe in ``finally``)."""
        self._give_back(clean)


class Connector(Protocol):
    """Hands out the connection for a host (and, later, its paid job)."""

    async def connect(self, host: HostInfo, *, session_id: str | None, request_id: str) -> Connection:
        """Return a connection to ``host`` for one attempt; a session's is its pinned socket."""
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
    opens it and sends ``session_init``; later turns on the same host reuse it while it stays open
    and every turn on it ended cleanly; a turn on another host, or after a broken one, opens a new
    one (:attr:`Connection.fresh`).

    Args:
        pool: where sockets come from.
        config: ``first_token_timeout`` bounds the wait for ``session_init_ack``.
    """

    def __init__(self, pool: ConnectionPool, config: InferenceConfig) -> None:
        self.pool = pool
        self.config = config
        self._pinned: dict[str, WebSocketClient] = {}

    def __repr__(self) -> str:
        return f"<PoolConnector pinned={len(self._pinned)} pool={self.pool!r}>"

    async def connect(self, host: HostInfo, *, session_id: str | None, request_id: str) -> Connection:
        """Return a connection to ``host``; see the class docstring for sessions.

        Raises:
            FabstirError: the socket could not be opened, or the host refused the session.
        """
        if session_id is None:
            socket = await self.pool.checkout(host.ws_url)
            return Connection(socket, Channel(socket),
                              _give_back=functools.partial(self._check_in, socket))
        pinned = self._pinned.get(session_id)
        if pinned is not None and (not pinned.is_open or pinned.url != host.ws_url):
            self.end_session(session_id)
            pinned = None
        if pinned is not None:
            return Connection(pinned, Channel(pinned), _give_back=functools.partial(self._keep, session_id, pinned))
        socket = await self.pool.checkout(host.ws_url)
        channel = Channel(socket)
        try:
            await channel.open_session(session_id, request_id=request_id, timeout=self.config.first_token_timeout)
        except FabstirError as exc:
            self.pool.discard(socket)
            exc.host = exc.host or host.api_url
            raise
        except BaseException:
            self.pool.discard(socket)
            raise
        self._pinned[session_id] = socket
        return Connection(socket, channel, fresh=True, _give_back=functools.partial(self._keep, session_id, socket))

    def _check_in(self, socket: WebSocketClient, clean: bool) -> None:
        self.pool.checkin(socket, reusable=clean)

    def _keep(self, session_id: str, socket: WebSocketClient, clean: bool) -> None:
        # Cancel is not close: a session keeps its socket after a clean (or cleanly cancelled) turn.
        if not clean:
            self.pool.discard(socket)
            if self._pinned.get(session_id) is socket:
                del self._pinned[session_id]

    async def warm_up(self, host: HostInfo) -> None:
        """Open a socket to ``host`` and leave it idle in the pool for the attempt to take."""
        self.pool.checkin(await self.pool.checkout(host.ws_url))

    def end_session(self, session_id: str) -> None:
        """Close the socket the session pins, if any."""
        socket = self._pinned.pop(session_id, None)
        if socket is not None:
            self.pool.discard(socket)

    def pinned_socket(self, session_id: str) -> WebSocketClient | None:
        """The socket a session pins now, if any (for diagnostics and tests)."""
        return self._pinned.get(session_id)
