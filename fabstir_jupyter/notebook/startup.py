"""How far a network's start has got, for the cells that wait on it.

The first use of an SDK starts its network: on ``network="local"`` a chain and host processes (the
steps come from :class:`~fabstir_jupyter.local.network.LocalNetwork`'s ``progress`` hook, in the
worker thread that builds it), then discovery. :class:`NetworkStartup` records each step with the
time it began and how the start ended, and lets coroutines on any event loop follow it: a cell's
output shows the step it is waiting on, and the error of a failed start reaches the cells that
waited for it. Nothing here imports the SDK.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

__all__ = ["NetworkStartup"]


class NetworkStartup:
    """The start of one SDK's network: its steps (label and start time) and its end.

    :meth:`step` and :meth:`finish` may be called from any thread; :meth:`follow` is awaited on
    any event loop.

    Args:
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started_at = clock()
        self.steps: list[tuple[str, float]] = []
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self.error_seen = False  # the error reached a follower: the next use starts again
        self._lock = threading.Lock()
        self._followers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def __repr__(self) -> str:
        if self.ended_at is None:
            return f"<NetworkStartup at {self.current or 'the start'!r}>"
        outcome = f"failed: {self.error}" if self.error is not None else "ready"
        return f"<NetworkStartup {outcome} after {self.seconds:.1f} s>"

    # ------------------------------------------------------------------ what the start reports

    def step(self, label: str) -> None:
        """Record that the start has begun step ``label`` (ignored once it has ended)."""
        with self._lock:
            if self.ended_at is not None:
                return
            self.steps.append((label, self._clock()))
        self._notify()

    def finish(self, error: BaseException | None = None) -> None:
        """Record the end of the start: ready, or failed with ``error``. Only the first call counts."""
        with self._lock:
            if self.ended_at is not None:
                return
            self.ended_at = self._clock()
            self.error = error
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            followers = list(self._followers)
        for loop, event in followers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its follower is gone
                pass

    # ------------------------------------------------------------------ what the cells read

    @property
    def done(self) -> bool:
        """Whether the start has ended (ready or failed)."""
        return self.ended_at is not None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def current(self) -> str | None:
        """The step in progress (None before the first one and once ended)."""
        with self._lock:
            return None if self.ended_at is not None or not self.steps else self.steps[-1][0]

    @property
    def seconds(self) -> float:
        """Seconds from the start to its end (or to now, while it runs)."""
        end = self.ended_at if self.ended_at is not None else self._clock()
        return end - self.started_at

    def durations(self) -> list[tuple[str, float]]:
        """Each step with its duration in seconds (to the next step, or to the end or now)."""
        with self._lock:
            steps = list(self.steps)
            end = self.ended_at if self.ended_at is not None else self._clock()
        ends = [t for _, t in steps[1:]] + [end]
        return [(label, stop - began) for (label, began), stop in zip(steps, ends, strict=True)]

    async def follow(self, on_step: Callable[[str], None] | None = None) -> bool:
        """Wait until the start has ended, calling ``on_step(label)`` with the step in progress
        now and with each later one; return whether it had to wait (False: it had already ended).

        Raises:
            BaseException: the error the start failed with (:attr:`error_seen` is then set).
        """
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            waited = self.ended_at is None
            shown = max(0, len(self.steps) - 1)  # from the step in progress: older ones are over
            self._followers.append(entry)
        try:
            while True:
                with self._lock:
                    new = [label for label, _ in self.steps[shown:]]
                    ended = self.ended_at is not None
                shown += len(new)
                if on_step is not None and waited:
                    for label in new:
                        on_step(label)
                if ended:
                    break
                await event.wait()
                event.clear()
        finally:
            with self._lock:
                self._followers.remove(entry)
        if self.error is not None:
            self.error_seen = True
            raise self.error
        return waited
