"""Host selection: plain functions over host lists, no I/O.

Selection runs in three steps (spec/PROTOCOL.md §9):

1. **Filter** (:func:`eligible_hosts`): unreachable hosts, hosts that do not serve the model, and
   hosts below ``min_stake`` or above ``max_latency`` are dropped; busy hosts are kept only when
   nothing else is left, and hosts that billed a paid job for more tokens than they reported
   (``overbilled_tokens``) only when nothing but them is left. When nothing is left, the error
   lists what is available, or each host with the reason it is not usable (its ``last_error``).
2. **Score** (:func:`score_host`): ``w_stake·stake + w_price·price + w_uptime·uptime +
   w_latency·latency`` with the production SDK's weights per mode (:data:`MODE_WEIGHTS`), each factor
   in [0, 1] (:func:`score_factors`):

   * stake: whole tokens, linear up to a cap of 10 000 (:data:`STAKE_CAP`); no stake scores 0;
   * price: the host's stable-token price for the model (raw units, precision 1000), placed on a
     logarithmic scale between 100 (score 1) and 100 000 (score 0). Production uses a linear scale,
     which squeezes every realistic price (0.1 to 10 USDC per 1 000 tokens) into the top tenth of
     the range, so ``cheapest`` could not tell a price from ten times that price; on the log scale
     each tenfold step is a third of the range. An unpriced host (no stable price, or 0) gets the
     neutral :data:`NEUTRAL_PRICE_SCORE`: neither a bargain nor a penalty;
   * uptime: the host's *measured* success rate over real requests, smoothed towards a prior of
     0.9 worth two requests (``(successes + 1.8) / (requests + 2)``, additive smoothing), so a new
     host starts at 0.9 and one failure on a fresh host does not condemn it;
   * latency: the *measured* latency (probe and real requests) on a logarithmic scale between
     10 ms (score 1) and 5 s (score 0), since a host ten times further away is what matters, not
     a few milliseconds more: 20 ms scores 0.89, 100 ms 0.63, 1 s 0.26. Unknown latency takes the
     neutral prior 0.5 (about 224 ms).

   A host in the preferred ``region`` gets :data:`REGION_BONUS` on top: a preference, not a filter.
3. **Pick** (:func:`select_host`): among the top 10 by score, hosts more than
   :data:`CLEAR_MARGIN` below the best are dropped (a clear winner is picked deterministically), and
   the rest are drawn with weights ``exp((score - best) / PICK_TEMPERATURE)``: hosts of equal score
   share the load evenly, a host 0.02 below the best is drawn e times less often. The randomness
   is a seedable :class:`random.Random`.

Modes are ``auto``, ``cheapest``, ``fastest`` and ``reliable``; a specific host is asked for with
``host_address`` and never reaches this module.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..config import SELECTION_MODES, HostRequirements, validate_mode
from ..errors import ModelNotAvailable, NoHostsAvailable
from ..urls import redact_url
from .info import HostInfo, resolve_model

__all__ = [
    "MODE_WEIGHTS",
    "SELECTION_MODES",
    "ModeWeights",
    "ScoreFactors",
    "eligible_hosts",
    "no_usable_host",
    "rank_hosts",
    "score_factors",
    "score_host",
    "select_host",
    "stable_price",
]


class ModeWeights(NamedTuple):
    """Weights of the four score factors in one selection mode; they sum to 1."""

    stake: float
    price: float
    uptime: float
    latency: float


class ScoreFactors(NamedTuple):
    """The four normalised score factors of one host, each in [0, 1]."""

    stake: float
    price: float
    uptime: float
    latency: float


#: The production SDK's weights per mode (spec/PROTOCOL.md §9).
MODE_WEIGHTS: dict[str, ModeWeights] = {
    "auto": ModeWeights(stake=0.35, price=0.30, uptime=0.20, latency=0.15),
    "cheapest": ModeWeights(stake=0.15, price=0.70, uptime=0.10, latency=0.05),
    "reliable": ModeWeights(stake=0.50, price=0.05, uptime=0.40, latency=0.05),
    "fastest": ModeWeights(stake=0.10, price=0.20, uptime=0.10, latency=0.60),
}
assert set(MODE_WEIGHTS) == set(SELECTION_MODES)

#: Stake (whole tokens) at and above which the stake factor is 1.
STAKE_CAP = 10_000.0
#: Stable price (raw units, precision 1000) scoring 1, and the one scoring 0.
PRICE_FLOOR, PRICE_CEILING = 100, 100_000
#: Price factor of a host with no stable price.
NEUTRAL_PRICE_SCORE = 0.5
#: Success-rate prior and its weight in requests (additive smoothing of the measured rate).
UPTIME_PRIOR, UPTIME_PRIOR_WEIGHT = 0.9, 2.0
#: Latency (ms) scoring 1, and the one scoring 0.
LATENCY_FLOOR_MS, LATENCY_CEILING_MS = 10.0, 5_000.0
#: Latency factor of a host whose latency was never measured.
NEUTRAL_LATENCY_SCORE = 0.5
#: Added to the score of a host in the preferred region.
REGION_BONUS = 0.1
#: Hosts considered by the weighted pick.
TOP_N = 10
#: Hosts further than this below the best score are never picked.
CLEAR_MARGIN = 0.05
#: Score difference that makes a host e times less likely to be picked.
PICK_TEMPERATURE = 0.02


#: Unusable hosts named, each with its reason, in a NO_HOSTS_AVAILABLE message.
LISTED_UNUSABLE_HOSTS = 5


def _why_unusable(host: HostInfo) -> str:
    error = host.last_error
    reason = "marked unreachable" if error is None else f"{error.code}: {error.message}"
    return f"{redact_url(host.ws_url)} ({reason})"


def no_usable_host(hosts: Sequence[HostInfo]) -> NoHostsAvailable:
    """Build the error for hosts none of which is usable, naming each (the first few) and why.

    The hint is the hosts' own when they all give the same one (a wrong scheme, say).
    """
    shown = "; ".join(_why_unusable(h) for h in hosts[:LISTED_UNUSABLE_HOSTS])
    more = len(hosts) - LISTED_UNUSABLE_HOSTS
    if more > 0:
        shown += f"; and {more} more"
    message = f"no usable host: {shown}" if len(hosts) == 1 else f"none of {len(hosts)} hosts is usable: {shown}"
    hints = {h.last_error.hint for h in hosts if h.last_error is not None}
    return NoHostsAvailable(message, hint=hints.pop() if len(hints) == 1 else None)


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

    Busy hosts are returned only when no other host fits; hosts that overbilled a paid job only when
    no other host (busy or not) fits.

    Raises:
        NoHostsAvailable: no host is known or reachable (the message names the first
            :data:`LISTED_UNUSABLE_HOSTS` hosts, each with why it is not usable).
        ModelNotAvailable: hosts are reachable but none serves the model (the message lists models).
    """
    known = list(hosts)
    if not known:
        raise NoHostsAvailable("no hosts are known", hint="pass hosts=[...] or set FABSTIR_HOSTS")
    reachable = [h for h in known if h.reachable]
    if not reachable:
        raise no_usable_host(known)
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
    honest = [h for h in fitting if not h.overbilled_tokens]
    ready = [h for h in honest if h.health != "busy"]
    return ready or honest or fitting


def stable_price(host: HostInfo, model: str | None = None) -> int | None:
    """Return the host's stable-token price for ``model`` (raw units, precision 1000), or ``None``.

    The model is resolved as a request would resolve it (no name: the host's default model). When
    the host's prices do not name that model, its cheapest stable price stands in. ``None`` means
    not priced in the stable token.
    """
    prices = host.prices
    if not prices:
        return None
    key: str | None = None
    if host.models:
        try:
            key = resolve_model(model, host)
        except ModelNotAvailable:
            key = None
    elif model is not None:
        key = model
    if key is not None and key in prices:
        return prices[key].get("stable") or None
    listed = [p.get("stable") for p in prices.values() if p.get("stable")]
    return min(listed) if listed else None  # type: ignore[type-var]


def _log_score(value: float, floor: float, ceiling: float) -> float:
    """1 at ``floor`` or below, 0 at ``ceiling`` or above, linear in log(value) between."""
    clamped = min(max(value, floor), ceiling)
    return 1.0 - math.log(clamped / floor) / math.log(ceiling / floor)


def score_factors(host: HostInfo, requirements: HostRequirements | None = None) -> ScoreFactors:
    """Return the host's four normalised factors (see the module docstring for each scale)."""
    requirements = requirements or HostRequirements()
    stake = min(max(host.stake or 0.0, 0.0), STAKE_CAP) / STAKE_CAP

    price = stable_price(host, requirements.model)
    price_score = NEUTRAL_PRICE_SCORE if price is None else _log_score(price, PRICE_FLOOR, PRICE_CEILING)

    successes = host.requests - host.failures
    uptime = (successes + UPTIME_PRIOR * UPTIME_PRIOR_WEIGHT) / (host.requests + UPTIME_PRIOR_WEIGHT)

    if host.latency_ms is None:
        latency = NEUTRAL_LATENCY_SCORE
    else:
        latency = _log_score(host.latency_ms, LATENCY_FLOOR_MS, LATENCY_CEILING_MS)
    return ScoreFactors(stake=stake, price=price_score, uptime=uptime, latency=latency)


def score_host(host: HostInfo, requirements: HostRequirements | None = None, mode: str = "auto") -> float:
    """Score a host for ``mode``: the weighted factors in [0, 1], plus the region bonus.

    Raises:
        InvalidOptions: ``mode`` is not one of :data:`SELECTION_MODES` (``field="mode"``).
    """
    weights = MODE_WEIGHTS[validate_mode(mode)]
    requirements = requirements or HostRequirements()
    factors = score_factors(host, requirements)
    score = (
        weights.stake * factors.stake
        + weights.price * factors.price
        + weights.uptime * factors.uptime
        + weights.latency * factors.latency
    )
    if requirements.region and host.region and host.region.strip().lower() == requirements.region.strip().lower():
        score += REGION_BONUS
    return score


def rank_hosts(
    hosts: Iterable[HostInfo],
    requirements: HostRequirements | None = None,
    *,
    mode: str = "auto",
    exclude: Iterable[HostInfo] = (),
) -> list[tuple[HostInfo, float]]:
    """Return ``(host, score)`` for every eligible host, best first (ties keep the input order).

    Hosts in ``exclude`` are left out while other eligible hosts exist.

    Raises:
        InvalidOptions: unknown ``mode``.
        NoHostsAvailable, ModelNotAvailable: see :func:`eligible_hosts`.
    """
    mode = validate_mode(mode)
    requirements = requirements or HostRequirements()
    candidates = eligible_hosts(hosts, requirements)
    avoided = {id(h) for h in exclude}
    fresh = [h for h in candidates if id(h) not in avoided] or candidates
    scored = [(h, score_host(h, requirements, mode)) for h in fresh]
    scored.sort(key=lambda pair: -pair[1])
    return scored


def select_host(
    hosts: Sequence[HostInfo],
    requirements: HostRequirements | None = None,
    *,
    mode: str = "auto",
    exclude: Iterable[HostInfo] = (),
    rng: random.Random | None = None,
) -> HostInfo:
    """Pick a host for ``requirements`` in ``mode``, avoiding ``exclude`` while others exist.

    Among the :data:`TOP_N` best, a host more than :data:`CLEAR_MARGIN` below the best score is
    never picked; the others are drawn with weights ``exp((score - best) / PICK_TEMPERATURE)``
    using ``rng`` (seed it for reproducible picks), so load spreads over hosts of equal score.

    Raises:
        InvalidOptions: unknown ``mode`` (``field="mode"``).
        NoHostsAvailable, ModelNotAvailable: nothing fits; the message says what is available.
    """
    ranked = rank_hosts(hosts, requirements, mode=mode, exclude=exclude)[:TOP_N]
    best = ranked[0][1]
    pool = [(h, s) for h, s in ranked if best - s <= CLEAR_MARGIN]
    if len(pool) == 1:
        return pool[0][0]
    rng = rng or random.Random()
    weights = [math.exp((s - best) / PICK_TEMPERATURE) for _, s in pool]
    return rng.choices([h for h, _ in pool], weights=weights)[0]
