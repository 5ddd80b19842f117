"""Reference hosts for tests: real servers on loopback port 0, started and closed in one place.

The fixtures ``start_host`` (hosts on the test's own event loop) and ``start_threaded_host`` (hosts
on a private loop thread, for tests that block their thread, e.g. in a magic or a blocking
``infer()``) in ``tests/conftest.py`` both start hosts through :class:`RunningHosts`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from typing import Any

from fabstir_jupyter.host import Backend, HostConfig, HostServer, ScriptedBackend
from fabstir_jupyter.host.backends import GenerationParams, GenerationStats


class CountingBackend(ScriptedBackend):
    """A scripted backend that counts the generations it starts and the tokens each one yielded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generations = 0
        self.tokens: list[int] = []  # tokens yielded, per generation

    def generate(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        self.generations += 1
        self.tokens.append(0)
        return self._counted(len(self.tokens) - 1, super().generate(params, cancel, stats))

    async def _counted(self, index: int, tokens: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        try:
            async for token in tokens:
                self.tokens[index] += 1
                yield token
        finally:
            await tokens.aclose()  # at once, as the host closes this wrapper


class GatedBackend(ScriptedBackend):
    """A scripted backend that holds every answer until the test opens :attr:`gate` (from any thread)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()

    async def generate(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        while not self.gate.is_set():  # pacing the fake host, not a wait before an assertion
            if cancel.is_set():
                return
            await asyncio.sleep(0.01)
        tokens = super().generate(params, cancel, stats)
        try:
            async for token in tokens:
                yield token
        finally:
            await tokens.aclose()  # at once, as the host closes this wrapper


class RunningHosts:
    """The hosts a test started; :meth:`aclose` closes them all."""

    def __init__(self) -> None:
        self.servers: list[HostServer] = []

    async def start(self, *, backend: Backend | None = None, **config: Any) -> HostServer:
        """Start a host with ``HostConfig(**config)`` and ``backend`` (default: an unthrottled scripted one)."""
        server = HostServer(HostConfig(**config), backend or ScriptedBackend())
        await server.start()
        self.servers.append(server)
        return server

    async def aclose(self) -> None:
        """Close every host started, in the order they started."""
        for server in self.servers:
            await server.close()
        self.servers.clear()
