"""Host records, model resolution, selection and discovery with a static list."""

from __future__ import annotations

import random

import pytest

from fabstir_jupyter.config import HostRequirements
from fabstir_jupyter.errors import InvalidOptions, ModelNotAvailable, NoHostsAvailable
from fabstir_jupyter.hosts import HostInfo, HostManager, StaticSource, hosts_from_env, resolve_model, select_host
from fabstir_jupyter.hosts.probe import HostProber


def host(url="http://h1:1", **fields):
    return HostInfo.from_url(url, **fields)


@pytest.mark.parametrize("url, ws, api", [
    ("http://h:8080", "ws://h:8080/v1/ws", "http://h:8080"),
    ("https://h.example", "wss://h.example/v1/ws", "https://h.example"),
    ("ws://127.0.0.1:9/v1/ws", "ws://127.0.0.1:9/v1/ws", "http://127.0.0.1:9"),
    ("localhost:7000", "ws://localhost:7000/v1/ws", "http://localhost:7000"),
])
def test_host_urls_are_normalised(url, ws, api):
    """Any URL form gives the same ws_url and api_url."""
    info = host(url)
    assert (info.ws_url, info.api_url) == (ws, api)


def test_model_names_resolve_by_id_alias_and_file_part():
    """Host id, listed alias, repo/file and repo:file resolve to the host's id."""
    info = host(models=("tiny-vicuna-1b.q4_k_m.gguf", "smol"), model_names={"SmolLM2": "smol"})
    assert resolve_model("smol", info) == "smol"
    assert resolve_model("SmolLM2", info) == "smol"
    assert resolve_model("CohereForAI/TinyVicuna-1B-32k-GGUF/tiny-vicuna-1b.q4_k_m.gguf", info) == \
        "tiny-vicuna-1b.q4_k_m.gguf"
    assert resolve_model("CohereForAI/TinyVicuna-1B-32k-GGUF:tiny-vicuna-1b.q4_k_m.gguf", info) == \
        "tiny-vicuna-1b.q4_k_m.gguf"
    assert resolve_model(None, info) == "tiny-vicuna-1b.q4_k_m.gguf"
    assert resolve_model(None, info, default="smol") == "smol"


def test_unknown_model_lists_what_is_available_and_is_never_aliased():
    """A name the host does not serve is refused, never mapped to another model."""
    info = host(models=("llama-2-7b",))
    with pytest.raises(ModelNotAvailable) as exc:
        resolve_model("llama-2-13b", info)
    assert "llama-2-7b" in str(exc.value)


def test_host_without_a_model_list_gets_the_name_as_given():
    """Production hosts do not list models: the name is sent as given."""
    assert resolve_model("llama-2-7b", host()) == "llama-2-7b"


def test_cost_uses_the_stable_price_with_precision_1000():
    """cost = tokens × price / 1000, in USDC (6 decimals) when a stable price exists."""
    info = host(prices={"m": {"stable": 2000, "native": 5}})
    assert info.cost("m", 1000) == (pytest.approx(0.002), "USDC")
    native = host(prices={"m": {"native": 10**15}})
    assert native.cost("m", 1000) == (pytest.approx(0.001), "ETH")
    assert info.cost("other", 10) == (None, None)


def test_latency_is_a_moving_average_and_requests_are_counted():
    """record_latency smooths samples; record_request tracks success and reachability."""
    info = host()
    info.record_latency(0.100)
    info.record_latency(0.200)
    assert 100 < info.latency_ms < 200
    info.record_request(True)
    info.record_request(False, reachable=False)
    assert info.success_rate == 0.5 and not info.reachable


def test_selection_filters_then_prefers_fast_and_reliable_hosts():
    """Unreachable and non-serving hosts are excluded; the fastest reliable host wins."""
    slow = host("http://slow:1", models=("m",), latency_ms=400.0)
    fast = host("http://fast:1", models=("m",), latency_ms=5.0)
    down = host("http://down:1", models=("m",), latency_ms=1.0, health="unreachable")
    other = host("http://other:1", models=("x",), latency_ms=1.0)
    chosen = select_host([slow, fast, down, other], HostRequirements(model="m"), rng=random.Random(0))
    assert chosen is fast


def test_region_is_a_preference_not_a_filter():
    """A host in the preferred region wins a tie; without one, another host is still chosen."""
    a = host("http://a:1", latency_ms=20.0, region="eu-west")
    b = host("http://b:1", latency_ms=20.0, region="us-east")
    assert select_host([a, b], HostRequirements(region="us-east")) is b
    assert select_host([a], HostRequirements(region="ap-south")) is a


def test_min_stake_and_max_latency_filter():
    """Hard requirements exclude hosts; nothing left is NO_HOSTS_AVAILABLE saying why."""
    rich = host("http://rich:1", stake=5000.0, latency_ms=50.0)
    poor = host("http://poor:1", stake=10.0, latency_ms=5.0)
    assert select_host([rich, poor], HostRequirements(min_stake=1000)) is rich
    with pytest.raises(NoHostsAvailable) as exc:
        select_host([rich, poor], HostRequirements(min_stake=1000, max_latency=10))
    assert "min_stake" in str(exc.value)


def test_excluded_hosts_are_avoided_while_others_exist():
    """Retries move to another host, and come back to a tried one only when none is left."""
    a, b = host("http://a:1"), host("http://b:1")
    assert select_host([a, b], exclude=[a]) is b
    assert select_host([a], exclude=[a]) is a


def test_no_hosts_and_no_model_errors_list_what_exists():
    """Empty lists and unserved models produce coded errors with the available set."""
    with pytest.raises(NoHostsAvailable):
        select_host([], HostRequirements())
    with pytest.raises(ModelNotAvailable) as exc:
        select_host([host(models=("a", "b"))], HostRequirements(model="c"))
    assert "a, b" in str(exc.value)


def test_hosts_from_env_splits_on_commas_and_spaces():
    """FABSTIR_HOSTS takes comma- or space-separated URLs."""
    assert hosts_from_env({"FABSTIR_HOSTS": "http://a:1, ws://b:2/v1/ws  c:3"}) == [
        "http://a:1", "ws://b:2/v1/ws", "c:3"]
    assert hosts_from_env({}) == []


@pytest.mark.parametrize("value, entry", [
    ("not a url!!", "not"),           # used to become http://not, http://a, http://url!!
    ("http://a:1 url!!:2", "url!!"),  # a host name no resolver takes
    ("http://a:1,ftp://b:2", "ftp://b:2"),
    ("localhost", "localhost"),       # neither a scheme nor a port: not taken for port 80
    ("h:99999", "h:99999"),
])
def test_hosts_from_env_refuses_unusable_entries_naming_the_variable(value, entry):
    """Each FABSTIR_HOSTS entry must be a usable host url; the error names $FABSTIR_HOSTS, the entry
    and the whole value, with a hint of the format."""
    with pytest.raises(InvalidOptions) as info:
        hosts_from_env({"FABSTIR_HOSTS": value})
    message = info.value.message
    assert message.startswith("$FABSTIR_HOSTS: ") and repr(entry) in message and repr(value) in message
    assert info.value.field == "hosts" and "separated by commas or spaces" in info.value.hint


def test_static_source_refuses_non_hosts():
    """A host list entry must be a URL or a HostInfo."""
    with pytest.raises(InvalidOptions):
        StaticSource([42])


async def test_discovery_probes_hosts_and_caches_with_a_ttl(start_host):
    """Discovery reads features, models and latency; refresh=True probes again; dead hosts are dropped."""
    live = await start_host()

    class CountingSource:
        calls = 0

        async def discover(self):
            CountingSource.calls += 1
            return [HostInfo.from_url(live.ws_url), HostInfo.from_url("ws://127.0.0.1:9/v1/ws")]

    async with HostManager(sources=[CountingSource()], probe_timeout=1.0) as manager:
        found = await manager.discover_all_active_hosts()
        assert [h.ws_url for h in found] == [live.ws_url]
        info = found[0]
        assert "coded-errors" in info.features and info.models == ("scripted-1",)
        assert info.latency_ms is not None and info.health == "ok"
        await manager.discover_all_active_hosts()
        assert CountingSource.calls == 1
        await manager.discover_all_active_hosts(refresh=True)
        assert CountingSource.calls == 2
        assert manager.find(live.http_url) is info
        assert len(manager.hosts) == 2


def test_served_ids_replace_registry_names_which_stay_as_aliases_with_their_prices():
    """A host serving a registry model under its own id keeps the registry names and prices working."""
    registry_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    info = host(models=(registry_name,), prices={registry_name: {"stable": 2000}},
                model_names={"HuggingFaceTB/SmolLM2:" + registry_name: registry_name, "0xabc": registry_name})
    info.adopt_served_models(["SmolLM2-135M-Instruct.Q4_1"], {"SmolLM2": "SmolLM2-135M-Instruct.Q4_1"})
    assert info.models == ("SmolLM2-135M-Instruct.Q4_1",)
    for name in (registry_name, "HuggingFaceTB/SmolLM2:" + registry_name, "0xabc", "SmolLM2"):
        assert resolve_model(name, info) == "SmolLM2-135M-Instruct.Q4_1"
    assert info.cost("SmolLM2-135M-Instruct.Q4_1", 1000) == (pytest.approx(0.002), "USDC")


def test_unmatched_registry_models_are_not_guessed_onto_another_model():
    """With several served models and no file-name match, a registry name is not aliased."""
    info = host(models=("llama-2-7b.gguf",))
    info.adopt_served_models(["alpha", "beta"], {})
    with pytest.raises(ModelNotAvailable):
        resolve_model("llama-2-7b.gguf", info)


def test_stream_capacity_prefers_the_hosts_own_figure_over_the_registry_metadata():
    """The host's max_concurrent_streams wins over metadata maxConcurrent; only positive integers count."""
    assert host().stream_capacity is None
    assert host(metadata={"maxConcurrent": 8}).stream_capacity == 8
    assert host(metadata={"maxConcurrent": 8}, max_concurrent_streams=2).stream_capacity == 2
    for junk in (0, -3, "8", 2.5, True, None, [4]):
        assert host(metadata={"maxConcurrent": junk}).stream_capacity is None, junk
        assert host(metadata={"maxConcurrent": 5}, max_concurrent_streams=junk).stream_capacity == 5, junk


async def test_probe_reads_the_stream_limit_a_host_states_in_v1_version(start_host):
    """A reference host states its limit in /v1/version and the probe keeps it; a legacy host (as a
    production node) states none."""
    limited = await start_host(max_concurrent_streams=3)
    legacy = await start_host(legacy=True, max_concurrent_streams=3)
    async with HostManager([limited.ws_url, legacy.ws_url], probe_timeout=2.0) as manager:
        found = {h.ws_url: h for h in await manager.discover_all_active_hosts()}
    assert found[limited.ws_url].max_concurrent_streams == 3
    assert found[legacy.ws_url].max_concurrent_streams is None


async def _describe_counting_tls_builds(url: str, monkeypatch) -> tuple[HostInfo, int]:
    builds = []
    original = HostProber._build_client

    def counting(self):
        builds.append(1)
        return original(self)

    monkeypatch.setattr(HostProber, "_build_client", counting)
    prober = HostProber(timeout=2.0)
    info = HostInfo.from_url(url)
    try:
        await prober.describe(info)
    finally:
        await prober.aclose()
    return info, len(builds)


async def test_describing_a_plain_http_host_loads_no_certificates(start_host, monkeypatch):
    """An http:// host is described without building the TLS client (its certificate store is most
    of a fresh client's first request)."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    live = await start_host()
    info, builds = await _describe_counting_tls_builds(live.http_url, monkeypatch)
    assert "coded-errors" in info.features and info.models == ("scripted-1",)
    assert builds == 0


async def test_plain_http_behind_an_https_proxy_uses_the_tls_client(monkeypatch):
    """An https:// proxy for plain-http requests needs TLS: the probe then uses the TLS client."""
    monkeypatch.setenv("HTTP_PROXY", "https://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    _, builds = await _describe_counting_tls_builds("http://127.0.0.1:9", monkeypatch)
    assert builds == 1
