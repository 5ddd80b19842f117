"""Shared fixtures: reference hosts on loopback (scripted backend) and client managers."""

from __future__ import annotations

import pytest

from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.host.scripted import ScriptedBackend
from fabstir_jupyter.host.server import HostConfig, HostServer
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.usage import ListSink


@pytest.fixture
async def start_host():
    """Start reference hosts with the scripted backend: ``await start_host(host_cfg..., backend=...)``."""
    servers: list[HostServer] = []

    async def start(*, backend: dict | None = None, **host_config) -> HostServer:
        server = HostServer(HostConfig(**host_config), ScriptedBackend(**(backend or {})))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def fast_config() -> InferenceConfig:
    """Client settings with short timeouts and no backoff wait, for fault tests."""
    return InferenceConfig(
        connection_timeout=5.0,
        first_token_timeout=5.0,
        idle_timeout=5.0,
        backoff_initial=0.0,
        backoff_max=0.01,
        usage_db=":memory:",
    )


@pytest.fixture
async def make_manager(fast_config):
    """Build managers recording usage into a list: ``make_manager(hosts, **config_changes)``."""
    managers: list[InferenceManager] = []

    def make(hosts, **changes) -> InferenceManager:
        config = fast_config.replace(**changes) if changes else fast_config
        manager = InferenceManager(list(hosts), config, usage=ListSink())
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.aclose()
