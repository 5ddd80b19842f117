"""LocalNetwork for paid sessions: the chain over JSON-RPC on loopback, the payment contracts' addresses,
each host's operator key in a private file, a funded user account, and a paid job over the wire."""

from __future__ import annotations

import gc
import logging
import os
import socket
import stat
from pathlib import Path

import pytest
from web3 import Web3

from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.errors import TransactionFailed
from fabstir_jupyter.local.network import USER_NATIVE, USER_USDC, LocalNetwork
from fabstir_jupyter.marketplace import MarketplaceClient
from fabstir_jupyter.networks import resolve_network


@pytest.fixture(scope="module")
def paid():
    """Two scripted hosts on a fresh local chain (do not stop or kill hosts)."""
    with LocalNetwork(2, "scripted", seed=5) as local:
        yield local


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _secrets(network: LocalNetwork) -> list[str]:
    files = [h.key_file for h in network.hosts] + [network.user_key_file]
    keys = [Path(f).read_text().strip() for f in files]
    return keys + [k[2:] for k in keys]


def test_rpc_url_serves_the_networks_chain_on_loopback(paid):
    """web3's HTTPProvider on rpc_url reads the same chain the network registered its hosts on."""
    assert paid.rpc_url.startswith("http://127.0.0.1:")
    w3 = Web3(Web3.HTTPProvider(paid.rpc_url))
    assert w3.eth.chain_id == paid.chain_id
    registry = w3.eth.contract(address=paid.addresses["node_registry"], abi=paid.chain.node_registry.abi)
    assert registry.functions.getAllActiveNodes().call() == [h.address for h in paid.hosts]


def test_addresses_name_the_payment_contracts(paid):
    """addresses has JobMarketplace, HostEarnings, USDC (6 decimals) and FAB under their contract names and
    the preset keys; as_network() keeps only preset keys and resolves."""
    addresses = paid.addresses
    w3 = Web3(Web3.HTTPProvider(paid.rpc_url))
    for name, key in (("JobMarketplace", "job_marketplace"), ("HostEarnings", "host_earnings"),
                      ("USDC", "stable_token"), ("FAB", "fab_token"), ("NodeRegistry", "node_registry")):
        assert addresses[name] == addresses[key] and len(w3.eth.get_code(addresses[name])) > 100
    assert paid.chain.usdc.functions.decimals().call() == 6
    marketplace = MarketplaceClient(paid.rpc_url, addresses["JobMarketplace"])
    assert marketplace.fee_basis_points() == 1000 and marketplace.min_deposit(addresses["USDC"]) == 500_000
    preset = resolve_network(paid.as_network())
    assert preset.addresses["job_marketplace"] == addresses["JobMarketplace"]
    assert "JobMarketplace" not in preset.addresses


def test_each_host_has_its_registry_key_in_a_file_only_it_can_read(paid):
    """key_file: mode 0600 in a 0700 directory owned by this user, holding the key of the host's registry
    entry (funded for gas); keys differ per host; the user key file is alike and its account is funded."""
    files = [h.key_file for h in paid.hosts] + [paid.user_key_file]
    assert len(set(files)) == 3 and len({os.path.dirname(f) for f in files}) == 1
    directory = os.stat(os.path.dirname(files[0]))
    assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == os.getuid()
    for path in files:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    for host in paid.hosts:
        key = PrivateKey.from_hex(Path(host.key_file).read_text())
        assert key.address == host.address == host.local.address
        assert paid.chain.native_balance(host.address) > 10**17  # gas for proofs and settlement
    user = PrivateKey.from_hex(Path(paid.user_key_file).read_text())
    assert user.address == paid.user_address == paid.user_key.address
    assert paid.chain.usdc_balance(paid.user_address) == USER_USDC
    assert paid.chain.native_balance(paid.user_address) == USER_NATIVE


def test_a_paid_job_runs_over_the_rpc_url_with_the_key_files(paid, caplog):
    """The user opens a job at host 0's on-chain price, the host proves with the key from its file, the
    user settles and the host withdraws: every transaction signed and sent raw over rpc_url. No key
    reaches a repr, an error or a DEBUG log on the way."""
    caplog.set_level(logging.DEBUG)
    host = paid.hosts[0]
    marketplace = paid.addresses["JobMarketplace"]
    as_user = MarketplaceClient(paid.rpc_url, marketplace, account=paid.user_key)
    host_key = PrivateKey.from_hex(Path(host.key_file).read_text())
    as_host = MarketplaceClient(paid.rpc_url, marketplace, account=host_key)
    native_price = host.prices[0]
    opened = as_user.create_job(host.address, paid.model.model_id, deposit=10**15, price_per_token=native_price)
    as_host.submit_proof(opened.job_id, 1000, os.urandom(32), "proof-cid")
    with pytest.raises(TransactionFailed) as refused:
        as_host.complete_job(opened.job_id)  # the host must wait out the dispute window
    settled = as_user.complete_job(opened.job_id)
    cost = 1000 * native_price // 1000
    assert (settled.tokens_used, settled.payment, settled.refund) == (1000, cost, 10**15 - cost)
    assert as_host.earnings() == settled.host_earnings == cost - cost // 10
    assert as_host.withdraw_earnings() == settled.host_earnings and as_host.earnings() == 0

    seen = [repr(paid), str(paid), repr(paid.hosts), repr(paid.user_key), str(paid.user_key), repr(as_user),
            repr(as_host), repr(vars(as_host)), str(refused.value), repr(refused.value), caplog.text,
            repr(paid.chain.hosts)]
    for secret in _secrets(paid):
        assert all(secret not in text for text in seen)


def test_stop_removes_the_key_files_and_closes_the_rpc_port():
    """stop() (and garbage collection of a network never stopped) removes the key directory and stops
    serving the chain."""
    network = LocalNetwork(1, "scripted")
    files = [network.hosts[0].key_file, network.user_key_file]
    port = _port(network.rpc_url)
    assert all(os.path.exists(f) for f in files)
    network.stop()
    assert not any(os.path.exists(f) for f in files) and not os.path.exists(os.path.dirname(files[0]))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    dropped = LocalNetwork(1, "scripted")
    directory, port = os.path.dirname(dropped.user_key_file), _port(dropped.rpc_url)
    del dropped
    gc.collect()
    assert not os.path.exists(directory)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_each_host_serves_encrypted_sessions_under_the_key_it_registered(paid):
    """A local host runs with its operator key: a client that encrypts to the publicKey found in the
    registry (checked against the registered address) gets an answer it can decrypt."""
    import json

    from websockets.asyncio.client import connect

    from fabstir_jupyter.encryption import EncryptedSession, host_public_key
    from fabstir_jupyter.hosts.registry import ChainRegistrySource
    from fabstir_jupyter.protocol import ResponseReader, parse_host_frame

    hosts = await ChainRegistrySource(paid.chain.provider, paid.chain.addresses).discover()
    assert len(hosts) == 2
    for host in hosts:
        public = host_public_key(host.metadata.get("publicKey"), host.address)  # raises on a mismatch
        session = EncryptedSession(public, session_id="7", job_id="7", chain_id=paid.chain_id, model=host.models[0],
                                   signer=PrivateKey.from_hex("0x" + "5d" * 32))
        async with connect(host.ws_url) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(json.dumps(session.init_frame()))
            assert json.loads(await ws.recv())["type"] == "session_init_ack"
            await ws.send(json.dumps(session.message_frame("hello there", model=host.models[0], max_tokens=5,
                                                           temperature=0.0, request_id="r")))
            reader, text = ResponseReader(request_id="r", max_tokens=5, features=[]), ""
            while not reader.done:
                text += "".join(reader.receive(session.decrypt(parse_host_frame(await ws.recv()))))
        assert len(text.split()) == 5 and reader.finish_reason == "length"


# ---------------------------------------------------------------------------- paid hosts (paid=True)


async def _session(url: str, job_id: int | None, chain_id: int, answers: list[int]):
    """Open a plaintext session on ``job_id`` (or one without a job), ask for answers of the given
    lengths, and close the socket; return the frames answering each request."""
    import json

    from websockets.asyncio.client import connect

    from fabstir_jupyter.protocol import prompt_frame, session_init_frame

    replies = []
    async with connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
        await ws.send(json.dumps(session_init_frame(str(job_id or "free"), job_id=job_id, chain_id=chain_id)))
        assert json.loads(await ws.recv())["type"] == "session_init_ack"
        for i, n in enumerate(answers):
            await ws.send(json.dumps(prompt_frame("tell me about the sea", session_id=None, model="scripted-1",
                                                  max_tokens=n, temperature=0.0, request_id=f"r{i}")))
            frames = []
            while not frames or frames[-1]["type"] not in ("stream_end", "error"):
                frames.append(json.loads(await ws.recv()))
            if frames[-1]["type"] == "error" and len(frames) == 1:
                replies.append(frames)
                continue
            while frames[-1]["type"] != "stream_end":
                frames.append(json.loads(await ws.recv()))
            replies.append(frames)
    return replies


def _wait(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


async def test_paid_local_hosts_bill_jobs_and_settle_them_when_the_socket_closes():
    """LocalNetwork(paid=True) starts fabstir-host processes with --rpc-url, --marketplace and
    --model-registry-id: they list paid-sessions, refuse a request without a job (PAYMENT_REQUIRED),
    prove a job's answers (600 tokens proven as the interval, then 600) and settle it on close."""
    import asyncio

    import httpx

    from fabstir_jupyter.marketplace import JobStatus

    with LocalNetwork(1, "scripted", seed=13, paid=True) as network:
        host = network.hosts[0]
        assert "paid" in repr(network)
        async with httpx.AsyncClient() as http:
            version = (await http.get(host.api_url + "/v1/version")).json()
            health = (await http.get(host.api_url + "/health")).json()
        assert "paid-sessions" in version["features"]
        assert health["payments"]["marketplace"] == network.addresses["JobMarketplace"]
        unpaid = await _session(host.url, None, network.chain_id, [5])
        assert unpaid[0][0]["code"] == "PAYMENT_REQUIRED"

        marketplace = network.addresses["JobMarketplace"]
        as_user = MarketplaceClient(network.rpc_url, marketplace, account=network.user_key)
        reader = MarketplaceClient(network.w3, marketplace)
        opened = await asyncio.to_thread(as_user.create_job, host.address, network.model.model_id, deposit=10**15,
                                         price_per_token=host.prices[0])
        answers = await _session(host.url, opened.job_id, network.chain_id, [600, 600])
        assert [sum(f.get("tokens", 0) for f in a if f["type"] == "stream_chunk") for a in answers] == [600, 600]
        await asyncio.to_thread(_wait, lambda: reader.get_job(opened.job_id).tokens_used == 1600)
        network.chain.advance_time(31)
        await asyncio.to_thread(_wait, lambda: reader.get_job(opened.job_id).status is JobStatus.COMPLETED)
        job = reader.get_job(opened.job_id)
        cost = 1600 * host.prices[0] // 1000
        assert job.refunded_to_user == 10**15 - cost and job.withdrawn_by_host == cost - cost // 10
        assert reader.earnings(host.address) == cost - cost // 10


async def test_a_killed_paid_host_leaves_its_job_to_time_out_by_anyone():
    """A paid host SIGKILLed mid-session settles nothing: its job stays Active with what it proved, and
    once the proofTimeoutWindow has passed anyone may time it out, which pays the proven tokens."""
    import asyncio

    from fabstir_jupyter.marketplace import JobStatus

    with LocalNetwork(1, "scripted", seed=17, paid=True) as network:
        host = network.hosts[0]
        marketplace = network.addresses["JobMarketplace"]
        as_user = MarketplaceClient(network.rpc_url, marketplace, account=network.user_key)
        reader = MarketplaceClient(network.w3, marketplace)
        opened = await asyncio.to_thread(as_user.create_job, host.address, network.model.model_id, deposit=10**15,
                                         price_per_token=host.prices[0], proof_timeout_window=60)
        await _session(host.url, opened.job_id, network.chain_id, [1200])
        await asyncio.to_thread(_wait, lambda: reader.get_job(opened.job_id).tokens_used == 1200)
        network.kill_host(0)
        assert reader.get_job(opened.job_id).status is JobStatus.ACTIVE
        anyone = network.chain.create_account(native=10**18)
        stranger = MarketplaceClient(network.rpc_url, marketplace, account=PrivateKey.from_hex(anyone.private_key))
        with pytest.raises(TransactionFailed) as early:
            stranger.trigger_timeout(opened.job_id)
        assert early.value.reason == "Not timeout"
        network.chain.advance_time(61)
        settled = stranger.trigger_timeout(opened.job_id)
        assert settled.timed_out and settled.tokens_used == 1200
        assert settled.payment == 1200 * host.prices[0] // 1000 and settled.refund == 10**15 - settled.payment
        assert reader.get_job(opened.job_id).status is JobStatus.TIMED_OUT
