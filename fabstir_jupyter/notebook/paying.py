"""What the notebook shows about paying: the wallet summary and a settled session's receipt.

:class:`WalletSummary` is what ``%fabstir wallet`` returns: the paying address (never the key),
balances, open jobs, what this kernel spent and the budget; on a network that pays nothing it says
why. :class:`SettlementReceipt` is what ``%fabstir end NAME`` returns for a paid session: each job's
settlement as the chain recorded it (tokens billed, cost, host earnings, treasury fee, refund, the
transactions) and whether the usage ledger agrees with the chain.

Both are plain display objects: ``text/plain`` for terminals and nbval, escaped ``text/html`` for
notebooks, their data as attributes and DataFrames. They are built from what the payments layer
exposes (:class:`~fabstir_jupyter.payments.Payments`, :class:`~fabstir_jupyter.payments.JobSettlement`);
nothing here does I/O or imports IPython, and no key ever reaches them (a
:class:`~fabstir_jupyter.wallet.Wallet` shows only its address and source).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..billing import format_amount
from .rendering import STATUS_PREFIX
from .tables import job_rows, jobs_dataframe

if TYPE_CHECKING:
    import pandas as pd

    from ..payments import JobSettlement, Payments
    from ..wallet import Wallet

__all__ = ["WalletSummary", "SettlementReceipt", "LedgerCheck", "short_hash", "whole", "wallet_summary"]


def short_hash(value: str | None) -> str:
    """``0x1234…abcd`` for a transaction hash or an address; ``—`` for none."""
    if not value:
        return "—"
    return value if len(value) <= 14 else f"{value[:6]}…{value[-4:]}"


def whole(value: float | None, unit: str | None = None) -> str:
    """An amount in whole tokens without an exponent or trailing zeros (``0.00018 USDC``): at most 6
    decimals, or 3 significant digits below 0.0001; ``—`` for none."""
    if value is None:
        return "—"
    if value != 0 and abs(value) < 1e-4:
        text = format(Decimal(f"{value:.3g}"), "f")
    else:
        text = f"{value:,.6f}".rstrip("0").rstrip(".")
    return f"{text} {unit}" if unit else text


def _rows_text(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max((len(label) for label, _ in rows), default=0) + 2
    return "\n".join([title] + [f"  {label:<{width}}{value}" for label, value in rows])


def _rows_html(title: str, rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th style=\"text-align: left; padding-right: 1em\">{html.escape(label)}</th>"
                   f"<td style=\"text-align: left\">{html.escape(value)}</td></tr>" for label, value in rows)
    table = f'<table border="0">{body}</table>' if rows else ""
    return f'<div class="fabstir-paying"><p><strong>{html.escape(title)}</strong></p>{table}</div>'


# --------------------------------------------------------------------------- %fabstir wallet


@dataclass
class WalletSummary:
    """What ``%fabstir wallet`` shows. Amounts are whole tokens of ``unit``.

    Attributes:
        network: the network's name.
        paid: whether this kernel pays for answers on it (a wallet and a budget).
        address: the paying account (``None``: no wallet); its key is never here.
        source: where the wallet's key came from (``"the local network's test account"``...).
        note: why nothing is paid, or what is missing (``""`` when paying works).
        unit: the payment token (``"USDC"``).
        balances: the wallet's balances by token (the payment token's and the native one's), when read.
        balance_error: why they could not be read, if so.
        jobs: the open jobs, rows of :data:`~.tables.JOB_COLUMNS` (``billed``: an estimate until settled).
        settled: what this kernel's settled jobs cost.
        running: what its open jobs have billed so far (an estimate until they settle).
        held: what open jobs hold in deposits.
        budget: the process budget (``None``: no cap).
        remaining: what may still be deposited under it.
    """

    network: str
    paid: bool
    address: str | None = None
    source: str | None = None
    note: str = ""
    unit: str | None = None
    balances: dict[str, float] | None = None
    balance_error: str | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    settled: float = 0.0
    running: float = 0.0
    held: float = 0.0
    budget: float | None = None
    remaining: float | None = None

    @property
    def spent(self) -> float:
        """What this kernel spent: settled jobs, plus what open jobs have billed so far (estimated)."""
        return self.settled + self.running

    @property
    def jobs_frame(self) -> pd.DataFrame:
        """The open jobs as a DataFrame (:data:`~.tables.JOB_COLUMNS`)."""
        return jobs_dataframe(self.jobs)

    def _title(self) -> str:
        if self.address is None:
            return f"{STATUS_PREFIX} no wallet on network {self.network}: {self.note}"
        title = f"{STATUS_PREFIX} wallet {self.address}" + (f" ({self.source})" if self.source else "")
        title += f" on {self.network}"
        return f"{title}: {self.note}" if self.note else title

    def _rows(self) -> list[tuple[str, str]]:
        if self.address is None:
            return []
        rows: list[tuple[str, str]] = []
        if self.balances is not None:
            rows.append(("balances", ", ".join(whole(amount, token) for token, amount in self.balances.items())))
        elif self.balance_error:
            rows.append(("balances", f"unavailable: {self.balance_error}"))
        if not self.paid:
            return rows
        unit = self.unit
        rows.append(("open jobs", str(len(self.jobs)) if self.jobs else "none"))
        for job in self.jobs:
            rows.append((f"  job {job['job_id']}",
                         f"{job['host']}, {job['model']}: deposit {whole(job['deposit'], job['unit'])}, billed so far "
                         f"≈{whole(job['billed'], job['unit'])} ({job['tokens']} tokens, est.), {job['status']}"))
        rows.append(("spent", f"{whole(self.spent, unit)} in this kernel ({whole(self.settled, unit)} settled + "
                              f"≈{whole(self.running, unit)} billed so far in open jobs, est.)"))
        if self.budget is None:
            rows.append(("budget", f"none (no cap); {whole(self.held, unit)} held in open jobs"))
        else:
            rows.append(("budget", f"{whole(self.budget, unit)}: {whole(self.remaining, unit)} left "
                                   f"({whole(self.held, unit)} held in open jobs)"))
        return rows

    def __repr__(self) -> str:
        return _rows_text(self._title(), self._rows())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        return _rows_html(self._title(), self._rows())


def wallet_summary(network: str, wallet: Wallet | None, payments: Payments | None, *, note: str = "",
                   balances: dict[str, float] | None = None, balance_error: str | None = None) -> WalletSummary:
    """Build the wallet summary of a network from what its SDK has (read on the payments' event loop).

    Args:
        network: the network's name.
        wallet: the SDK's wallet, if any.
        payments: the inference manager's payments (``None``: nothing is paid).
        note: why nothing is paid (when ``payments`` is ``None``).
        balances, balance_error: the wallet's balances (``Payments.balance()``), or why they are unknown.
    """
    if payments is None:
        return WalletSummary(network, False, address=None if wallet is None else wallet.address,
                             source=None if wallet is None else wallet.source, note=note, balances=balances,
                             balance_error=balance_error)
    if balances is not None:  # the payment token first, then the native one (gas)
        balances = dict(sorted(balances.items(), key=lambda item: item[0] != payments.unit))
    jobs = [row for row in job_rows(payments) if row["status"] not in ("completed", "timed_out")]
    budget = payments.budget
    limit = None
    if budget is not None and budget.limit is not None:
        limit = budget.limit / 10**budget.decimals
    elif budget is None and payments.config.budget is not None:
        limit = float(payments.config.budget)  # no job yet: the token's decimals are not read
    return WalletSummary(
        network, True, address=payments.address, source=payments.wallet.source, unit=payments.unit,
        balances=balances, balance_error=balance_error, jobs=jobs, settled=payments.spent,
        running=sum(row["billed"] or 0.0 for row in jobs), held=payments.held, budget=limit,
        remaining=payments.remaining if budget is not None else limit,
    )


# --------------------------------------------------------------------------- %fabstir end NAME


@dataclass(frozen=True)
class LedgerCheck:
    """What the usage ledger says of one settled job, beside the chain (a row of ``reconcile()``).

    Attributes:
        ledger_tokens: the tokens the hosts reported for the job's requests, as the ledger recorded them.
        expected_tokens: what the proof cadence implies the chain bills for those.
        billed_tokens: what the chain billed.
        agrees: whether the chain billed what the cadence implies.
        reason: why the bill differs from the tokens streamed (``""``: it does not).
        source: ``"usage ledger"``, or ``"client count"`` where the ledger keeps no jobs.
    """

    ledger_tokens: int
    expected_tokens: int
    billed_tokens: int
    agrees: bool
    reason: str
    source: str = "usage ledger"


@dataclass
class SettlementReceipt:
    """What ``%fabstir end NAME`` returns for a paid session: its jobs' settlements, read back from the
    chain, and the usage ledger's check of each (amounts in the settlements are base units).

    Attributes:
        name: the session's name.
        turns: its completed turns.
        settlements: one :class:`~fabstir_jupyter.payments.JobSettlement` per job, oldest first.
        checks: the ledger's check per job id.
    """

    name: str
    turns: int
    settlements: list[JobSettlement]
    checks: dict[int, LedgerCheck] = field(default_factory=dict)

    @property
    def settlement(self) -> JobSettlement | None:
        """The last job's settlement."""
        return self.settlements[-1] if self.settlements else None

    @property
    def agrees(self) -> bool:
        """Whether, for every job, the ledger agrees with the chain and the deposit's parts add up."""
        return all(s.adds_up and self.check(s).agrees for s in self.settlements)

    def check(self, settlement: JobSettlement) -> LedgerCheck:
        """The ledger's check of ``settlement`` (the client's own count where the ledger has none)."""
        found = self.checks.get(settlement.job_id)
        if found is not None:
            return found
        return LedgerCheck(settlement.streamed_tokens, settlement.expected_tokens, settlement.tokens_billed,
                           settlement.agrees, settlement.reason, source="client count")

    @property
    def frame(self) -> pd.DataFrame:
        """The settlements as a DataFrame, one row per job, amounts in whole tokens."""
        import pandas as pd

        rows = []
        for s in self.settlements:
            check = self.check(s)
            rows.append({
                "job_id": s.job_id, "host": s.host, "model": s.model, "status": s.status,
                "deposit": s.amount(s.deposit), "tokens_billed": s.tokens_billed, "cost": s.amount(s.cost),
                "host_earnings": s.amount(s.host_earnings), "treasury_fee": s.amount(s.treasury_fee),
                "refund": s.amount(s.refund), "unit": s.unit, "open_tx": s.open_tx, "settle_tx": s.settle_tx,
                "settled_by": s.settled_by, "ledger_tokens": check.ledger_tokens,
                "expected_tokens": check.expected_tokens, "agrees": check.agrees, "reason": check.reason,
            })
        frame: pd.DataFrame = pd.DataFrame(rows)
        return frame

    def _parts(self) -> list[tuple[str, list[tuple[str, str]]]]:
        parts = []
        for s in self.settlements:
            show = functools.partial(format_amount, decimals=s.decimals, unit=s.unit)
            by = {"client": "this wallet", "host": "the host", "other": "someone else (a timeout)"}.get(
                s.settled_by, s.settled_by)
            check = self.check(s)
            billed = f"{s.tokens_billed}"
            if s.reason:
                billed += f" (the host reported {s.streamed_tokens}; {s.reason})"
            refund = f"{show(s.refund)} of the {show(s.deposit)} deposit"
            if not s.adds_up:
                refund += " (host earnings + treasury fee + refund do NOT add up to the deposit)"
            if check.agrees:
                ledger = (f"agrees with the chain: {check.billed_tokens} tokens billed, as the proof cadence "
                          f"implies for the {check.ledger_tokens} the {check.source} counts")
            else:
                ledger = (f"does NOT agree with the chain: it implies {check.expected_tokens} tokens for the "
                          f"{check.ledger_tokens} it counts, the chain billed {check.billed_tokens}"
                          + (f" ({check.reason})" if check.reason else ""))
            rows = [
                ("tokens billed", billed),
                ("cost", show(s.cost)),
                ("host earnings", show(s.host_earnings)),
                ("treasury fee", show(s.treasury_fee)),
                ("refund", refund),
                ("transactions", f"opened {short_hash(s.open_tx)}, settled {short_hash(s.settle_tx)}"),
                ("ledger", ledger),
            ]
            title = (f"{STATUS_PREFIX} session {self.name!r}: job {s.job_id} {s.status.replace('_', ' ')} "
                     f"(settled by {by})")
            parts.append((title, rows))
        return parts

    def __repr__(self) -> str:
        return "\n".join(_rows_text(title, rows) for title, rows in self._parts())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        return "\n".join(_rows_html(title, rows) for title, rows in self._parts())
