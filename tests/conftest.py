"""Shared fixtures: reference hosts on loopback (``start_host``, ``start_threaded_host``) and client managers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from _hosts import RunningHosts
from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.host import Backend, HostServer
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.runner import LoopThread
from fabstir_jupyter.usage import ListSink


@pytest.fixture
async def start_host() -> AsyncIterator[Any]:
    """Start reference hosts on the test's loop: ``await start_host(backend=..., **HostConfig fields)``.

    The backend defaults to an unthrottled :class:`~fabstir_jupyter.host.ScriptedBackend`; every
    host is closed after the test.
    """
    hosts = RunningHosts()
    yield hosts.start
    await hosts.aclose()


@pytest.fixture
def start_threaded_host() -> Iterator[Callable[..., HostServer]]:
    """Start reference hosts on a private loop thread: ``start_threaded_host(backend=..., **HostConfig fields)``.

    For tests that block their own thread (a magic, a blocking ``infer()`` inside a coroutine):
    the thread keeps the hosts serving meanwhile.
    """
    loop = LoopThread("test-hosts")
    hosts = RunningHosts()

    def start(*, backend: Backend | None = None, **config: Any) -> HostServer:
        return loop.run(hosts.start(backend=backend, **config))

    yield start
    loop.run(hosts.aclose())
    loop.stop()


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
