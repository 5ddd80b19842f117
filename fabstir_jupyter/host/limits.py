"""Bounded state of the reference host: rate limits and session memory.

No I/O and no asyncio here: every class takes a ``clock`` (seconds, monotonic) so tests can drive
time by hand.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..limits import TokenBucket

__all__ = ["per_minute_bucket", "AddressLimiter", "HostSession", "SessionStore"]

Clock = Callable[[], float]


def per_minute_bucket(rate_per_minute: float, *, clock: Clock = time.monotonic) -> TokenBucket | None:
    """A bucket admitting ``rate_per_minute`` requests per minute in bursts of up to a minute's worth;
    ``None`` when the rate is 0 or less (limiting off)."""
    if rate_per_minute <= 0:
        return None
    return _minute_bucket(rate_per_minute, clock)


def _minute_bucket(rate_per_minute: float, clock: Clock) -> TokenBucket:
    return TokenBucket(rate_per_minute / 60.0, max(1.0, float(rate_per_minute)), clock=clock)


class AddressLimiter:
    """One :class:`TokenBucket` per remote address, at most ``max_addresses`` kept.

    Buckets that refilled completely are forgotten, so the table stays small; when it is full the
    oldest bucket is dropped.
    """

    def __init__(self, rate_per_minute: float, *, max_addresses: int = 10_000, clock: Clock = time.monotonic) -> None:
        self.rate_per_minute = rate_per_minute
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def try_acquire(self, address: str) -> bool:
        """Take one request for ``address``; return False when it is over its rate."""
        if self.rate_per_minute <= 0:
            return True
        bucket = self._buckets.get(address)
        if bucket is None:
            self._prune()
            bucket = self._buckets[address] = _minute_bucket(self.rate_per_minute, self._clock)
        else:
            self._buckets.move_to_end(address)
        return bucket.try_acquire()

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may send again."""
        bucket = self._buckets.get(address)
        return bucket.retry_after() if bucket is not None else 0.0

    def _prune(self) -> None:
        if len(self._buckets) < self.max_addresses:
            return
        for key in [k for k, b in self._buckets.items() if b.full]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_addresses:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(slots=True)
class HostSession:
    """A session as the host remembers it: its ids and the transcript.

    Attributes:
        owners: for an encrypted session, the signer addresses its inits have in common (see
            ``HostServer._bind_memory``); empty for a plaintext one.
    """

    session_id: str
    job_id: str | None = None
    chain_id: int | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    last_used: float = 0.0
    owners: frozenset[str] = frozenset()


class SessionStore:
    """Sessions by id: bounded in count and length, evicted when idle.

    Args:
        max_sessions: the most sessions kept; opening one more evicts the least recently used.
        max_messages: the most messages a transcript keeps (a leading system message is kept,
            the oldest others go first).
        idle_timeout: seconds without use after which a session is forgotten.
        clock: monotonic seconds.
    """

    def __init__(
        self, *, max_sessions: int = 1000, max_messages: int = 200, idle_timeout: float = 600.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: OrderedDict[str, HostSession] = OrderedDict()

    def _evict_idle(self) -> None:
        deadline = self._clock() - self.idle_timeout
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_used > deadline:
                break
            self._sessions.popitem(last=False)

    def open(self, session_id: str, *, job_id: str | None = None, chain_id: int | None = None) -> HostSession:
        """Open ``session_id`` with an empty transcript (an existing one is reset)."""
        self._evict_idle()
        self._sessions.pop(session_id, None)
        while len(self._sessions) >= max(1, self.max_sessions):
            self._sessions.popitem(last=False)
        session = HostSession(session_id, job_id=job_id, chain_id=chain_id, last_used=self._clock())
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> HostSession | None:
        """Return the open session ``session_id`` (marking it used), or None."""
        self._evict_idle()
        session = self._sessions.get(session_id)
        if session is not None:
            session.last_used = self._clock()
            self._sessions.move_to_end(session_id)
        return session

    def record_turn(self, session: HostSession, turn_input: Iterable[tuple[str, str]], answer: str) -> None:
        """Remember a finished turn: its input messages followed by the answer.

        A last ``assistant`` input message (a prefill) is extended by the answer rather than
        followed by a new message.
        """
        messages = list(turn_input)
        if messages and messages[-1][0] == "assistant":
            messages[-1] = ("assistant", messages[-1][1] + answer)
        else:
            messages.append(("assistant", answer))
        session.messages = trim_transcript(messages, self.max_messages)
        session.last_used = self._clock()
        if session.session_id in self._sessions:
            self._sessions.move_to_end(session.session_id)

    def __len__(self) -> int:
        self._evict_idle()
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions


def trim_transcript(messages: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Keep the last ``limit`` messages, and a leading system message if there is one."""
    if limit <= 0 or len(messages) <= limit:
        return messages
    if messages[0][0] == "system" and limit > 1:
        return [messages[0], *messages[len(messages) - (limit - 1):]]
    return messages[len(messages) - limit:]
