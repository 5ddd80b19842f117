"""Conversations: plaintext sessions on one host, with the transcript kept by the client.

Context window: when the next turn (history + prompt + ``max_tokens``) would not fit the model's
context window (``usage.context_window_size`` as the host reports it), the oldest turns are left
out of what is sent; the client's ``transcript`` keeps them all. Token counts are estimated from
the characters-per-token ratio of the previous turn.

A session pins one socket (``session_init`` once, then one ``prompt`` per turn) and keeps the
transcript itself, because hosts may forget (production hosts keep plaintext history not at all,
any host loses it on restart). Whenever the host may lack the history (a new socket, a host
without ``plaintext-sessions``, a cancelled turn) the transcript is resent with the prompt:
as ``messages`` where the host supports them, else flattened into the prompt.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from . import protocol
from .protocol import Usage
from .config import InferenceOptions, validate_prompt, wire_transcript
from .errors import Cancelled, FabstirError, ProtocolError, SessionNotFound
from .hosts import HostInfo
from .transport import WebSocketClient

if TYPE_CHECKING:
    from .inference import InferenceManager, InferenceStream

__all__ = ["Session", "SessionManager"]


@dataclass(eq=False)
class Session:
    """One conversation. ``transcript`` holds ``{role, content}`` turns, oldest first."""

    id: str
    model: str | None = None
    host: HostInfo | None = None
    system_prompt: str | None = None
    transcript: list[dict[str, str]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    turns: int = 0  # completed turns
    cancelled_turns: int = 0  # turns stopped before their end (interrupt, aclose, the session ending)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ended: bool = False
    context_window: int | None = None
    window_start: int = 0  # transcript messages before this index are no longer sent (trimmed)
    _chars_per_token: float = field(default=4.0, repr=False)
    _history_chars: int = field(default=0, repr=False)
    _conn: WebSocketClient | None = field(default=None, repr=False)
    _synced: bool = field(default=False, repr=False)  # the host's memory matches the transcript
    _turn: InferenceStream | None = field(default=None, repr=False)  # the turn streaming now, if any

    def __repr__(self) -> str:
        host = self.host.api_url if self.host else None
        return f"<Session {self.id} model={self.model} host={host} turns={self.turns}{' ended' if self.ended else ''}>"

    def messages_for(self, prompt: str) -> list[dict[str, str]]:
        """The transcript to send for a new ``prompt``: system prompt, the turns inside the context
        window, then the prompt."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        kept = self.transcript[self.window_start:]
        return messages + [dict(m) for m in kept] + [{"role": "user", "content": prompt}]

    def _trim_to_window(self, prompt: str, prefill: str | None, max_tokens: int) -> bool:
        """Drop the oldest turns from what is sent until the turn should fit; return whether any went."""
        if not self.context_window:
            return False
        trimmed = False
        while self.window_start < len(self.transcript):
            chars = sum(len(m["content"]) for m in self.messages_for(prompt)) + len(prefill or "")
            if chars / self._chars_per_token + max_tokens <= self.context_window:
                break
            self.window_start += 2  # one user + assistant turn
            trimmed = True
        return trimmed
    async def _open_turn(self, manager: InferenceManager, host: HostInfo, model: str, prompt: str,
                         options: InferenceOptions, request_id: str, *, max_tokens: int,
                         prefill: str | None = None) -> tuple[WebSocketClient, dict[str, Any]]:
        """Return the pinned socket (opening it and sending ``session_init`` if needed) and the frame.

        ``prefill`` is the partial answer of a failed attempt: the history is resent with it so the
        (possibly new) host continues the answer.
        """
        if self._conn is not None and (not self._conn.is_open or host is not self.host):
            manager.pool.discard(self._conn)
            self._conn, self._synced = None, False
        if self._conn is None:
            conn = await manager.pool.checkout(host.ws_url)
            try:
                await conn.send(protocol.session_init_frame(self.id, request_id=request_id))
                while True:
                    event = await conn.recv_event(manager.config.first_token_timeout)
                    if isinstance(event, protocol.SessionInitAck):
                        break
                    if isinstance(event, protocol.ErrorEvent):
                        error = event.error
                        error.host = host.api_url
                        raise error
                    if not isinstance(event, (protocol.Connected, protocol.Pong, protocol.UnknownFrame)):
                        raise ProtocolError(f"expected session_init_ack, got {type(event).__name__}",
                                            host=host.api_url)
            except BaseException:
                manager.pool.discard(conn)
                raise
            self._conn, self._synced = conn, False
        self.host, self.model = host, model
        if self.context_window is None:
            self.context_window = host.context_window
        trimmed = self._trim_to_window(prompt, prefill, max_tokens)
        # The host keeps the untrimmed history in its memory: a trimmed turn resends the window.
        replay = not self._synced or "plaintext-sessions" not in host.features or bool(prefill) or trimmed
        self._history_chars = sum(len(m["content"]) for m in self.messages_for(prompt)) + len(prefill or "")
        wire_prompt, messages = prompt, None
        if replay and (self.transcript or self.system_prompt or prefill):
            wire_prompt, messages = wire_transcript(self.messages_for(prompt), host.features, prefill)
        frame = protocol.prompt_frame(
            wire_prompt,
            session_id=self.id,
            model=model,
            max_tokens=max_tokens,
            **options.sampling_fields(),
            messages=messages,
            request_id=request_id,
        )
        return self._conn, frame

    def _release_turn(self, manager: InferenceManager, conn: WebSocketClient, clean: bool) -> None:
        """Keep the pinned socket after a clean turn; close it after a broken one."""
        if not clean:
            manager.pool.discard(conn)
            if self._conn is conn:
                self._conn, self._synced = None, False

    def _complete_turn(self, prompt: str, answer: str, *, synced: bool, usage: Usage | None = None) -> None:
        self.transcript.append({"role": "user", "content": prompt})
        self.transcript.append({"role": "assistant", "content": answer})
        self.turns += 1
        self._synced = synced
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            if usage.context_window_size:
                self.context_window = usage.context_window_size
            if usage.prompt_tokens and self._history_chars:
                self._chars_per_token = max(0.5, self._history_chars / usage.prompt_tokens)


class SessionManager:
    """Create, continue and end sessions; shares the inference manager's hosts, pool and usage."""

    def __init__(self, inference: InferenceManager) -> None:
        self._inference = inference
        self._sessions: dict[str, Session] = {}

    def __repr__(self) -> str:
        return f"<SessionManager sessions={len(self._sessions)}>"

    async def create_session(self, model: str | None = None, host: str | HostInfo | None = None,
                             system_prompt: str | None = None, session_id: str | None = None) -> Session:
        """Start a conversation; the host is chosen (or connected) on the first turn."""
        if system_prompt is not None:
            validate_prompt(system_prompt, max_chars=self._inference.config.max_prompt_chars,
                            field_name="system_prompt")
        session = Session(id=session_id or uuid.uuid4().hex, model=model, system_prompt=system_prompt)
        if host is not None:
            session.host = self._inference._host_for(host)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        """Return a live session.

        Raises:
            SessionNotFound: unknown or ended.
        """
        session = self._sessions.get(str(session_id))
        if session is None or session.ended:
            raise SessionNotFound(f"no active session {session_id!r}")
        return session

    @property
    def sessions(self) -> list[Session]:
        """Live sessions, oldest first."""
        return [s for s in self._sessions.values() if not s.ended]

    def to_frame(self, include_ended: bool = False) -> Any:
        """The sessions as a pandas DataFrame: id, model, host, turns, tokens, context use, state."""
        import pandas as pd

        rows = [
            {
                "id": s.id,
                "model": s.model,
                "host": s.host.api_url if s.host else None,
                "turns": s.turns,
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "context_window": s.context_window,
                "trimmed_turns": s.window_start // 2,
                "created_at": pd.Timestamp(s.created_at, unit="s"),
                "ended": s.ended,
            }
            for s in self._sessions.values()
            if include_ended or not s.ended
        ]
        return pd.DataFrame(rows, columns=["id", "model", "host", "turns", "prompt_tokens", "completion_tokens",
                                           "context_window", "trimmed_turns", "created_at", "ended"])

    def stream(self, session_id: str, prompt: str, options: InferenceOptions | Mapping[str, Any] | None = None,
               **kwargs: Any) -> InferenceStream:
        """Create the stream of one turn (see :class:`~fabstir_jupyter.inference.InferenceStream`)."""
        session = self.get(session_id)
        if session.model is not None:
            kwargs.setdefault("model", session.model)
        # No fixed host: the stream starts on the session's host and fails over to another.
        return self._inference._make_stream(prompt, options, kwargs, kind="session", session=session)

    async def session_inference(self, session_id: str, prompt: str,
                                options: InferenceOptions | Mapping[str, Any] | None = None,
                                **kwargs: Any) -> AsyncIterator[str]:
        """Yield the answer to ``prompt`` in the session's context."""
        async with self.stream(session_id, prompt, options, **kwargs) as stream:
            async for piece in stream:
                yield piece

    async def end_session(self, session_id: str) -> Session:
        """End a session and close its socket; returns it (with its transcript) for reference.

        A turn still streaming is cancelled first (``stream_cancel`` to its host): it does not fail
        over or retry, its consumer gets :class:`~fabstir_jupyter.errors.Cancelled` after the text
        already delivered, and it counts in ``cancelled_turns``, not ``turns``. Nothing is recorded
        for the session after this returns.

        Raises:
            SessionNotFound: unknown or already ended.
        """
        session = self.get(session_id)
        session.ended = True
        turn = session._turn
        if turn is not None:
            await turn._stop(Cancelled(f"session {session.id} was ended while this turn was streaming"))
        if session._conn is not None:
            self._inference.pool.discard(session._conn)
            session._conn = None
        return session

    async def aclose(self) -> None:
        """End every session."""
        for session in self.sessions:
            try:
                await self.end_session(session.id)
            except FabstirError:
                pass
