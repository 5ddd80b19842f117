"""Conversations: a session is a transcript plus the policy of what each turn sends; no I/O here.

A session's turns are streams (:class:`~fabstir_jupyter.streams.InferenceStream`): the stream does
all the socket work, on the socket the session pins (``session_init`` once, then one ``prompt`` per
turn; see :class:`~fabstir_jupyter.connections.PoolConnector`), and asks the session what to send.

The client keeps the transcript itself, because hosts may forget (production hosts keep plaintext
history not at all, any host loses it on restart). Whenever the host may lack the history (a new
socket, a host without ``plaintext-sessions``, a turn that did not end cleanly, a continuation
after a failover, a trimmed window) the transcript is resent with the prompt: as ``messages`` where
the host supports them, else flattened into the prompt.

Paid networks (spec/PROTOCOL.md §10): a session pays with jobs of its own. :meth:`SessionManager.create_session`
opens the first on the chosen host (``deposit=`` and ``budget=`` bound it), every turn runs on that
job's one socket, and :meth:`SessionManager.end_session` settles every job the session used and
puts the results in :attr:`Session.settlements` (read back from the chain). A turn whose socket
drops, or whose job's deposit runs out, goes on on a new job (see :mod:`fabstir_jupyter.payments`).

Context window: when the next turn (history + prompt + ``max_tokens``) would not fit the model's
context window (``usage.context_window_size`` as the host reports it), the oldest turns are left
out of what is sent; the client's ``transcript`` keeps them all. Token counts are estimated from
the characters-per-token ratio of the previous turn.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import protocol
from .config import HostRequirements, InferenceOptions, validate_prompt
from .errors import Cancelled, FabstirError, InvalidOptions, SessionNotFound
from .hosts import HostInfo, resolve_model
from .streams import InferenceCore, InferenceStream
from .transport import WebSocketClient

if TYPE_CHECKING:
    from .payments import JobSettlement

__all__ = ["Session", "SessionManager"]


@dataclass(eq=False)
class Session:
    """One conversation: its transcript (``{role, content}`` turns, oldest first) and counters.

    It implements :class:`~fabstir_jupyter.streams.Conversation`: :meth:`plan_turn` says what a
    turn sends, :meth:`complete_turn` records the answer.
    """

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
    _synced: bool = field(default=False, repr=False)  # the host's memory matches the transcript
    settlements: list[JobSettlement] = field(default_factory=list)  # filled when a paid session ends
    _jobs: Any = field(default=None, repr=False)  # the paid session's terms (payments.SessionTerms)

    @property
    def job_id(self) -> int | None:
        """The paid job the session holds now (``None``: unpaid, or not opened)."""
        job = self._jobs.job if self._jobs is not None else None
        return job.job_id if job is not None else None

    @property
    def job_ids(self) -> list[int]:
        """Every paid job the session used, in order."""
        return [job.job_id for job in self._jobs.jobs] if self._jobs is not None else []

    @property
    def settlement(self) -> JobSettlement | None:
        """The settlement of the job the session held when it ended (:attr:`settlements` has them all)."""
        return self.settlements[-1] if self.settlements else None

    def __repr__(self) -> str:
        host = self.host.api_url if self.host else None
        return f"<Session {self.id} model={self.model} host={host} turns={self.turns}{' ended' if self.ended else ''}>"

    def messages_for(self, prompt: str) -> list[dict[str, str]]:
        """The transcript to send for a new ``prompt``: system prompt, the turns inside the context
        window, then the prompt."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        kept = self.transcript[self.window_start:]
        return messages + [dict(m) for m in kept] + [{"role": "user", "content": prompt}]

    def _window(self, prompt: str) -> tuple[protocol.Message, ...]:
        kept = tuple((m["role"], m["content"]) for m in self.transcript[self.window_start:])
        return protocol.transcript(prompt, kept, self.system_prompt)

    def _trim_to_window(self, prompt: str, prefill: str | None, max_tokens: int) -> bool:
        """Drop the oldest turns from what is sent until the turn should fit; return whether any went."""
        if not self.context_window:
            return False
        trimmed = False
        while self.window_start < len(self.transcript):
            chars = sum(len(content) for _, content in self._window(prompt)) + len(prefill or "")
            if chars / self._chars_per_token + max_tokens <= self.context_window:
                break
            self.window_start += 2  # one user + assistant turn
            trimmed = True
        return trimmed

    def plan_turn(self, prompt: str, host: HostInfo, model: str, *, fresh_socket: bool, prefill: str | None,
                  max_tokens: int) -> tuple[str, tuple[protocol.Message, ...]]:
        """Decide what one attempt of a turn sends to ``host``: the ``(prompt, messages)`` of its request.

        The transcript is resent when the host may not hold it: a ``fresh_socket`` (opened for this
        attempt), a host without ``plaintext-sessions``, a turn whose predecessor did not end cleanly,
        a ``prefill`` (the partial answer of a failed attempt, which the host continues), or a
        window trimmed for the context (the host's memory holds the untrimmed history).
        """
        if fresh_socket:
            self._synced = False
        self.host, self.model = host, model
        if self.context_window is None:
            self.context_window = host.context_window
        trimmed = self._trim_to_window(prompt, prefill, max_tokens)
        replay = not self._synced or "plaintext-sessions" not in host.features or bool(prefill) or trimmed
        window = self._window(prompt)
        self._history_chars = sum(len(content) for _, content in window) + len(prefill or "")
        if replay and (self.transcript or self.system_prompt or prefill):
            return protocol.shape_transcript(window, host.features, prefill)
        return prompt, ()

    def complete_turn(self, prompt: str, answer: str, *, synced: bool, usage: protocol.Usage | None = None) -> None:
        """Record a finished turn; ``synced``: it ended cleanly, so the host's memory matches."""
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

    def cancel_turn(self) -> None:
        """Count a turn stopped before its end (it stays out of the transcript)."""
        self.cancelled_turns += 1


class SessionManager:
    """Create, continue and end sessions; shares the inference core's hosts, connections and usage."""

    def __init__(self, core: InferenceCore) -> None:
        self._core = core
        self._sessions: dict[str, Session] = {}

    def __repr__(self) -> str:
        return f"<SessionManager sessions={len(self._sessions)}>"

    async def create_session(self, model: str | None = None, host: str | HostInfo | None = None,
                             system_prompt: str | None = None, session_id: str | None = None, *,
                             deposit: Any = None, budget: Any = None, max_tokens: int | None = None,
                             job_id: int | None = None) -> Session:
        """Start a conversation. Unpaid, the host is chosen (or connected) on the first turn; on a paid
        network the host is chosen now and the session's first job opened on it.

        Args:
            model, host, system_prompt, session_id: the conversation.
            deposit: each of the session's jobs' deposit, in whole tokens of the payment token
                (default: sized from ``max_tokens`` × the host's price, at least the contract's minimum).
            budget: the most the session may hold in deposits and spend, in whole tokens (default:
                the process budget only).
            max_tokens: what a turn will ask for at most, to size the deposit (default: the config's).
            job_id: take this open job of the same wallet instead of opening one.

        Raises:
            InvalidPrompt: a bad ``system_prompt``.
            InvalidOptions: a deposit or budget not above 0 (or given on an unpaid network), a bad job id.
            BudgetExceeded: the deposit would pass the session's or the process's budget (nothing sent).
            InsufficientFunds, TransactionFailed, PaymentRequired: the job could not be opened (or
                taken: another wallet's job, a settled one).
            NoHostsAvailable: no host, or ``host`` is a registry address no discovered host has.
        """
        core = self._core
        if system_prompt is not None:
            validate_prompt(system_prompt, max_chars=core.config.max_prompt_chars, field_name="system_prompt")
        session = Session(id=session_id or uuid.uuid4().hex, model=model, system_prompt=system_prompt)
        if host is not None:
            session.host = core.host_for(host)
        payments = core.payments
        if payments is None:
            for name, value in (("deposit", deposit), ("budget", budget), ("job_id", job_id)):
                if value is not None:
                    raise InvalidOptions(f"{name} is for paid networks; network {core.config.network} is not paid",
                                         field=name)
        else:
            await core._call_on_owner(self._open_paid(session, deposit, budget, max_tokens, job_id))
        self._sessions[session.id] = session
        return session

    async def _open_paid(self, session: Session, deposit: Any, budget: Any, max_tokens: int | None,
                         job_id: int | None) -> None:
        """Choose the session's host and open (or take) its first job."""
        core = self._core
        payments = core.payments
        assert payments is not None
        terms = await payments.register_session(session.id, deposit=deposit, budget=budget)
        try:
            if session.host is None:
                wanted = session.model or core.config.default_model
                session.host = await core.host_manager.select_best_host(HostRequirements(model=wanted), mode="auto")
            host = session.host
            if not payments.pays(host):
                payments.check_unpaid(host)
                payments._sessions.pop(session.id, None)
                return
            await core.host_manager.describe(host)
            model = resolve_model(session.model, host, core.config.default_model)
            if job_id is not None:
                await payments.adopt_job(job_id, host, model, terms)
            else:
                tokens = max_tokens if max_tokens is not None else core.config.default_max_tokens
                await payments.open_job(host, model, max_tokens=tokens, kind="session", session=terms)
        except BaseException:
            payments._sessions.pop(session.id, None)
            raise
        session._jobs = terms

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

    def pinned_socket(self, session_id: str) -> WebSocketClient | None:
        """The socket a session pins now, if its connector pins sockets (for diagnostics and tests)."""
        pinned = getattr(self._core.connector, "pinned_socket", None)
        return pinned(str(session_id)) if callable(pinned) else None

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
        """Create the stream of one turn (see :class:`~fabstir_jupyter.streams.InferenceStream`).

        Raises:
            SessionNotFound: unknown or ended.
            InvalidPrompt, InvalidOptions: bad input.
        """
        session = self.get(session_id)
        if session.model is not None:
            kwargs.setdefault("model", session.model)
        # No pinned host: the turn starts on the session's host and fails over to another.
        return self._core.stream(prompt, options, session=session, kind="session", **kwargs)

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

        A paid session's jobs are settled before it returns (the host's last proof, then the job
        completed by this wallet) and their settlements, read back from the chain, are in
        :attr:`Session.settlements` (:attr:`Session.settlement`: the last job's).

        Raises:
            SessionNotFound: unknown or already ended.
            TransactionFailed, ConnectionFailed: a job could not be settled (the session is ended;
                the job stays Active on chain, its deposit held until it is settled).
        """
        session = self.get(session_id)
        session.ended = True
        ended = Cancelled(f"session {session.id} was ended while this turn was streaming")
        await self._core.stop_turns(session.id, ended)
        self._core.connector.end_session(session.id)
        payments = self._core.payments
        if payments is not None:
            session.settlements = await self._core._call_on_owner(payments.end_session(session.id))
        return session

    async def aclose(self) -> None:
        """End every session."""
        for session in self.sessions:
            try:
                await self.end_session(session.id)
            except FabstirError:
                pass
