"""Reference hosts for tests: real servers on loopback port 0, started and closed in one place.

The fixtures ``start_host`` (hosts on the test's own event loop) and ``start_threaded_host`` (hosts
on a private loop thread, for tests that block their thread, e.g. in a magic or a blocking
``infer()``) in ``tests/conftest.py`` both start hosts through :class:`RunningHosts`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fabstir_jupyter.host import Backend, HostConfig, HostServer, ScriptedBackend
from fabstir_jupyter.host.backends import GenerationParams, GenerationStats


class CountingBackend(ScriptedBackend):
    """A scripted backend that counts the generations it starts (to show one never ran)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generations = 0

    def generate(self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats) -> AsyncIterator[str]:
        self.generations += 1
        return super().generate(params, cancel, stats)


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
