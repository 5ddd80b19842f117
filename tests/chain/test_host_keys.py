"""Hosts' encryption keys on a real (in-process) chain: published and checked, or recovered from the
registration transaction of a host that publishes none, and used end to end by the client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fabstir_jupyter.connections import encryption_key_for
from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.errors import ChainError, EncryptionError, EncryptionUnavailable
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.hosts import HostManager
from fabstir_jupyter.hosts.keys import LOG_WINDOW, OPERATOR_EVENTS, registration_key
from fabstir_jupyter.hosts.registry import ChainRegistrySource
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.usage import ListSink

from .conftest import SMOLLM

HOST_HEX = "0x" + "71" * 32
HOST_KEY = PrivateKey.from_hex(HOST_HEX)
PROMPT = "Name a river that crosses a desert"


def test_operator_events_are_the_production_topics():
    """The events searched are production's, topic for topic (spec/production-abi.txt)."""
    from pathlib import Path

    from eth_utils import keccak

    abi = (Path(__file__).resolve().parents[1] / "data" / "production-abi.txt").read_text()
    for signature in OPERATOR_EVENTS:
        name = signature.split("(")[0]
        line = next(line for line in abi.splitlines() if line.startswith(f"event {name}("))
        assert line.rsplit("topic ", 1)[1].strip() == "0x" + keccak(text=signature).hex(), name


async def test_a_host_without_a_published_key_has_it_recovered_from_its_registration(chain):
    """Registered with no publicKey in its metadata (as the production node's CLI does): discovery finds
    no key, and the source recovers it from the host's own transaction; it derives the host's address."""
    host = chain.register_host("http://127.0.0.1:9", models=[SMOLLM], private_key=HOST_HEX,
                               publish_key=False)
    source = ChainRegistrySource(chain.provider, chain.addresses)
    (info,) = await source.discover()
    assert "publicKey" not in info.metadata
    key = await source.recover_public_key(info.address)
    assert key == HOST_KEY.public_key and key.address == host.address
    found = await HostManager(sources=[source]).keys.find(info)
    assert (found.source, found.public_key) == ("registration", HOST_KEY.public_key)
    assert info.encryption_key is found


async def test_the_client_encrypts_to_a_host_whose_key_it_recovered(chain, start_host):
    """End to end: a real host running with its operator key, registered without publishing it, serves
    an encrypted stream, also under encryption="required"; the key was looked up once."""
    server = await start_host(operator_key=HOST_KEY)
    chain.register_host(server.http_url, models=[("org/scripted", "scripted-1")], private_key=HOST_HEX,
                        publish_key=False)
    source = ChainRegistrySource(chain.provider, chain.addresses)
    calls = []
    recover = source.recover_public_key

    async def counted(address: str, **kwargs: Any) -> Any:
        calls.append(address)
        return await recover(address, **kwargs)

    source.recover_public_key = counted  # type: ignore[method-assign]
    manager = InferenceManager(HostManager(sources=[source]), usage=ListSink())
    try:
        async with manager.stream(PROMPT, max_tokens=5, encryption="required") as stream:
            text = await stream.read()
        again = await manager.ainfer(PROMPT, max_tokens=3)
    finally:
        await manager.aclose()
    assert text == scripted_text(PROMPT, 5) and stream.encrypted is True
    assert again.encrypted is True and again.text == scripted_text(PROMPT, 3)
    assert calls == [HOST_KEY.address]
    assert stream.host.encryption_key.source == "registration"


async def test_a_published_key_of_another_account_is_flagged_and_refused(chain):
    """Discovery flags a publicKey that derives another address; the connector refuses the host in auto
    and required, and only encryption=False would use it."""
    other = PrivateKey.from_hex("0x" + "72" * 32)
    chain.register_host("http://127.0.0.1:9", models=[SMOLLM],
                        metadata={"publicKey": other.public_key.compressed.hex()})
    (info,) = await ChainRegistrySource(chain.provider, chain.addresses).discover()
    assert info.metadata["_public_key_mismatch"] is True
    found = await HostManager(sources=[]).keys.find(info)
    assert found.suspicious and not found.usable and other.address in found.problem
    for mode in ("auto", "required"):
        with pytest.raises(EncryptionUnavailable):
            encryption_key_for(info, found, mode)
    assert encryption_key_for(info, found, False) is None


def test_an_endpoint_refusing_a_whole_chain_search_is_searched_in_windows(chain):
    """eth_getLogs over every block refused ("range too large"): the search walks back from the head
    in windows, stops at the first window holding the host's events, and recovers the key."""
    host = chain.register_host("http://127.0.0.1:9", models=[SMOLLM], private_key=HOST_HEX, publish_key=False)
    for _ in range(6):  # later blocks with nothing of the host's
        chain.register_host("http://127.0.0.1:10", models=[SMOLLM])
    source = ChainRegistrySource(chain.provider, chain.addresses)
    ranges = []

    def picky(method: str, params: Any) -> Any:
        if method == "eth_getLogs":
            first, last = params[0]["fromBlock"], params[0]["toBlock"]
            if last == "latest" or int(last, 16) - int(first, 16) >= 8:
                raise ChainError("eth_getLogs: block range too large")
            ranges.append((int(first, 16), int(last, 16)))
        return source.rpc(method, params)

    key = registration_key(picky, chain.addresses["node_registry"], host.address, window=8)
    assert key == HOST_KEY.public_key
    assert len(ranges) >= 2 and all(b - a == 7 for a, b in ranges[:-1])  # newest window first, walking back
    assert ranges == sorted(ranges, reverse=True)
    assert LOG_WINDOW > 8


def test_an_address_with_no_registry_events_is_not_supported(chain):
    """No transaction signed by the address among the registry's events: ENCRYPTION_NOT_SUPPORTED."""
    chain.register_host("http://127.0.0.1:9", models=[SMOLLM])
    source = ChainRegistrySource(chain.provider, chain.addresses)
    stranger = PrivateKey.from_hex("0x" + "73" * 32).address
    with pytest.raises(EncryptionError) as info:
        registration_key(source.rpc, chain.addresses["node_registry"], stranger)
    assert info.value.code == "ENCRYPTION_NOT_SUPPORTED" and stranger in str(info.value)


async def test_an_unreachable_rpc_leaves_the_host_without_a_key_and_says_why():
    """A registry endpoint that cannot be reached: no key, no exception; the problem names the endpoint."""
    from fabstir_jupyter.hosts import HostInfo

    source = ChainRegistrySource("http://127.0.0.1:9/rpc", {"node_registry": "0x" + "11" * 20}, timeout=2)
    info = HostInfo(api_url="http://127.0.0.1:9", address=HOST_KEY.address)
    found = await asyncio.wait_for(HostManager(sources=[source]).keys.find(info), 10)
    assert not found.usable and not found.suspicious
    assert "registry rpc" in found.problem and "recovering it failed" in found.problem
