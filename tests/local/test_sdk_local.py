"""FabstirSDK on the embedded local network, and on a custom network that is a local chain."""

from __future__ import annotations

import pytest

from fabstir_jupyter import FabstirSDK, InferenceConfig
from fabstir_jupyter.errors import ConnectionFailed, PaymentRequired
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.hosts.registry import ChainRegistrySource

from .conftest import wait_gone

PROMPT = "hello from the embedded default"


def _config() -> InferenceConfig:
    return InferenceConfig(usage_db=":memory:")


async def test_sdk_discovers_the_local_hosts_on_chain_and_infers():
    """network='local' registers its hosts on the local chain; discovery finds them there with their offers."""
    async with FabstirSDK(network="local", local_backend="scripted", local_hosts=3, config=_config()) as sdk:
        network = sdk.local_network
        assert network is not None and len(network.hosts) == 3  # started by `async with`, off the loop
        assert sdk.host_urls == network.urls
        hosts = await sdk.get_host_manager().discover_all_active_hosts()
        assert {h.address for h in hosts} == {h.address for h in network.hosts}
        assert len({h.stake for h in hosts}) == len({h.region for h in hosts}) == 3
        assert len({h.prices["scripted-1"]["stable"] for h in hosts}) == 3
        assert not any("_public_key_mismatch" in h.metadata for h in hosts)
        manager = sdk.get_inference_manager()
        result = await manager.ainfer(PROMPT, max_tokens=5)
        assert result.text == scripted_text(PROMPT, 5) and result.usage.cost_unit == "USDC"
        # The embedded default encrypts end to end: every local host publishes the key it runs with.
        assert result.encrypted is True and result.usage.encrypted is True
        assert all(h.encryption_key.source == "metadata" for h in hosts if h.encryption_key is not None)
        pids = [h.pid for h in network.hosts]
    assert sdk.local_network is None and not wait_gone(pids, 5.0)
    with pytest.raises(ConnectionFailed):
        sdk.get_host_manager()  # closed: no second network


def test_sdk_adds_static_hosts_to_the_local_network(network):
    """hosts=[...] with network='local' are used besides the chain's hosts."""
    extra = network.hosts[0].url
    with FabstirSDK(network="local", hosts=[extra], local_backend="scripted", config=_config()) as sdk:
        manager = sdk.get_inference_manager()
        assert sdk.host_urls == [sdk.local_network.hosts[0].url, extra]
        assert manager.infer(PROMPT, max_tokens=2).text == scripted_text(PROMPT, 2)
        known = sdk.get_host_manager().hosts  # discovered by that request
        assert sorted(h.ws_url for h in known) == sorted([extra, sdk.local_network.hosts[0].url])


async def test_dict_network_reads_a_local_chain_through_its_provider(network):
    """A custom network dict with an in-process provider discovers that chain's hosts like any registry."""
    spec = network.as_network("devnet")
    async with FabstirSDK(network=spec, config=_config()) as sdk:
        assert sdk.settings.network == "devnet" and sdk.settings.chain.chain_id == network.chain_id
        assert sdk.local_network is None  # nothing started here
        source = sdk.get_host_manager()._sources[0]
        assert isinstance(source, ChainRegistrySource)
        hosts = await sdk.get_host_manager().discover_all_active_hosts()
        assert sorted(h.address for h in hosts) == sorted(h.address for h in network.hosts)
        assert all(h.health == "ok" for h in hosts)
        assert set(sdk.host_urls) == set(network.urls)


async def test_dict_network_refuses_inference(network):
    """Inference on a custom chain network is refused like base-sepolia's (spec/PROTOCOL.md §10)."""
    async with FabstirSDK(network=network.as_network(), config=_config()) as sdk:
        with pytest.raises(PaymentRequired):
            sdk.get_inference_manager().stream(PROMPT)
