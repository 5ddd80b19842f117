"""What paid sessions cost, worked out without I/O: the proof cadence, deposits, budgets, reconciliation.

A paid job (spec/PROTOCOL.md §10) is billed for the tokens its host proves, and hosts prove on
production's cadence (``checkpoint_manager.rs``; the reference host's ``host/metering.py``):

- a proof every :data:`PROOF_THRESHOLD` tokens (1000) while an answer streams;
- after each answer, a proof of what is pending when that is at least :data:`MIN_PROOF_TOKENS` (100);
- when the job's connection closes, a proof of whatever is pending, except a remainder under 100
  tokens after an earlier proof (the contract refuses it: those tokens go unbilled);
- the first proof claims at least the job's ``proofInterval`` (minimum billing).

:class:`ProofCadence` replays that cadence from the tokens the host reported per answer, so the
client knows, before settlement, what the chain should bill (:meth:`ProofCadence.settled`), how
much room a job's deposit has left (:meth:`ProofCadence.room`), and why a bill differs from the
tokens streamed (:func:`explain_difference`). :class:`Budget` bounds deposits: a deposit that would
pass a budget is refused before any transaction. Amounts are integers in the payment token's base
units (wei; USDC has 6 decimals); :func:`base_units` reads what a user types.

Nothing here does I/O or imports web3: the payments layer and the usage ledger share it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import BudgetExceeded, InvalidOptions

__all__ = [
    "MIN_PROOF_TOKENS",
    "PROOF_THRESHOLD",
    "PRICE_PRECISION",
    "ProofCadence",
    "Budget",
    "base_units",
    "format_amount",
    "whole_tokens",
    "tokens_for",
    "cost_of",
    "deposit_for",
    "explain_difference",
    "cadence_of",
]

#: Tokens between two proofs while an answer streams (production's CHECKPOINT_THRESHOLD).
PROOF_THRESHOLD = 1000
#: The fewest tokens the contract accepts in a proof.
MIN_PROOF_TOKENS = 100
#: Prices are per 1000 tokens: cost = tokens × price / 1000.
PRICE_PRECISION = 1000


def tokens_for(deposit: int, price_per_token: int) -> int:
    """The tokens a deposit pays for at a price (the contract's bound)."""
    return deposit * PRICE_PRECISION // price_per_token


def cost_of(tokens: int, price_per_token: int) -> int:
    """What ``tokens`` cost at a price, as the contract settles it (rounded down)."""
    return tokens * price_per_token // PRICE_PRECISION


def deposit_for(tokens: int, price_per_token: int) -> int:
    """The smallest deposit that pays for ``tokens`` at a price."""
    return -(-tokens * price_per_token // PRICE_PRECISION)


@dataclass
class ProofCadence:
    """One job's proofs as its host makes them, replayed from the tokens it reported per answer.

    Args:
        proof_interval: the job's ``proofInterval`` (its first proof claims at least this many).
        tokens_used: the job's ``tokensUsed`` when the client took it (0 for a new job).

    Attributes:
        claimed: what the proofs so far add up to (the chain's ``tokensUsed`` once they land).
        pending: tokens streamed since the last proof.
        streamed: tokens the host reported streaming for the job.
        padding: tokens claimed beyond those streamed (the first proof's minimum billing).
        unbilled: tokens streamed that no proof will claim (a remainder under 100 after a proof).
        answers: answers counted.
    """

    proof_interval: int
    tokens_used: int = 0
    claimed: int = 0
    pending: int = 0
    streamed: int = 0
    padding: int = 0
    unbilled: int = 0
    answers: int = 0

    def __post_init__(self) -> None:
        self.proof_interval = max(self.proof_interval, MIN_PROOF_TOKENS)
        self.claimed = max(self.claimed, self.tokens_used)

    def copy(self) -> ProofCadence:
        """An independent copy (to look ahead without changing this one)."""
        return dataclasses.replace(self)

    def _prove(self, tokens: int) -> None:
        if self.claimed == 0 and tokens < self.proof_interval:
            self.padding += self.proof_interval - tokens
            tokens = self.proof_interval
        self.claimed += tokens
        self.pending = 0

    def answer(self, tokens: int) -> None:
        """Count one answer of ``tokens`` tokens (however it ended): proofs while it streamed, and after it."""
        tokens = max(0, int(tokens))
        self.answers += 1
        self.streamed += tokens
        while tokens:
            step = min(tokens, PROOF_THRESHOLD - self.pending)
            self.pending += step
            tokens -= step
            if self.pending >= PROOF_THRESHOLD:
                self._prove(self.pending)
        if self.pending >= MIN_PROOF_TOKENS:
            self._prove(self.pending)

    def most_billable(self) -> int:
        """The most an honest host may have billed for the job: what it had used when the client took
        it, every token the host reported (a node may fold a short tail into a proof in flight
        instead of leaving it unbilled), and for a new job the first proof's padding to
        ``proofInterval``, that proof coming as early as the first :data:`MIN_PROOF_TOKENS` tokens."""
        padding = 0
        if self.streamed and not self.tokens_used:
            padding = max(0, self.proof_interval - min(self.streamed, MIN_PROOF_TOKENS))
        return self.tokens_used + self.streamed + padding

    def settled(self) -> int:
        """The job's ``tokensUsed`` after settlement: the claims so far and the last proof at close."""
        final = self.copy()
        final.settle()
        return final.claimed

    def settle(self) -> None:
        """The job's connection closed: the last proof, or the remainder left unbilled."""
        if self.pending <= 0:
            return
        if self.claimed > 0 and self.pending < MIN_PROOF_TOKENS:
            self.unbilled += self.pending
            self.pending = 0
            return
        self._prove(self.pending)

    def needed_for(self, tokens: int) -> int:
        """The most the job may be billed after an answer of ``tokens`` more: the bound a host checks
        against what the deposit pays for before it sends each token."""
        need = self.claimed + self.pending + max(0, tokens)
        return max(need, self.proof_interval) if self.claimed == 0 else need

    def room(self, max_tokens: int) -> int:
        """How many more tokens an answer may take on a job whose deposit pays for ``max_tokens``
        (the largest ``n`` with ``needed_for(n) <= max_tokens``)."""
        if self.claimed == 0 and self.proof_interval > max_tokens:
            return 0
        return max(0, max_tokens - self.claimed - self.pending)


def explain_difference(billed: int | None, streamed: int, cadence: ProofCadence | None) -> str:
    """Say why the chain billed ``billed`` tokens for a job whose host reported streaming ``streamed``.

    Args:
        billed: the job's settled ``tokensUsed`` (``None`` while it is open).
        streamed: the tokens the client's ledger counts for the job (the hosts' reports).
        cadence: the cadence replayed from the ledger (what the chain should bill), if known.

    Returns:
        ``""`` when the bill matches the tokens streamed, else a lower-case reason.
    """
    if billed is None:
        return "not settled yet"
    if billed == streamed:
        return ""
    expected = cadence.settled() if cadence is not None else None
    reasons = []
    if cadence is not None and billed == expected:
        final = cadence.copy()
        final.settle()
        if final.padding:
            reasons.append(f"minimum billing: the first proof claims the job's proofInterval "
                           f"({final.proof_interval} tokens), {final.padding} more than streamed by then")
        if final.unbilled:
            reasons.append(f"unproven tokens: {final.unbilled} streamed after the last proof, fewer than a "
                           f"proof's {MIN_PROOF_TOKENS}, go unbilled")
        return "; ".join(reasons) or "as the proof cadence implies"
    if expected is not None and billed < expected:
        return (f"unproven tokens: the host proved {expected - billed} fewer than the cadence implies "
                f"(it stopped, or was stopped, before proving them)")
    if expected is not None:
        return f"billed {billed - expected} tokens more than the proof cadence implies for what the host reported"
    return "no ledger records for the job"


# ---------------------------------------------------------------------------- amounts


def base_units(value: Any, decimals: int, what: str) -> int:
    """Read an amount given in whole tokens (``0.5`` USDC, ``"0.001"`` ETH) as base units.

    Raises:
        InvalidOptions: not a finite number above 0, or finer than the token's decimals.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise InvalidOptions(f"{what} must be an amount of tokens (a number above 0), not {value!r}", field=what)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidOptions(f"{what} must be a finite amount, not {value!r}", field=what)
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise InvalidOptions(f"{what} must be an amount of tokens (a number above 0), not {value!r}",
                             field=what) from None
    if not amount.is_finite() or amount <= 0:
        raise InvalidOptions(f"{what} must be above 0, not {value!r}", field=what)
    units = amount.scaleb(decimals)
    if units != units.to_integral_value():
        raise InvalidOptions(f"{what} {value!r} is finer than the token's {decimals} decimals", field=what)
    return int(units)


def format_amount(units: int | None, decimals: int, unit: str) -> str:
    """Show base units as whole tokens: ``format_amount(1_500_000, 6, "USDC") == "1.5 USDC"``."""
    if units is None:
        return "unlimited"
    text = format(Decimal(units).scaleb(-decimals).normalize(), "f")
    return f"{text} {unit}"


def whole_tokens(units: int, decimals: int) -> float:
    """Base units as whole tokens, a float: ``whole_tokens(1_500_000, 6) == 1.5``."""
    scale: int = 10**decimals  # (typeshed types int ** int as Any: a negative power is a float)
    return units / scale


@dataclass
class Budget:
    """A spending cap in base units of one token: deposits held plus payments made stay within it.

    A deposit is *held* from the moment its job opens until the job settles; then its payment is
    *spent* and the rest comes back. A session's budget has the process's as its ``parent``: a
    deposit must fit both.

    Args:
        limit: the cap (``None``: no cap of its own).
        decimals, unit: how to show amounts (``6``, ``"USDC"``).
        name: what the messages call it (``"the process budget"``).
        parent: a budget this one spends from as well.
    """

    limit: int | None
    decimals: int
    unit: str
    name: str = "budget"
    parent: Budget | None = None
    held: int = 0
    spent: int = 0

    def __repr__(self) -> str:
        return (f"Budget({self.name}: {format_amount(self.limit, self.decimals, self.unit)}, "
                f"held {format_amount(self.held, self.decimals, self.unit)}, "
                f"spent {format_amount(self.spent, self.decimals, self.unit)})")

    @property
    def remaining(self) -> int | None:
        """What may still be deposited (the least of this budget's and its parents'), ``None``: no cap."""
        own = None if self.limit is None else max(0, self.limit - self.held - self.spent)
        above = self.parent.remaining if self.parent is not None else None
        if own is None:
            return above
        return own if above is None else min(own, above)

    def check(self, amount: int, what: str) -> None:
        """Refuse a deposit of ``amount`` that would pass this budget or a parent's.

        Raises:
            BudgetExceeded: it would (not retryable; nothing was sent).
        """
        budget: Budget | None = self
        while budget is not None:
            if budget.limit is not None and budget.held + budget.spent + amount > budget.limit:
                left = max(0, budget.limit - budget.held - budget.spent)
                raise BudgetExceeded(
                    f"{what}: a deposit of {format_amount(amount, self.decimals, self.unit)} would pass "
                    f"{budget.name} of {format_amount(budget.limit, self.decimals, self.unit)} "
                    f"({format_amount(left, self.decimals, self.unit)} left; "
                    f"{format_amount(budget.held, self.decimals, self.unit)} held in open jobs)",
                    hint="raise the budget (budget=... or FABSTIR_BUDGET), give a smaller deposit, or end "
                         "sessions to settle their jobs and free what they hold",
                )
            budget = budget.parent

    def hold(self, amount: int) -> None:
        """Hold a deposit (after :meth:`check`), here and in the parents."""
        budget: Budget | None = self
        while budget is not None:
            budget.held += amount
            budget = budget.parent

    def settle(self, deposit: int, payment: int) -> None:
        """A job settled: its deposit is no longer held, its payment is spent."""
        budget: Budget | None = self
        while budget is not None:
            budget.held = max(0, budget.held - deposit)
            budget.spent += payment
            budget = budget.parent


def cadence_of(answers: Iterable[int], proof_interval: int, tokens_used: int = 0) -> ProofCadence:
    """Replay a job's answers (host-reported tokens, in order) through the proof cadence."""
    cadence = ProofCadence(proof_interval, tokens_used)
    for tokens in answers:
        cadence.answer(tokens)
    return cadence

