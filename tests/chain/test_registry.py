"""ChainRegistrySource: hosts from the registry in a constant number of round trips, read leniently."""

from __future__ import annotations

import logging
import threading

import pytest
from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak

from fabstir_jupyter.errors import ChainError, ConnectionFailed, ModelNotAvailable
from fabstir_jupyter.hosts import HostManager, resolve_model
from fabstir_jupyter.hosts.registry import (
    ChainRegistrySource,
    ModelRecord,
    NodeRecord,
    _decode_model,
    build_host,
    parse_metadata,
    public_key_address,
)
from fabstir_jupyter.local.chain import LocalChain, model_id

from .conftest import SMOLLM, TINY_VICUNA

TV_FILE, SM_FILE = TINY_VICUNA[1], SMOLLM[1]
MODEL_FIELDS = ["string", "string", "bytes32", "uint256", "bool", "uint256"]
MODEL_STRUCT = "(" + ",".join(MODEL_FIELDS) + ")"


class CountingProvider:
    """Forward to a provider, recording the thread of each request; optionally without batches."""

    def __init__(self, inner, *, batches: bool = True) -> None:
        self.inner = inner
        self.threads: set[int] = set()
        if batches:
            self.make_batch_request = self._batch

    def make_request(self, method, params):
        self.threads.add(threading.get_ident())
        return self.inner.make_request(method, params)

    def _batch(self, requests):
        self.threads.add(threading.get_ident())
        return self.inner.make_batch_request(requests)


class RewritingProvider:
    """Forward JSON-RPC to a provider, passing the answers to eth_calls of one function through ``rewrite``."""

    def __init__(self, inner, signature: str, rewrite) -> None:
        self.inner = inner
        self.selector = "0x" + keccak(text=signature)[:4].hex()
        self.rewrite = rewrite
        self.rewritten = 0

    def _one(self, method, params, response):
        if method == "eth_call" and params[0]["data"].startswith(self.selector):
            self.rewritten += 1
            return self.rewrite(response)
        return response

    def make_request(self, method, params):
        return self._one(method, params, self.inner.make_request(method, params))

    def make_batch_request(self, requests):
        responses = self.inner.make_batch_request(requests)
        return [self._one(method, params, r) for (method, params), r in zip(requests, responses, strict=True)]


def _view(host) -> tuple:
    """What discovery says about a host, comparable across readings."""
    return (
        host.address, host.api_url, host.models, host.model_names, host.region, host.stake, host.prices, host.metadata
    )


async def test_discover_returns_the_registered_hosts(three_hosts):
    """discover() gives each host's address, URL, stake, region, metadata, models, aliases and prices."""
    chain, (h1, h2, h3) = three_hosts
    source = ChainRegistrySource(chain.w3, chain.addresses)
    hosts = {h.address: h for h in await source.discover()}
    assert list(hosts) == [h1.address, h2.address, h3.address]
    first, second, third = hosts[h1.address], hosts[h2.address], hosts[h3.address]
    assert first.api_url == "http://127.0.0.1:9001" and second.api_url == "https://h2.example:8443"
    assert (first.stake, second.stake, third.stake) == (1000.0, 2500.5, 10000.0)
    assert (first.region, second.region, third.region) == ("us-east-1", "eu-west-1", "ap-southeast-1")
    assert first.metadata["hardware"] == {"gpu": "RTX 4090", "vram": 24}
    assert first.models == (TV_FILE,) and second.models == (TV_FILE, SM_FILE)
    assert first.model_names == {
        "/".join(TINY_VICUNA): TV_FILE,
        ":".join(TINY_VICUNA): TV_FILE,
        model_id(*TINY_VICUNA): TV_FILE,
    }
    assert first.prices == {TV_FILE: {"native": 1_000, "stable": 2_000}}
    # SmolLM2 has no native price on chain: 0 (not priced), never the node's minimum
    assert second.prices == {TV_FILE: {"native": 500, "stable": 700}, SM_FILE: {"native": 0, "stable": 300}}
    assert third.prices == {SM_FILE: {"native": 0, "stable": 0}}
    for host, registered in ((first, h1), (second, h2), (third, h3)):
        assert host.metadata["publicKey"] == registered.public_key
        assert "_public_key_mismatch" not in host.metadata and "_invalid_metadata" not in host.metadata


async def test_discovered_model_names_resolve_to_the_host_id(three_hosts):
    """Every name form of PROTOCOL.md §3a resolves to the host's model id; an unknown one does not."""
    chain, _hosts = three_hosts
    second = (await ChainRegistrySource(chain.w3, chain.addresses).discover())[1]
    for name in (SM_FILE, "/".join(SMOLLM), ":".join(SMOLLM), model_id(*SMOLLM), "0x" + model_id(*SMOLLM)[2:].upper()):
        assert resolve_model(name, second) == SM_FILE
    with pytest.raises(ModelNotAvailable):
        resolve_model("other/model.gguf", second)


async def test_discover_flags_bad_metadata_and_a_foreign_public_key(chain, caplog):
    """A host with invalid metadata JSON or someone else's publicKey is still discovered, flagged and logged."""
    good = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA])
    bad_json = chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA], metadata='{"location": "us-east-1",')
    foreign = chain.register_host(
        "http://127.0.0.1:9003", models=[TINY_VICUNA], metadata={"publicKey": good.public_key}
    )
    malformed = chain.register_host("http://127.0.0.1:9004", models=[TINY_VICUNA], metadata={"publicKey": "02abc"})
    with caplog.at_level(logging.WARNING, logger="fabstir_jupyter.hosts.registry"):
        hosts = {h.address: h for h in await ChainRegistrySource(chain.w3, chain.addresses).discover()}
    assert len(hosts) == 4
    assert hosts[bad_json.address].metadata == {"_invalid_metadata": True}
    assert hosts[bad_json.address].models == (TV_FILE,)
    assert hosts[foreign.address].metadata["_public_key_mismatch"] is True
    assert hosts[malformed.address].metadata["_public_key_mismatch"] is True
    assert "_public_key_mismatch" not in hosts[good.address].metadata
    assert f"host {bad_json.address}: metadata is not a JSON object" in caplog.text
    assert f"host {foreign.address}: its published publicKey belongs to {good.address}" in caplog.text


async def _round_trips(chain: LocalChain, **options) -> tuple[int, int, int]:
    source = ChainRegistrySource(chain.provider, chain.addresses, **options)
    hosts = await source.discover()
    return source.rpc_calls, source.rpc_requests, len(hosts)


async def test_round_trips_stay_three_from_3_to_40_hosts(chain):
    """Discovery costs 3 round trips with 3 hosts and with 40, also when chunks split the calls.

    Step 3 makes one getHostModelPrices per host and token (not one getModelPricing per model).
    """
    for i in range(3):
        chain.register_host(f"http://127.0.0.1:{9000 + i}", models=[TINY_VICUNA, SMOLLM], prices=(1, 2))
    assert await _round_trips(chain) == (3, 3, 3)
    for i in range(3, 40):
        chain.register_host(f"http://127.0.0.1:{9000 + i}", models=[TINY_VICUNA, SMOLLM], prices=(1, 2))
    assert await _round_trips(chain) == (3, 3, 40)
    # 40 getNodeFullInfo in 6 chunks of 7; 80 host price lists + 2 models in 12 chunks: still one round trip each
    assert await _round_trips(chain, chunk_size=7) == (3, 1 + 6 + 12, 40)


async def test_round_trips_stay_three_without_a_multicall(three_hosts):
    """Without a Multicall3 address the calls travel as one JSON-RPC batch per step."""
    chain, _hosts = three_hosts
    addresses = {k: v for k, v in chain.addresses.items() if k != "multicall"}
    source = ChainRegistrySource(chain.provider, addresses)
    with_multicall = await ChainRegistrySource(chain.provider, chain.addresses).discover()
    assert [_view(h) for h in await source.discover()] == [_view(h) for h in with_multicall]
    # getAllActiveNodes, 3 getNodeFullInfo, 3 hosts x 2 tokens getHostModelPrices, 2 getModel
    assert source.rpc_calls == 3 and source.rpc_requests == 1 + 3 + 6 + 2


async def test_a_provider_without_batches_gets_one_request_per_chunk(three_hosts):
    """A provider that takes no batches still gets every host, one request per aggregate3 chunk."""
    chain, _hosts = three_hosts
    source = ChainRegistrySource(CountingProvider(chain.provider, batches=False), chain.addresses, chunk_size=4)
    assert len(await source.discover()) == 3
    assert source.rpc_calls == source.rpc_requests == 1 + 1 + 2  # 3 infos; 6 price lists + 2 models in 2 chunks


async def test_rpc_runs_off_the_event_loop(three_hosts):
    """Every RPC request runs in an executor thread, never on the event loop's thread."""
    chain, _hosts = three_hosts
    provider = CountingProvider(chain.provider)
    await ChainRegistrySource(provider, chain.addresses).discover()
    await ChainRegistrySource(provider, chain.addresses).sequential_discover()
    assert provider.threads and threading.get_ident() not in provider.threads


async def test_sequential_discover_makes_one_round_trip_per_host(three_hosts):
    """sequential_discover() reads 1 + N calls, with minimum prices and models named by id."""
    chain, (h1, _h2, _h3) = three_hosts
    source = ChainRegistrySource(chain.provider, chain.addresses)
    hosts = await source.sequential_discover()
    assert source.rpc_calls == source.rpc_requests == 1 + 3
    assert hosts[0].address == h1.address and hosts[0].models == (model_id(*TINY_VICUNA),)
    assert hosts[1].prices[model_id(*SMOLLM)] == {"native": 500, "stable": 300}


async def test_full_sequential_discover_equals_discover(three_hosts):
    """Read one call at a time, the registry gives exactly what the batched discovery gives."""
    chain, _hosts = three_hosts
    source = ChainRegistrySource(chain.provider, chain.addresses)
    batched = [_view(h) for h in await source.discover()]
    before = source.rpc_calls
    assert [_view(h) for h in await source.sequential_discover(full=True)] == batched
    assert source.rpc_calls - before == 1 + 3 + 2 * 3 + 2


async def test_without_price_reads_models_get_the_minimum_prices(three_hosts):
    """read_prices=False skips getModelPricing: 3 round trips, each model at the node's minimum prices."""
    chain, _hosts = three_hosts
    source = ChainRegistrySource(chain.provider, chain.addresses, read_prices=False)
    second = (await source.discover())[1]
    assert second.models == (TV_FILE, SM_FILE)
    assert second.prices == {TV_FILE: {"native": 500, "stable": 300}, SM_FILE: {"native": 500, "stable": 300}}
    assert source.rpc_calls == 3 and source.rpc_requests == 3


async def test_a_token_never_priced_reads_as_unpriced(three_hosts):
    """With a stable token no host priced in, every stable price is 0 and native prices stay."""
    chain, (h1, _h2, _h3) = three_hosts
    hosts = await ChainRegistrySource(chain.provider, {**chain.addresses, "stable_token": h1.address}).discover()
    assert hosts[0].prices == {TV_FILE: {"native": 1_000, "stable": 0}}


async def test_deactivated_hosts_are_not_discovered(chain):
    """A deactivated host drops out of the next discovery."""
    a = chain.register_host("http://127.0.0.1:9001", models=[TINY_VICUNA])
    b = chain.register_host("http://127.0.0.1:9002", models=[TINY_VICUNA])
    chain.deactivate_host(a)
    assert [h.address for h in await ChainRegistrySource(chain.provider, chain.addresses).discover()] == [b.address]


async def test_an_empty_registry_costs_one_round_trip(chain):
    """With no active hosts discovery returns nothing after one round trip."""
    source = ChainRegistrySource(chain.provider, chain.addresses)
    assert await source.discover() == [] and source.rpc_calls == 1


async def test_host_manager_discovers_from_the_chain(three_hosts):
    """HostManager(sources=[ChainRegistrySource]) lists the registry's hosts, keyed by address."""
    chain, (h1, h2, h3) = three_hosts
    source = ChainRegistrySource(chain.w3, chain.addresses)
    async with HostManager(sources=[source]) as manager:
        hosts = await manager.discover_all_active_hosts(probe=False)
        assert [h.address for h in hosts] == [h1.address, h2.address, h3.address]
        assert manager.find(h2.address.lower()).api_url == "https://h2.example:8443"
        await manager.discover_all_active_hosts(probe=False)  # cached: no new round trips
        assert source.rpc_calls == 3


async def test_a_wrong_registry_address_is_a_chain_error(three_hosts):
    """An address without a registry gives a ChainError (a chain read failed, not a host frame) that
    says the answer does not decode."""
    chain, _hosts = three_hosts
    no_code = "0x000000000000000000000000000000000000dEaD"  # (the stable token has code now: the mock USDC)
    assert chain.w3.eth.get_code(no_code) == b""
    source = ChainRegistrySource(chain.provider, {**chain.addresses, "node_registry": no_code})
    with pytest.raises(ChainError, match="do not decode") as info:
        await source.discover()
    assert info.value.code == "CHAIN_ERROR" and info.value.retryable


async def test_an_unreachable_rpc_url_is_a_connection_failure():
    """An RPC URL nobody listens on raises ConnectionFailed, whose text keeps the URL's key out."""
    source = ChainRegistrySource("http://127.0.0.1:9/v3/secret-key", {"node_registry": "0x" + "11" * 20}, timeout=2)
    with pytest.raises(ConnectionFailed) as caught:
        await source.discover()
    assert "secret-key" not in str(caught.value) and "secret-key" not in repr(source)
    assert "registry rpc http://127.0.0.1:9" in str(caught.value)


async def test_discovery_uses_the_given_executor(three_hosts):
    """A given executor runs the blocking reads."""
    from concurrent.futures import ThreadPoolExecutor

    chain, _hosts = three_hosts
    with ThreadPoolExecutor(1, thread_name_prefix="registry-test") as pool:
        provider = CountingProvider(chain.provider)
        await ChainRegistrySource(provider, chain.addresses, executor=pool).discover()
        (thread,) = provider.threads
        assert thread in {t.ident for t in threading.enumerate() if t.name.startswith("registry-test")}


def test_parse_metadata_is_lenient():
    """Invalid JSON or a non-object is ({}, False); empty text is ({}, True)."""
    assert parse_metadata('{"a": 1}') == ({"a": 1}, True)
    assert parse_metadata("") == ({}, True)
    assert parse_metadata("[1, 2]") == ({}, False)
    assert parse_metadata("{oops") == ({}, False)


def test_public_key_address_rejects_malformed_keys():
    """Only a 33-byte compressed point in hex yields an address."""
    key = "02" + "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"  # the secp256k1 generator
    assert public_key_address(key) == "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
    assert public_key_address("0x" + key) == public_key_address(key)
    off_curve = "02" + (5).to_bytes(32, "big").hex()  # 5**3 + 7 has no square root mod p
    for bad in (None, 7, "", key[:-2], "04" + key[2:], "02" + "zz" * 32, "02" + "ff" * 32, off_curve):
        assert public_key_address(bad) is None


def _node(model_ids: tuple[str, ...], **fields) -> NodeRecord:
    values = dict(
        address="0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf", stake_wei=10**18, active=True, metadata="{}",
        api_url="http://h:1", model_ids=model_ids, min_price_native=1, min_price_stable=2,
    )
    values.update(fields)
    return NodeRecord(**values)


def test_models_sharing_a_file_name_are_never_aliased_to_each_other():
    """Two models with one file name get repo/file ids; the bare file name resolves to neither."""
    a, b = model_id("org-a/m", "model.gguf"), model_id("org-b/m", "model.gguf")
    models = {a: ModelRecord("org-a/m", "model.gguf", True), b: ModelRecord("org-b/m", "model.gguf", True)}
    host = build_host(_node((a, b)), prices=None, models=models)
    assert host.models == ("org-a/m/model.gguf", "org-b/m/model.gguf")
    assert resolve_model("org-b/m:model.gguf", host) == "org-b/m/model.gguf"
    assert resolve_model(a, host) == "org-a/m/model.gguf"
    with pytest.raises(ModelNotAvailable):
        resolve_model("model.gguf", host)


def test_a_model_unknown_to_the_registry_is_named_by_its_id():
    """A model id the ModelRegistry does not know is the host's model id itself."""
    unknown = model_id("x", "y")
    host = build_host(_node((unknown,)), prices=None, models={})
    assert host.models == (unknown,) and host.model_names == {}
    assert host.prices == {unknown: {"native": 1, "stable": 2}}


def test_an_unusable_api_url_skips_the_host():
    """A node whose apiUrl is not a URL is skipped, with a warning."""
    problems: list[str] = []
    assert build_host(_node((), api_url="ftp://nowhere"), prices=None, models={}, warn=problems.append) is None
    assert "is not a usable URL" in problems[0]


def test_discover_sync_can_run_in_a_plain_thread(three_hosts):
    """discover_sync() works from a thread with no event loop."""
    chain, _hosts = three_hosts
    result: list = []
    source = ChainRegistrySource(chain.w3, chain.addresses)
    worker = threading.Thread(target=lambda: result.extend(source.discover_sync()))
    worker.start()
    worker.join(30)
    assert len(result) == 3


def test_importing_the_registry_source_imports_no_web3():
    """Importing hosts.registry loads neither web3 nor eth-abi (they load on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, fabstir_jupyter.hosts.registry\n"
        "print(sorted(m for m in ('web3', 'eth_abi', 'eth_keys') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"



def test_get_model_decodes_the_production_struct_encoding():
    """A getModel answer encoded as production encodes it (one tuple) decodes; bad UTF-8 is replaced."""
    model = ("CohereForAI/TinyVicuna-1B-32k-GGUF", "tiny-vicuna-1b.q4_k_m.gguf", b"\x11" * 32, 1, True, 1_700_000_000)
    data = encode([MODEL_STRUCT], [model])
    assert int.from_bytes(data[:32], "big") == 32  # the struct's offset word
    assert _decode_model(data) == ModelRecord(*TINY_VICUNA, True)
    odd = encode(["(bytes,bytes,bytes32,uint256,bool,uint256)"], [(b"org/\xff", b"m.gguf", bytes(32), 1, False, 1)])
    assert _decode_model(odd) == ModelRecord("org/\ufffd", "m.gguf", False)


def test_get_model_refuses_six_flat_values():
    """The old flat encoding, and trailing bytes after the struct, are refused rather than misread."""
    model = ("org/repo", "model.gguf", bytes(32), 1, True, 5)
    for data in (encode(MODEL_FIELDS, list(model)), encode([MODEL_STRUCT], [model]) + bytes(32)):
        with pytest.raises((DecodingError, ValueError)):  # eth_abi's, or the re-encoding check's
            _decode_model(data)


async def test_flat_get_model_answers_name_models_by_id_never_garbage(three_hosts, caplog):
    """A registry answering getModel with six flat values gets its models named by id, with one warning."""
    chain, _hosts = three_hosts

    def flatten(response):
        (model,) = decode([MODEL_STRUCT], bytes.fromhex(response["result"][2:]))
        return {**response, "result": "0x" + encode(MODEL_FIELDS, list(model)).hex()}

    provider = RewritingProvider(chain.provider, "getModel(bytes32)", flatten)
    addresses = {k: v for k, v in chain.addresses.items() if k != "multicall"}
    with caplog.at_level(logging.WARNING, logger="fabstir_jupyter.hosts.registry"):
        second = (await ChainRegistrySource(provider, addresses).discover())[1]
    assert provider.rewritten == 2
    assert second.models == (model_id(*TINY_VICUNA), model_id(*SMOLLM)) and second.model_names == {}
    assert caplog.text.count("getModel answers do not decode as production's struct") == 1


async def test_a_failing_price_list_falls_back_to_the_minimum_prices(three_hosts, caplog):
    """Where getHostModelPrices reverts (an older registry), a node's minimum prices stand in, with a warning."""
    chain, _hosts = three_hosts

    def revert(response):
        return {"jsonrpc": "2.0", "id": response.get("id"), "error": {"code": 3, "message": "execution reverted"}}

    provider = RewritingProvider(chain.provider, "getHostModelPrices(address,address)", revert)
    addresses = {k: v for k, v in chain.addresses.items() if k != "multicall"}
    with caplog.at_level(logging.WARNING, logger="fabstir_jupyter.hosts.registry"):
        hosts = await ChainRegistrySource(provider, addresses).discover()
    assert provider.rewritten == 6
    assert hosts[1].prices == {TV_FILE: {"native": 500, "stable": 300}, SM_FILE: {"native": 500, "stable": 300}}
    assert "getHostModelPrices failed for 6 of 6 (node, token) reads" in caplog.text


async def test_discovery_through_an_rpc_url_holding_an_api_key_logs_no_key_at_debug(three_hosts, caplog):
    """Discovery over HTTP JSON-RPC with every logger at DEBUG (web3's provider logs the whole URI,
    urllib3 the request path): the key in the URL's path and query appears in no record, while the
    records still name the host and port. (web3 logged the full URI before.)"""
    import os
    from urllib.parse import urlsplit

    from fabstir_jupyter.local.rpc import LocalRpcServer

    chain, hosts = three_hosts
    secret = "k3y" + os.urandom(8).hex()
    caplog.set_level(logging.DEBUG)
    with LocalRpcServer(chain.provider) as server:
        url = f"{server.url.rstrip('/')}/v2/{secret}?apikey={secret}"
        found = await ChainRegistrySource(url, chain.addresses).discover()
    assert len(found) == len(hosts)
    client_side = [r for r in caplog.records if not r.name.startswith("fabstir_jupyter.local")]
    netloc = urlsplit(server.url).netloc
    assert any(r.name.startswith("web3") and netloc in r.getMessage() for r in client_side)  # the logs ran
    assert all(secret not in r.getMessage() for r in client_side)
