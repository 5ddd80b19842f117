""":class:`InferenceManager`: the brief's API over streams, sessions and batches.

The manager is an :class:`~fabstir_jupyter.streams.InferenceCore` (hosts, connections, usage, the
owning event loop, :meth:`~fabstir_jupyter.streams.InferenceCore.stream`) with the rest of the
brief's methods on top: the async generators :meth:`~InferenceManager.stream_inference`,
:meth:`~InferenceManager.direct_inference` and :meth:`~InferenceManager.session_inference`, the
blocking :meth:`~InferenceManager.infer`, batches, sessions and host selection. Each is a thin
wrapper: the stream object and its one attempt loop live in :mod:`fabstir_jupyter.streams`.

It sits on top of the client core: it imports sessions and batches, which import nothing of it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .batch import run_batch
from .config import HostRequirements, InferenceConfig, InferenceOptions
from .connections import Connector
from .hosts import HostInfo, HostManager
from .sessions import SessionManager
from .streams import InferenceCore, InferenceResult, InferenceStream, backoff_delay
from .transport import WebSocketClient
from .usage import UsageSink

if TYPE_CHECKING:
    from .crypto import PrivateKey
    from .payments import Payments

__all__ = ["InferenceManager", "InferenceStream", "InferenceResult", "backoff_delay"]


class InferenceManager(InferenceCore):
    """Run inference on discovered hosts: streaming, direct, in sessions, in batches, or blocking.

    Args:
        host_manager: where hosts come from (a :class:`HostManager`, or a list of host URLs).
        config: client-wide settings; defaults to :class:`InferenceConfig()`.
        usage: where usage records go; defaults to an SQLite :class:`~fabstir_jupyter.usage.UsageLedger`
            at ``config.usage_db``.
        rng: randomness for backoff jitter and tie-breaking (seed it for reproducible runs).
        connector: hands out connections (see :class:`~fabstir_jupyter.streams.InferenceCore`).
        signer: the key that signs encrypted session inits (see :class:`~fabstir_jupyter.streams.InferenceCore`).
        payments: pay for requests on a paid network (:attr:`payments`: wallet, budget, open jobs,
            settlements; see :mod:`fabstir_jupyter.payments`).

    The manager belongs to one event loop: the first that uses it, or a private loop thread when it
    is first used through the blocking :meth:`infer`. Streams can be consumed from other loops.
    """

    def __init__(
        self,
        host_manager: HostManager | list[str] | None = None,
        config: InferenceConfig | None = None,
        *,
        usage: UsageSink | None = None,
        rng: random.Random | None = None,
        connector: Connector | None = None,
        signer: PrivateKey | None = None,
        payments: Payments | None = None,
    ) -> None:
        super().__init__(host_manager, config, usage=usage, rng=rng, connector=connector, signer=signer,
                         payments=payments)
        self._sessions: SessionManager | None = None

    # ------------------------------------------------------------------ the brief's API

    async def stream_inference(self, prompt: str, options: InferenceOptions | Mapping[str, Any] | None = None,
                               **kwargs: Any) -> AsyncIterator[str]:
        """Yield the answer's text pieces from the best available host (automatic selection)."""
        async with self.stream(prompt, options, kind="stream", **kwargs) as stream:
            async for piece in stream:
                yield piece

    async def direct_inference(self, prompt: str, host_url: str,
                               options: InferenceOptions | Mapping[str, Any] | None = None,
                               **kwargs: Any) -> AsyncIterator[str]:
        """Yield the answer's text pieces from the host at ``host_url`` (retries stay on that host)."""
        async with self.stream(prompt, options, host=host_url, kind="direct", **kwargs) as stream:
            async for piece in stream:
                yield piece

    async def session_inference(self, session_id: str, prompt: str,
                                options: InferenceOptions | Mapping[str, Any] | None = None,
                                **kwargs: Any) -> AsyncIterator[str]:
        """Yield the answer to ``prompt`` within a session, which keeps the conversation."""
        async for piece in self.sessions.session_inference(session_id, prompt, options, **kwargs):
            yield piece

    async def select_best_host(self, requirements: HostRequirements | None = None, *,
                               mode: str = "auto") -> HostInfo:
        """Return the best host for ``requirements`` in a selection ``mode`` (auto, cheapest,
        fastest, reliable), discovering and probing as needed."""
        return await self._call_on_owner(self.host_manager.select_best_host(requirements, mode=mode))

    async def batch(self, prompts: Sequence[str], options: InferenceOptions | Mapping[str, Any] | None = None, *,
                    max_concurrency: int | None = None, per_host_concurrency: int | None = None,
                    progress: Callable[[int, int, int], Any] | None = None,
                    requirements: HostRequirements | None = None, **kwargs: Any) -> Any:
        """Run many prompts across hosts and return a pandas DataFrame, one row per prompt.

        See :func:`fabstir_jupyter.batch.run_batch`: bounded concurrency overall and per host,
        failover, ``progress(done, total, errors)`` after each prompt; a bad prompt or a dead host
        gives a row with an error, never an exception.
        """
        return await self._call_on_owner(run_batch(
            self, prompts, options, max_concurrency=max_concurrency, per_host_concurrency=per_host_concurrency,
            progress=progress, requirements=requirements, **kwargs))

    def batch_blocking(self, prompts: Sequence[str], options: InferenceOptions | Mapping[str, Any] | None = None,
                       **kwargs: Any) -> Any:
        """Blocking :meth:`batch`, for scripts and notebook cells."""
        return self._run_blocking(run_batch(self, prompts, options, **kwargs))

    async def connect_to_host(self, host_url: str) -> WebSocketClient:
        """Open a new WebSocket to a host (the caller owns it and must close it)."""
        return await WebSocketClient(host_url, self.config, headers=self.config.auth_headers(host_url)).connect()

    async def ainfer(self, prompt: str, options: InferenceOptions | Mapping[str, Any] | None = None,
                     **kwargs: Any) -> InferenceResult:
        """Run a request to the end and return its :class:`InferenceResult`.

        Raises:
            FabstirError: the request failed (its partial text is in ``error.partial_text``).
        """
        return await _run_to_end(self.stream(prompt, options, kind="infer", **kwargs))

    def infer(self, prompt: str, options: InferenceOptions | Mapping[str, Any] | None = None, *,
              timeout: float | None = None, **kwargs: Any) -> InferenceResult:
        """Blocking :meth:`ainfer`, usable from scripts and from a running loop (e.g. a notebook cell).

        Bad input raises here, in the caller's thread, before anything is scheduled. Ctrl-C cancels
        the request on the host and re-raises ``KeyboardInterrupt``.
        """
        stream = self.stream(prompt, options, kind="infer", **kwargs)
        return self._run_blocking(_run_to_end(stream), timeout)

    @property
    def sessions(self) -> SessionManager:
        """The session manager sharing this manager's hosts, connections and usage."""
        if self._sessions is None:
            self._sessions = SessionManager(self)
        return self._sessions

    async def _release_resources(self) -> None:
        if self._sessions is not None:
            await self._sessions.aclose()
        await super()._release_resources()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> InferenceManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> InferenceManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _run_to_end(stream: InferenceStream) -> InferenceResult:
    async with stream:
        await stream.read()
    return stream.result()
