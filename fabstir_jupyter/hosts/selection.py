"""Host selection: plain functions over host lists, no I/O.

Filters first (reachable, serves the model, ``min_stake``, ``max_latency``), then scores what is
left. Measured latency and success rate count, and ``region`` is a preference that raises a host's
score, never a filter (spec/PROTOCOL.md §9). Selection modes and the stake/price weights of §9 build
on :func:`score_host`.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from ..config import HostRequirements
from ..errors import ModelNotAvailable, NoHostsAvailable
from .info import HostInfo, resolve_model

__all__ = ["eligible_hosts", "score_host", "select_host"]

_REGION_BONUS = 0.25
_UNKNOWN_LATENCY_MS = 250.0


def _serves(host: HostInfo, model: str | None) -> bool:
    if model is None or not host.models:
        return True
    try:
        resolve_model(model, host)
    except ModelNotAvailable:
        return False
    return True


def eligible_hosts(hosts: Iterable[HostInfo], requirements: HostRequirements) -> list[HostInfo]:
    """Return the hosts that satisfy every hard requirement.

    Raises:
        NoHostsAvailable: no host is known or reachable (the message lists the unreachable ones).
        ModelNotAvailable: hosts are reachable but none serves the model (the message lists models).
    """
    known = list(hosts)
    if not known:
        raise NoHostsAvailable("no hosts are known", hint="pass hosts=[...] or set FABSTIR_HOSTS")
    reachable = [h for h in known if h.reachable]
    if not reachable:
        raise NoHostsAvailable(
            f"none of {len(known)} hosts is reachable: {', '.join(h.api_url for h in known[:5])}"
        )
    serving = [h for h in reachable if _serves(h, requirements.model)]
    if not serving:
        models = sorted({m for h in reachable for m in h.models})
        raise ModelNotAvailable(f"no host serves model {requirements.model!r}; available: {', '.join(models)}")
    fitting = serving
    if requirements.min_stake is not None:
        fitting = [h for h in fitting if (h.stake or 0) >= requirements.min_stake]
    if requirements.max_latency is not None:
        fitting = [h for h in fitting if h.latency_ms is not None and h.latency_ms <= requirements.max_latency]
    if not fitting:
        raise NoHostsAvailable(
            f"{len(serving)} hosts serve the model but none meets min_stake={requirements.min_stake} "
            f"and max_latency={requirements.max_latency} ms"
        )
    return fitting


def score_host(host: HostInfo, requirements: HostRequirements) -> float:
    """Score a host in [0, 1.25]: lower latency and a better success record score higher."""
    latency = host.latency_ms if host.latency_ms is not None else _UNKNOWN_LATENCY_MS
    latency_score = 1.0 / (1.0 + latency / 100.0)
    success = host.success_rate if host.success_rate is not None else 0.9
    score = 0.5 * latency_score + 0.5 * success
    if requirements.region and host.region and host.region.lower() == requirements.region.lower():
        score += _REGION_BONUS
    return score


def select_host(
    hosts: Sequence[HostInfo],
    requirements: HostRequirements | None = None,
    *,
    exclude: Iterable[HostInfo] = (),
    rng: random.Random | None = None,
) -> HostInfo:
    """Pick the best host for ``requirements``, avoiding ``exclude`` while others exist.

    Ties are broken by ``rng`` (seedable) so load spreads over equal hosts.
    """
    requirements = requirements or HostRequirements()
    candidates = eligible_hosts(hosts, requirements)
    avoided = {id(h) for h in exclude}
    fresh = [h for h in candidates if id(h) not in avoided] or candidates
    rng = rng or random.Random()
    return max(fresh, key=lambda h: (round(score_host(h, requirements), 6), rng.random()))
