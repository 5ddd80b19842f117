"""Host selection: modes, score factors, the weighted pick, region preference, filters and errors."""

from __future__ import annotations

import collections
import math
import random

import pytest

from fabstir_jupyter.config import HostRequirements, InferenceConfig, resolve_options
from fabstir_jupyter.errors import InvalidOptions, ModelNotAvailable, NoHostsAvailable
from fabstir_jupyter.host.scripted import ScriptedBackend
from fabstir_jupyter.hosts import HostInfo, HostManager
from fabstir_jupyter.hosts.selection import (
    CLEAR_MARGIN,
    MODE_WEIGHTS,
    REGION_BONUS,
    rank_hosts,
    score_factors,
    score_host,
    select_host,
    stable_price,
)

DRAWS = 200


def host(name, *, price=None, latency=None, stake=None, requests=0, failures=0, region=None, models=("m",),
         health="ok"):
    prices = {} if price is None else {m: {"native": 0, "stable": price} for m in models}
    return HostInfo.from_url(f"http://{name}:1", models=models, prices=prices, latency_ms=latency, stake=stake,
                             requests=requests, failures=failures, region=region, health=health)


def market():
    """Four hosts, each best at one thing: price, latency, track record and stake, or balance."""
    return {
        "cheap": host("cheap", price=120, latency=300.0, stake=2000, requests=10, failures=1),
        "fast": host("fast", price=5000, latency=10.0, stake=2000, requests=10, failures=1),
        "solid": host("solid", price=60000, latency=150.0, stake=10000, requests=100),
        "balanced": host("balanced", price=800, latency=50.0, stake=6000, requests=20, failures=1),
    }


def draw(hosts, requirements=None, *, mode="auto", seed=0, n=DRAWS, **kwargs):
    rng = random.Random(seed)
    picks = collections.Counter(
        select_host(hosts, requirements, mode=mode, rng=rng, **kwargs).api_url for _ in range(n)
    )
    return {url.removeprefix("http://").removesuffix(":1"): count for url, count in picks.items()}


def test_mode_weights_are_the_production_weights():
    """stake, price, uptime, latency weights per mode are spec/PROTOCOL.md §9's."""
    assert {mode: tuple(w) for mode, w in MODE_WEIGHTS.items()} == {
        "auto": (0.35, 0.30, 0.20, 0.15),
        "cheapest": (0.15, 0.70, 0.10, 0.05),
        "reliable": (0.50, 0.05, 0.40, 0.05),
        "fastest": (0.10, 0.20, 0.10, 0.60),
    }


@pytest.mark.parametrize("mode, winner", [
    ("cheapest", "cheap"),
    ("fastest", "fast"),
    ("reliable", "solid"),
    ("auto", "balanced"),
])
def test_each_mode_picks_its_own_host(mode, winner):
    """On one market every mode has a different, clear winner, picked in every draw."""
    hosts = list(market().values())
    assert draw(hosts, HostRequirements(model="m"), mode=mode) == {winner: DRAWS}


@pytest.mark.parametrize("mode, winner", [("cheapest", "cheap"), ("fastest", "fast")])
def test_cheapest_and_fastest_win_over_a_crowd_of_average_hosts(mode, winner):
    """Against eight middling hosts the cheapest/fastest host still wins nearly every draw."""
    crowd = [host(f"avg{i}", price=4000 + 100 * i, latency=80.0 + i, stake=5000, requests=10) for i in range(8)]
    special = {
        "cheap": host("cheap", price=200, latency=90.0, stake=5000, requests=10),
        "fast": host("fast", price=4500, latency=12.0, stake=5000, requests=10),
    }
    picks = draw(crowd + list(special.values()), mode=mode, seed=7)
    assert picks.get(winner, 0) >= 0.95 * DRAWS


def test_stake_is_linear_up_to_the_cap():
    """Stake in whole tokens scores stake/10 000, capped at 1; none scores 0."""
    assert score_factors(host("a", stake=5000)).stake == pytest.approx(0.5)
    assert score_factors(host("a", stake=25000)).stake == 1.0
    assert score_factors(host("a")).stake == 0.0


@pytest.mark.parametrize("price, expected", [
    (50, 1.0), (100, 1.0), (1000, 2 / 3), (10_000, 1 / 3), (100_000, 0.0), (5_000_000, 0.0),
])
def test_price_score_is_logarithmic_between_100_and_100000(price, expected):
    """Lower stable price scores higher; each tenfold step costs a third of the range."""
    assert score_factors(host("a", price=price), HostRequirements(model="m")).price == pytest.approx(expected)


def test_unpriced_hosts_get_a_neutral_price_score():
    """No stable price (none, 0 or native only) scores 0.5, between a bargain and a rip-off."""
    native_only = HostInfo.from_url("http://n:1", models=("m",), prices={"m": {"native": 10**12, "stable": 0}})
    for info in (host("a"), native_only, host("z", price=0)):
        assert score_factors(info, HostRequirements(model="m")).price == 0.5
    assert stable_price(native_only, "m") is None


def test_price_is_the_requested_models_price():
    """A host priced per model is scored on the model asked for (its default model without one)."""
    info = HostInfo.from_url("http://a:1", models=("big", "small"),
                             prices={"big": {"stable": 50_000}, "small": {"stable": 200}})
    assert stable_price(info, "small") == 200
    assert stable_price(info, "big") == 50_000
    assert stable_price(info) == 50_000
    assert stable_price(HostInfo.from_url("http://b:1", prices={"x": {"stable": 900}, "y": {"stable": 300}})) == 300


def test_uptime_is_the_measured_success_rate_with_a_prior():
    """A new host starts at 0.9; successes raise it, failures lower it, one failure is no verdict."""
    fresh = score_factors(host("a")).uptime
    assert fresh == pytest.approx(0.9)
    assert score_factors(host("a", requests=50)).uptime > 0.99
    assert score_factors(host("a", requests=50, failures=25)).uptime == pytest.approx(0.5, abs=0.02)
    assert 0.5 < score_factors(host("a", requests=1, failures=1)).uptime < fresh


def test_latency_score_is_logarithmic_and_unknown_is_neutral():
    """10 ms or less scores 1, 5 s or more 0, unmeasured 0.5."""
    assert score_factors(host("a", latency=2.0)).latency == 1.0
    assert score_factors(host("a", latency=5000.0)).latency == 0.0
    assert score_factors(host("a", latency=math.sqrt(10 * 5000))).latency == pytest.approx(0.5)
    assert score_factors(host("a")).latency == 0.5


def test_reliable_mode_prefers_the_measured_track_record():
    """Two hosts equal on paper: reliable picks the one whose requests succeed."""
    good = host("good", stake=5000, price=1000, latency=50.0, requests=40, failures=0)
    flaky = host("flaky", stake=5000, price=1000, latency=50.0, requests=40, failures=20)
    assert draw([flaky, good], mode="reliable") == {"good": DRAWS}


def test_equal_hosts_share_the_load():
    """Hosts of equal score are drawn about equally often."""
    hosts = [host(f"h{i}", latency=20.0) for i in range(3)]
    picks = draw(hosts, n=600, seed=3)
    assert set(picks) == {"h0", "h1", "h2"}
    assert all(150 <= count <= 250 for count in picks.values())


def test_weighted_pick_favours_the_best_of_near_ties():
    """A host 0.02 below the best is picked about e times less often; beyond the margin, never."""
    best = host("best", stake=10000)
    near = host("near", stake=10000 - 0.02 / 0.35 * 10000)
    far = host("far", stake=10000 - (CLEAR_MARGIN + 0.01) / 0.35 * 10000)
    assert score_host(best) - score_host(near) == pytest.approx(0.02)
    picks = draw([far, near, best], n=1000, seed=11)
    assert "far" not in picks
    assert picks["best"] / picks["near"] == pytest.approx(math.e, rel=0.3)


def test_only_the_top_ten_are_drawn():
    """Of twelve near-equal hosts, the two lowest-scoring are never picked."""
    hosts = [host(f"h{i:02}", stake=9000 - i) for i in range(12)]
    picks = draw(hosts, n=2000, seed=5)
    assert set(picks) == {f"h{i:02}" for i in range(10)}


def test_a_seeded_rng_makes_picks_reproducible():
    """The same seed gives the same sequence of picks."""
    hosts = [host(f"h{i}") for i in range(5)]
    rng_a, rng_b = random.Random(9), random.Random(9)
    first = [select_host(hosts, rng=rng_a) for _ in range(50)]
    assert first == [select_host(hosts, rng=rng_b) for _ in range(50)]
    assert len(set(map(id, first))) > 1


def test_region_adds_a_bonus_to_matching_hosts():
    """A host in the preferred region (any case) scores REGION_BONUS more, and wins a tie."""
    home = host("home", region="EU-West", latency=30.0)
    away = host("away", region="us-east", latency=30.0)
    requirements = HostRequirements(region="eu-west")
    assert score_host(home, requirements) - score_host(away, requirements) == pytest.approx(REGION_BONUS)
    assert draw([away, home], requirements) == {"home": DRAWS}


def test_region_is_not_a_filter():
    """With no host in the region, others are picked; a much better host abroad still wins."""
    away = host("away", region="us-east")
    assert select_host([away], HostRequirements(region="ap-south")) is away
    local = host("local", region="eu-west", price=90_000)
    bargain = host("bargain", region="us-east", price=150)
    assert draw([local, bargain], HostRequirements(region="eu-west"), mode="cheapest") == {"bargain": DRAWS}


def test_filters_apply_before_scoring():
    """Unreachable, non-serving, under-staked and slow hosts are dropped however well they score."""
    star = host("star", price=100, latency=5.0, stake=10000, requests=100)
    hosts = [
        host("down", price=100, latency=1.0, stake=10000, health="unreachable"),
        host("other", price=100, latency=1.0, stake=10000, models=("x",)),
        host("poor", price=100, latency=1.0, stake=10),
        host("slow", price=100, latency=900.0, stake=10000),
        host("unmeasured", price=100, stake=10000),
        star,
    ]
    requirements = HostRequirements(model="m", min_stake=1000, max_latency=100)
    assert [h for h, _ in rank_hosts(hosts, requirements)] == [star]


def test_excluded_hosts_are_avoided_while_others_exist():
    """exclude removes tried hosts unless nothing else fits."""
    best, other = host("best", stake=10000), host("other")
    assert select_host([best, other], exclude=[best]) is other
    assert select_host([best], exclude=[best]) is best


def test_errors_list_what_is_available():
    """No reachable host and an unserved model give coded errors naming what exists."""
    with pytest.raises(NoHostsAvailable) as exc:
        select_host([host("a", health="unreachable")], mode="cheapest")
    assert "ws://a:1/v1/ws" in str(exc.value)  # the websocket url tried (it keeps a path)
    with pytest.raises(ModelNotAvailable) as exc:
        select_host([host("a", models=("alpha", "beta"))], HostRequirements(model="gamma"), mode="fastest")
    assert "alpha, beta" in str(exc.value)


def test_busy_hosts_are_kept_for_when_nothing_else_fits():
    """A busy host (HOST_BUSY at its last probe) is passed over while a free one fits, and chosen when it
    is the only one: a refusal for load is not a reason to call the host unreachable."""
    from fabstir_jupyter.errors import HostBusy

    busy = host("busy", price=100, latency=5.0, stake=10000)  # the best on every factor
    busy.record_error(HostBusy("connect: host refused the websocket upgrade with HTTP 503"))
    free = host("free", price=90000, latency=4000.0)
    assert busy.health == "busy" and busy.reachable
    rng = random.Random(3)
    assert {select_host([busy, free], rng=rng).api_url for _ in range(DRAWS)} == {free.api_url}
    assert select_host([busy], rng=rng) is busy


def test_hosts_that_overbilled_are_chosen_only_when_nothing_else_fits():
    """A host that proved more tokens than it reported on a settled job is passed over while any other
    host fits, even a busy one; alone (or beside only others like it), it is still chosen."""
    from fabstir_jupyter.errors import HostBusy

    greedy = host("greedy", price=100, latency=5.0, stake=10000)  # the best on every factor
    greedy.overbilled_tokens = 200
    busy = host("busy", price=90000, latency=4000.0)
    busy.record_error(HostBusy("connect: host refused the websocket upgrade with HTTP 503"))
    free = host("free", price=90000, latency=4000.0)
    rng = random.Random(5)
    assert {select_host([greedy, busy, free], rng=rng).api_url for _ in range(DRAWS)} == {free.api_url}
    assert {select_host([greedy, busy], rng=rng).api_url for _ in range(DRAWS)} == {busy.api_url}
    assert select_host([greedy], rng=rng) is greedy


def test_no_usable_host_lists_reasons_bounded_with_a_shared_hint():
    """Each unusable host is listed with its code and reason, the first five then a count; a hint
    all of them share is kept, differing hints are not guessed between."""
    from fabstir_jupyter.errors import ConnectionFailed

    hosts = [host(f"h{i}", health="unreachable") for i in range(7)]
    for h in hosts:
        h.record_error(ConnectionFailed("connect: connection refused", hint="check the port"))
    with pytest.raises(NoHostsAvailable) as info:
        select_host(hosts)
    message = info.value.message
    assert message.startswith("none of 7 hosts is usable: ws://h0:1/v1/ws (CONNECTION_FAILED: connect: "
                              "connection refused); ws://h1:1/v1/ws")
    assert message.endswith("ws://h4:1/v1/ws (CONNECTION_FAILED: connect: connection refused); and 2 more")
    assert info.value.hint == "check the port"
    hosts[0].record_error(ConnectionFailed("connect: tls handshake failed (x)", hint="use ws://"))
    with pytest.raises(NoHostsAvailable) as info:
        select_host(hosts)
    assert info.value.hint is None


@pytest.mark.parametrize("mode", ["specific", "Fastest!", "", 3, True])
def test_unknown_mode_is_invalid_options_naming_mode(mode):
    """select_host, score_host and resolve_options refuse an unknown mode with field='mode'."""
    for call in (
        lambda: select_host([host("a")], mode=mode),
        lambda: score_host(host("a"), mode=mode),
        lambda: resolve_options(None, {"mode": mode}, InferenceConfig()),
    ):
        with pytest.raises(InvalidOptions) as exc:
            call()
        assert exc.value.field == "mode"


def test_mode_option_is_normalised():
    """InferenceOptions.mode defaults to None (auto) and accepts any case."""
    config = InferenceConfig()
    assert resolve_options(None, {}, config).mode is None
    assert resolve_options(None, {"mode": " Cheapest"}, config).mode == "cheapest"
    assert select_host([host("a")], mode=None).api_url == "http://a:1"


async def test_host_manager_selects_by_mode(start_host):
    """select_best_host(mode=...) discovers, probes and picks by mode; a bad mode fails before I/O."""
    dear = await start_host(backend=ScriptedBackend(model_id="m"))
    cheap = await start_host(backend=ScriptedBackend(model_id="m"))
    hosts = [
        HostInfo.from_url(dear.ws_url, prices={"m": {"native": 0, "stable": 90_000}}, stake=10000),
        HostInfo.from_url(cheap.ws_url, prices={"m": {"native": 0, "stable": 150}}, stake=10000),
    ]
    async with HostManager(hosts, probe_timeout=2.0, rng=random.Random(1)) as manager:
        with pytest.raises(InvalidOptions):
            await manager.select_best_host(mode="priciest")
        assert manager.hosts == []
        for _ in range(5):
            chosen = await manager.select_best_host(HostRequirements(model="m"), mode="cheapest")
            assert chosen.ws_url == cheap.ws_url
        assert chosen.models == ("m",) and chosen.latency_ms is not None
