"""billing: the client's replay of the proof cadence, deposits, budgets and amounts (no I/O)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from fabstir_jupyter.billing import (
    Budget,
    ProofCadence,
    base_units,
    cadence_of,
    cost_of,
    deposit_for,
    explain_difference,
    format_amount,
    tokens_for,
)
from fabstir_jupyter.errors import BudgetExceeded, InvalidOptions
from fabstir_jupyter.host.metering import JobMeter

answers_strategy = st.lists(st.integers(min_value=0, max_value=3500), max_size=12)


def _host_bill(answers: list[int], proof_interval: int, max_tokens: int = 10**9) -> tuple[int, int, int]:
    """What the reference host's meter claims for the same answers: (claimed before settlement, after, unbilled)."""
    meter = JobMeter(1, proof_interval=proof_interval, max_tokens=max_tokens)
    for tokens in answers:
        for _ in range(tokens):
            meter.add_token("x")
        meter.answer_ended()
    claimed = meter.claimed
    meter.settle()
    return claimed, meter.claimed, meter.unbilled


@settings(max_examples=150, deadline=None)
@given(answers=answers_strategy, proof_interval=st.sampled_from([100, 250, 1000, 1500]))
def test_the_client_replays_the_hosts_proof_cadence_exactly(answers, proof_interval):
    """For any answers, the client's cadence claims what the reference host's meter claims (production's
    cadence): before settlement, after it, and the tokens left unbilled."""
    cadence = cadence_of(answers, proof_interval)
    before, after, unbilled = _host_bill(answers, proof_interval)
    assert cadence.claimed == before
    assert cadence.settled() == after
    final = cadence.copy()
    final.settle()
    assert final.unbilled == unbilled and final.streamed == sum(answers)


@settings(max_examples=100, deadline=None)
@given(answers=answers_strategy, extra=st.integers(min_value=0, max_value=3000),
       proof_interval=st.sampled_from([100, 1000]))
def test_room_is_what_the_host_lets_stream_before_it_caps(answers, extra, proof_interval):
    """A job with room for N more tokens takes an answer of N without the host refusing a token, and the
    host refuses the (N+1)th: the client's top-up decision and the host's cap agree."""
    max_tokens = cadence_of(answers, proof_interval).needed_for(0) + extra
    cadence = cadence_of(answers, proof_interval)
    room = cadence.room(max_tokens)
    meter = JobMeter(1, proof_interval=proof_interval, max_tokens=max_tokens)
    for tokens in answers:
        for _ in range(tokens):
            meter.add_token("x")
        meter.answer_ended()
    served = 0
    while meter.refusal() is None and served <= room + 1:
        meter.add_token("x")
        served += 1
    assert served == room


@settings(max_examples=150, deadline=None)
@given(answers=answers_strategy, proof_interval=st.sampled_from([100, 250, 1000, 1500]),
       used=st.sampled_from([0, 0, 500]))
def test_an_honest_bill_never_passes_most_billable(answers, proof_interval, used):
    """The reference host's bill (cadence, unbilled tail) and a node folding the tail into its last
    proof both stay within most_billable: a bill above it is tokens the host did not report."""
    cadence = ProofCadence(proof_interval, used)
    for tokens in answers:
        cadence.answer(tokens)
    ceiling = cadence.most_billable()
    assert cadence.settled() <= ceiling
    folded = cadence.copy()  # a node that proves the unbilled tail too
    folded.settle()
    assert folded.claimed + folded.unbilled <= ceiling
    if used == 0 and proof_interval == 100 and sum(answers) >= 100:
        assert ceiling == sum(answers)  # the default proof interval: no slack beyond what was reported


def test_most_billable_counts_the_tail_the_padding_and_an_adopted_jobs_start():
    """1050 tokens: the cadence bills 1000 (50 left unbilled), a folding node 1050; a 30-token first
    answer is padded to the proof interval; an adopted job adds what it had used."""
    long = ProofCadence(100)
    long.answer(1050)
    assert (long.settled(), long.most_billable()) == (1000, 1050)
    short = ProofCadence(100)
    short.answer(30)
    assert short.most_billable() == 100 == short.settled()
    wide = ProofCadence(1500)  # the first proof may come after the first 100 tokens, padded to 1500
    wide.answer(1100)
    assert (wide.settled(), wide.most_billable()) == (1600, 2500)
    adopted = ProofCadence(100, 500)
    adopted.answer(30)
    assert adopted.most_billable() == 530 and ProofCadence(100, 500).most_billable() == 500


def test_a_short_first_answer_is_billed_the_proof_interval():
    """600 + 600 tokens with production's proofInterval of 1000 bill 1600 (the first proof is padded);
    with the contract's minimum of 100 they bill 1200."""
    assert cadence_of([600, 600], 1000).settled() == 1600
    assert cadence_of([600, 600], 100).settled() == 1200
    assert cadence_of([50], 100).settled() == 100 and cadence_of([], 100).settled() == 0


def test_explain_difference_names_minimum_billing_and_unproven_tokens():
    """The reasons a bill differs from the tokens streamed: padding, a remainder under 100, a host that
    proved less than it streamed, and a bill above what the cadence implies."""
    assert explain_difference(300, 300, cadence_of([300], 100)) == ""
    assert explain_difference(None, 5, cadence_of([5], 100)) == "not settled yet"
    assert explain_difference(100, 40, cadence_of([40], 100)).startswith("minimum billing")
    assert "50 streamed after the last proof" in explain_difference(300, 350, cadence_of([300, 50], 100))
    assert explain_difference(1000, 1200, cadence_of([1200], 100)).startswith(
        "unproven tokens: the host proved 200 fewer")
    assert "more than the proof cadence implies" in explain_difference(900, 800, cadence_of([800], 100))


def test_amounts_are_read_in_whole_tokens_and_refused_when_not_positive():
    """0.5 USDC is 500 000 base units; zero, negative, NaN, booleans, words and dust finer than the
    decimals are INVALID_OPTIONS naming the field."""
    assert base_units("0.5", 6, "deposit") == 500_000 and base_units(2, 6, "budget") == 2_000_000
    assert base_units(Decimal("0.000001"), 6, "deposit") == 1 and base_units(0.001, 18, "deposit") == 10**15
    for bad in (0, -1, "-0.5", float("nan"), float("inf"), True, "lots", None, "0.0000001"):
        with pytest.raises(InvalidOptions) as info:
            base_units(bad, 6, "deposit")
        assert info.value.field == "deposit" and info.value.code == "INVALID_OPTIONS"
    assert format_amount(1_500_000, 6, "USDC") == "1.5 USDC" and format_amount(None, 6, "USDC") == "unlimited"


def test_contract_arithmetic():
    """cost rounds down, a deposit for N tokens pays for at least N, tokens_for is the contract's bound."""
    assert cost_of(1001, 3) == 3 and deposit_for(1001, 3) == 4 and tokens_for(4, 3) >= 1001
    assert tokens_for(500_000, 2000) == 250_000


def test_a_budget_refuses_a_deposit_that_would_pass_it_or_its_parent():
    """Deposits held plus payments spent stay within a budget and its parent's; settling frees the
    unspent part; the refusal is BUDGET_EXCEEDED, not retryable, and says what is left."""
    process = Budget(1_000_000, 6, "USDC", name="the process budget")
    session = Budget(600_000, 6, "USDC", name="session s's budget", parent=process)
    session.check(500_000, "open a job")
    session.hold(500_000)
    assert (process.held, session.remaining, process.remaining) == (500_000, 100_000, 500_000)
    with pytest.raises(BudgetExceeded) as info:
        session.check(200_000, "open a job")
    assert not info.value.retryable and "session s's budget of 0.6 USDC" in info.value.message
    assert "0.1 USDC left" in info.value.message
    other = Budget(None, 6, "USDC", parent=process)
    with pytest.raises(BudgetExceeded, match="the process budget of 1 USDC"):
        other.check(600_000, "open a job")
    session.settle(500_000, 1_000)
    assert (process.held, process.spent, session.remaining) == (0, 1_000, 599_000)
    assert ProofCadence(50).proof_interval == 100  # the contract's minimum
