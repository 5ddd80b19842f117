"""JobMarketplace and HostEarnings on the local chain, driven through MarketplaceClient (spec §10).

Every transaction is signed by its sender's own key and sent raw, as over a real RPC endpoint. Time
moves with eth-tester's time travel (LocalChain.advance_time), never by sleeping. Amounts are
checked to the unit: what the host earns, what the treasury keeps and what the depositor gets back
add up to the deposit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from urllib.parse import urlsplit

import pytest
from eth_account.typed_transactions import TypedTransaction
from hexbytes import HexBytes
from web3.logs import DISCARD

from _rpc import FailingRequests, RangeCappedProvider, StuckTransactions
from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.errors import (
    BudgetExceeded,
    ConnectionFailed,
    InsufficientFunds,
    InvalidOptions,
    SessionNotFound,
    TransactionFailed,
)
from fabstir_jupyter.local.chain import NATIVE_TOKEN, LocalChain, model_id
from fabstir_jupyter.local.rpc import LocalRpcServer
from fabstir_jupyter.marketplace import (
    MAX_REPLACEMENTS,
    JobStatus,
    MarketplaceClient,
    OpenedJob,
    deposit_for,
    job_cost,
    max_tokens,
)

MODEL = ("fabstir/scripted", "scripted-1")
OTHER = ("fabstir/scripted", "scripted-2")
UNPRICED = ("fabstir/scripted", "scripted-3")
NATIVE_PRICE = 2_000_000_000  # wei per 1000 tokens
STABLE_PRICE = 2_000  # USDC units (6 decimals) per 1000 tokens
DEPOSIT = 10**15  # wei: pays for 500 million tokens at NATIVE_PRICE
USDC_DEPOSIT = 1_000_000  # 1 USDC: pays for 500 000 tokens at STABLE_PRICE
MODEL_ID = model_id(*MODEL)


def _key(account) -> PrivateKey:
    return PrivateKey.from_hex(account.private_key)


@pytest.fixture(scope="module")
def market():
    """A chain with host A (MODEL priced native and USDC, UNPRICED without prices), host B (OTHER), a
    deactivated host C, a funded user and a funded stranger, and a client for each."""
    chain = LocalChain(seed=21)
    host = chain.register_host("http://127.0.0.1:9001", models=[MODEL, UNPRICED],
                               prices={MODEL: (NATIVE_PRICE, STABLE_PRICE)})
    other = chain.register_host("http://127.0.0.1:9002", models=[OTHER], prices=(NATIVE_PRICE, STABLE_PRICE))
    idle = chain.register_host("http://127.0.0.1:9003", models=[MODEL], prices=(NATIVE_PRICE, STABLE_PRICE))
    chain.deactivate_host(idle)
    user = chain.create_account(native=10**19, usdc=100 * 10**6)
    stranger = chain.create_account(native=10**18, usdc=0)
    marketplace = chain.addresses["job_marketplace"]

    def client(account) -> MarketplaceClient:
        return MarketplaceClient(chain.w3, marketplace, account=_key(account), receipt_timeout=10)

    class Market:
        pass

    m = Market()
    m.chain, m.host, m.other, m.idle, m.user, m.stranger = chain, host, other, idle, user, stranger
    m.as_user, m.as_host, m.as_stranger = client(user), client(host), client(stranger)
    yield m
    chain.close()


def _open(m, **terms):
    terms = {"deposit": DEPOSIT, "price_per_token": NATIVE_PRICE, **terms}
    return m.as_user.create_job(terms.pop("host", m.host.address), terms.pop("model", MODEL_ID), **terms)


def _prove(m, job_id: int, tokens: int, *, wait: int = 10, client=None):
    """Let ``wait`` seconds pass on chain, then prove ``tokens`` (a fresh proof hash each time)."""
    m.chain.advance_time(wait)
    return (client or m.as_host).submit_proof(job_id, tokens, os.urandom(32), "proof-cid", "delta-cid")


def _refused(reason: str, call, *, cls=TransactionFailed):
    with pytest.raises(cls) as caught:
        call()
    if cls is TransactionFailed:
        assert caught.value.reason == reason, caught.value
    assert reason in str(caught.value)
    return caught.value


def _gas_paid(chain: LocalChain, tx_hash: str) -> int:
    receipt = chain.w3.eth.get_transaction_receipt(tx_hash)
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


# ---------------------------------------------------------------------------- happy paths


def test_native_job_pays_host_treasury_and_refund_exactly_the_deposit(market):
    """create → two proofs → complete: 10% of the proven cost to the treasury, the rest to the host's
    earnings, the remainder back to the depositor; the marketplace keeps only the fee."""
    m = market
    chain, marketplace = m.chain, m.chain.job_marketplace
    held_before = chain.native_balance(marketplace.address)
    treasury_before = marketplace.functions.accumulatedTreasuryNative().call()
    earnings_before = m.as_host.earnings()

    opened = _open(m)
    assert chain.native_balance(marketplace.address) == held_before + DEPOSIT
    job = m.as_user.get_job(opened.job_id)
    assert (job.depositor, job.host, job.payment_token, job.deposit) == (m.user.address, m.host.address,
                                                                         NATIVE_TOKEN, DEPOSIT)
    assert (job.price_per_token, job.proof_interval, job.max_duration, job.proof_timeout_window) == (
        NATIVE_PRICE, 1000, 3600, 300)
    assert job.status is JobStatus.ACTIVE and job.tokens_used == 0 and job.max_tokens == 500_000_000
    assert m.as_user.session_model(opened.job_id) == MODEL_ID

    _prove(m, opened.job_id, 1000)
    _prove(m, opened.job_id, 1500)
    proven = m.as_user.get_job(opened.job_id)
    assert proven.tokens_used == 2500 and proven.last_proof_cid == "proof-cid"
    assert m.as_user.get_proof(opened.job_id, 1).tokens_claimed == 1500
    assert m.as_user.get_proof(opened.job_id, 1).delta_cid == "delta-cid"

    user_before = chain.native_balance(m.user.address)
    settled = m.as_user.complete_job(opened.job_id, "conversation-cid")
    cost = job_cost(2500, NATIVE_PRICE)
    fee = cost * 1000 // 10000
    assert (settled.tokens_used, settled.payment, settled.host_earnings, settled.refund) == (
        2500, cost, cost - fee, DEPOSIT - cost)
    assert settled.treasury_fee == fee and not settled.timed_out and not settled.refund_credited
    assert settled.host_earnings + settled.treasury_fee + settled.refund == DEPOSIT
    assert chain.native_balance(m.user.address) == user_before + settled.refund - _gas_paid(chain, settled.tx_hash)
    assert m.as_host.earnings() == earnings_before + cost - fee
    assert marketplace.functions.accumulatedTreasuryNative().call() == treasury_before + fee
    assert chain.native_balance(marketplace.address) == held_before + fee
    done = m.as_user.get_job(opened.job_id)
    assert done.status is JobStatus.COMPLETED and done.conversation_cid == "conversation-cid"
    assert (done.withdrawn_by_host, done.refunded_to_user) == (cost - fee, DEPOSIT - cost)


def test_job_events_carry_production_shapes(market):
    """SessionJobCreated / SessionJobCreatedForModel / ProofSubmitted / SessionCompleted name the job."""
    m = market
    opened = _open(m)
    _prove(m, opened.job_id, 1000)
    m.as_user.complete_job(opened.job_id)
    events = m.chain.job_marketplace.events
    block = m.chain.w3.eth.get_transaction_receipt(opened.tx_hash)["blockNumber"]
    created = events.SessionJobCreated().get_logs(from_block=block)
    assert [(e.args.jobId, e.args.depositor, e.args.host, e.args.deposit) for e in created] == [
        (opened.job_id, m.user.address, m.host.address, DEPOSIT)]
    for_model = events.SessionJobCreatedForModel().get_logs(from_block=block)
    assert [(e.args.jobId, "0x" + e.args.modelId.hex()) for e in for_model] == [(opened.job_id, MODEL_ID)]
    proofs = events.ProofSubmitted().get_logs(from_block=block)
    assert [(e.args.jobId, e.args.host, e.args.tokensClaimed, e.args.proofCID, e.args.deltaCID) for e in proofs] == [
        (opened.job_id, m.host.address, 1000, "proof-cid", "delta-cid")]
    completed = events.SessionCompleted().get_logs(from_block=block)
    assert [(e.args.jobId, e.args.totalTokensUsed) for e in completed] == [(opened.job_id, 1000)]


def test_a_settlement_is_found_on_an_endpoint_that_caps_log_ranges(market):
    """A job adopted without its opening block, settled by its host: the search from block 0 is
    refused, so it walks back from the head in windows and stops at the settlement's."""
    m = market
    opened = _open(m)
    _prove(m, opened.job_id, 1000)
    m.chain.advance_time(m.as_user.dispute_window() + 1)
    settled = m.as_host.complete_job(opened.job_id)
    for _ in range(9):  # later blocks with no settlement of this job
        m.chain.advance_time(1)
    capped = RangeCappedProvider(m.chain.provider, cap=4)
    with LocalRpcServer(capped) as server:
        client = MarketplaceClient(server.url, m.chain.addresses["job_marketplace"])
        found = client.find_settlement(opened.job_id, window=4)
        assert found is not None and found.tx_hash == settled.tx_hash
        assert (found.tokens_used, found.payment, found.completed_by) == (1000, settled.payment, m.host.address)
        head = m.chain.w3.eth.block_number
        assert capped.ranges[0] == (head - 3, head) and capped.ranges == sorted(capped.ranges, reverse=True)
        assert all(last - first == 3 for first, last in capped.ranges)
        assert capped.ranges[-1][0] <= settled.block_number <= capped.ranges[-1][1]

        capped.ranges.clear()  # a window wider than the endpoint's cap is halved until it is answered
        assert client.find_settlement(opened.job_id).tx_hash == settled.tx_hash
        assert capped.ranges and all(last - first <= 3 for first, last in capped.ranges)

        capped.ranges.clear()  # nothing after the settlement: the walk stops at from_block, finding none
        assert client.find_settlement(opened.job_id, from_block=settled.block_number + 1, window=4) is None
        assert capped.ranges and min(first for first, _ in capped.ranges) == settled.block_number + 1
        capped.ranges.clear()  # a deadline already past: no window is searched
        assert client.find_settlement(opened.job_id, window=4, deadline=time.monotonic() - 1) is None
        assert capped.ranges == []


def test_usdc_job_settles_in_usdc_to_the_unit(market):
    """The ERC-20 path: approve, create with the mock USDC (6 decimals), prove, complete; balances exact."""
    m = market
    chain, usdc = m.chain, m.chain.addresses["stable_token"]
    marketplace = chain.job_marketplace.address
    user_before = chain.usdc_balance(m.user.address)
    treasury_before = chain.job_marketplace.functions.accumulatedTreasuryTokens(usdc).call()
    earnings_before = m.as_host.earnings(token=usdc)

    opened = _open(m, deposit=USDC_DEPOSIT, price_per_token=STABLE_PRICE, token=usdc)
    assert opened.token == usdc and chain.usdc_balance(m.user.address) == user_before - USDC_DEPOSIT
    assert m.as_user.get_job(opened.job_id).payment_token == usdc
    _prove(m, opened.job_id, 1200)
    settled = m.as_user.complete_job(opened.job_id)
    cost = job_cost(1200, STABLE_PRICE)  # 2400 units
    fee = cost // 10
    assert (settled.payment, settled.host_earnings, settled.refund) == (cost, cost - fee, USDC_DEPOSIT - cost)
    assert chain.usdc_balance(m.user.address) == user_before - cost
    assert m.as_host.earnings(token=usdc) == earnings_before + cost - fee
    assert chain.job_marketplace.functions.accumulatedTreasuryTokens(usdc).call() == treasury_before + fee
    assert chain.usdc_balance(marketplace) == chain.job_marketplace.functions.accumulatedTreasuryTokens(usdc).call()


def test_host_withdraws_its_native_and_usdc_earnings(market):
    """withdrawAll pays the host its balance (native: minus gas), empties it, and refuses a second time."""
    m = market
    chain, usdc = m.chain, m.chain.addresses["stable_token"]
    for token, deposit, price in ((NATIVE_TOKEN, DEPOSIT, NATIVE_PRICE), (usdc, USDC_DEPOSIT, STABLE_PRICE)):
        opened = _open(m, deposit=deposit, price_per_token=price, token=token)
        _prove(m, opened.job_id, 1000)
        m.as_user.complete_job(opened.job_id)
    native_owed, usdc_owed = m.as_host.earnings(), m.as_host.earnings(token=usdc)
    assert native_owed > 0 and usdc_owed > 0
    usdc_before = chain.usdc_balance(m.host.address)
    assert m.as_host.withdraw_earnings(usdc, amount=usdc_owed - 1) == usdc_owed - 1
    assert m.as_host.withdraw_earnings(usdc) == 1
    assert chain.usdc_balance(m.host.address) == usdc_before + usdc_owed
    native_before = chain.native_balance(m.host.address)
    block = chain.w3.eth.block_number
    assert m.as_host.withdraw_earnings() == native_owed
    (tx,) = chain.w3.eth.get_block(block + 1)["transactions"]  # eth-tester mines one block per transaction
    assert chain.native_balance(m.host.address) == native_before + native_owed - _gas_paid(chain, tx)
    assert (m.as_host.earnings(), m.as_host.earnings(token=usdc)) == (0, 0)
    _refused("No earnings to withdraw", lambda: m.as_host.withdraw_earnings())
    _refused("Insufficient earnings", lambda: m.as_host.withdraw_earnings(usdc, amount=1))


def test_only_the_marketplace_credits_earnings(market):
    """HostEarnings.creditEarnings refuses any caller the owner did not authorize."""
    m = market
    earnings = m.as_stranger.w3.eth.contract(address=m.chain.addresses["host_earnings"],
                                             abi=m.chain.host_earnings.abi)
    assert earnings.functions.authorizedCallers(m.chain.addresses["job_marketplace"]).call() is True
    fn = earnings.functions.creditEarnings(m.stranger.address, 1, NATIVE_TOKEN)
    _refused("Not authorized to credit earnings", lambda: m.as_stranger._transact(fn, "credit"))


# ---------------------------------------------------------------------------- refusals at creation


@pytest.mark.parametrize("terms, reason", [
    ({"deposit": 0}, "Low deposit"),
    ({"deposit": 10**14 - 1}, "Low deposit"),  # MIN_DEPOSIT is 0.0001 ETH
    ({"price_per_token": NATIVE_PRICE - 1}, "Low price"),  # below the host's getModelPricing
    ({"proof_interval": 99}, "Low interval"),
    ({"deposit": 10**14, "price_per_token": 2 * 10**14}, "Low deposit"),  # pays for 500 < 1000 tokens
    ({"proof_timeout_window": 59}, "Bad timeout"),
    ({"proof_timeout_window": 3601}, "Bad timeout"),
    ({"max_duration": 365 * 86400 + 1}, "Bad dur"),
    ({"price_per_token": 0}, "Bad price"),
    ({"model": model_id(*OTHER)}, "No model"),  # served by B, not by A
    ({"model": model_id(*UNPRICED)}, "no model pricing"),  # the registry's own revert, as production
    ({"host": "0x" + "ab" * 20}, "No host reg"),
])
def test_create_refuses_bad_terms_with_production_reasons(market, terms, reason):
    """Each refusal reverts with production's text before any money moves; no job is created."""
    m = market
    next_id = m.chain.job_marketplace.functions.nextJobId().call()
    error = _refused(reason, lambda: _open(m, **terms))
    assert error.code == "TRANSACTION_FAILED" and error.retryable is False and error.tx_hash is None
    assert m.chain.job_marketplace.functions.nextJobId().call() == next_id


def test_create_refuses_an_inactive_host_and_an_unapproved_model(market, chain):
    """A deactivated host is "Host not active"; a deactivated model is "Bad model"."""
    m = market
    _refused("Host not active", lambda: _open(m, host=m.idle.address))
    fresh = MarketplaceClient(chain.w3, chain.addresses["job_marketplace"])
    assert fresh.address is None
    host = chain.register_host("http://127.0.0.1:9009", models=[MODEL], prices=(NATIVE_PRICE, STABLE_PRICE))
    user = chain.create_account(native=10**18)
    client = MarketplaceClient(chain.w3, chain.addresses["job_marketplace"], account=_key(user))
    chain._transact(chain.model_registry.functions.deactivateModel(bytes.fromhex(MODEL_ID[2:])), chain.deployer, "off")
    _refused("Bad model", lambda: client.create_job(host.address, MODEL_ID, deposit=DEPOSIT,
                                                    price_per_token=NATIVE_PRICE))


def test_usdc_deposits_below_the_minimum_or_without_funds_are_refused(market):
    """0.5 USDC is the minimum; a token the marketplace does not accept is "Bad token"; no balance is
    INSUFFICIENT_FUNDS before anything is sent."""
    m = market
    usdc = m.chain.addresses["stable_token"]
    assert m.as_user.min_deposit(usdc) == 500_000 and m.as_user.min_deposit() == 10**14
    _refused("Low deposit", lambda: _open(m, deposit=499_999, price_per_token=STABLE_PRICE, token=usdc))
    fab = m.chain.fab_token
    m.chain._transact(fab.functions.mint(m.user.address, USDC_DEPOSIT), m.chain.deployer, "mint FAB")
    _refused("Bad token", lambda: _open(m, deposit=USDC_DEPOSIT, price_per_token=STABLE_PRICE, token=fab.address))
    with pytest.raises(InsufficientFunds, match="exceeds the token balance of 0"):
        m.as_stranger.create_job(m.host.address, MODEL_ID, deposit=USDC_DEPOSIT, price_per_token=STABLE_PRICE,
                                 token=usdc)


def test_a_deposit_over_the_balance_is_insufficient_funds(market):
    """A native deposit beyond the account's balance is refused before sending (no nonce spent)."""
    m = market
    nonce = m.chain.w3.eth.get_transaction_count(m.user.address)
    with pytest.raises(InsufficientFunds) as caught:
        _open(m, deposit=10**21)
    assert caught.value.code == "INSUFFICIENT_FUNDS" and not caught.value.retryable
    assert m.chain.w3.eth.get_transaction_count(m.user.address) == nonce


def test_a_deposit_leaving_nothing_for_gas_is_insufficient_funds(market):
    """Balance == deposit: the node refuses the gas, and the client says INSUFFICIENT_FUNDS."""
    m = market
    poor = m.chain.create_account(native=DEPOSIT)
    client = MarketplaceClient(m.chain.w3, m.chain.addresses["job_marketplace"], account=_key(poor))
    with pytest.raises(InsufficientFunds, match="enough balance"):
        client.create_job(m.host.address, MODEL_ID, deposit=DEPOSIT, price_per_token=NATIVE_PRICE)
    assert m.chain.native_balance(poor.address) == DEPOSIT


def test_a_fixed_gas_limit_sends_without_estimates_and_refusals_read_the_same(market, caplog):
    """With ``gas_limit`` (the local chain's setting: eth-tester's estimate executes a transaction many
    times over), no eth_estimateGas goes out: a USDC job (approve, create) opens and settles. A job the
    contract refuses is mined and reverts, and comes back as the same TRANSACTION_FAILED with its
    reason, naming its transaction; no job is created. No gas at all is INSUFFICIENT_FUNDS."""
    m = market
    usdc = m.chain.addresses["stable_token"]
    marketplace = m.chain.addresses["job_marketplace"]
    user = m.chain.create_account(native=10**18, usdc=10 * USDC_DEPOSIT)
    with LocalRpcServer(m.chain.provider) as server, caplog.at_level(logging.DEBUG, "fabstir_jupyter.local.rpc"):
        client = MarketplaceClient(server.url, marketplace, account=_key(user), receipt_timeout=10,
                                   gas_limit=3_000_000)
        opened = client.create_job(m.host.address, MODEL_ID, deposit=USDC_DEPOSIT, price_per_token=STABLE_PRICE,
                                   token=usdc)
        assert client.get_job(opened.job_id).active
        settled = client.complete_job(opened.job_id)
        assert settled.refund == USDC_DEPOSIT
        next_id = m.chain.job_marketplace.functions.nextJobId().call()
        error = _refused("Low price", lambda: client.create_job(m.host.address, MODEL_ID, deposit=USDC_DEPOSIT,
                                                                price_per_token=STABLE_PRICE - 1, token=usdc))
        assert error.tx_hash is not None and error.retryable is False
        assert m.chain.job_marketplace.functions.nextJobId().call() == next_id
        broke = MarketplaceClient(server.url, marketplace, account=_key(m.chain.create_account(native=DEPOSIT)),
                                  gas_limit=3_000_000)
        with pytest.raises(InsufficientFunds):
            broke.create_job(m.host.address, MODEL_ID, deposit=DEPOSIT, price_per_token=NATIVE_PRICE)
    methods = [r.args[0] for r in caplog.records if r.name == "fabstir_jupyter.local.rpc" and r.msg == "local rpc %s"]
    # approve and create, complete; approve again (the first job took the allowance) and the refused create;
    # the create the node refuses for gas
    assert "eth_estimateGas" not in methods and methods.count("eth_sendRawTransaction") == 6
    with pytest.raises(InvalidOptions, match="gas_limit"):
        MarketplaceClient(m.chain.w3, marketplace, gas_limit=20_999)


def test_reads_over_http_ask_for_the_chain_id_once(market, caplog):
    """web3 validates every eth_call against the chain id; over HTTP the client asks for it once, not
    twice per read (each a round trip: a tenth of a job's time on the local chain)."""
    m = market
    with LocalRpcServer(m.chain.provider) as server, caplog.at_level(logging.DEBUG, "fabstir_jupyter.local.rpc"):
        client = MarketplaceClient(server.url, m.chain.addresses["job_marketplace"])
        assert [client.min_deposit() for _ in range(5)] == [10**14] * 5
    methods = [r.args[0] for r in caplog.records if r.name == "fabstir_jupyter.local.rpc" and r.msg == "local rpc %s"]
    assert methods.count("eth_call") == 5 and methods.count("eth_chainId") <= 2


def test_bad_arguments_are_invalid_options_before_any_rpc(market):
    """Malformed ids, hashes, amounts and keys are INVALID_OPTIONS, naming the field."""
    m = market
    with pytest.raises(InvalidOptions) as caught:
        _open(m, model="0x1234")
    assert caught.value.field == "model_id"
    with pytest.raises(InvalidOptions, match="deposit"):
        _open(m, deposit=-1)
    with pytest.raises(InvalidOptions, match="proof_hash"):
        m.as_host.submit_proof(1, 1000, b"short")
    with pytest.raises(InvalidOptions, match="read-only"):
        MarketplaceClient(m.chain.w3, m.chain.addresses["job_marketplace"]).complete_job(1)
    with pytest.raises(InvalidOptions, match="account"):
        MarketplaceClient(m.chain.w3, m.chain.addresses["job_marketplace"], account=m.user.private_key)
    with pytest.raises(SessionNotFound):
        m.as_user.get_job(10**9)


# ---------------------------------------------------------------------------- proofs


def test_proofs_only_by_the_host_and_within_production_limits(market):
    """Not the host, under 100 tokens, a first proof under the interval, a reused hash: all refused."""
    m = market
    job = _open(m).job_id
    _refused("Not host", lambda: _prove(m, job, 1000, client=m.as_user))
    _refused("Not host", lambda: _prove(m, job, 1000, client=m.as_stranger))
    _refused("Low first", lambda: _prove(m, job, 999))  # the first proof pays at least the interval
    proof_hash = os.urandom(32)
    m.chain.advance_time(10)
    m.as_host.submit_proof(job, 1000, proof_hash)
    _refused("Min tokens", lambda: _prove(m, job, 99))
    m.chain.advance_time(10)
    _refused("Proof already used", lambda: m.as_host.submit_proof(job, 200, proof_hash))
    _prove(m, job, 100)  # later proofs need only 100
    assert m.as_user.get_job(job).tokens_used == 1100


def test_proofs_are_held_to_2000_tokens_per_second(market):
    """With 5 s since the job started, 10 001 tokens are "Too many" (retryable) and 10 000 pass."""
    m = market
    opened = _open(m)
    start = m.as_user.get_job(opened.job_id).start_time
    m.chain.advance_time(start + 5 - m.chain.next_timestamp)
    assert m.chain.next_timestamp == start + 5
    error = _refused("Too many", lambda: m.as_host.submit_proof(opened.job_id, 10_001, os.urandom(32)))
    assert error.retryable is True
    m.as_host.submit_proof(opened.job_id, 10_000, os.urandom(32))
    job = m.as_user.get_job(opened.job_id)
    assert (job.tokens_used, job.last_proof_time) == (10_000, start + 5)


def test_proofs_never_pass_what_the_deposit_pays_for(market):
    """The running total stays within deposit × 1000 / price: one token more is BUDGET_EXCEEDED."""
    m = market
    price = 2 * 10**12  # at or above the host's price; the minimum deposit then pays for 50 000 tokens
    opened = _open(m, deposit=10**14, price_per_token=price)
    limit = max_tokens(10**14, price)
    assert limit == 50_000
    _prove(m, opened.job_id, limit - 100, wait=60)
    with pytest.raises(BudgetExceeded) as caught:
        _prove(m, opened.job_id, 101)
    assert caught.value.code == "BUDGET_EXCEEDED" and "Over dep" in str(caught.value)
    _prove(m, opened.job_id, 100)
    settled = m.as_user.complete_job(opened.job_id)
    assert settled.tokens_used == limit and settled.refund == 0 and settled.payment == 10**14


# ---------------------------------------------------------------------------- completion and timeout


def test_completion_rules_depositor_any_time_host_after_the_dispute_window(market):
    """A stranger may not complete; the host must wait 30 s after the last proof; a completed job
    takes no more proofs nor a second completion."""
    m = market
    job = _open(m).job_id
    _prove(m, job, 1000, wait=2)
    _refused("Not depositor or host", lambda: m.as_stranger.complete_job(job))
    error = _refused("Dispute wait", lambda: m.as_host.complete_job(job))
    assert error.retryable is True
    m.chain.advance_time(30)
    settled = m.as_host.complete_job(job, "host-cid")
    assert settled.tokens_used == 1000 and m.as_user.get_job(job).conversation_cid == "host-cid"
    _refused("Not active", lambda: m.as_user.complete_job(job))
    _refused("Not active", lambda: _prove(m, job, 1000))
    _refused("Not active", lambda: m.as_user.trigger_timeout(job))


def test_a_host_reads_the_dispute_window_the_chain_clock_and_its_registration(market):
    """What a paid host reads before it settles: the marketplace's dispute window, the latest block's
    timestamp (which advance_time moves) and whether an address is an active node of the marketplace's
    NodeRegistry (the deactivated host is not)."""
    m = market
    assert m.as_host.dispute_window() == 30
    before = m.as_host.chain_time()
    assert before == m.chain.timestamp
    m.chain.advance_time(100)
    assert m.as_host.chain_time() >= before + 99
    assert m.as_host.is_active_node() is True and m.as_host.is_active_node(m.other.address) is True
    assert m.as_user.is_active_node(m.idle.address) is False and m.as_user.is_active_node() is False


def test_a_job_closed_before_any_proof_refunds_everything(market):
    """The depositor ends a job with no proof: nothing to the host or the treasury (minTokensFee is 0)."""
    m = market
    opened = _open(m)
    settled = m.as_user.complete_job(opened.job_id)
    assert (settled.payment, settled.host_earnings, settled.refund) == (0, 0, DEPOSIT)


def test_timeout_after_the_proof_window_settles_the_proven_tokens(market):
    """Before proofTimeoutWindow passes: "Not timeout" (retryable). After it anyone may time the job out;
    the host is paid its proven tokens, the depositor the rest."""
    m = market
    opened = _open(m, proof_timeout_window=60)
    _prove(m, opened.job_id, 1000)
    _refused("Not timeout", lambda: m.as_stranger.trigger_timeout(opened.job_id))
    m.chain.advance_time(61)
    settled = m.as_stranger.trigger_timeout(opened.job_id)
    cost = job_cost(1000, NATIVE_PRICE)
    assert settled.timed_out and (settled.payment, settled.refund) == (cost, DEPOSIT - cost)
    assert settled.host_earnings == cost - cost // 10
    job = m.as_user.get_job(opened.job_id)
    assert job.status is JobStatus.TIMED_OUT and job.refunded_to_user == DEPOSIT - cost
    timed_out = m.chain.job_marketplace.events.SessionTimedOut().process_receipt(
        m.chain.w3.eth.get_transaction_receipt(settled.tx_hash), errors=DISCARD)
    assert [(e.args.jobId, e.args.hostEarnings, e.args.userRefund) for e in timed_out] == [
        (opened.job_id, cost - cost // 10, DEPOSIT - cost)]


def test_timeout_after_max_duration_even_with_recent_proofs(market):
    """maxDuration bounds the job whatever the proofs: after it, the job times out."""
    m = market
    opened = _open(m, max_duration=100, proof_timeout_window=3600)
    _prove(m, opened.job_id, 1000, wait=50)
    _refused("Not timeout", lambda: m.as_user.trigger_timeout(opened.job_id))
    m.chain.advance_time(50)
    assert m.as_user.trigger_timeout(opened.job_id).tokens_used == 1000


# ---------------------------------------------------------------------------- one key, many transactions


def _client_of(m, account) -> MarketplaceClient:
    return MarketplaceClient(m.chain.w3, m.chain.addresses["job_marketplace"], account=_key(account),
                             receipt_timeout=10)


def test_two_clients_of_one_key_sending_at_once_take_distinct_nonces(market, monkeypatch):
    """Two MarketplaceClients signing with one key (two SDKs in one kernel) send at the same moment from two
    threads, each reading the pending count when the other may too: both transactions are mined. (Each
    client had a lock of its own: both took the same nonce and the second was refused.)"""
    m = market
    account = m.chain.create_account(native=10**18, usdc=10**7)
    first, second = _client_of(m, account), _client_of(m, account)
    usdc = m.chain.addresses["stable_token"]
    eth = m.chain.w3.eth
    real = eth.get_transaction_count
    both = threading.Barrier(2, timeout=1)

    def counted(*args, **kwargs):
        count = real(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait()  # both threads read the count before either sends, if the clients let them
        return count

    monkeypatch.setattr(eth, "get_transaction_count", counted)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sent = list(pool.map(lambda job: job[0].approve(usdc, job[1]), [(first, 10), (second, 20)]))
    assert all(sent) and len(set(sent)) == 2
    nonces = {m.chain.w3.eth.get_transaction(tx)["nonce"] for tx in sent}
    assert nonces == {0, 1}


def test_a_node_behind_on_the_pending_count_does_not_give_two_transactions_one_nonce(market, monkeypatch):
    """A load-balanced endpoint may answer the pending count from a node that has not seen the last
    transaction: while one transaction's receipt is awaited, the next takes the nonce after it anyway."""
    m = market
    account = m.chain.create_account(native=10**18, usdc=10**7)
    client = _client_of(m, account)
    usdc = m.chain.addresses["stable_token"]
    eth = m.chain.w3.eth
    stale = eth.get_transaction_count(account.address)
    monkeypatch.setattr(eth, "get_transaction_count", lambda *args, **kwargs: stale)
    real_receipt = eth.get_transaction_receipt
    waiting, release = threading.Event(), threading.Event()

    def held(tx_hash, *args, **kwargs):
        if not waiting.is_set():  # the first transaction's receipt: hold it
            waiting.set()
            assert release.wait(10)
        return real_receipt(tx_hash, *args, **kwargs)

    monkeypatch.setattr(eth, "get_transaction_receipt", held)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.approve, usdc, 10)
        assert waiting.wait(10)
        second = client.approve(usdc, 20)
        release.set()
        assert first.result(10)
    assert second and m.chain.w3.eth.get_transaction(second)["nonce"] == stale + 1


def _fees(raw: str) -> tuple[int, int, int]:
    """(nonce, maxFeePerGas, maxPriorityFeePerGas) of a signed EIP-1559 transaction."""
    fields = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    return int(fields["nonce"]), int(fields["maxFeePerGas"]), int(fields["maxPriorityFeePerGas"])


def _open_via(m, provider, *, on_sent=None, **options) -> OpenedJob:
    """Open a native job as the user through ``provider`` served over HTTP (receipts polled every 20 ms,
    within 20 s unless ``options`` say otherwise); check it afterwards on the chain itself."""
    options = {"receipt_timeout": 20, "poll_interval": 0.02, **options}
    with LocalRpcServer(provider) as server:
        client = MarketplaceClient(server.url, m.chain.addresses["job_marketplace"], account=_key(m.user), **options)
        return client.create_job(m.host.address, MODEL_ID, deposit=DEPOSIT, price_per_token=NATIVE_PRICE,
                                 on_sent=on_sent)


def test_a_transaction_left_unmined_is_sent_again_with_higher_fees_and_the_replacement_counts(market):
    """A job's creating transaction stays unmined (priced under a fee spike): after replace_after it is
    sent again with the same nonce and fees up by at least a quarter; the replacement is mined and opens
    the job; on_sent heard both hashes."""
    m = market
    stuck = StuckTransactions(m.chain.provider, stuck=1)
    heard: list[str] = []
    opened = _open_via(m, stuck, on_sent=heard.append, replace_after=0.2)
    assert m.as_user.get_job(opened.job_id).deposit == DEPOSIT
    (first_nonce, first_fee, first_tip), (nonce, fee, tip) = (_fees(raw) for raw in stuck.sent)
    assert len(stuck.sent) == 2 and nonce == first_nonce
    assert fee * 4 >= first_fee * 5 and tip * 4 >= first_tip * 5
    assert heard[1] == opened.tx_hash != heard[0] and len(heard) == 2
    with pytest.raises(Exception, match="not found"):
        m.chain.w3.eth.get_transaction(heard[0])  # the stuck one never reached the chain


def test_the_original_mined_while_its_replacement_is_sent_is_the_outcome(market):
    """The stuck transaction is mined just as its replacement arrives: the node refuses the replacement
    (nonce taken) and the client takes the original's receipt."""
    m = market
    stuck = StuckTransactions(m.chain.provider, stuck=1, mine_late=True)
    opened = _open_via(m, stuck, replace_after=0.2)
    assert len(stuck.sent) == 2
    assert opened.tx_hash == m.chain.w3.eth.get_transaction_receipt(opened.tx_hash)["transactionHash"].to_0x_hex()
    assert _fees(stuck.sent[0])[0] == m.chain.w3.eth.get_transaction(opened.tx_hash)["nonce"]
    assert m.as_user.get_job(opened.job_id).active


@pytest.mark.parametrize("refusal", ["replacement transaction underpriced",
                                     "insufficient funds for gas * price + value"])
def test_a_refused_replacement_leaves_the_original_to_be_waited_on(market, refusal):
    """The node refuses the replacement (its fee bump too small, or more than the account holds):
    the client keeps waiting on the original, which is mined, and the job opens."""
    m = market
    stuck = StuckTransactions(m.chain.provider, stuck=1, refuse=refusal)
    opened = _open_via(m, stuck, replace_after=0.2)
    assert len(stuck.sent) == 2 and m.as_user.get_job(opened.job_id).active
    assert m.chain.w3.eth.get_transaction(opened.tx_hash)["nonce"] == _fees(stuck.sent[0])[0]


def test_a_transaction_never_mined_is_replaced_at_most_max_replacements_times_then_fails(market):
    """Nothing the client sends is mined: it replaces the transaction MAX_REPLACEMENTS times, then fails
    TRANSACTION_FAILED naming the wait, with the last hash; it is not refused (it may still be mined)."""
    m = market
    stuck = StuckTransactions(m.chain.provider, stuck=100)
    with pytest.raises(TransactionFailed, match=r"not mined within 1\.5 s") as caught:
        _open_via(m, stuck, receipt_timeout=1.5, replace_after=0.1)
    assert len(stuck.sent) == 1 + MAX_REPLACEMENTS
    assert len({_fees(raw)[0] for raw in stuck.sent}) == 1
    assert caught.value.tx_hash is not None and caught.value.reason is None
    with pytest.raises(InvalidOptions):
        MarketplaceClient(m.chain.w3, m.chain.addresses["job_marketplace"], replace_after=0)


def test_a_failed_fee_read_skips_one_replacement_and_the_next_goes_out(market):
    """The node fails the base-fee read of the first replacement round: that round sends nothing, the
    wait goes on, the next round replaces the stuck transaction and it is mined."""
    m = market
    stuck = StuckTransactions(m.chain.provider, stuck=1)
    # the first block read after the transaction went out is the first replacement round's (its base fee)
    failing = FailingRequests(stuck, {"eth_getBlockByNumber": {0}}, after="eth_sendRawTransaction")
    opened = _open_via(m, failing, replace_after=0.2)
    assert failing.failed == ["eth_getBlockByNumber"] and failing.calls["eth_getBlockByNumber"] == 2
    assert len(stuck.sent) == 2
    assert m.as_user.get_job(opened.job_id).active and opened.tx_hash != stuck.held[0]


def test_a_node_still_indexing_its_transactions_is_waited_on(market):
    """A node that answers the receipt poll with "transaction indexing is in progress" (after a restart):
    the client keeps polling instead of failing the transaction."""
    m = market
    indexing = FailingRequests(m.chain.provider, {"eth_getTransactionReceipt": {0, 1, 2}},
                               message="transaction indexing is in progress")
    opened = _open_via(m, indexing)
    assert indexing.failed == ["eth_getTransactionReceipt"] * 3 and m.as_user.get_job(opened.job_id).active


def test_a_receipt_poll_blip_is_polled_through_and_a_dead_endpoint_is_not(market):
    """Two receipt polls failing in a row (an endpoint's blip) are polled through and the job opens;
    three in a row end the wait with the endpoint's error (the transaction's hash on it)."""
    m = market
    blip = FailingRequests(m.chain.provider, {"eth_getTransactionReceipt": {0, 1}})
    opened = _open_via(m, blip)
    assert blip.failed == ["eth_getTransactionReceipt"] * 2 and m.as_user.get_job(opened.job_id).active
    dead = FailingRequests(m.chain.provider, {"eth_getTransactionReceipt": set(range(3))})
    with pytest.raises(TransactionFailed, match="internal error") as caught:
        _open_via(m, dead)
    assert dead.failed == ["eth_getTransactionReceipt"] * 3 and caught.value.tx_hash


def test_an_http_error_status_is_connection_failed_and_hides_the_rpc_url(caplog):
    """An endpoint answering 429 (rate limited) or 503: CONNECTION_FAILED naming the status, retryable;
    the API key in the URL's path and query is in neither the error nor any log line."""
    import http.server

    class Limited(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(429 if "v2" in self.path else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Limited)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for path, status in (("/v2/SECRETKEY123?apikey=SECRETKEY123", 429), ("/v3/SECRETKEY123", 503)):
            url = f"http://127.0.0.1:{server.server_address[1]}{path}"
            client = MarketplaceClient(url, "0x" + "11" * 20, timeout=5)
            with caplog.at_level(logging.DEBUG), pytest.raises(ConnectionFailed) as caught:
                client.find_settlement(1, window=4)
            assert f"HTTP {status}" in caught.value.message and caught.value.retryable
            assert "SECRETKEY123" not in str(caught.value) and "SECRETKEY123" not in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_an_rpc_url_holding_an_api_key_shows_in_no_log_line_at_debug(market, caplog):
    """Reads and a transaction through an RPC URL whose path and query hold an API key, with every logger at
    DEBUG (web3's providers and urllib3's connection pool log each request): the key appears nowhere, the
    host and port still do. (urllib3 logged the request's path, and with it the key.)"""
    from fabstir_jupyter.local.rpc import LocalRpcServer

    m = market
    secret = "k3y" + os.urandom(8).hex()
    caplog.set_level(logging.DEBUG)
    with LocalRpcServer(m.chain.provider) as server:
        url = f"{server.url.rstrip('/')}/v2/{secret}?apikey={secret}"
        account = m.chain.create_account(native=10**18, usdc=10**7)
        client = MarketplaceClient(url, m.chain.addresses["job_marketplace"], account=_key(account), receipt_timeout=10)
        assert client.min_deposit() > 0
        assert client.approve(m.chain.addresses["stable_token"], 10)
    # (the local node's own access log is the server's side, not the client's)
    client_side = [r for r in caplog.records if not r.name.startswith("fabstir_jupyter.local")]
    netloc = urlsplit(server.url).netloc
    assert any(r.name == "urllib3.connectionpool" and netloc in r.getMessage() for r in client_side)  # logs ran
    assert all(secret not in r.getMessage() for r in client_side) and secret not in repr(client)


# ---------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("tokens, price", [(1000, NATIVE_PRICE), (1, 3), (777, STABLE_PRICE), (10**6, 1)])
def test_deposit_for_is_the_smallest_deposit_that_pays_for_the_tokens(tokens, price):
    """max_tokens(deposit_for(n)) >= n > max_tokens(deposit_for(n) - 1); job_cost is the contract's rounding."""
    deposit = deposit_for(tokens, price)
    assert max_tokens(deposit, price) >= tokens > max_tokens(deposit - 1, price)
    assert job_cost(tokens, price) == tokens * price // 1000
