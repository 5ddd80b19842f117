"""LocalChain: the contracts deployed in process, hosts registered with their own keys, as in production."""

from __future__ import annotations

import json

import pytest
from eth_abi import decode, encode
from eth_utils import keccak

from fabstir_jupyter.errors import InvalidOptions
from fabstir_jupyter.hosts.registry import AGGREGATE3, public_key_address
from fabstir_jupyter.local.chain import NATIVE_TOKEN, LocalChain, LocalChainError, model_id

from .conftest import SMOLLM, TINY_VICUNA

SPEC_EXAMPLE_ID = "0x0b75a2061e70e736924a30c0a327db7ab719402129f76f631adbd7b7a5a5bced"
NATIVE = NATIVE_TOKEN
FAB = 10**18
MODEL_STRUCT = "(string,string,bytes32,uint256,bool,uint256)"


def _id(model: tuple[str, str]) -> bytes:
    return bytes.fromhex(model_id(*model)[2:])


def test_model_id_matches_the_spec_example(chain):
    """getModelId on chain and model_id() both give the §8 example hash."""
    assert model_id(*TINY_VICUNA) == SPEC_EXAMPLE_ID
    assert chain.model_registry.functions.getModelId(*TINY_VICUNA).call() == bytes.fromhex(SPEC_EXAMPLE_ID[2:])


def test_local_chain_deploys_the_registry_and_payment_contracts(chain):
    """FAB, USDC, the registries, multicall, HostEarnings and JobMarketplace have code; the registry names
    FAB and the models; the stable token is the mock USDC."""
    assert set(chain.addresses) == {"node_registry", "model_registry", "multicall", "stable_token", "fab_token",
                                    "job_marketplace", "host_earnings"}
    for address in chain.addresses.values():
        assert len(chain.w3.eth.get_code(address)) > 100
    assert chain.addresses["fab_token"] == chain.fab_token.address
    assert chain.addresses["stable_token"] == chain.usdc.address
    assert chain.usdc.functions.symbol().call() == "USDC" and chain.usdc.functions.decimals().call() == 6
    nodes = chain.node_registry.functions
    assert nodes.fabToken().call() == chain.fab_token.address
    assert nodes.modelRegistry().call() == chain.addresses["model_registry"]
    assert (nodes.MIN_STAKE().call(), nodes.PRICE_PRECISION().call()) == (0, 1000)
    assert chain.fab_token.functions.symbol().call() == "FAB" and chain.fab_token.functions.decimals().call() == 18
    assert nodes.getAllActiveNodes().call() == []


def test_contracts_are_deployed_where_layout_says_before_the_chain_exists(chain):
    """layout.contract_addresses() (what the local network hands its hosts before the chain exists) is
    where each contract is: the CREATE rule's address for the deployer and its nonce, as rlp and
    eth-utils compute it, EIP-55 checksummed like web3's."""
    import rlp
    from eth_utils import keccak, to_checksum_address

    from fabstir_jupyter.local.layout import DEPLOYER, checksummed, contract_address, contract_addresses

    expected = contract_addresses()
    names = ("fab_token", "model_registry", "node_registry", "multicall", "host_earnings", "job_marketplace")
    assert chain.deployer == DEPLOYER
    assert {name: chain.addresses[name] for name in names} == {name: expected[name] for name in names}
    assert expected["usdc"] == chain.usdc.address
    for nonce in range(128):
        reference = keccak(rlp.encode([bytes.fromhex(DEPLOYER[2:]), nonce]))[12:]
        assert contract_address(DEPLOYER, nonce) == to_checksum_address(reference)
    for raw in (bytes(20), b"\xff" * 20, bytes.fromhex(DEPLOYER[2:]), keccak(b"x")[:20]):
        assert checksummed(raw) == to_checksum_address(raw)
    with pytest.raises(ValueError):
        contract_address(DEPLOYER, 128)


def test_derived_keys_are_valid_and_fresh_ones_differ():
    """derive_key: a seed gives the same key each time, None a fresh valid secp256k1 key each time."""
    from fabstir_jupyter.crypto import PrivateKey
    from fabstir_jupyter.local.layout import derive_key

    assert derive_key(5, 0) == derive_key(5, 0) != derive_key(5, 1)
    fresh = {derive_key(None, 0) for _ in range(20)}
    assert len(fresh) == 20
    for key in fresh:
        assert PrivateKey.from_hex(key).address.startswith("0x")


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
    assert nodes.getNodeModels(h2.address).call() == [_id(TINY_VICUNA), _id(SMOLLM)]
    stable_token = chain.addresses["stable_token"]
    assert nodes.getModelPricing(h1.address, _id(TINY_VICUNA), NATIVE).call() == 1_000
    assert nodes.getModelPricing(h2.address, _id(SMOLLM), stable_token).call() == 300
    assert nodes.modelTokenPricing(h2.address, _id(TINY_VICUNA), stable_token).call() == 700
    assert nodes.getHostModelPrices(h2.address, NATIVE).call() == [[_id(TINY_VICUNA), _id(SMOLLM)], [500, 0]]
    assert nodes.getHostModelPrices(h2.address, stable_token).call() == [[_id(TINY_VICUNA), _id(SMOLLM)], [700, 300]]
    assert nodes.getHostModelPrices(chain.deployer, NATIVE).call() == [[], []]  # not registered


def test_get_model_pricing_reverts_where_no_price_is_set(three_hosts):
    """As in production (no fallback to the minimum): an unset model, token or host reverts "no model pricing"."""
    chain, (h1, h2, h3) = three_hosts
    pricing = chain.node_registry.functions.getModelPricing
    for operator, model, token in (
        (h2.address, SMOLLM, NATIVE),  # priced in the stable token only
        (h1.address, SMOLLM, NATIVE),  # not served
        (h1.address, TINY_VICUNA, h1.address),  # a token it never priced
        (h3.address, SMOLLM, NATIVE),  # registered without prices
    ):
        with pytest.raises(Exception, match="no model pricing"):
            pricing(operator, _id(model), token).call()


def test_model_registry_lists_and_describes_models(three_hosts):
    """getAllModels lists the models the hosts registered; getModel returns one struct, as production does."""
    chain, _hosts = three_hosts
    models = chain.model_registry.functions
    assert models.getAllModels().call() == [_id(TINY_VICUNA), _id(SMOLLM)]
    repo, file_name, sha, tier, active, timestamp = models.getModel(_id(SMOLLM)).call()
    assert (repo, file_name, tier, active) == (*SMOLLM, 1, True) and timestamp > 0
    assert models.isModelApproved(_id(SMOLLM)).call() and models.isTrustedModel(_id(SMOLLM)).call()
    assert models.getModelHash(_id(SMOLLM)).call() == sha
    assert models.getModel(bytes(32)).call()[:2] == ("", "")
    # the raw answer is the canonical encoding of one tuple: offset word first, then the struct
    data = keccak(text="getModel(bytes32)")[:4] + _id(SMOLLM)
    raw = bytes.fromhex(chain.provider.make_request("eth_call", [{"to": chain.addresses["model_registry"],
                                                                  "data": "0x" + data.hex()}, "latest"])["result"][2:])
    assert raw == encode([MODEL_STRUCT], [(*SMOLLM, sha, 1, True, timestamp)])
    assert int.from_bytes(raw[:32], "big") == 32


def test_models_are_added_once_by_the_owner_and_can_be_deactivated(chain):
    """addTrustedModel refuses a second add and a non-owner; a deactivated model cannot be registered."""
    models = chain.model_registry.functions
    mid = chain.add_model(*TINY_VICUNA)
    assert chain.add_model(*TINY_VICUNA) == mid  # known: no second transaction
    with pytest.raises(LocalChainError, match="model already exists"):
        chain._transact(models.addTrustedModel(*TINY_VICUNA, bytes(32)), chain.deployer, "add again")
    host = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA])
    with pytest.raises(LocalChainError, match="not owner"):
        chain._transact(models.addTrustedModel(*SMOLLM, bytes(32)), host.address, "add as a host")
    chain._transact(models.deactivateModel(_id(TINY_VICUNA)), chain.deployer, "deactivate")
    assert models.isModelApproved(_id(TINY_VICUNA)).call() is False
    with pytest.raises(LocalChainError, match="model not approved"):
        chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA])


def test_deactivate_reactivate_and_unregister_a_host(chain):
    """A deactivated host leaves the active list; an unregistered one gets its FAB stake back."""
    a = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], stake=5)
    b = chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA], stake=7)
    nodes = chain.node_registry.functions
    chain.deactivate_host(a)
    assert nodes.getAllActiveNodes().call() == [b.address]
    assert nodes.isActiveNode(a.address).call() is False
    chain.reactivate_host(a)
    assert sorted(nodes.getAllActiveNodes().call()) == sorted([a.address, b.address])
    assert chain.fab_balance(b.address) == 0
    chain.unregister_host(b)
    assert nodes.getAllActiveNodes().call() == [a.address]
    assert nodes.getNodeFullInfo(b.address).call()[0] == NATIVE
    assert chain.fab_balance(b.address) == 7 * FAB
    assert chain.fab_balance(chain.addresses["node_registry"]) == 5 * FAB


def test_registering_twice_raises_with_the_reason(chain):
    """Registering a key that is already registered raises LocalChainError naming the revert reason."""
    host = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA])
    with pytest.raises(LocalChainError, match="already registered"):
        chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA], private_key=host.private_key)


def test_register_host_rejects_bad_models_and_prices(chain):
    """A malformed model or price, no model, or a stake below the minimum is an InvalidOptions before any
    transaction."""
    block = chain.w3.eth.block_number
    with pytest.raises(InvalidOptions):
        chain.register_host("http://127.0.0.1:9001", models=["no-slash"])
    with pytest.raises(InvalidOptions):
        chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], prices=(1, -2))
    with pytest.raises(InvalidOptions):
        chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], prices={SMOLLM: (1, 2)})
    with pytest.raises(InvalidOptions, match="at least one model"):
        chain.register_host("http://127.0.0.1:9001")
    assert chain.w3.eth.block_number == block
    with pytest.raises(InvalidOptions, match="below the registry's minimum of 100"):
        LocalChain(minimum_stake=100).register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], stake=99)


def test_registration_takes_the_production_path():
    """approve + registerNode pulls MIN_STAKE in FAB, stake adds the rest; the events are production's."""
    local = LocalChain(minimum_stake=100, seed=2)
    host = local.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA, SMOLLM], stake=250,
                               prices={TINY_VICUNA: (900, 40)})
    nodes = local.node_registry.functions
    assert nodes.getNodeFullInfo(host.address).call()[1] == 250 * FAB
    assert local.fab_balance(host.address) == 0 and local.fab_balance(local.addresses["node_registry"]) == 250 * FAB
    events = local.node_registry.events
    registered = events.NodeRegistered().get_logs(from_block=0)
    assert [(e.args.operator, e.args.stakedAmount, e.args.models) for e in registered] == [
        (host.address, 100 * FAB, [_id(TINY_VICUNA), _id(SMOLLM)])
    ]
    topic = "0x" + keccak(text="NodeRegistered(address,uint256,string,bytes32[])").hex()  # production's
    raw = local.w3.eth.get_logs({"address": local.addresses["node_registry"], "topics": [topic], "fromBlock": 0})
    assert [log["transactionHash"] for log in raw] == [e.transactionHash for e in registered]
    priced = events.ModelTokenPricingUpdated().get_logs(from_block=0)
    assert [(e.args.modelId, e.args.token, e.args.price) for e in priced] == [
        (_id(TINY_VICUNA), NATIVE, 900), (_id(TINY_VICUNA), local.addresses["stable_token"], 40)
    ]
    local.add_stake(host, 50)
    assert nodes.getNodeFullInfo(host.address).call()[1] == 300 * FAB


def test_register_node_without_a_fab_approval_reverts():
    """registerNode pulls the stake: a caller that approved none stays unregistered."""
    local = LocalChain(minimum_stake=100, seed=4)
    host = local.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], stake=100)
    other = local.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA], stake=100)
    local.unregister_host(other)  # holds 100 FAB again, approval spent
    register = local.node_registry.functions.registerNode("{}", "http://x:1", [_id(TINY_VICUNA)], 0, 0)
    with pytest.raises(LocalChainError, match="allowance too low"):
        local._transact(register, other.address, "register without approval")
    assert local.node_registry.functions.getAllActiveNodes().call() == [host.address]


def test_prices_are_set_and_cleared_per_model_and_token(chain):
    """setModelTokenPricing changes one (model, token) price; 0 clears it; only a served model takes one."""
    host = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA], prices=(10, 20))
    nodes = chain.node_registry.functions
    chain.set_model_token_pricing(host, TINY_VICUNA, NATIVE, 15)
    assert nodes.getHostModelPrices(host.address, NATIVE).call() == [[_id(TINY_VICUNA)], [15]]
    chain._transact(nodes.clearModelTokenPricing(_id(TINY_VICUNA), NATIVE), host.address, "clear")
    assert nodes.getHostModelPrices(host.address, NATIVE).call() == [[_id(TINY_VICUNA)], [0]]
    assert nodes.getModelPricing(host.address, _id(TINY_VICUNA), chain.addresses["stable_token"]).call() == 20
    with pytest.raises(LocalChainError, match="model not supported"):
        chain.set_model_token_pricing(host, SMOLLM, NATIVE, 5)
    chain.deactivate_host(host)
    with pytest.raises(LocalChainError, match="node not active"):
        chain.set_model_token_pricing(host, TINY_VICUNA, NATIVE, 5)


def test_seeded_chains_give_the_same_host_addresses():
    """Two chains with the same seed register hosts at the same addresses."""
    first, second = LocalChain(seed=5), LocalChain(seed=5)
    assert (first.register_host("http://a:1", models=[TINY_VICUNA]).address
            == second.register_host("http://a:1", models=[TINY_VICUNA]).address)


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


# ---------------------------------------------------------------------------- the clock


def _signed_transfer(chain: LocalChain, account, to: str) -> dict:
    """Send 1 wei from ``account`` as a signed raw transaction (what a wallet does); return its block."""
    tx = {"to": to, "value": 1, "gas": 21_000, "gasPrice": chain.w3.eth.gas_price, "chainId": chain.chain_id,
          "nonce": chain.w3.eth.get_transaction_count(account.address)}
    signed = chain.w3.eth.account.sign_transaction(tx, account.private_key)
    receipt = chain.w3.eth.wait_for_transaction_receipt(chain.w3.eth.send_raw_transaction(signed.raw_transaction))
    return chain.w3.eth.get_block(receipt["blockNumber"])


def test_setup_does_not_push_the_clock_ahead_of_the_wall(chain):
    """Deploying and registering many hosts (dozens of blocks in a second or two) leaves the chain's
    next block at the wall clock, not dozens of seconds ahead of it."""
    import time

    for port in range(9001, 9006):
        chain.register_host(f"http://127.0.0.1:{port}", models=[TINY_VICUNA])
    assert chain.w3.eth.block_number > 30
    assert chain.next_timestamp <= int(time.time()) + 1


def test_a_transaction_is_stamped_with_the_wall_clock(chain):
    """A signed transaction's block carries the wall clock's second (py-evm would stamp it when the
    previous block was mined, however long ago), and blocks never go back in time."""
    import time

    user = chain.create_account(native=10**18)
    before = int(time.time())
    first = _signed_transfer(chain, user, chain.deployer)
    second = _signed_transfer(chain, user, chain.deployer)
    after = int(time.time())
    assert before <= first["timestamp"] <= after + 1
    assert second["timestamp"] >= first["timestamp"] + 1


def test_an_idle_chain_keeps_time_with_the_wall(chain):
    """Nobody transacts, yet the latest block's timestamp keeps up with the wall clock (within the
    BLOCK_TIME a live chain takes per block): what a paid host reads before it settles."""
    import time

    from fabstir_jupyter.local.chain import BLOCK_TIME

    start = int(time.time())
    deadline = time.monotonic() + 10 * BLOCK_TIME
    while chain.timestamp < start + BLOCK_TIME:
        assert time.monotonic() < deadline, "the latest block never caught up with the wall clock"
        time.sleep(0.2)
    assert chain.timestamp <= int(time.time()) + 1


def test_advance_time_still_moves_the_clock_ahead(chain):
    """Tests move time without sleeping: advance_time(n) puts the next block n seconds later."""
    before = chain.next_timestamp
    assert chain.advance_time(100) >= before + 100
    user = chain.create_account(native=10**18)
    assert _signed_transfer(chain, user, chain.deployer)["timestamp"] >= before + 100
