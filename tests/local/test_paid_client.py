"""The client's side of paid sessions on the embedded local network: paid scripted hosts, the local chain
over JSON-RPC, the real marketplace. Every check of money reads the chain itself."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from pathlib import Path

import pytest

from _rpc import RangeCappedProvider, RecordingProvider
from fabstir_jupyter import FabstirSDK, InferenceConfig
from fabstir_jupyter.config import HostRequirements
from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.errors import (
    BudgetExceeded,
    ConnectionFailed,
    InsufficientFunds,
    InvalidOptions,
    PaymentRequired,
    TransactionFailed,
)
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.hosts import HostManager
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.local.network import LocalNetwork
from fabstir_jupyter.local.rpc import LocalRpcServer
from fabstir_jupyter.marketplace import JobStatus, MarketplaceClient
from fabstir_jupyter.networks import ADDRESS_KEYS, NETWORKS, NetworkPreset
from fabstir_jupyter.notebook.tables import host_rows
from fabstir_jupyter.payments import LOCAL_GAS_LIMIT, PaymentConfig, Payments
from fabstir_jupyter.usage import ListSink, UsageLedger
from fabstir_jupyter.wallet import Wallet

PROMPT = "tell me about the sea"
MODEL = "scripted-1"


@pytest.fixture(scope="module")
def network():
    """Two paid scripted hosts on a fresh local chain (tests restore any price they change)."""
    with LocalNetwork(2, "scripted", seed=21, paid=True) as local:
        yield local


def _preset(network: LocalNetwork, **changes) -> NetworkPreset:
    addresses = {k: v for k, v in network.addresses.items() if k in ADDRESS_KEYS}
    preset = NetworkPreset(name="local", chain_id=network.chain_id, addresses=addresses, rpc_url=network.rpc_url)
    return dataclasses.replace(preset, **changes)


def _manager(network: LocalNetwork, *, budget="100", key: PrivateKey | None = None, usage=None, preset=None,
             **config) -> InferenceManager:
    """An inference manager on ``network`` that pays from ``key`` (default: the funded test account)."""
    wallet = Wallet(key or network.user_key, "test")
    cfg = InferenceConfig(usage_db=":memory:", backoff_initial=0.05, backoff_max=0.2)
    hosts = HostManager([], sources=[network.source()], config=cfg)
    usage = usage if usage is not None else ListSink()
    payments = Payments(wallet, preset or _preset(network), PaymentConfig(budget=budget, **config), usage=usage,
                        local=True)
    return InferenceManager(hosts, cfg, usage=usage, payments=payments, signer=wallet._key)


def _reader(network: LocalNetwork) -> MarketplaceClient:
    return MarketplaceClient(network.w3, network.addresses["JobMarketplace"])


def _user_key_hex(network: LocalNetwork) -> str:
    """The user's private key as its key file holds it (0x-hex)."""
    return Path(network.user_key_file).read_text().strip()


def _next_job_id(network: LocalNetwork) -> int:
    return _reader(network)._marketplace.functions.nextJobId().call()


async def _host_of(manager: InferenceManager, network: LocalNetwork, index: int):
    await manager.host_manager.discover_all_active_hosts()
    return manager.host_for(network.hosts[index].address)


# ---------------------------------------------------------------------------- the happy path


async def test_the_embedded_network_pays_a_session_from_its_test_account_and_the_chain_agrees():
    """FabstirSDK() on network='local' pays by default: a session's answer streams on a job opened from the
    test account (the wallet shows its address only); after end_session the chain shows the job Completed,
    tokensUsed as the proof cadence implies for what the host streamed, and host earnings + treasury fee +
    refund == deposit; the usage ledger's reconciliation agrees."""
    async with FabstirSDK(local_backend="scripted", config=InferenceConfig(usage_db=":memory:")) as sdk:
        network = sdk.local_network
        assert network.paid and sdk.address == network.user_address
        manager = sdk.get_inference_manager()
        payments = manager.payments
        assert payments is sdk.payments and payments.address == network.user_address
        session = await manager.sessions.create_session(max_tokens=400)
        job_id = session.job_id
        assert job_id is not None and payments.open_jobs[0].job_id == job_id
        first = "".join([piece async for piece in manager.session_inference(session.id, PROMPT, max_tokens=300)])
        second = "".join([piece async for piece in manager.session_inference(session.id, "and rivers",
                                                                              max_tokens=150)])
        assert first == scripted_text(PROMPT, 300) and len(second.split()) == 150
        reader = _reader(network)  # the host proves after each answer, off its event loop
        await asyncio.to_thread(_wait_for, lambda: reader.get_job(job_id).tokens_used == 450)
        assert reader.get_job(job_id).status is JobStatus.ACTIVE
        ended = await manager.sessions.end_session(session.id)
        settled = ended.settlement
        job = _reader(network).get_job(job_id)
        assert job.status is JobStatus.COMPLETED and settled.status == "completed" and settled.settled_by == "client"
        assert job.tokens_used == settled.tokens_billed == settled.expected_tokens == 450
        assert settled.cost == 450 * job.price_per_token // 1000
        assert settled.host_earnings + settled.treasury_fee + settled.refund == settled.deposit == job.deposit
        assert job.refunded_to_user == settled.refund and job.withdrawn_by_host == settled.host_earnings
        assert settled.treasury_fee == settled.cost // 10 and settled.reason == ""
        assert payments.spent == pytest.approx(settled.cost / 10**6) and payments.held == 0
        frame = payments.reconcile()
        row = frame.set_index("job_id").loc[job_id]
        assert (row["ledger_tokens"], row["billed_tokens"], row["expected_tokens"]) == (450, 450, 450)
        assert bool(row["agrees"]) and row["ledger_cost"] == pytest.approx(row["chain_cost"])
        assert row["settle_tx"] == settled.settle_tx and row["open_tx"] == settled.open_tx


async def test_opening_a_job_reads_the_balance_and_the_allowance_once_and_approves_once(network):
    """A USDC job reads the balance and the allowance once each; the first job of a budget approves
    the rest of the budget too, so the second sends no approval (two transactions, then one)."""
    balance_of, allowance = "0x70a08231", "0xdd62ed3e"  # balanceOf(address), allowance(address,address)
    recorded = RecordingProvider(network.chain.provider)
    fresh = network.chain.create_account(native=10**18, usdc=10**7)  # no allowance yet
    with LocalRpcServer(recorded) as server:
        manager = _manager(network, key=PrivateKey.from_hex(fresh.private_key), budget="5",
                           preset=_preset(network, rpc_url=server.url))
        async with manager:
            host = await _host_of(manager, network, 0)
            counts = []
            for _ in range(2):
                recorded.requests.clear()
                session = await manager.sessions.create_session(host=host)
                counts.append((recorded.count("eth_call", balance_of), recorded.count("eth_call", allowance),
                               recorded.count("eth_sendRawTransaction")))
                await manager.sessions.end_session(session.id)
    assert counts == [(1, 1, 2), (1, 1, 1)], counts


async def test_a_host_that_proves_more_than_it_streamed_is_passed_over_after_settlement(network):
    """A hostile host proves 200 tokens more on a session's job than its answers reported (the extra
    proof is sent with its key from outside, as a modified host would): the settlement bills them and says
    so, the host is marked (overbilled_tokens) and selection passes it over while the honest host fits."""
    manager = _manager(network)
    async with manager:
        greedy = await _host_of(manager, network, 0)
        honest = await _host_of(manager, network, 1)
        session = await manager.sessions.create_session(host=greedy)
        answer = await manager.sessions.stream(session.id, PROMPT, max_tokens=300).read()
        assert answer == scripted_text(PROMPT, 300)
        reader = _reader(network)
        await asyncio.to_thread(_wait_for, lambda: reader.get_job(session.job_id).tokens_used == 300)
        as_host = MarketplaceClient(network.rpc_url, network.addresses["JobMarketplace"],
                                    account=PrivateKey.from_hex(network.hosts[0].local.private_key))
        network.chain.advance_time(10)  # the contract allows 2000 tokens per second since the last proof
        await asyncio.to_thread(as_host.submit_proof, session.job_id, 200, os.urandom(32))
        ended = await manager.sessions.end_session(session.id)
        settled = ended.settlement
        assert (settled.expected_tokens, settled.tokens_billed) == (300, 500)
        assert "200 tokens more than the proof cadence implies" in settled.reason
        assert greedy.overbilled_tokens == 200 and honest.overbilled_tokens == 0
        shown = {row["url"]: row["status"] for row in host_rows([greedy, honest])}  # the dashboard's rows
        assert shown == {greedy.api_url: "overbilled", honest.api_url: "ok"}
        requirements = HostRequirements(model=MODEL)
        picks = {(await manager.host_manager.select_best_host(requirements)).key for _ in range(10)}
        assert picks == {honest.key}


async def test_stateless_calls_share_one_job_per_host_and_close_settles_it(network):
    """Stateless requests to one host reuse its tab's job (one deposit, one socket, a session id each);
    the stream says which job it paid with; closing the manager settles the tab."""
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        results = [await manager.ainfer(f"{PROMPT} {i}", max_tokens=40, host=host) for i in range(3)]
        assert [r.text for r in results] == [scripted_text(f"{PROMPT} {i}", 40) for i in range(3)]
        (jobs,) = {r.job_ids for r in results}
        (job_id,) = jobs
        assert [e.kind for e in results[0].events] == ["job_opened"] and not results[1].events
        assert all(r.usage.job_id == job_id and r.usage.tx_hash for r in results)
        assert results[0].cost == pytest.approx(40 * host.prices[MODEL]["stable"] / 1000 / 10**6)
        assert [j.job_id for j in manager.payments.open_jobs] == [job_id]
    settled = manager.payments.settlements
    assert [s.job_id for s in settled] == [job_id] and settled[0].tokens_billed == 120
    assert _reader(network).get_job(job_id).status is JobStatus.COMPLETED


def test_the_local_chain_gets_transactions_without_gas_estimates_and_other_networks_estimate(network):
    """Payments on the embedded network send every transaction with LOCAL_GAS_LIMIT (eth-tester's
    estimate executes it many times over: most of a job's time); on any other network they estimate."""
    wallet = Wallet(network.user_key, "test")
    local = Payments(wallet, _preset(network), PaymentConfig(budget="1"), local=True)
    live = Payments(wallet, _preset(network, name="base-sepolia"), PaymentConfig(budget="1"), local=False)
    assert local._chain().gas_limit == LOCAL_GAS_LIMIT and live._chain().gas_limit is None


def test_the_replacement_delay_reaches_the_chain_client_and_is_checked(network):
    """PaymentConfig.replace_after sets the chain client's (None turns replacement off); zero or a
    negative number is INVALID_OPTIONS naming it."""
    wallet = Wallet(network.user_key, "test")
    assert Payments(wallet, _preset(network), PaymentConfig(budget="1"), local=True)._chain().replace_after == 30.0
    for value in (5, None):
        payments = Payments(wallet, _preset(network), PaymentConfig(budget="1", replace_after=value), local=True)
        assert payments._chain().replace_after == value
    for bad in (0, -1, "soon", True):
        with pytest.raises(InvalidOptions) as info:
            PaymentConfig(replace_after=bad)
        assert info.value.field == "replace_after"


async def test_concurrent_stateless_calls_open_a_job_each_up_to_the_limit(network):
    """Four requests at once to one host with jobs_per_host=2 run on two jobs (one socket each), never more."""
    manager = _manager(network, jobs_per_host=2)
    async with manager:
        host = await _host_of(manager, network, 1)
        results = await asyncio.gather(*(manager.ainfer(f"{PROMPT} {i}", max_tokens=30, host=host) for i in range(4)))
        assert [r.text for r in results] == [scripted_text(f"{PROMPT} {i}", 30) for i in range(4)]
        assert len({r.job_ids[0] for r in results}) == 2
    settlements = manager.payments.settlements
    assert sum(s.streamed_tokens for s in settlements) == 120
    assert all(s.tokens_billed == s.expected_tokens == 100 for s in settlements)  # each job's minimum billing


async def test_concurrent_requests_wait_for_the_one_job_the_budget_holds(network):
    """Three requests at once to one host with a budget that holds one deposit: one job opens, the other
    requests wait for it and run on it in turn; none fails. (Those that found the first job still opening
    failed BUDGET_EXCEEDED, not retryable.)"""
    manager = _manager(network, budget="0.7")  # one 0.5 USDC deposit, not two
    async with manager:
        host = await _host_of(manager, network, 1)
        results = await asyncio.gather(*(manager.ainfer(f"{PROMPT} {i}", max_tokens=10, host=host) for i in range(3)),
                                       return_exceptions=True)
        assert [r.text for r in results] == [scripted_text(f"{PROMPT} {i}", 10) for i in range(3)], results
        assert len({r.job_ids for r in results}) == 1
    (settled,) = manager.payments.settlements
    assert settled.streamed_tokens == 30 and manager.payments.held == 0


async def test_a_low_deposit_opens_the_next_job_before_the_request_needs_it(network):
    """When a tab job's deposit cannot pay for the next request (plus its margin), a new job is opened
    before the request is sent: no stream is capped, the old job is settled with what it served."""
    chain, usdc = network.chain, network.addresses["USDC"]
    local = network.hosts[1]
    price = 500_000 * 1000 // 600  # the 0.5 USDC minimum deposit pays for 600 tokens
    chain.set_model_token_pricing(local.local, network.model.model_id, usdc, price)
    try:
        manager = _manager(network, job_tokens=100)
        async with manager:
            host = await _host_of(manager, network, 1)
            results = [await manager.ainfer(f"{PROMPT} {i}", max_tokens=200, host=host) for i in range(3)]
            assert all(r.error is None and r.finish_reason == "length" for r in results)
            jobs = [r.job_ids for r in results]
            assert jobs[0] == jobs[1] and len(jobs[2]) == 1 and jobs[2] != jobs[1]
            kinds = [e.kind for e in results[2].events]
            assert kinds == ["job_ended", "job_opened"] and "room for 200 more tokens" in results[2].events[0].message
        first = next(s for s in manager.payments.settlements if s.job_id == jobs[0][0])
        assert first.tokens_billed == 400 and first.adds_up
    finally:
        chain.set_model_token_pricing(local.local, network.model.model_id, usdc, local.prices[1])


async def test_a_host_capping_a_session_turn_continues_it_on_a_new_job(network):
    """A session whose own deposit pays for 600 tokens asks for 1000: the host caps the stream at 600
    (BUDGET_EXCEEDED), the turn goes on on a new job with the answer so far as prefill, the stream says
    so, and the two jobs bill 600 + 400: every token once."""
    chain, usdc = network.chain, network.addresses["USDC"]
    local = network.hosts[0]
    chain.set_model_token_pricing(local.local, network.model.model_id, usdc, 500_000 * 1000 // 600)
    try:
        manager = _manager(network)
        async with manager:
            host = await _host_of(manager, network, 0)
            session = await manager.sessions.create_session(host=host, deposit="0.5")
            async with manager.sessions.stream(session.id, PROMPT, max_tokens=1000) as stream:
                text = await stream.read()
            assert text == scripted_text(PROMPT, 1000) and stream.error is None
            assert "job_continued" in [e.kind for e in stream.events] and len(session.job_ids) == 2
            ended = await manager.sessions.end_session(session.id)
        billed = [s.tokens_billed for s in ended.settlements]
        assert billed == [600, 400] and all(s.adds_up for s in ended.settlements)
    finally:
        chain.set_model_token_pricing(local.local, network.model.model_id, usdc, local.prices[1])


async def test_plaintext_requests_bind_their_job_with_session_init(network):
    """Without encryption a paid request still names its job: a session_init carrying the job id (and the
    chain id) before each stateless prompt, once per session socket; hosts refuse unbound requests."""
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        stateless = [await manager.ainfer(f"{PROMPT} {i}", max_tokens=12, host=host, encryption=False)
                     for i in range(2)]
        assert [r.text for r in stateless] == [scripted_text(f"{PROMPT} {i}", 12) for i in range(2)]
        assert stateless[0].encrypted is False and stateless[0].job_ids == stateless[1].job_ids
        session = await manager.sessions.create_session(host=host)
        turns = [await manager.sessions.stream(session.id, p, max_tokens=10, encryption=False).read()
                 for p in (PROMPT, "and rivers")]
        assert turns[0] == scripted_text(PROMPT, 10) and len(turns[1].split()) == 10
        ended = await manager.sessions.end_session(session.id)
    assert ended.settlement.streamed_tokens == 20 and ended.settlement.tokens_billed == 100


@pytest.mark.parametrize("encryption", [False, "auto"])
async def test_a_job_the_host_refuses_at_init_is_replaced_and_the_turn_served(network, encryption):
    """The session's job is completed on chain before its first turn (by its depositor, elsewhere): the host
    refuses it at the session's init (PAYMENT_REQUIRED); that ends the job, and the turn goes on on a new
    job, plaintext or encrypted alike."""
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        session = await manager.sessions.create_session(host=host)
        first = session.job_id
        as_me = MarketplaceClient(network.rpc_url, network.addresses["JobMarketplace"], account=network.user_key)
        as_me.complete_job(first)
        async with manager.sessions.stream(session.id, PROMPT, max_tokens=5, encryption=encryption) as stream:
            text = await stream.read()
        assert text == scripted_text(PROMPT, 5) and stream.error is None
        assert session.job_ids[0] == first and len(session.job_ids) == 2 and stream.job_ids == (session.job_id,)
        ended = await manager.sessions.end_session(session.id)
    assert [s.job_id for s in ended.settlements] == session.job_ids
    assert ended.settlements[0].tokens_billed == 0 and ended.settlements[0].settled_by == "client"


async def test_authenticate_turns_payments_on_for_a_registry_network(network, monkeypatch):
    """A registry network with a budget but no key refuses inference; authenticate() then pays with that key
    from the next request on, on the same manager."""
    for name in ("FABSTIR_PRIVATE_KEY", "FABSTIR_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    async with FabstirSDK(network=_sepolia_on(network), budget="1", config=InferenceConfig(usage_db=":memory:")) as sdk:
        manager = sdk.get_inference_manager()
        with pytest.raises(PaymentRequired):
            await manager.ainfer(PROMPT, max_tokens=4)
        assert sdk.authenticate(_user_key_hex(network)) == network.user_address
        result = await manager.ainfer(PROMPT, max_tokens=4)
        assert result.text == scripted_text(PROMPT, 4) and manager.payments.address == network.user_address


# ---------------------------------------------------------------------------- budgets and bad input


async def test_budgets_refuse_a_deposit_before_any_transaction(network):
    """A session deposit over its own budget, or over what the process budget has left, is BUDGET_EXCEEDED
    (not retryable) and opens no job; a job settled frees its deposit for the next."""
    manager = _manager(network, budget="0.8")
    async with manager:
        host = await _host_of(manager, network, 0)
        start = _next_job_id(network)
        with pytest.raises(BudgetExceeded) as own:
            await manager.sessions.create_session(host=host, deposit="0.6", budget="0.55")
        assert not own.value.retryable and "session" in own.value.message
        held = await manager.sessions.create_session(host=host, deposit="0.5")
        with pytest.raises(BudgetExceeded) as process:
            await manager.sessions.create_session(host=host, deposit="0.5")
        assert "the process budget of 0.8 USDC" in process.value.message and process.value.hint
        assert _next_job_id(network) == start + 1
        await manager.sessions.end_session(held.id)
        again = await manager.sessions.create_session(host=host, deposit="0.5")
        assert again.job_id == start + 1
        assert manager.payments.remaining == pytest.approx(0.3 - manager.payments.spent)


@pytest.mark.parametrize("deposit", [0, -1, "-0.5", "nothing", float("nan")])
async def test_a_deposit_that_is_not_above_zero_is_invalid_options(network, deposit):
    """Zero, negative and non-numeric deposits are INVALID_OPTIONS naming the field; nothing is sent."""
    manager = _manager(network)
    async with manager:
        start = _next_job_id(network)
        with pytest.raises(InvalidOptions) as info:
            await manager.sessions.create_session(deposit=deposit)
        assert info.value.field == "deposit" and _next_job_id(network) == start


@pytest.mark.parametrize("token", ["stable", "native"])
async def test_an_unfunded_key_is_insufficient_funds_naming_the_address_only(network, token):
    """A wallet with no tokens (no USDC for the deposit; no ETH for the deposit or its gas):
    INSUFFICIENT_FUNDS saying which address to fund; the key appears nowhere."""
    key = PrivateKey.generate()
    manager = _manager(network, key=key, token=token)
    async with manager:
        result = None
        with pytest.raises(InsufficientFunds) as info:
            result = await manager.ainfer(PROMPT, max_tokens=5)
        assert result is None
        error = info.value
        assert key.address in error.hint and not error.retryable
        secret = key._secret().hex()
        assert secret not in str(error) and secret not in repr(error) and secret not in error.hint


async def test_a_wrong_chain_id_is_refused_before_any_transaction(network):
    """A network whose chain_id is not the RPC endpoint's: INVALID_OPTIONS (field chain_id), no job opened."""
    manager = _manager(network, preset=_preset(network, chain_id=84532))
    async with manager:
        start = _next_job_id(network)
        with pytest.raises(InvalidOptions) as info:
            await manager.ainfer(PROMPT, max_tokens=5)
        assert info.value.field == "chain_id" and "84532" in info.value.message
        assert _next_job_id(network) == start


async def test_a_host_whose_price_rose_since_discovery_is_refused_with_what_to_do(network):
    """The client pays at most the price the host listed when discovered: a host that raised it since gets
    no job (TRANSACTION_FAILED, reason 'Low price', retryable: another host may do) and nothing is sent."""
    chain, usdc = network.chain, network.addresses["USDC"]
    local = network.hosts[1]
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 1)
        chain.set_model_token_pricing(local.local, network.model.model_id, usdc, local.prices[1] * 3)
        try:
            start = _next_job_id(network)
            with pytest.raises(TransactionFailed) as info:
                await manager.sessions.create_session(host=host)
            assert info.value.reason == "Low price" and info.value.retryable
            assert "discover the hosts again" in info.value.hint and _next_job_id(network) == start
            result = await manager.ainfer(PROMPT, max_tokens=5)  # unpinned: the other host serves it
            assert result.host == network.hosts[0].api_url
        finally:
            chain.set_model_token_pricing(local.local, network.model.model_id, usdc, local.prices[1])


async def test_someone_elses_job_and_a_settled_job_are_refused(network):
    """create_session(job_id=...) takes only an open job of the same wallet: another account's job and a
    settled job are PAYMENT_REQUIRED before anything is sent to the host."""
    other = network.chain.create_account(native=10**18, usdc=10**7)
    as_other = MarketplaceClient(network.rpc_url, network.addresses["JobMarketplace"],
                                 account=PrivateKey.from_hex(other.private_key))
    local = network.hosts[0]
    theirs = as_other.create_job(local.address, network.model.model_id, deposit=500_000,
                                 price_per_token=local.prices[1], token=network.addresses["USDC"])
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        with pytest.raises(PaymentRequired) as foreign:
            await manager.sessions.create_session(host=host, job_id=theirs.job_id)
        assert other.address in foreign.value.message
        session = await manager.sessions.create_session(host=host)
        await manager.sessions.end_session(session.id)
        with pytest.raises(PaymentRequired) as settled:
            await manager.sessions.create_session(host=host, job_id=session.settlement.job_id)
        assert "completed" in settled.value.message and "never reused" in settled.value.message
        as_me = MarketplaceClient(network.rpc_url, network.addresses["JobMarketplace"], account=network.user_key)
        outside = as_me.create_job(local.address, network.model.model_id, deposit=500_000,
                                   price_per_token=local.prices[1], token=network.addresses["USDC"])
        adopted = await manager.sessions.create_session(host=host, job_id=outside.job_id)  # its own open job: taken
        assert adopted.job_id == outside.job_id
        answer = await manager.sessions.stream(adopted.id, PROMPT, max_tokens=5).read()
        assert answer == scripted_text(PROMPT, 5)
        ended = await manager.sessions.end_session(adopted.id)
        assert ended.settlement.job_id == outside.job_id and ended.settlement.settled_by == "client"
    as_other.complete_job(theirs.job_id)


async def test_an_adopted_job_settled_elsewhere_is_read_back_through_an_endpoint_capping_log_ranges(network):
    """A session on a job opened elsewhere (no opening block known) that its depositor settles from
    another client while the session is open: end_session reads the settlement from the chain's logs,
    and where the endpoint refuses a search from block 0 it walks back from the head in windows."""
    as_me = MarketplaceClient(network.rpc_url, network.addresses["JobMarketplace"], account=network.user_key)
    local = network.hosts[0]
    outside = as_me.create_job(local.address, network.model.model_id, deposit=500_000,
                               price_per_token=local.prices[1], token=network.addresses["USDC"])
    capped = RangeCappedProvider(network.chain.provider, cap=16)
    with LocalRpcServer(capped) as server:
        manager = _manager(network, preset=_preset(network, rpc_url=server.url))
        async with manager:
            host = await _host_of(manager, network, 0)
            session = await manager.sessions.create_session(host=host, job_id=outside.job_id)
            answer = await manager.sessions.stream(session.id, PROMPT, max_tokens=5).read()
            assert answer == scripted_text(PROMPT, 5)
            settled_outside = await asyncio.to_thread(as_me.complete_job, outside.job_id)
            ended = await manager.sessions.end_session(session.id)
    receipt = ended.settlement
    assert receipt.job_id == outside.job_id and receipt.settle_tx == settled_outside.tx_hash
    assert receipt.settled_by == "client" and receipt.cost == settled_outside.payment
    assert receipt.refund == settled_outside.refund and receipt.status == "completed"
    assert capped.ranges and all(last - first <= 15 for first, last in capped.ranges)
    assert any(first <= settled_outside.block_number <= last for first, last in capped.ranges)


async def test_a_job_another_session_holds_is_not_taken_twice(network):
    """create_session(job_id=...) with a job this client already uses (another session's) is PAYMENT_REQUIRED:
    two PaidJobs for one job would hold its deposit twice and count its bill twice at settlement."""
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        first = await manager.sessions.create_session(host=host)
        held = manager.payments.held
        with pytest.raises(PaymentRequired) as twice:
            await manager.sessions.create_session(host=host, job_id=first.job_id)
        assert "already in use by session" in twice.value.message and manager.payments.held == held
        await manager.sessions.stream(first.id, PROMPT, max_tokens=5).read()
        ended = await manager.sessions.end_session(first.id)
    assert [s.job_id for s in manager.payments.settlements] == [first.job_id]
    assert manager.payments.spent == pytest.approx(ended.settlement.cost / 10**6) and manager.payments.held == 0


async def test_a_job_creation_that_times_out_leaves_no_deposit_behind(network):
    """Opening a job that outlasts job_timeout fails the attempt (CONNECTION_FAILED, retryable); a creation
    not sent yet is never sent, one that lands anyway is settled at once: every deposit comes back, nothing
    stays held."""
    manager = _manager(network, job_timeout=0.001, settle_timeout=30.0)
    start = _next_job_id(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        with pytest.raises(ConnectionFailed) as info:
            await manager.ainfer(PROMPT, max_tokens=5, host=host)
        assert "did not finish within" in info.value.message
    opened = range(start, _next_job_id(network))
    reader = _reader(network)
    for job_id in opened:
        job = reader.get_job(job_id)
        assert job.status is JobStatus.COMPLETED and job.refunded_to_user == job.deposit
    assert manager.payments.held == 0 and manager.payments.spent == 0
    assert sorted(s.job_id for s in manager.payments.settlements) == list(opened)


def _gate(owner, name: str):
    """Hold ``owner.<name>`` (a blocking chain call, run in the payments' thread pool) until the test lets
    it go: returns (entered, proceed, left) events."""
    entered, proceed, left = threading.Event(), threading.Event(), threading.Event()
    real = getattr(owner, name)

    def gated(*args, **kwargs):
        entered.set()
        try:
            assert proceed.wait(30), "the test never let the chain call go"
            return real(*args, **kwargs)
        finally:
            left.set()

    setattr(owner, name, gated)
    return entered, proceed, left


async def _cancel_inside(gate, request) -> None:
    """Run ``request`` until it enters the gated chain call (``gate``: what :func:`_gate` returned),
    cancel it there (what Ctrl-C does), check that it ends cancelled, then let the chain call go on."""
    entered, proceed, _ = gate
    task = asyncio.ensure_future(request)
    assert await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()


def _all_refunded(network: LocalNetwork, job_ids) -> None:
    reader = _reader(network)
    for job_id in job_ids:
        job = reader.get_job(job_id)
        assert job.status is JobStatus.COMPLETED and job.refunded_to_user == job.deposit, job_id


async def test_a_request_cancelled_while_its_job_opens_leaves_no_job_open(network):
    """Cancel a request (what Ctrl-C does in a notebook) while the client waits for its job's creating
    transaction to be mined: the transaction lands; the client takes that job and settles it at once (the
    whole deposit comes back); nothing stays held in the budget. (The job used to stay Active on chain,
    forgotten, its deposit locked, while the budget freed it.)"""
    manager = _manager(network, token="native", budget="1")
    async with manager:
        host = await _host_of(manager, network, 0)
        await manager.payments.ensure_ready()
        gate = _gate(manager.payments._chain().w3.eth, "get_transaction_receipt")
        start = _next_job_id(network)
        await _cancel_inside(gate, manager.ainfer(PROMPT, max_tokens=5, host=host))
    opened = list(range(start, _next_job_id(network)))
    assert len(opened) == 1
    _all_refunded(network, opened)
    assert [s.job_id for s in manager.payments.settlements] == opened
    assert manager.payments.held == 0 and manager.payments.spent == 0


async def test_a_request_cancelled_before_its_job_is_sent_sends_nothing(network):
    """Cancelled while the client still reads the token's allowance (before any approval): the job's
    transaction is never sent."""
    manager = _manager(network)
    async with manager:
        host = await _host_of(manager, network, 0)
        await manager.payments.ensure_ready()
        client = manager.payments._chain()
        gate = _gate(client, "allowance")
        _, go, created = _gate(client, "create_job")
        go.set()  # (only watched)
        start = _next_job_id(network)
        await _cancel_inside(gate, manager.ainfer(PROMPT, max_tokens=5, host=host))
    assert await asyncio.to_thread(created.wait, 30)  # the thread's create_job returned (or refused to send)
    assert _next_job_id(network) == start and manager.payments.held == 0 and not manager.payments.settlements


async def test_a_job_whose_creation_answer_was_lost_is_found_and_settled(network):
    """The creating transaction is sent and mined, but the node's answers to the receipt polls are lost
    three times in a row (the endpoint's connection down for a moment; fewer are polled through): the
    attempt fails over to a new job, and the first job, found on chain from its transaction's hash, is
    settled with its whole deposit back."""
    import requests

    from fabstir_jupyter.marketplace import RECEIPT_POLL_FAILURES

    manager = _manager(network, token="native", budget="1")
    async with manager:
        host = await _host_of(manager, network, 0)
        await manager.payments.ensure_ready()
        eth = manager.payments._chain().w3.eth
        real, failed = eth.get_transaction_receipt, []

        def lost(tx_hash, *args, **kwargs):
            if len(failed) < RECEIPT_POLL_FAILURES:
                failed.append(tx_hash)
                raise requests.ConnectionError("connection reset by peer")
            return real(tx_hash, *args, **kwargs)

        eth.get_transaction_receipt = lost
        start = _next_job_id(network)
        result = await manager.ainfer(PROMPT, max_tokens=5, host=host)
        assert result.text == scripted_text(PROMPT, 5) and len(failed) == RECEIPT_POLL_FAILURES
        lost = start
        assert result.job_ids == (lost + 1,)
    _all_refunded(network, [lost])
    settled = {s.job_id: s for s in manager.payments.settlements}
    assert sorted(settled) == [lost, lost + 1] and settled[lost].open_tx == failed[0]
    assert manager.payments.held == 0 and manager.payments.spent == pytest.approx(settled[lost + 1].cost / 10**18)


def _refuse_completion_once(client: MarketplaceClient) -> list[int]:
    """Make the first complete_job fail as a node refusing the transaction would; return the jobs refused."""
    real, refused = client.complete_job, []

    def complete_job(job_id, *args, **kwargs):
        if not refused:
            refused.append(job_id)
            raise TransactionFailed(f"complete job {job_id}: the node refused it: replacement transaction underpriced")
        return real(job_id, *args, **kwargs)

    client.complete_job = complete_job
    return refused


async def _end_a_session_whose_settlement_fails(manager, network) -> list[int]:
    """A session's turn on host 0, then end_session with the node refusing the completion: it raises
    TransactionFailed. Returns the jobs refused."""
    host = await _host_of(manager, network, 0)
    session = await manager.sessions.create_session(host=host)
    await manager.sessions.stream(session.id, PROMPT, max_tokens=5).read()
    refused = _refuse_completion_once(manager.payments._chain())
    with pytest.raises(TransactionFailed):
        await manager.sessions.end_session(session.id)
    return refused


async def test_a_settlement_that_failed_can_be_tried_again(network):
    """end_session's settlement fails (the node refuses the transaction): the job is 'unsettled', still
    Active, its deposit held. Payments.settle(job) then settles it. (The failed task was kept and its
    error raised again on every later try: the job could never be settled by this client.)"""
    manager = _manager(network, settle_timeout=2.0)
    async with manager:
        refused = await _end_a_session_whose_settlement_fails(manager, network)
        (job,) = manager.payments.open_jobs
        assert refused == [job.job_id] and job.state == "unsettled" and manager.payments.held > 0
        assert _reader(network).get_job(job.job_id).status is JobStatus.ACTIVE
        settled = await manager.payments.settle(job)
        assert settled.job_id == job.job_id and settled.adds_up and manager.payments.held == 0
    assert _reader(network).get_job(job.job_id).status is JobStatus.COMPLETED


async def test_closing_settles_a_job_whose_settlement_failed_before(network):
    """A job whose settlement failed at end_session is settled when the manager closes."""
    manager = _manager(network, settle_timeout=2.0)
    async with manager:
        refused = await _end_a_session_whose_settlement_fails(manager, network)
    assert _reader(network).get_job(refused[0]).status is JobStatus.COMPLETED
    assert [s.job_id for s in manager.payments.settlements] == refused and manager.payments.held == 0


async def test_closing_again_after_an_interrupted_close_settles_the_jobs(network):
    """Ctrl-C (a cancelled await) while the manager closes: closing again still settles the open jobs.
    (The first call marked the payments closed, and the second returned at once, leaving them Active.)"""
    manager = _manager(network)
    host = await _host_of(manager, network, 0)
    result = await manager.ainfer(PROMPT, max_tokens=5, host=host)
    (job_id,) = result.job_ids
    entered, proceed, _ = _gate(manager.payments._chain(), "get_job")
    closing = asyncio.ensure_future(manager.aclose())
    assert await asyncio.to_thread(entered.wait, 30)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    proceed.set()
    await manager.aclose()
    assert _reader(network).get_job(job_id).status is JobStatus.COMPLETED
    assert [s.job_id for s in manager.payments.settlements] == [job_id]


async def test_balance_in_another_thread_while_the_first_job_opens_checks_the_chain_once(network):
    """payments.balance() (blocking: the notebook's thread) while the event loop makes the payments ready
    for a first job: the chain is checked, and the budget made, once. (Both threads could run the check and
    each make a budget, the later one replacing the one that held the first job's deposit.)"""
    manager = _manager(network)
    async with manager:
        payments = manager.payments
        client = payments._chain()
        real, calls = client.decimals, []
        client.decimals = lambda *args: (calls.append(threading.current_thread().name), real(*args))[1]
        entered, proceed, _ = _gate(client, "decimals")
        balance = asyncio.ensure_future(asyncio.to_thread(payments.balance))
        assert await asyncio.to_thread(entered.wait, 30)
        ready = asyncio.ensure_future(payments.ensure_ready())
        for _ in range(20):  # give a second check the chance to start (it used to; now it waits its turn)
            if len(calls) > 1:
                break
            await asyncio.sleep(0.05)
        proceed.set()
        assert (await balance)["USDC"] > 0
        await ready
        budget = payments.budget
        await manager.ainfer(PROMPT, max_tokens=5, host=await _host_of(manager, network, 0))
        assert len(calls) == 1 and payments.budget is budget and payments.held > 0


async def test_no_job_opens_once_closing_has_begun(network):
    """While the payments close (settling the jobs they know), a request that needs a new job gets none:
    CONNECTION_FAILED, nothing sent. (A job opened then was not among those close settled, and the
    payments' threads were gone when it was retired: it stayed Active.)"""
    manager = _manager(network)
    host = await _host_of(manager, network, 0)
    payments = manager.payments
    await manager.ainfer(PROMPT, max_tokens=5, host=host)
    entered, proceed, _ = _gate(payments._chain(), "get_job")
    closing = asyncio.ensure_future(payments.aclose())
    assert await asyncio.to_thread(entered.wait, 30)
    start = _next_job_id(network)
    with pytest.raises(ConnectionFailed) as info:
        await payments.open_job(host, MODEL, max_tokens=5, kind="tab")
    assert "closed" in info.value.message and _next_job_id(network) == start
    proceed.set()
    await closing
    await manager.aclose()
    assert not payments.open_jobs and payments.held == 0


# ---------------------------------------------------------------------------- a host killed mid-answer


async def test_a_host_killed_mid_answer_settles_its_job_and_the_answer_goes_on_on_a_new_job():
    """SIGKILL the host serving a paid session mid-answer (after a 1000-token proof landed): the answer
    continues on a new job on the other host with the text as prefill, the stream says so, the dead host's
    job is completed by the client with what was proven, and no token is billed twice."""
    with LocalNetwork(2, "scripted", seed=23, paid=True, host_args=["--token-rate", "400"]) as network:
        manager = _manager(network, final_proof_timeout=2.0)
        async with manager:
            host = await _host_of(manager, network, 0)
            session = await manager.sessions.create_session(host=host, max_tokens=1500)
            first_job = session.job_id
            reader = _reader(network)
            async with manager.sessions.stream(session.id, PROMPT, max_tokens=1500) as stream:
                async for _ in stream:
                    if stream.job.job_id == first_job and stream.job.received_tokens == 0 and \
                            len(stream.text.split()) >= 1050:
                        await asyncio.to_thread(_wait_for, lambda: reader.get_job(first_job).tokens_used >= 1000)
                        network.kill_host(0)
                        break
                async for _ in stream:
                    pass
            assert stream.error is None and stream.text == scripted_text(PROMPT, 1500)
            assert stream.host.address == network.hosts[1].address
            continued = [e for e in stream.events if e.kind == "job_continued"]
            assert len(continued) == 1 and str(first_job) in continued[0].message
            jobs = session.job_ids
            assert jobs[0] == first_job and len(jobs) == 2
            ended = await manager.sessions.end_session(session.id)
        killed, second = ended.settlements
        assert reader.get_job(first_job).status is JobStatus.COMPLETED and killed.settled_by == "client"
        assert killed.tokens_billed == 1000 and killed.reason.startswith("unproven tokens")
        assert second.tokens_billed == second.streamed_tokens == second.received_tokens
        assert killed.received_tokens + second.received_tokens == 1500
        assert killed.tokens_billed + second.tokens_billed <= 1500  # no token billed twice
        assert all(s.adds_up for s in ended.settlements)


def _wait_for(predicate, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- base-sepolia, with the local chain


def _sepolia_on(network: LocalNetwork) -> NetworkPreset:
    """The base-sepolia preset with the local chain's RPC URL, chain id and addresses swapped in."""
    addresses = {k: v for k, v in network.addresses.items() if k in ADDRESS_KEYS}
    return dataclasses.replace(NETWORKS["base-sepolia"], rpc_url=network.rpc_url, chain_id=network.chain_id,
                               addresses=addresses)


def test_base_sepolia_without_a_key_or_a_budget_says_what_to_set(network, monkeypatch):
    """The same code on base-sepolia: discovery works, inference is PAYMENT_REQUIRED naming
    FABSTIR_PRIVATE_KEY and the budget, with no key, and with a key but no budget."""
    for name in ("FABSTIR_PRIVATE_KEY", "FABSTIR_KEY_FILE", "FABSTIR_BUDGET"):
        monkeypatch.delenv(name, raising=False)
    with FabstirSDK(network=_sepolia_on(network), config=InferenceConfig(usage_db=":memory:")) as sdk:
        assert sdk.settings.network == "base-sepolia" and sdk.wallet is None
        with pytest.raises(PaymentRequired) as info:
            sdk.get_inference_manager().infer(PROMPT, max_tokens=5)
        assert "FABSTIR_PRIVATE_KEY" in info.value.message and "FABSTIR_BUDGET" in info.value.message
    monkeypatch.setenv("FABSTIR_PRIVATE_KEY", _user_key_hex(network))
    with FabstirSDK(network=_sepolia_on(network), config=InferenceConfig(usage_db=":memory:")) as sdk:
        assert sdk.address == network.user_address
        with pytest.raises(PaymentRequired):
            sdk.get_inference_manager().infer(PROMPT, max_tokens=5)


def test_base_sepolia_with_a_key_and_a_budget_opens_real_jobs(network, monkeypatch, caplog):
    """With FABSTIR_PRIVATE_KEY and a budget the base-sepolia code path opens a job on the chain, streams,
    and settles it at close; the key shows in no repr, error or log line on the way."""
    caplog.set_level(logging.DEBUG)
    key = _user_key_hex(network)
    monkeypatch.setenv("FABSTIR_PRIVATE_KEY", key)
    monkeypatch.setenv("FABSTIR_BUDGET", "2")
    with FabstirSDK(network=_sepolia_on(network), config=InferenceConfig(usage_db=":memory:")) as sdk:
        manager = sdk.get_inference_manager()
        result = manager.infer(PROMPT, max_tokens=8)
        assert result.text == scripted_text(PROMPT, 8) and result.job_ids
        payments = manager.payments
        assert payments.remaining == pytest.approx(1.5) and payments.unit == "USDC"
        balance = payments.balance()
        seen = [repr(sdk), repr(sdk.wallet), str(sdk.wallet), repr(payments), repr(payments.open_jobs),
                repr(manager.connector), repr(result), repr(sdk.settings)]
    job_id = result.job_ids[0]
    assert _reader(network).get_job(job_id).status is JobStatus.COMPLETED
    assert balance["USDC"] > 0 and balance["ETH"] > 0
    seen += [repr(payments.settlements), str(payments.settlements[0]), caplog.text]
    for secret in (key, key[2:], key[2:].upper()):
        assert all(secret not in text for text in seen)


def test_a_wallet_never_shows_or_pickles_its_key(network, tmp_path):
    """A wallet shows its address and source; pickling is refused; a key file others may read is refused."""
    import pickle

    key = _user_key_hex(network)
    wallet = Wallet.from_file(network.user_key_file)
    assert wallet.address == network.user_address and key not in repr(wallet) and key[2:] not in str(wallet)
    with pytest.raises(TypeError):
        pickle.dumps(wallet)
    loose = tmp_path / "loose.key"
    loose.write_text(key + "\n")
    os.chmod(loose, 0o644)
    with pytest.raises(InvalidOptions) as info:
        Wallet.from_file(loose)
    assert "chmod 600" in info.value.message and key[2:] not in str(info.value)
    os.chmod(loose, 0o600)
    assert Wallet.from_file(loose).address == network.user_address


async def test_the_ledger_keeps_jobs_and_reconciles_them_with_the_chain(network, tmp_path):
    """A file ledger records each attempt's job and opening transaction, and each job opened and settled;
    reconcile() shows per job the ledger's tokens and cost beside the chain's bill, with the reason
    (here the minimum billing of a 20-token job)."""
    ledger = UsageLedger(tmp_path / "usage.sqlite3")
    manager = _manager(network, usage=ledger)
    async with manager:
        host = await _host_of(manager, network, 0)
        result = await manager.ainfer(PROMPT, max_tokens=20, host=host)
    job_id = result.job_ids[0]
    ledger.flush()
    (record,) = [r for r in ledger.records() if r.job_id == job_id]
    assert record.tx_hash == manager.payments.settlements[0].open_tx
    (job,) = [j for j in ledger.jobs() if j.job_id == job_id]
    assert (job.status, job.tokens_billed, job.chain_cost) == ("completed", 100, 100 * job.price_per_token // 1000)
    row = ledger.reconcile().set_index("job_id").loc[job_id]
    assert (row["ledger_tokens"], row["billed_tokens"], row["token_difference"]) == (20, 100, 80)
    assert bool(row["agrees"]) and row["reason"].startswith("minimum billing")
    ledger.close()
