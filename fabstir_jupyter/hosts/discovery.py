"""Host discovery: sources of hosts, and the :class:`HostManager` that merges, probes and caches them.

A discovery source is anything with ``async discover() -> list[HostInfo]``. :class:`StaticSource`
serves a fixed list (``hosts=[...]`` or ``FABSTIR_HOSTS``, read by
:func:`~fabstir_jupyter.settings.hosts_from_env`); the chain registry source plugs in the same way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeAlias

from ..config import HostRequirements, InferenceConfig, validate_mode
from ..errors import InvalidOptions
from ..settings import hosts_from_env
from .info import HostInfo
from .keys import HostKeys
from .probe import HostProber
from .selection import select_host

__all__ = ["DiscoverySource", "StaticSource", "HostManager", "hosts_from_env"]

HostLike: TypeAlias = str | HostInfo


class DiscoverySource(Protocol):
    """Where hosts come from."""

    async def discover(self) -> list[HostInfo]:
        """Return the hosts this source knows now."""
        ...


def _as_host(item: HostLike) -> HostInfo:
    if isinstance(item, HostInfo):
        return item
    if isinstance(item, str):
        return HostInfo.from_url(item)
    raise InvalidOptions(f"a host must be a URL or a HostInfo, not {type(item).__name__}", field="hosts")


class StaticSource:
    """A fixed list of hosts, given as URLs or :class:`HostInfo`."""

    def __init__(self, hosts: Iterable[HostLike]) -> None:
        self._hosts = [_as_host(h) for h in hosts]

    async def discover(self) -> list[HostInfo]:
        return list(self._hosts)


class HostManager:
    """Know the hosts: discover them from sources, probe them, keep their measurements.

    Args:
        hosts: a static host list (URLs or :class:`HostInfo`).
        sources: further discovery sources (e.g. a chain registry).
        config: TLS and timeout settings for probes.
        probe_timeout: bound of one host probe, in seconds.
        cache_ttl: seconds a discovery result is reused before sources are read again.
        rng: randomness for tie-breaking in selection (seed it for reproducible picks).

    Attributes:
        keys: finds hosts' encryption keys (:class:`~fabstir_jupyter.hosts.keys.HostKeys`), recovering
            the keys of hosts that publish none through the sources that can
            (``recover_public_key``), each recovery bounded by ``config.connection_timeout``.
    """

    def __init__(
        self,
        hosts: Iterable[HostLike] | None = None,
        *,
        sources: Sequence[DiscoverySource] = (),
        config: InferenceConfig | None = None,
        probe_timeout: float = 5.0,
        cache_ttl: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or InferenceConfig()
        self._sources: list[DiscoverySource] = list(sources)
        if hosts:
            self._sources.insert(0, StaticSource(hosts))
        self.prober = HostProber(self.config, timeout=probe_timeout)
        self.cache_ttl = cache_ttl
        self.rng = rng or random.Random()
        self._hosts: dict[str, HostInfo] = {}
        self._discovered_at: float | None = None
        self._lock: asyncio.Lock | None = None
        self.keys = HostKeys(self._sources, timeout=self.config.connection_timeout)

    def __repr__(self) -> str:
        return f"<HostManager hosts={len(self._hosts)} sources={len(self._sources)}>"

    @property
    def hosts(self) -> list[HostInfo]:
        """The hosts known so far (no I/O)."""
        return list(self._hosts.values())

    def add_source(self, source: DiscoverySource) -> None:
        """Add a discovery source; the next discovery reads it."""
        self._sources.append(source)
        self._discovered_at = None

    def add_host(self, host: HostLike) -> HostInfo:
        """Add (or return the known) host for a URL or :class:`HostInfo`, without probing."""
        info = _as_host(host)
        known = self._hosts.get(info.key)
        if known is None:
            self._hosts[info.key] = known = info
        return known

    def find(self, url_or_address: str) -> HostInfo | None:
        """Return the known host with this registry address or URL, if any."""
        text = url_or_address.strip().lower()
        if text in self._hosts:
            return self._hosts[text]
        try:
            probe = HostInfo.from_url(url_or_address)
        except InvalidOptions:
            return None
        for host in self._hosts.values():
            if host.ws_url == probe.ws_url:
                return host
        return None

    async def discover_all_active_hosts(self, *, refresh: bool = False, probe: bool = True) -> list[HostInfo]:
        """Read every source, merge hosts by identity, probe the new ones, and return the reachable.

        Results are cached for ``cache_ttl`` seconds; ``refresh=True`` reads the sources again and
        re-probes every host. Measurements of known hosts are kept across discoveries.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            fresh = self._discovered_at is not None and time.monotonic() - self._discovered_at < self.cache_ttl
            if refresh or not fresh:
                found = await asyncio.gather(*(source.discover() for source in self._sources))
                to_probe = []
                for host in (h for batch in found for h in batch):
                    known = self._hosts.get(host.key)
                    if known is None:
                        self._hosts[host.key] = known = host
                        to_probe.append(host)
                    elif refresh:
                        to_probe.append(known)
                if probe and to_probe:
                    await asyncio.gather(*(self.prober.probe(h) for h in to_probe))
                self._discovered_at = time.monotonic()
        return [h for h in self._hosts.values() if h.reachable]

    async def describe(self, host: HostInfo) -> HostInfo:
        """Make sure the host's ``/v1/version`` features (and models) are known; read once."""
        await self.prober.describe(host)
        return host

    async def select_best_host(
        self,
        requirements: HostRequirements | None = None,
        *,
        mode: str | None = "auto",
        exclude: Iterable[HostInfo] = (),
    ) -> HostInfo:
        """Discover (cached) and pick a host for ``requirements`` in selection ``mode``.

        ``mode`` is ``"auto"`` (``None`` too), ``"cheapest"``, ``"fastest"`` or ``"reliable"``
        (see :mod:`fabstir_jupyter.hosts.selection`); ``exclude`` is avoided while other hosts fit.

        Raises:
            InvalidOptions: unknown ``mode`` (checked before any I/O).
            NoHostsAvailable, ModelNotAvailable: nothing fits; the message says what is available.
        """
        mode = validate_mode(mode)
        await self.discover_all_active_hosts()
        return select_host(self.hosts, requirements, mode=mode, exclude=exclude, rng=self.rng)

    async def aclose(self) -> None:
        """Release the probe HTTP client; idempotent."""
        await self.prober.aclose()

    close = aclose

    async def __aenter__(self) -> HostManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
