"""A paid ``fabstir-host`` (spec §10) against a real local chain over JSON-RPC.

Each test runs a real :class:`HostServer` with an operator key and a :class:`PaymentConfig` that
points at a :class:`LocalRpcServer` serving a :class:`LocalChain` (the JobMarketplace deployed,
the host registered with that key), and talks to it over a real WebSocket. Jobs are opened, and
read back, with :class:`MarketplaceClient` from the user's own key. Time on chain moves with
``LocalChain.advance_time``, never by sleeping through the dispute window; waits poll with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from _rpc import StuckTransactions

pytest.importorskip("eth_tester", reason="paid sessions need the local chain (the 'chain' extra)")

from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.encryption import EncryptedSession
from fabstir_jupyter.host import HostServer, ModelInfo, PaymentConfig, ScriptedBackend
from fabstir_jupyter.local.chain import LocalChain, model_id
from fabstir_jupyter.local.rpc import LocalRpcServer
from fabstir_jupyter.marketplace import (
    MARKETPLACE_ABI,
    JobStatus,
    MarketplaceClient,
    SessionJob,
)
from fabstir_jupyter.protocol import (
    ResponseReader,
    parse_host_frame,
    prompt_frame,
    session_init_frame,
)

from .conftest import Peer, Result, get_json

MODEL = ("fabstir/scripted", "scripted-1")
OTHER = ("fabstir/scripted", "scripted-2")
MODEL_ID = model_id(*MODEL)
PRICE = 2_000_000_000  # wei per 1000 tokens, the host's price
DEPOSIT = 10**15  # pays for 500 000 tokens at PRICE
PROMPT = "Which spice does grandmother hide in the plum chutney?"
DISPUTE = 30  # the local marketplace's dispute window
#: Fast retries and polls for tests; the settlement still waits for the chain's own clock.
FAST = {"rpc_timeout": 5.0, "receipt_timeout": 10.0, "retry_base": 0.05, "retry_max_delay": 0.5,
        "retry_window": 30.0, "settle_poll": 0.05, "settle_timeout": 60.0, "shutdown_timeout": 1.0}
DEADLINE = 30.0


class Market:
    """A local chain over JSON-RPC with our host (MODEL and OTHER registered), a rival host and a user."""

    def __init__(self) -> None:
        self.chain = LocalChain(seed=41)
        self.rpc = LocalRpcServer(self.chain.provider).start()
        self.host = self.chain.register_host("http://127.0.0.1:9", models=[MODEL, OTHER], prices=(PRICE, 2000))
        self.rival = self.chain.register_host("http://127.0.0.1:10", models=[MODEL], prices=(PRICE, 2000))
        self.host_key = PrivateKey.from_hex(self.host.private_key)
        self.user = self.chain.create_account(native=10**20)
        self.marketplace = self.chain.addresses["job_marketplace"]
        self.as_user = MarketplaceClient(self.rpc.url, self.marketplace,
                                         account=PrivateKey.from_hex(self.user.private_key))
        self.as_rival = MarketplaceClient(self.rpc.url, self.marketplace,
                                          account=PrivateKey.from_hex(self.rival.private_key))
        self.reader = MarketplaceClient(self.chain.w3, self.marketplace)  # reads the chain directly, no proxy
        self._events = self.chain.w3.eth.contract(address=self.marketplace, abi=MARKETPLACE_ABI).events

    def open(self, *, host: str | None = None, model: str = MODEL_ID, deposit: int = DEPOSIT,
             price: int = PRICE, **terms: Any) -> int:
        return self.as_user.create_job(host or self.host.address, model, deposit=deposit, price_per_token=price,
                                       **terms).job_id

    def job(self, job_id: int) -> SessionJob:
        return self.reader.get_job(job_id)

    def proofs(self, job_id: int) -> list[int]:
        """tokensClaimed of each ProofSubmitted of the job, in order."""
        logs = self._events.ProofSubmitted().get_logs(argument_filters={"jobId": job_id}, from_block=0)
        return [int(e["args"]["tokensClaimed"]) for e in logs]

    def settlement(self, job_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The job's SessionCompleted and SessionCompletedBy arguments."""
        done = self._events.SessionCompleted().get_logs(argument_filters={"jobId": job_id}, from_block=0)
        by = self._events.SessionCompletedBy().get_logs(argument_filters={"jobId": job_id}, from_block=0)
        assert len(done) == len(by) == 1
        return dict(done[0]["args"]), dict(by[0]["args"])


@pytest.fixture(scope="module")
def market():
    local = Market()
    yield local
    local.rpc.stop()
    local.chain.close()


@pytest.fixture
def paid_host(market, start_host):
    """Start paid hosts: ``await paid_host(rpc_url=..., backend=..., **PaymentConfig fields)``."""

    async def make(rpc_url: str | None = None, backend: Any = None, **settings: Any) -> HostServer:
        payment = PaymentConfig(rpc_url or market.rpc.url, market.marketplace, MODEL_ID, **{**FAST, **settings})
        return await start_host(backend=backend, operator_key=market.host_key, payment=payment)

    return make


async def eventually(check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Call the blocking ``check`` in a thread until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout:g} s")
        await asyncio.sleep(0.05)


async def init(peer: Peer, job_id: int | str | None, *, session_id: str | None = None,
               chain_id: int | None = None) -> dict[str, Any]:
    """Send a plaintext session_init naming ``job_id``; return the host's reply."""
    await peer.send(session_init_frame(session_id or str(job_id), job_id=job_id, chain_id=chain_id))
    return await peer.recv()


async def ask(peer: Peer, max_tokens: int, *, rid: str = "r", model: str = "scripted-1",
              session_id: str | None = None) -> Result:
    """Send one prompt in the connection's session; read the answer (or the refusal)."""
    await peer.send(prompt_frame(PROMPT, session_id=session_id, model=model, max_tokens=max_tokens,
                                 temperature=0.0, request_id=rid))
    frames = []
    while True:
        frame = await peer.recv()
        frames.append(frame)
        if frame["type"] == "stream_end" or (frame["type"] == "error" and not frames[:-1]):
            return Result(frames)


def tokens(result: Result) -> int:
    return sum(chunk["tokens"] for chunk in result.chunks)


async def settle(market: Market, job_id: int, proofs: list[int]) -> None:
    """Wait for the job's proofs, move the chain past the dispute window, wait for the host to complete it."""
    await eventually(lambda: market.proofs(job_id) == proofs)
    market.chain.advance_time(DISPUTE + 1)
    await eventually(lambda: market.job(job_id).status is JobStatus.COMPLETED)


def check_settlement(market: Market, job_id: int, billed: int, *, deposit: int = DEPOSIT, price: int = PRICE,
                     by: str | None = None) -> None:
    """The job was completed by ``by`` (default: the host) for ``billed`` tokens; the amounts add up."""
    done, completed_by = market.settlement(job_id)
    payment = billed * price // 1000
    fee = payment * 1000 // 10_000
    assert done["totalTokensUsed"] == billed and completed_by["paymentAmount"] == payment
    assert completed_by["completedBy"] == (by or market.host.address)
    assert done["hostEarnings"] == payment - fee
    assert done["hostEarnings"] + fee + done["userRefund"] == deposit


# ---------------------------------------------------------------------------- paid sessions


async def test_paid_plaintext_session_proves_on_production_cadence_and_settles_on_close(market, paid_host, make_peer):
    """Answers of 1200, 1250 and 50 tokens in one session: a proof at every 1000 tokens, one after each
    answer leaving >= 100, none for the last 50 (under the contract's minimum, so unbilled); closing the
    socket settles the job once the dispute window has passed: 2450 tokens billed, the amounts add up."""
    server = await paid_host()
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    ack = await init(peer, job_id, chain_id=market.chain.chain_id)
    assert ack["type"] == "session_init_ack" and ack["job_id"] == job_id
    answers = [await ask(peer, n, rid=f"r{n}") for n in (1200, 1250, 50)]
    assert [tokens(a) for a in answers] == [1200, 1250, 50]
    assert all(a.end["finish_reason"] == "length" and not a.errors for a in answers)
    await eventually(lambda: market.proofs(job_id) == [1000, 200, 1000, 250])
    assert market.job(job_id).status is JobStatus.ACTIVE  # the host settles only when the socket closes
    await peer.ws.close()
    await settle(market, job_id, [1000, 200, 1000, 250])
    check_settlement(market, job_id, 2450)
    _, body = await get_json(server, "/health")
    assert body["payments"]["settled_jobs"] == 1 and body["payments"]["open_jobs"] == 0


async def test_paid_encrypted_session_pads_its_first_proof_and_settles_alike(market, paid_host, make_peer):
    """The encrypted path bills like the plaintext one, the job coming from the init payload's jobId and
    the init re-sent before every prompt (as the production SDK does): a first answer of 300 tokens is
    proven as the job's proofInterval (1000), then 2200 tokens add 1000, 1000 and 200: 3200 billed."""
    server = await paid_host()
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    session = EncryptedSession(market.host_key.public_key, session_id=f"{job_id}-chat", job_id=job_id,
                               chain_id=market.chain.chain_id, model="scripted-1",
                               signer=PrivateKey.from_hex(market.user.private_key))
    streamed = []
    for n in (300, 2200):
        await peer.send(session.init_frame())
        ack = await peer.recv()
        assert ack["type"] == "session_init_ack" and ack["job_id"] == job_id, ack
        await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=n, temperature=0.0,
                                              request_id=f"e{n}"))
        reader, text = ResponseReader(request_id=f"e{n}", max_tokens=n, features=[]), ""
        while not reader.done:
            text += "".join(reader.receive(session.decrypt(parse_host_frame(json.dumps(await peer.recv())))))
        assert reader.finish_reason == "length"
        streamed.append(len(text.split()))
    assert streamed == [300, 2200]
    await peer.ws.close()
    await settle(market, job_id, [1000, 1000, 1000, 200])
    check_settlement(market, job_id, 3200)


async def test_deposit_exhausted_mid_stream_ends_the_stream_cleanly_and_bills_the_deposit(market, paid_host,
                                                                                         make_peer):
    """A deposit that pays for 2000 tokens: after a 300-token answer (proven as 1000), the next answer
    stops at 1000 tokens with BUDGET_EXCEEDED and stream_end: no token the deposit cannot pay for. Later
    prompts and a re-init are refused BUDGET_EXCEEDED; the settlement bills the whole deposit."""
    server = await paid_host()
    deposit, price = 10**14, 5 * 10**13  # 2000 tokens
    job_id = await asyncio.to_thread(market.open, deposit=deposit, price=price)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    first = await ask(peer, 300, rid="a")
    cut = await ask(peer, 1500, rid="b")
    assert tokens(first) == 300 and tokens(cut) == 1000
    assert [e["code"] for e in cut.errors] == ["BUDGET_EXCEEDED"] and "deposit exhausted" in cut.errors[0]["message"]
    assert cut.end["type"] == "stream_end" and cut.end["reason"] == "error"
    assert cut.end["usage"]["completion_tokens"] == 1000
    refused = await ask(peer, 10, rid="c")
    assert refused.frames == refused.errors and refused.errors[0]["code"] == "BUDGET_EXCEEDED"
    again = await init(peer, job_id)
    assert again["type"] == "error" and again["code"] == "BUDGET_EXCEEDED"
    await peer.ws.close()
    await settle(market, job_id, [1000, 1000])
    check_settlement(market, job_id, 2000, deposit=deposit, price=price)
    assert market.settlement(job_id)[0]["userRefund"] == 0


# ---------------------------------------------------------------------------- refusals


async def test_a_paid_host_serves_no_request_without_a_job(market, paid_host, make_peer):
    """Stateless inference, a prompt in a session opened without a job, and an encrypted message after an
    init without a jobId are each refused PAYMENT_REQUIRED, saying how to open a job; nothing streams."""
    server = await paid_host()
    peer = await make_peer(server)
    await peer.send({"type": "inference", "id": "i", "request": {"prompt": PROMPT, "model": "scripted-1",
                                                                  "max_tokens": 5, "temperature": 0.0}})
    stateless = await peer.recv()
    assert stateless["type"] == "error" and stateless["code"] == "PAYMENT_REQUIRED" and stateless["id"] == "i"
    assert market.marketplace in stateless["message"] and "session_init" in stateless["message"]
    assert (await init(peer, None, session_id="free"))["type"] == "session_init_ack"
    unpaid = await ask(peer, 5)
    assert unpaid.frames == unpaid.errors and unpaid.errors[0]["code"] == "PAYMENT_REQUIRED"
    session = EncryptedSession(market.host_key.public_key, session_id="e", job_id="", chain_id=market.chain.chain_id,
                               model="scripted-1")
    await peer.send(session.init_frame())
    assert (await peer.recv())["type"] == "session_init_ack"
    await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=5, temperature=0.0, request_id="m"))
    refusal = await peer.recv()
    assert refusal["type"] == "error" and refusal["code"] == "PAYMENT_REQUIRED" and refusal["id"] == "m"
    assert await peer.silent_for(0.2)


async def test_a_paid_host_refuses_jobs_it_cannot_bill_with_coded_errors(market, paid_host, make_peer):
    """At session_init: an unknown job is SESSION_NOT_FOUND; another host's job, a completed job, a job
    for another model and another chain id are PAYMENT_REQUIRED; a job id that is no number is
    INVALID_OPTIONS. Every refusal names the job and the session, and binds nothing."""
    server = await paid_host()
    peer = await make_peer(server)
    rivals = await asyncio.to_thread(market.open, host=market.rival.address)
    other_model = await asyncio.to_thread(market.open, model=model_id(*OTHER))
    completed = await asyncio.to_thread(market.open)
    await asyncio.to_thread(market.as_user.complete_job, completed)
    usable = await asyncio.to_thread(market.open)
    cases = [
        (999_999, None, "SESSION_NOT_FOUND", "does not exist"),
        (rivals, None, "PAYMENT_REQUIRED", f"pays host {market.rival.address}"),
        (completed, None, "PAYMENT_REQUIRED", "is completed"),
        (other_model, None, "PAYMENT_REQUIRED", "pays for model"),
        (usable, 1, "PAYMENT_REQUIRED", f"paid on chain {market.chain.chain_id}, not chain 1"),
        ("twelve", None, "INVALID_OPTIONS", "job id must be a positive integer"),
    ]
    for job_id, chain_id, code, says in cases:
        reply = await init(peer, job_id, session_id=f"s-{job_id}", chain_id=chain_id)
        assert reply["type"] == "error" and reply["code"] == code and says in reply["message"], reply
        assert reply["session_id"] == f"s-{job_id}" and (str(job_id) in reply["message"] or code == "INVALID_OPTIONS")
        refused = await ask(peer, 5, session_id=f"s-{job_id}")
        assert refused.errors and refused.errors[0]["code"] in ("SESSION_NOT_FOUND", "PAYMENT_REQUIRED")
    _, body = await get_json(server, "/health")
    assert body["payments"]["open_jobs"] == 0


async def test_a_request_for_a_model_other_than_the_jobs_is_refused(market, paid_host, make_peer):
    """On a host serving two models, a job for its registered model pays only for that one: a prompt
    naming the other is PAYMENT_REQUIRED; naming the model by its registry id is served."""

    class TwoModels(ScriptedBackend):
        @property
        def models(self) -> list[ModelInfo]:
            return [*super().models, ModelInfo("scripted-2", "second model", 2048)]

    server = await paid_host(backend=TwoModels())
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    wrong = await ask(peer, 5, model="scripted-2")
    assert wrong.errors[0]["code"] == "PAYMENT_REQUIRED"
    assert f"job {job_id} pays for model" in wrong.errors[0]["message"]
    right = await ask(peer, 5, model=MODEL_ID)
    assert tokens(right) == 5 and not right.errors


async def test_a_job_keeps_one_connection_and_is_never_served_after_its_settlement(market, paid_host, make_peer):
    """While a connection holds a job, another connection naming it is refused; once the holder closes,
    the job is settled and refused everywhere, by this host (even before the chain shows it completed)
    and by a fresh host that only sees the chain."""
    server = await paid_host()
    job_id = await asyncio.to_thread(market.open)
    holder, other = await make_peer(server), await make_peer(server)
    assert (await init(holder, job_id))["type"] == "session_init_ack"
    busy = await init(other, job_id)
    assert busy["code"] == "PAYMENT_REQUIRED" and "in use on another connection" in busy["message"]
    assert tokens(await ask(holder, 150)) == 150
    await holder.ws.close()
    await eventually(lambda: market.proofs(job_id) == [1000])
    late = await init(other, job_id)
    assert late["code"] == "PAYMENT_REQUIRED" and "settled when its connection closed" in late["message"]
    await settle(market, job_id, [1000])
    check_settlement(market, job_id, 1000)
    restarted = await paid_host()
    reply = await init(await make_peer(restarted), job_id)
    assert reply["code"] == "PAYMENT_REQUIRED" and "is completed" in reply["message"]


async def test_a_job_whose_deposit_cannot_pay_another_proof_is_refused(market, paid_host, make_peer):
    """A job with 1000 tokens proven and 52 left (fewer than a proof's 100) is BUDGET_EXCEEDED at init."""
    server = await paid_host()
    job_id = await asyncio.to_thread(market.open, deposit=10**14, price=95 * 10**12)  # 1052 tokens
    as_host = MarketplaceClient(market.rpc.url, market.marketplace, account=market.host_key)
    await asyncio.to_thread(as_host.submit_proof, job_id, 1000, b"\x01" * 32)
    reply = await init(await make_peer(server), job_id)
    assert reply["code"] == "BUDGET_EXCEEDED" and "52 more tokens" in reply["message"]


async def test_the_depositor_completing_first_stops_the_host_quietly(market, paid_host, make_peer, caplog):
    """The user completes the job mid-session: the host's next proof meets Not active, it stops billing
    the job (the next prompt is PAYMENT_REQUIRED) and its close settles nothing, with no error logged."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    server = await paid_host()
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    await ask(peer, 1000, rid="a")
    await eventually(lambda: market.proofs(job_id) == [1000])
    await asyncio.to_thread(market.as_user.complete_job, job_id)
    await ask(peer, 1000, rid="b")
    await eventually(lambda: f"job {job_id}: no longer active on chain" in caplog.text)
    refused = await ask(peer, 5, rid="c")
    assert refused.errors[0]["code"] == "PAYMENT_REQUIRED" and "no longer active" in refused.errors[0]["message"]
    await peer.ws.close()
    await server.close()
    check_settlement(market, job_id, 1000, by=market.user.address)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING and "payments" in r.name] == []


async def test_a_job_whose_proof_cannot_land_is_served_no_more(market, paid_host, make_peer, caplog):
    """A job whose first proof the contract refuses until its retry window runs out ("Too many": a
    proofInterval of 200 000 tokens needs 100 s since the job opened): the host abandons the proof and
    serves the job no more (PAYMENT_REQUIRED naming why) instead of streaming on unpaid to the deposit."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    server = await paid_host(retry_window=0.5)
    job_id = await asyncio.to_thread(market.open, proof_interval=200_000)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    first = await ask(peer, 1000, rid="a")
    assert tokens(first) == 1000  # the stream never waits for the proof
    await eventually(lambda: f"job {job_id}: proof of 200000 tokens" in caplog.text and "abandoned" in caplog.text)
    refused = await ask(peer, 5, rid="b")
    assert refused.errors[0]["code"] == "PAYMENT_REQUIRED" and "could not prove" in refused.errors[0]["message"]
    assert market.job(job_id).tokens_used == 0
    await peer.ws.close()
    await server.close()
    # its settlement's proof meets "Low first" (the first was lost): left open, the log tells what landed
    assert f"job {job_id} left open at shutdown: 0 tokens proven on chain, 200000 more in proofs not landed" \
        in caplog.text


async def test_a_job_check_does_not_queue_behind_a_proof_waiting_to_be_mined(market, paid_host, make_peer, caplog):
    """One chain thread, held by a proof whose transaction is never mined (a fee spike): a new client's
    session_init is still checked and acknowledged while that proof waits (job checks read on threads
    of their own), before the proof's wait runs out."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    stuck = StuckTransactions(market.chain.provider, stuck=100)
    with LocalRpcServer(stuck) as rpc:
        server = await paid_host(rpc_url=rpc.url, chain_threads=1, receipt_timeout=20.0)
        first_job = await asyncio.to_thread(market.open)
        second_job = await asyncio.to_thread(market.open)
        first = await make_peer(server)
        assert (await init(first, first_job))["type"] == "session_init_ack"
        await ask(first, 1000, rid="a")  # its proof goes out, and is never mined
        await eventually(lambda: len(stuck.sent) >= 1)
        second = await make_peer(server)
        assert (await init(second, second_job))["type"] == "session_init_ack"
        assert "not mined within" not in caplog.text  # the proof still waits: the check did not queue behind it
        stuck.release()  # the fee spike passes: the proof is mined, and no thread of this host is left waiting
        await eventually(lambda: market.proofs(first_job) == [1000])
        await server.close()


async def test_a_job_completed_before_its_settlement_proof_is_left_alone(market, paid_host, make_peer, caplog):
    """The user completes the job while its only answer is still unproven (50 tokens, under a proof's
    100): at the close, the host's settlement proof meets Not active, and the host stops there, reading
    nothing more from the chain for that job (no second "already completed" outcome)."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    server = await paid_host()
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    assert tokens(await ask(peer, 50)) == 50
    await asyncio.to_thread(market.as_user.complete_job, job_id)
    await peer.ws.close()
    await eventually(lambda: f"job {job_id}: no longer active on chain" in caplog.text)
    await server.close()  # waits for the job's worker to finish
    assert market.proofs(job_id) == []
    check_settlement(market, job_id, 0, by=market.user.address)
    assert f"job {job_id}: already" not in caplog.text and f"job {job_id} settled" not in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING and "payments" in r.name] == []


async def test_a_host_serves_before_its_chain_answers_and_checks_jobs_once_it_does(market, paid_host, make_peer):
    """The chain's RPC socket listens but nothing serves it yet (as when the local network launches its
    hosts before its chain exists): the host serves anyway, /health says it is connecting, and two
    session_inits sent meanwhile wait. Once the chain serves, each is checked there: this host's job is
    acknowledged and pays for an answer, another host's is refused PAYMENT_REQUIRED."""
    usable = await asyncio.to_thread(market.open)
    rivals = await asyncio.to_thread(market.open, host=market.rival.address)
    sock = socket.create_server(("127.0.0.1", 0))
    rpc = LocalRpcServer(market.chain.provider, sock=sock)
    try:
        server = await paid_host(rpc_url=f"http://127.0.0.1:{sock.getsockname()[1]}")
        _, version = await get_json(server, "/v1/version")
        assert "paid-sessions" in version["features"]
        _, health = await get_json(server, "/health")
        assert health["payments"]["chain"] == "connecting" and health["payments"]["chain_id"] is None
        ours, theirs = await make_peer(server), await make_peer(server)
        await ours.send(session_init_frame(str(usable), job_id=usable, chain_id=market.chain.chain_id))
        await theirs.send(session_init_frame(str(rivals), job_id=rivals))
        assert rpc.requests_served == 0
        rpc.start()
        ack, refusal = await ours.recv(DEADLINE), await theirs.recv(DEADLINE)
        assert ack["type"] == "session_init_ack" and ack["job_id"] == usable
        assert refusal["type"] == "error" and refusal["code"] == "PAYMENT_REQUIRED"
        assert f"pays host {market.rival.address}" in refusal["message"]
        assert tokens(await ask(ours, 5)) == 5
        _, health = await get_json(server, "/health")
        assert health["payments"]["chain"] == "connected" and health["payments"]["chain_id"] == market.chain.chain_id
        assert rpc.requests_served > 0
    finally:
        rpc.stop()


@pytest.mark.parametrize("failure", ["no chain libraries", "not a marketplace", "no answer"])
async def test_a_host_whose_chain_client_cannot_connect_refuses_jobs_with_a_coded_error(market, start_host, make_peer,
                                                                                        monkeypatch, failure):
    """The chain client cannot load (web3 missing), the address is not a JobMarketplace, or nothing
    answers at the RPC URL within connect_timeout: a session_init naming a job gets HOST_ERROR (the
    cause's code in the message, never the URL) instead of hanging, and /health says the chain failed."""
    rpc_url, marketplace, cause = None, market.marketplace, "INVALID_OPTIONS"
    if failure == "no chain libraries":
        monkeypatch.setitem(sys.modules, "fabstir_jupyter.marketplace", None)  # its import fails
    elif failure == "not a marketplace":
        marketplace = market.chain.addresses["stable_token"]  # a contract, but no disputeWindow()
    else:
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            rpc_url, cause = f"http://127.0.0.1:{sock.getsockname()[1]}", "CONNECTION_FAILED"
    payment = PaymentConfig(rpc_url or market.rpc.url, marketplace, MODEL_ID, **{**FAST, "connect_timeout": 1.0})
    server = await start_host(operator_key=market.host_key, payment=payment)
    peer = await make_peer(server)
    reply = await init(peer, 1)
    assert reply["type"] == "error" and reply["code"] == "HOST_ERROR", reply
    assert f"no connection to its chain ({cause})" in reply["message"] and "127.0.0.1" not in reply["message"]
    _, health = await get_json(server, "/health")
    assert health["payments"]["chain"] == "failed" and health["payments"]["open_jobs"] == 0


async def test_a_host_with_a_gas_limit_proves_and_settles_without_estimates(market, paid_host, make_peer, caplog):
    """With a fixed gas limit (what the local network gives its hosts: eth-tester's estimate executes a
    transaction many times over), the proof and the settlement go out without eth_estimateGas and land
    as estimated ones do."""
    server = await paid_host(gas_limit=3_000_000)
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    caplog.set_level(logging.DEBUG, logger="fabstir_jupyter.local.rpc")
    assert tokens(await ask(peer, 1000)) == 1000
    await eventually(lambda: market.proofs(job_id) == [1000])
    await peer.ws.close()
    await settle(market, job_id, [1000])
    check_settlement(market, job_id, 1000)
    methods = [r.args[0] for r in caplog.records if r.name == "fabstir_jupyter.local.rpc" and r.msg == "local rpc %s"]
    assert methods.count("eth_sendRawTransaction") == 2 and "eth_estimateGas" not in methods


# ---------------------------------------------------------------------------- the chain never blocks the stream


class RpcProxy:
    """A JSON-RPC relay in front of the local chain that can hold raw transactions or drop every request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.release = threading.Event()
        self.release.set()  # set: raw transactions pass
        self.down = False  # True: every request is dropped without an answer
        self.holding = 0  # raw transactions waiting for release
        self.dropped = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if proxy.down:
                    proxy.dropped += 1
                    return  # the connection closes with no answer: the endpoint is down
                if b"eth_sendRawTransaction" in body and not proxy.release.is_set():
                    proxy.holding += 1
                    proxy.release.wait(DEADLINE)
                    proxy.holding -= 1
                request = urllib.request.Request(proxy.upstream, data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=DEADLINE) as answer:
                    data = answer.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def proxy(market):
    relay = RpcProxy(market.rpc.url)
    yield relay
    relay.stop()


async def test_the_stream_never_waits_for_a_proof(market, paid_host, make_peer, proxy):
    """With every raw transaction held at the RPC, a 2000-token answer streams to its end (each frame
    within the test's 5 s read timeout) while its proof due at token 1000 is not even sent: no proof is
    on chain when stream_end arrives. Released, the two proofs land in order."""
    server = await paid_host(rpc_url=proxy.url)
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    proxy.release.clear()
    answer = await ask(peer, 2000)
    assert tokens(answer) == 2000 and answer.end["reason"] == "complete"
    assert market.proofs(job_id) == [] and market.job(job_id).tokens_used == 0
    await eventually(lambda: proxy.holding == 1)  # the first proof is at the RPC, held; the second queued
    proxy.release.set()
    await eventually(lambda: market.proofs(job_id) == [1000, 1000])
    await peer.ws.close()
    await settle(market, job_id, [1000, 1000])


async def test_a_proof_failing_while_the_rpc_is_down_is_retried_and_lands(market, paid_host, make_peer, proxy,
                                                                          caplog):
    """The RPC drops every request while a proof falls due: the host retries with backoff (logging the
    job id, never the prompt, the answer or the API key in the RPC URL) and the proof lands once the RPC
    is back."""
    caplog.set_level(logging.DEBUG, logger="fabstir_jupyter")
    server = await paid_host(rpc_url=proxy.url + "/v3/SECRET-API-KEY")
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    proxy.down = True
    answer = await ask(peer, 1000)
    assert tokens(answer) == 1000
    await eventually(lambda: proxy.dropped >= 3)
    assert market.proofs(job_id) == []
    proxy.down = False
    await eventually(lambda: market.proofs(job_id) == [1000])
    await peer.ws.close()
    await settle(market, job_id, [1000])
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and all(f"job {job_id}: proof of 1000 tokens failed ([CONNECTION_FAILED]" in m for m in retries)
    payment_logs = [r.getMessage() for r in caplog.records if r.name == "fabstir_jupyter.host.payments"]
    connecting = ("paid sessions on", "chain client loaded")  # the host's start, before any job
    assert all(f"job {job_id}" in m for m in payment_logs if not m.startswith(connecting))
    everything = caplog.text
    assert PROMPT not in everything and answer.text not in everything
    assert market.host.private_key[2:] not in everything and "SECRET-API-KEY" not in everything


# ---------------------------------------------------------------------------- shutdown


async def test_a_stopping_host_proves_what_is_pending_and_settles_within_its_bound(market, paid_host, make_peer):
    """close() settles the jobs of the connections it closes: 50 streamed tokens (no proof yet) are proven
    as the job's interval, and the job completes once the dispute window passes on chain."""
    server = await paid_host(shutdown_timeout=DEADLINE)
    job_id = await asyncio.to_thread(market.open)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    assert tokens(await ask(peer, 50)) == 50
    closing = asyncio.create_task(server.close())
    await settle(market, job_id, [1000])
    await asyncio.wait_for(closing, DEADLINE)
    check_settlement(market, job_id, 1000)


async def test_a_job_left_open_at_shutdown_can_be_timed_out_by_anyone(market, paid_host, make_peer, caplog):
    """A host that cannot wait out the dispute window leaves the job open (logged with its id); its proofs
    stay on chain, and after the proofTimeoutWindow anyone may time the job out, paying the proven tokens."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    server = await paid_host(shutdown_timeout=0.5)
    job_id = await asyncio.to_thread(market.open, proof_timeout_window=60)
    peer = await make_peer(server)
    assert (await init(peer, job_id))["type"] == "session_init_ack"
    assert tokens(await ask(peer, 150)) == 150
    await eventually(lambda: market.proofs(job_id) == [1000])
    started = time.monotonic()
    await server.close()
    assert time.monotonic() - started < 10
    assert f"job {job_id} left open at shutdown: 1000 tokens proven on chain, 0 more in proofs not landed" \
        in caplog.text
    assert market.job(job_id).status is JobStatus.ACTIVE
    market.chain.advance_time(61)
    settled = await asyncio.to_thread(market.as_rival.trigger_timeout, job_id)
    assert settled.timed_out and settled.tokens_used == 1000 and settled.payment == 1000 * PRICE // 1000


async def test_health_and_version_say_the_host_is_paid_and_show_no_secret(market, paid_host):
    """/v1/version lists paid-sessions; /health names the marketplace, chain and operator (the chain's
    id once the host has connected to it, in the background), never the key nor the RPC URL."""
    server = await paid_host()
    _, version = await get_json(server, "/v1/version")
    assert "paid-sessions" in version["features"] and "e2ee" in version["features"]
    _, health = await get_json(server, "/health")
    assert health["payments"]["chain"] in ("connecting", "connected")
    await asyncio.wait_for(server.payments.wait_connected(), DEADLINE)
    _, health = await get_json(server, "/health")
    payments = health["payments"]
    assert payments["chain"] == "connected"
    assert payments["marketplace"] == market.marketplace and payments["chain_id"] == market.chain.chain_id
    assert payments["operator"] == market.host.address and payments["model_registry_id"] == MODEL_ID
    text = json.dumps(health) + json.dumps(version) + repr(server.config) + repr(server.payments)
    assert market.host.private_key[2:] not in text and market.rpc.url not in text
