"""JobMeter: production's proof cadence and the deposit bound, as plain arithmetic (no chain, no I/O)."""

from __future__ import annotations

import pytest

from fabstir_jupyter.errors import BudgetExceeded, PaymentRequired
from fabstir_jupyter.host.metering import MIN_PROOF_TOKENS, PROOF_THRESHOLD, JobMeter


def stream(meter: JobMeter, n: int, text: str = "x") -> list[int]:
    """Stream ``n`` tokens (stopping at a refusal); return the proofs that fell due, as token counts."""
    due = []
    for _ in range(n):
        if meter.refusal() is not None:
            break
        proof = meter.add_token(text)
        if proof is not None:
            due.append(proof.tokens)
    return due


def answer(meter: JobMeter, n: int) -> list[int]:
    """Stream one answer of ``n`` tokens and end it, as the server does."""
    due = stream(meter, n)
    last = meter.answer_ended()
    return due + ([last.tokens] if last else [])


def test_meter_proves_every_1000_tokens_and_after_answers_of_100_or_more():
    """Production's cadence: a proof at each 1000 pending, one after an answer leaving >= 100 pending,
    none for a smaller remainder, which the next proof carries."""
    meter = JobMeter(7, proof_interval=1000, max_tokens=10**6)
    assert answer(meter, 1200) == [1000, 200]
    assert answer(meter, 1250) == [1000, 250]
    assert answer(meter, 50) == []  # 50 pending: under the contract's minimum
    assert answer(meter, 60) == [110]  # the next answer's proof carries them
    assert meter.claimed == meter.streamed == 2560 and meter.pending == 0


def test_first_proof_is_padded_to_the_interval_and_the_padding_counts_against_the_deposit():
    """The first proof claims at least proofInterval (the contract refuses less); later ones claim what streamed."""
    meter = JobMeter(7, proof_interval=1000, max_tokens=10**6)
    assert answer(meter, 300) == [1000]
    assert (meter.streamed, meter.proven, meter.claimed) == (300, 300, 1000)
    assert answer(meter, 2200) == [1000, 1000, 200]
    assert meter.claimed == 3200 and meter.streamed == 2500


def test_settlement_proves_any_first_tokens_but_drops_a_small_remainder_after_a_proof():
    """At settlement a job with no proof yet is billed its interval for even 1 token; after a proof, a
    remainder under 100 is dropped (counted as unbilled) and 100 or more is proven."""
    first = JobMeter(1, proof_interval=1000, max_tokens=5000)
    stream(first, 5)
    proof = first.settle()
    assert proof is not None and (proof.tokens, proof.total, proof.reason) == (1000, 1000, "settlement")

    small = JobMeter(2, proof_interval=1000, max_tokens=5000)
    answer(small, 1000)
    stream(small, MIN_PROOF_TOKENS - 1)
    assert small.settle() is None and small.unbilled == 99 and small.claimed == 1000

    enough = JobMeter(3, proof_interval=1000, max_tokens=5000)
    answer(enough, 1000)
    stream(enough, MIN_PROOF_TOKENS)
    assert enough.settle().tokens == 100
    assert JobMeter(4, proof_interval=1000, max_tokens=5000).settle() is None  # nothing streamed: no proof


@pytest.mark.parametrize("first_answer, streamed, proofs", [
    (2000, 2000, [1000, 1000]),  # no padding: the whole deposit streams
    (300, 1300, [1000, 1000]),  # 700 padded tokens are paid for: 700 fewer stream
])
def test_meter_refuses_the_token_the_deposit_could_not_pay_for(first_answer, streamed, proofs):
    """With a deposit for 2000 tokens, the meter stops the stream where proving everything would pass
    2000, padding included; the proofs then add up to the deposit exactly."""
    meter = JobMeter(9, proof_interval=1000, max_tokens=2000)
    due = answer(meter, first_answer) + answer(meter, 5000)
    assert meter.streamed == streamed and due == proofs and meter.claimed == 2000
    refusal = meter.refusal()
    assert isinstance(refusal, BudgetExceeded) and "job 9: deposit exhausted" in refusal.message
    assert meter.remaining == 0 and meter.settle() is None


def test_a_job_taken_with_proofs_on_chain_is_not_padded_again():
    """A job that already has tokensUsed (a host restarted) counts from there, without padding."""
    meter = JobMeter(5, proof_interval=1000, max_tokens=3000, tokens_used=1000)
    assert answer(meter, 150) == [150] and meter.claimed == 1150
    assert meter.remaining == 1850


def test_proof_hashes_are_unique_and_name_the_text_without_holding_it():
    """proofHash differs per job, per total and per streamed text; it is 32 bytes and reveals nothing."""
    def first_hash(job_id: int, text: str) -> bytes:
        meter = JobMeter(job_id, proof_interval=100, max_tokens=10**6)
        for _ in range(PROOF_THRESHOLD):
            proof = meter.add_token(text)
        assert proof is not None
        return proof.proof_hash

    hashes = {first_hash(1, "a"), first_hash(2, "a"), first_hash(1, "b")}
    assert len(hashes) == 3 and all(len(h) == 32 for h in hashes)
    meter = JobMeter(1, proof_interval=100, max_tokens=10**6)
    stream(meter, 2000, "secret")
    assert b"secret" not in b"".join(hashes)


def test_a_closed_meter_refuses_with_its_reason():
    """close() makes every later token refused with the error given (the first one wins)."""
    meter = JobMeter(3, proof_interval=100, max_tokens=10**6)
    meter.close(PaymentRequired("job 3 is no longer active"))
    meter.close(PaymentRequired("another reason"))
    assert stream(meter, 10) == [] and meter.streamed == 0
    assert meter.refusal().message == "job 3 is no longer active"
