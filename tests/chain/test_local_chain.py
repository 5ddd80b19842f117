"""LocalChain: the contracts deployed in process, hosts registered with their own keys."""

from __future__ import annotations

import json

import pytest
from eth_abi import decode, encode
from eth_utils import keccak

from fabstir_jupyter.errors import InvalidOptions
from fabstir_jupyter.hosts.registry import AGGREGATE3, public_key_address
from fabstir_jupyter.local.chain import LocalChain, LocalChainError, model_id

from .conftest import SMOLLM, TINY_VICUNA

SPEC_EXAMPLE_ID = "0x0b75a2061e70e736924a30c0a327db7ab719402129f76f631adbd7b7a5a5bced"
NATIVE = "0x" + "00" * 20


def _id(model: tuple[str, str]) -> bytes:
    return bytes.fromhex(model_id(*model)[2:])


def test_model_id_matches_the_spec_example(chain):
    """getModelId on chain and model_id() both give the §8 example hash."""
    assert model_id(*TINY_VICUNA) == SPEC_EXAMPLE_ID
    assert chain.model_registry.functions.getModelId(*TINY_VICUNA).call() == bytes.fromhex(SPEC_EXAMPLE_ID[2:])


def test_local_chain_deploys_the_three_contracts(chain):
    """The registry, model registry and multicall have code at the addresses the chain reports."""
    assert set(chain.addresses) == {"node_registry", "model_registry", "multicall", "stable_token"}
    for key in ("node_registry", "model_registry", "multicall"):
        assert len(chain.w3.eth.get_code(chain.addresses[key])) > 100
    assert chain.node_registry.functions.stableToken().call() == chain.addresses["stable_token"]
    assert chain.node_registry.functions.getAllActiveNodes().call() == []


def test_register_host_publishes_a_public_key_matching_its_address(chain):
    """A registered host gets its own key; metadata carries its compressed public key and region."""
    host = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], region="us-east-1")
    metadata = json.loads(host.metadata)
    assert metadata["publicKey"] == host.public_key and len(host.public_key) == 66
    assert public_key_address(host.public_key) == host.address
    assert metadata["location"] == "us-east-1"
    assert host.private_key not in repr(host)


def test_registered_hosts_answer_every_spec_view(three_hosts):
    """The §8 view functions report the three hosts' stake, URLs, models and per-model prices."""
    chain, (h1, h2, h3) = three_hosts
    nodes = chain.node_registry.functions
    assert nodes.getAllActiveNodes().call() == [h1.address, h2.address, h3.address]
    operator, stake, active, metadata, api_url, models, native, stable = nodes.getNodeFullInfo(h2.address).call()
    assert (operator, stake, active) == (h2.address, 2_500_500_000_000_000_000_000, True)
    assert api_url == "https://h2.example:8443"
    assert models == [_id(TINY_VICUNA), _id(SMOLLM)]
    assert (native, stable) == (500, 300)  # the smallest non-zero per-model prices
    assert json.loads(metadata)["name"] == "second"
    assert nodes.getNodesForModel(_id(SMOLLM)).call() == [h2.address, h3.address]
    assert nodes.nodeSupportsModel(h1.address, _id(TINY_VICUNA)).call() is True
    assert nodes.nodeSupportsModel(h1.address, _id(SMOLLM)).call() is False
    assert nodes.isActiveNode(h3.address).call() is True
    assert nodes.getNodeApiUrl(h3.address).call() == "http://127.0.0.1:9003"
    stable_token = chain.addresses["stable_token"]
    assert nodes.getModelPricing(h1.address, _id(TINY_VICUNA), NATIVE).call() == 1_000
    assert nodes.getModelPricing(h2.address, _id(SMOLLM), stable_token).call() == 300
    assert nodes.getModelPricing(h2.address, _id(SMOLLM), NATIVE).call() == 500  # 0 falls back to the minimum
    assert nodes.getModelPricing(h1.address, _id(SMOLLM), NATIVE).call() == 0  # not served


def test_get_model_pricing_reverts_for_an_unknown_token(three_hosts):
    """getModelPricing reverts for a token that is neither native nor the stable token."""
    chain, (h1, _h2, _h3) = three_hosts
    with pytest.raises(Exception, match="unsupported token"):
        chain.node_registry.functions.getModelPricing(h1.address, _id(TINY_VICUNA), h1.address).call()


def test_model_registry_lists_and_describes_models(three_hosts):
    """getAllModels lists the models the hosts registered; getModel returns the §8 six-tuple."""
    chain, _hosts = three_hosts
    models = chain.model_registry.functions
    assert models.getAllModels().call() == [_id(TINY_VICUNA), _id(SMOLLM)]
    repo, file_name, _sha, tier, active, timestamp = models.getModel(_id(SMOLLM)).call()
    assert (repo, file_name, tier, active) == (*SMOLLM, 1, True) and timestamp > 0
    assert models.getModel(bytes(32)).call()[:2] == ["", ""]


def test_deactivate_reactivate_and_unregister_a_host(chain):
    """A deactivated host leaves the active list; an unregistered one gets its stake back."""
    a = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], stake=5)
    b = chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA], stake=7)
    nodes = chain.node_registry.functions
    chain.deactivate_host(a)
    assert nodes.getAllActiveNodes().call() == [b.address]
    assert nodes.isActiveNode(a.address).call() is False
    chain.reactivate_host(a)
    assert sorted(nodes.getAllActiveNodes().call()) == sorted([a.address, b.address])
    balance = chain.w3.eth.get_balance(b.address)
    chain.unregister_host(b)
    assert nodes.getAllActiveNodes().call() == [a.address]
    assert nodes.getNodeFullInfo(b.address).call()[0] == NATIVE
    assert chain.w3.eth.get_balance(b.address) > balance + 6 * 10**18


def test_registering_twice_raises_with_the_reason(chain):
    """Registering a key that is already registered raises LocalChainError naming the revert reason."""
    host = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA])
    with pytest.raises(LocalChainError, match="already registered"):
        chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA], private_key=host.private_key)


def test_register_host_rejects_bad_models_and_prices(chain):
    """A malformed model or price is an InvalidOptions before any transaction."""
    with pytest.raises(InvalidOptions):
        chain.register_host("http://127.0.0.1:9001", models=["no-slash"])
    with pytest.raises(InvalidOptions):
        chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], prices=(1, -2))
    with pytest.raises(InvalidOptions):
        chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], prices={SMOLLM: (1, 2)})


def test_seeded_chains_give_the_same_host_addresses():
    """Two chains with the same seed register hosts at the same addresses."""
    first, second = LocalChain(seed=5), LocalChain(seed=5)
    assert first.register_host("http://a:1").address == second.register_host("http://a:1").address


def test_multicall_aggregate3_allows_or_refuses_failures(three_hosts):
    """aggregate3 returns (success, data) per call, and reverts when a call that must succeed fails."""
    chain, (h1, _h2, _h3) = three_hosts
    registry = chain.addresses["node_registry"]

    def pricing(token: str) -> bytes:
        selector = keccak(text="getModelPricing(address,bytes32,address)")[:4]
        return selector + encode(["address", "bytes32", "address"], [h1.address, _id(TINY_VICUNA), token])

    def aggregate(allow: bool) -> dict:
        calls = [(registry, True, pricing(NATIVE)), (registry, allow, pricing(h1.address))]
        data = keccak(text=AGGREGATE3)[:4] + encode(["(address,bool,bytes)[]"], [calls])
        request = {"to": chain.addresses["multicall"], "data": "0x" + data.hex()}
        return chain.provider.make_request("eth_call", [request, "latest"])

    (ok, data), (failed_ok, _reason) = decode(["(bool,bytes)[]"], bytes.fromhex(aggregate(True)["result"][2:]))[0]
    assert ok and decode(["uint256"], data)[0] == 1_000 and not failed_ok
    assert "Multicall3: call failed" in aggregate(False)["error"]["message"]
