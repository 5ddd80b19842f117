"""A private event loop in a daemon thread, for blocking calls from scripts and notebooks.

ipykernel always runs an event loop in the main thread, so ``asyncio.run()`` cannot be used there,
and patching asyncio breaks cancellation. Instead, coroutines are submitted to this loop with
``run_coroutine_threadsafe`` and the caller waits in short slices, so Ctrl-C stays responsive: on
``KeyboardInterrupt`` the coroutine is cancelled (its cleanup runs, e.g. ``stream_cancel`` is sent)
and the interrupt is re-raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")

_POLL = 0.1  # seconds between checks for Ctrl-C while waiting


class LoopThread:
    """An event loop running in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str = "fabstir-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        try:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the loop; return its future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, *,
            cancel_grace: float = 5.0) -> T:
        """Run a coroutine on the loop and wait for its result from this thread.

        Raises:
            KeyboardInterrupt: re-raised after the coroutine was cancelled and had up to
                ``cancel_grace`` seconds to clean up.
            TimeoutError: ``timeout`` passed; the coroutine was cancelled.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run() called from its own loop: await the coroutine instead")
        future = self.submit(coro)
        return wait_future(future, timeout, cancel_grace=cancel_grace)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs on the loop, stop it and join the thread; idempotent."""
        if not self._thread.is_alive():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


def wait_future(future: concurrent.futures.Future[T], timeout: float | None = None, *,
                cancel_grace: float = 5.0) -> T:
    """Wait for a cross-thread future in short slices, cancelling it on Ctrl-C or timeout."""
    waited = 0.0
    try:
        while True:
            try:
                return future.result(_POLL)
            except concurrent.futures.TimeoutError:
                waited += _POLL
                if timeout is not None and waited >= timeout:
                    future.cancel()
                    raise TimeoutError(f"no result within {timeout:g} s") from None
    except KeyboardInterrupt:
        future.cancel()
        try:
            concurrent.futures.wait([future], cancel_grace)
        finally:
            raise
