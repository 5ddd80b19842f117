"""Time in tests: a clock the test moves by hand, and polling with a deadline instead of a fixed sleep.

A test asserts what happened, not how fast: where it must wait for something another task, thread
or process does, it polls for it with a generous deadline (a safety net, not a speed check).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEADLINE = 5.0  # seconds a polled condition may take before the test fails
STEP = 0.01  # seconds between polls


class FakeClock:
    """A monotonic clock the test moves by hand: pass it as ``clock=``, then set or advance ``now``."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds


async def wait_until(condition: Callable[[], object], timeout: float = DEADLINE, *, what: str = "condition") -> None:
    """Poll ``condition`` on the running loop until it is true.

    Raises:
        AssertionError: it was still false after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await asyncio.sleep(STEP)


def poll_until(condition: Callable[[], object], timeout: float = DEADLINE, *, what: str = "condition") -> None:
    """Block this thread, polling ``condition`` until it is true.

    Raises:
        AssertionError: it was still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(STEP)
