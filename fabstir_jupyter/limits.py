"""Request rate limits: token buckets on an injectable clock (no I/O, no asyncio).

Shared by the client (:class:`RateLimiter` spaces requests per host) and the reference host
(:class:`TokenBucket` refuses requests over its rate)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket", "RateLimiter"]


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    Two ways to use it: :meth:`try_acquire` takes a token only if one is there (a server refusing
    a request), :meth:`reserve` always takes one and returns how long the caller must wait before
    using it (a client spacing its requests). The clock is injectable so tests count, not sleep.
    """

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self) -> float:
        """Take one token now or in the future; return the wait in seconds."""
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def try_acquire(self) -> bool:
        """Take one token if one is available now; return whether it was taken."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until a token is available (0 if one is available now)."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def available(self) -> float:
        """Tokens available now (negative while reservations are outstanding)."""
        self._refill()
        return self._tokens

    @property
    def full(self) -> bool:
        """Whether the bucket has refilled completely (a table of buckets can then forget it)."""
        return self.available() >= self.burst


class RateLimiter:
    """One :class:`TokenBucket` per host key; ``rate=None`` disables limiting."""

    def __init__(self, rate: float | None, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def reserve(self, key: str) -> float:
        """Take a token for ``key``; return the seconds to wait before sending (0 when unlimited)."""
        if self.rate is None:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, clock=self._clock)
        return bucket.reserve()
