"""Usage accounting: inference emits :class:`UsageRecord` events, a ledger keeps them.

Usage is an event sink. The inference layer calls ``sink.record(rec)`` once per finished attempt
(success, error or cache hit) and moves on; anything with that method is a :class:`UsageSink`
(a :class:`ListSink` in tests, a :class:`UsageLedger` in the SDK).

:class:`UsageLedger` keeps the records in SQLite. One writer thread owns the connection and does
all SQLite work, reads included, so ``:memory:`` databases work and no event loop ever waits for
the disk:

* :meth:`UsageLedger.record` only puts the record on a queue: it never blocks for long and never
  raises for disk problems (they are logged on the ``fabstir_jupyter.usage`` logger and the
  records are dropped and counted in :attr:`UsageLedger.dropped`);
* the writer commits whatever is queued in one transaction;
* reads (:meth:`~UsageLedger.records`, :meth:`~UsageLedger.to_frame`,
  :meth:`~UsageLedger.summary`) are jobs on the same queue, so they see every record recorded
  before them, flushed or not.

Every record names the process that recorded it (``client_id``, :func:`current_client_id`): the
default ledger is one file shared by every kernel and script of a user, so a notebook can read back
its own records (``client_id=current_client_id()``) or the whole ledger.

A request may take several attempts (a retry after ``HOST_BUSY``, a failover after a broken
stream); the ledger keeps one record per attempt. A request *failed* only if its last attempt
failed; the failed attempts before another attempt of the same request are *retried* attempts
(:func:`summarize`).

Paid sessions (spec/PROTOCOL.md §10) add a second table: one :class:`JobRecord` per job on chain
(its deposit and price when opened, what the chain billed once settled), written with
:meth:`UsageLedger.record_job`. A paid attempt's record names its ``job_id`` and the ``tx_hash``
that opened the job, and its ``cost`` is at the job's own price. :meth:`UsageLedger.reconcile`
puts the two side by side: per job, the tokens and cost the ledger counted against what the chain
billed, and the reason for any difference (minimum billing, unproven tokens).

File databases use WAL mode with ``synchronous=NORMAL``; the schema version is kept in
``PRAGMA user_version`` and older files are migrated when opened. pandas is imported only by the
DataFrame views.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import operator
import os
import queue
import sqlite3
import threading
import time as _time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import platformdirs

from .billing import cadence_of, explain_difference
from .errors import InvalidOptions, LedgerClosed, LedgerUnavailable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "UsageRecord",
    "JobRecord",
    "JOB_COLUMNS",
    "RECONCILE_COLUMNS",
    "reconcile",
    "UsageSink",
    "ListSink",
    "UsageLedger",
    "LedgerClosed",
    "LedgerUnavailable",
    "SCHEMA_VERSION",
    "default_ledger_path",
    "group_cost_unit",
    "current_client_id",
    "summarize",
]

logger = logging.getLogger("fabstir_jupyter.usage")

#: Version of the ``requests`` table, stored in ``PRAGMA user_version``. 1: the first table;
#: 2: adds ``client_id`` (rows from version 1 files have none); 3: adds ``encrypted`` (rows from
#: older files have none); 4: adds ``job_id`` and ``tx_hash`` to requests, and the ``jobs`` table;
#: 5: a job is known by its opening transaction too (``open_tx`` joins the jobs table's key).
SCHEMA_VERSION = 5

MEMORY = ":memory:"
_MAX_BATCH = 10_000  # items drained from the queue into one transaction at most

_T = TypeVar("_T")


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRecord:
    """What one inference attempt used: tokens, time, cost and outcome.

    Fields are keyword-only. Times are seconds; ``time`` is epoch seconds when the request
    started, ``duration`` runs from then to the last frame (or the error), ``ttft`` from then to
    the first token.

    Attributes:
        time: epoch seconds when the request started.
        request_id: the client's id of the request.
        host: the host URL, if a host was chosen.
        host_address: the host's on-chain address, if known.
        model: the model id.
        prompt_tokens: prompt tokens as the host reported them.
        completion_tokens: generated tokens as the host reported them (what the host bills).
        received_tokens: tokens delivered to the caller (after stop sequences and limits).
        total_tokens: total tokens as the host reported them.
        ttft: seconds to the first token; None if none arrived.
        duration: seconds from the start of the request to its end.
        finish_reason: ``"stop"``, ``"length"``, ``"cancelled"``, ``"error"`` or None.
        cost: the price of the request, when the host's price is known.
        cost_unit: the unit of ``cost``, e.g. ``"USDC"`` or ``"ETH"``.
        error_code: the :class:`~fabstir_jupyter.errors.FabstirError` code if the attempt failed.
        cached: whether the answer came from the response cache (no host was asked).
        session_id: the session the request belongs to, if any.
        attempt: the orchestrator's 1-based attempt number.
        kind: ``"stream"``, ``"direct"``, ``"session"``, ``"batch"``...
        client_id: the process that recorded it (:func:`current_client_id`); a
            :class:`UsageLedger` fills it in when it is None. None in rows written before ledgers
            kept it.
        encrypted: whether the attempt sent its request end-to-end encrypted (spec §6); None when
            it sent nothing (a cache hit, a failure before connecting) or in rows written before
            ledgers kept it. A whole stream's record is True only if every attempt was.
        job_id: the paid job (spec §10) the attempt was billed to; None when unpaid.
        tx_hash: the transaction that opened (and paid the deposit of) that job.
    """

    time: float
    request_id: str
    host: str | None = None
    host_address: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    received_tokens: int = 0
    total_tokens: int | None = None
    ttft: float | None = None
    duration: float = 0.0
    finish_reason: str | None = None
    cost: float | None = None
    cost_unit: str | None = None
    error_code: str | None = None
    cached: bool = False
    session_id: str | None = None
    attempt: int = 1
    kind: str = "stream"
    client_id: str | None = None
    encrypted: bool | None = None
    job_id: int | None = None
    tx_hash: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Return the generation rate after the first token, or None where it is undefined.

        A property, never stored: ``(received_tokens - 1) / (duration - ttft)``, the tokens that
        followed the first one over the time they took. So time to first token (queueing, prompt
        processing) does not dilute it. None without a ``ttft``, with fewer than two tokens, or
        when no time passed after the first token.
        """
        if self.ttft is None or self.received_tokens < 2:
            return None
        elapsed = self.duration - self.ttft
        if not elapsed > 0:
            return None
        return (self.received_tokens - 1) / elapsed

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a dict, in field order, plus the derived ``tokens_per_second``.

        The extra key sits after ``duration``; drop it before passing the dict back to
        ``UsageRecord(**...)``.
        """
        data: dict[str, Any] = {}
        for name in _FIELDS:
            data[name] = getattr(self, name)
            if name == "duration":
                data["tokens_per_second"] = self.tokens_per_second
        return data


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageRecord))

_client: tuple[int, str] | None = None


def current_client_id() -> str:
    """Return this process's id in usage records: random, new in every process (so one per kernel).

    A forked child gets an id of its own on its first call.
    """
    global _client
    pid = os.getpid()
    if _client is None or _client[0] != pid:
        _client = (pid, uuid.uuid4().hex[:16])
    return _client[1]


def _stamped(rec: UsageRecord) -> UsageRecord:
    return rec if rec.client_id is not None else dataclasses.replace(rec, client_id=current_client_id())
#: DataFrame columns: every field, with the derived rate after ``duration``.
_FRAME_COLUMNS: tuple[str, ...] = tuple(UsageRecord(time=0.0, request_id="").to_dict())


@runtime_checkable
class UsageSink(Protocol):
    """Anything that takes usage records: a :class:`UsageLedger`, a :class:`ListSink`...

    ``record`` is called from the event loop: it must not block, and should not raise.
    """

    def record(self, rec: UsageRecord) -> None:
        """Take one record."""


class ListSink:
    """A sink that appends records to :attr:`records`, for tests and quick looks."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.jobs: list[JobRecord] = []

    def record(self, rec: UsageRecord) -> None:
        """Append ``rec`` (``list.append`` is atomic, so any thread may call this)."""
        self.records.append(rec)

    def record_job(self, job: JobRecord) -> None:
        """Keep ``job``, replacing an earlier record of the same job."""
        self.jobs = [j for j in self.jobs if _job_key(j) != _job_key(job)] + [job]

    def reconcile(self) -> Any:
        """:func:`reconcile` over what was recorded."""
        return reconcile(self.records, self.jobs)

    def __repr__(self) -> str:
        return f"ListSink(records={len(self.records)}, jobs={len(self.jobs)})"


# --------------------------------------------------------------------------- rows


def _req_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"usage record field {name}: expected str, got {type(value).__name__}")
    return value


def _opt_str(name: str, value: Any) -> str | None:
    return None if value is None else _req_str(name, value)


def _req_int(name: str, value: Any) -> int:
    try:
        return operator.index(value)  # accepts numpy integers, refuses 3.5
    except TypeError:
        raise TypeError(f"usage record field {name}: expected int, got {type(value).__name__}") from None


def _opt_int(name: str, value: Any) -> int | None:
    return None if value is None else _req_int(name, value)


def _opt_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"usage record field {name}: expected float, got {type(value).__name__}") from None
    return None if math.isnan(number) else number


def _req_float(name: str, value: Any) -> float:
    number = _opt_float(name, value)
    if number is None:
        raise ValueError(f"usage record field {name}: must be a number, got {value!r}")
    return number


def _bool(name: str, value: Any) -> int:
    return 1 if value else 0


def _opt_bool(name: str, value: Any) -> int | None:
    return None if value is None else _bool(name, value)


# name → (SQL declaration, converter to a bindable value); the order is the field order.
_COLUMNS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "time": ("REAL NOT NULL", _req_float),
    "request_id": ("TEXT NOT NULL", _req_str),
    "host": ("TEXT", _opt_str),
    "host_address": ("TEXT", _opt_str),
    "model": ("TEXT", _opt_str),
    "prompt_tokens": ("INTEGER", _opt_int),
    "completion_tokens": ("INTEGER", _opt_int),
    "received_tokens": ("INTEGER NOT NULL", _req_int),
    "total_tokens": ("INTEGER", _opt_int),
    "ttft": ("REAL", _opt_float),
    "duration": ("REAL NOT NULL", _req_float),
    "finish_reason": ("TEXT", _opt_str),
    "cost": ("REAL", _opt_float),
    "cost_unit": ("TEXT", _opt_str),
    "error_code": ("TEXT", _opt_str),
    "cached": ("INTEGER NOT NULL", _bool),
    "session_id": ("TEXT", _opt_str),
    "attempt": ("INTEGER NOT NULL", _req_int),
    "kind": ("TEXT NOT NULL", _req_str),
    "client_id": ("TEXT", _opt_str),
    "encrypted": ("INTEGER", _opt_bool),
    "job_id": ("INTEGER", _opt_int),
    "tx_hash": ("TEXT", _opt_str),
}
assert tuple(_COLUMNS) == _FIELDS, "usage columns and UsageRecord fields disagree"

_CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {decl}" for name, (decl, _) in _COLUMNS.items())
    + ")"
)
_CREATE_INDEX = "CREATE INDEX IF NOT EXISTS requests_time ON requests (time)"
_CREATE_CLIENT_INDEX = "CREATE INDEX IF NOT EXISTS requests_client ON requests (client_id, time)"
_CREATE_JOB_INDEX = "CREATE INDEX IF NOT EXISTS requests_job ON requests (job_id)"
#: Statements that bring a table of version N (the key) to version N + 1 (filled in below).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE requests ADD COLUMN client_id TEXT", _CREATE_CLIENT_INDEX),
    2: ("ALTER TABLE requests ADD COLUMN encrypted INTEGER",),
}
_INSERT = f"INSERT INTO requests ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})"
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM requests"


def _row(rec: UsageRecord) -> tuple[Any, ...]:
    return tuple(convert(name, getattr(rec, name)) for name, (_, convert) in _COLUMNS.items())


_SQLITE_BUSY = 5  # SQLite's primary result code for "database is locked" (sqlite3.SQLITE_BUSY from 3.11)


def _locked(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says another connection holds the lock (transient), not a lasting failure."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == _SQLITE_BUSY
    return "database is locked" in str(exc)  # Python 3.10 gives only the message


def _from_row(row: Iterable[Any]) -> UsageRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["cached"] = bool(values["cached"])
    if values["encrypted"] is not None:
        values["encrypted"] = bool(values["encrypted"])
    return UsageRecord(**values)


def _epoch(since: float | datetime | None) -> float | None:
    if since is None:
        return None
    if isinstance(since, datetime):
        return since.timestamp()
    return float(since)


# --------------------------------------------------------------------------- paid jobs


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """One paid job (spec/PROTOCOL.md §10) as the client opened it, and as the chain settled it.

    Amounts are integers in the payment token's base units (``decimals`` places: wei, or USDC's 6);
    ``unit`` names the token. Fields from ``status`` on are filled at settlement.

    Attributes:
        job_id, chain_id, marketplace: which job, on which chain and JobMarketplace.
        host, host_address: the host's URL and registry address.
        model, model_id: the model's id on the host and its registry id (bytes32, 0x hex).
        token, unit, decimals: the payment token (the zero address for the native token).
        deposit, price_per_token, proof_interval: the job's terms.
        open_tx: the transaction that opened the job (and paid the deposit).
        opened_at: epoch seconds.
        kind: ``"session"`` (a session's job) or ``"tab"`` (stateless requests to one host).
        session_id: the session, for a session's job.
        status: ``"open"``, ``"completed"``, ``"timed_out"``, or ``"unsettled"`` (settlement failed:
            the job stays Active on chain; its depositor may complete it later).
        settle_tx, settled_at, settled_by: the settling transaction, when, and who sent it.
        tokens_billed: ``tokensUsed`` as settled (minimum billing included).
        chain_cost: what the chain charged (host earnings + treasury fee).
        host_earnings, treasury_fee, refund: where the deposit went (they add up to it).
        client_id: the process that opened it.
    """

    job_id: int
    chain_id: int
    marketplace: str
    host: str | None
    host_address: str
    model: str | None
    model_id: str
    token: str
    unit: str
    decimals: int
    deposit: int
    price_per_token: int
    proof_interval: int
    open_tx: str
    opened_at: float
    kind: str = "tab"
    session_id: str | None = None
    status: str = "open"
    settle_tx: str | None = None
    settled_at: float | None = None
    settled_by: str | None = None
    tokens_billed: int | None = None
    chain_cost: int | None = None
    host_earnings: int | None = None
    treasury_fee: int | None = None
    refund: int | None = None
    client_id: str | None = None

    def amount(self, units: int | None) -> float | None:
        """``units`` of the payment token as whole tokens (``None`` stays ``None``)."""
        return None if units is None else units / 10**self.decimals


_BIG = frozenset({"deposit", "price_per_token", "chain_cost", "host_earnings", "treasury_fee", "refund"})
#: The ``jobs`` table's columns: every :class:`JobRecord` field (amounts as decimal text: wei pass 2**63).
JOB_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobRecord))


def _job_decl(name: str) -> str:
    if name in _BIG or name in ("marketplace", "host", "host_address", "model", "model_id", "token", "unit",
                                "open_tx", "kind", "session_id", "status", "settle_tx", "settled_by",
                                "client_id"):
        return "TEXT"
    return "REAL" if name in ("opened_at", "settled_at") else "INTEGER"


# A job is known by its chain, marketplace, id and opening transaction: the local network's chain has
# the same chain id and contract addresses in every run, so its job 1 of today is not yesterday's
# (whose opening transaction, from another test account, differs). ``open_tx`` is "" for a job taken
# with ``job_id=`` (its opening transaction unknown).
_CREATE_JOBS = (
    "CREATE TABLE IF NOT EXISTS jobs ("
    + ", ".join(f"{name} {_job_decl(name)}" for name in JOB_COLUMNS)
    + ", PRIMARY KEY (chain_id, marketplace, job_id, open_tx))"
)
_MIGRATIONS[3] = ("ALTER TABLE requests ADD COLUMN job_id INTEGER", "ALTER TABLE requests ADD COLUMN tx_hash TEXT",
                  _CREATE_JOB_INDEX, _CREATE_JOBS)
_MIGRATIONS[4] = ("ALTER TABLE jobs RENAME TO jobs_v4", _CREATE_JOBS,
                  f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) SELECT {', '.join(JOB_COLUMNS)} FROM jobs_v4",
                  "DROP TABLE jobs_v4")
_UPSERT_JOB = f"INSERT OR REPLACE INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})"
_SELECT_JOBS = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"


def _job_row(job: JobRecord) -> tuple[Any, ...]:
    if not isinstance(job, JobRecord):
        raise TypeError(f"usage ledger: expected a JobRecord, got {type(job).__name__}")
    return _JobRow(str(getattr(job, n)) if n in _BIG and getattr(job, n) is not None else getattr(job, n)
                   for n in JOB_COLUMNS)


class _JobRow(tuple[Any, ...]):
    """A ``jobs`` row on the writer's queue (plain tuples are ``requests`` rows)."""

    __slots__ = ()


def _job_from_row(row: Iterable[Any]) -> JobRecord:
    values = dict(zip(JOB_COLUMNS, row, strict=True))
    for name in _BIG:
        if values[name] is not None:
            values[name] = int(values[name])
    return JobRecord(**values)


def _job_key(job: JobRecord) -> tuple[Any, ...]:
    """What tells one job from another (the jobs table's key)."""
    return job.chain_id, job.marketplace, job.job_id, job.open_tx


#: The columns of :func:`reconcile`'s frame, in order.
RECONCILE_COLUMNS = (
    "job_id", "kind", "session_id", "host", "model", "unit", "status", "deposit", "requests", "received_tokens",
    "ledger_tokens", "ledger_cost", "expected_tokens", "billed_tokens", "chain_cost", "host_earnings",
    "treasury_fee", "refund", "token_difference", "cost_difference", "agrees", "reason", "open_tx", "settle_tx",
)


def reconcile(records: Iterable[UsageRecord], jobs: Iterable[JobRecord]) -> pd.DataFrame:
    """Compare, job by job, what the ledger counted with what the chain billed.

    Per job: the attempts billed to it (``requests``), the tokens they received and the tokens the
    hosts reported generating (``ledger_tokens``: what a host bills), their cost at the job's price
    (``ledger_cost``), the tokens the proof cadence implies for them (``expected_tokens``), and the
    chain's settlement (``billed_tokens``, ``chain_cost``, ``host_earnings``, ``treasury_fee``,
    ``refund``; empty while open). ``token_difference`` is billed minus ledger tokens,
    ``cost_difference`` chain minus ledger cost; ``agrees`` says whether the chain billed what the
    cadence implies; ``reason`` explains a difference (``billing.explain_difference``). Amounts are
    whole tokens of the job's ``unit``.
    """
    import pandas as pd

    by_job: dict[tuple[int, str], list[UsageRecord]] = {}  # an attempt names its job's opening transaction too
    for rec in sorted(records, key=lambda r: r.time):
        if rec.job_id is not None and not rec.cached:
            by_job.setdefault((rec.job_id, rec.tx_hash or ""), []).append(rec)
    rows = []
    for job in sorted(jobs, key=lambda j: j.opened_at):
        attempts = by_job.get((job.job_id, job.open_tx or ""), [])
        answers = [rec.completion_tokens or 0 for rec in attempts]
        cadence = cadence_of(answers, job.proof_interval)
        ledger_tokens = sum(answers)
        ledger_cost = sum(answers) * job.price_per_token / 1000 / 10**job.decimals
        billed = job.tokens_billed  # None until the job settled
        chain_cost = job.amount(job.chain_cost)
        rows.append({
            "job_id": job.job_id, "kind": job.kind, "session_id": job.session_id, "host": job.host,
            "model": job.model, "unit": job.unit, "status": job.status, "deposit": job.amount(job.deposit),
            "requests": len(attempts), "received_tokens": sum(r.received_tokens for r in attempts),
            "ledger_tokens": ledger_tokens, "ledger_cost": ledger_cost, "expected_tokens": cadence.settled(),
            "billed_tokens": job.tokens_billed, "chain_cost": chain_cost,
            "host_earnings": job.amount(job.host_earnings), "treasury_fee": job.amount(job.treasury_fee),
            "refund": job.amount(job.refund),
            "token_difference": billed - ledger_tokens if billed is not None else None,
            "cost_difference": chain_cost - ledger_cost if chain_cost is not None else None,
            "agrees": (billed == cadence.settled()) if billed is not None else None,
            "reason": explain_difference(job.tokens_billed, ledger_tokens, cadence),
            "open_tx": job.open_tx, "settle_tx": job.settle_tx,
        })
    dtypes = {"job_id": "int64", "requests": "int64", "received_tokens": "int64", "ledger_tokens": "int64",
              "expected_tokens": "int64", "billed_tokens": "Int64", "token_difference": "Int64", "agrees": "boolean",
              "deposit": "float64", "ledger_cost": "float64", "chain_cost": "float64", "host_earnings": "float64",
              "treasury_fee": "float64", "refund": "float64", "cost_difference": "float64"}
    frame: pd.DataFrame = pd.DataFrame({name: pd.Series([row[name] for row in rows], dtype=dtypes.get(name, "string"))
                                        for name in RECONCILE_COLUMNS})
    return frame


# --------------------------------------------------------------------------- the ledger


def default_ledger_path() -> Path:
    """Return where a ledger lives by default: ``usage.sqlite3`` in the user data directory."""
    return Path(platformdirs.user_data_dir("fabstir-jupyter")) / "usage.sqlite3"


class _Job(Generic[_T]):
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], _T]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[_T] = concurrent.futures.Future()


_STOP = object()


class UsageLedger:
    """A persistent :class:`UsageSink`: usage records in SQLite, written by one thread.

    Construction opens (and if needed creates) the database on the writer thread and waits for
    it, so a bad path fails here. Owners must call :meth:`close` (or use ``with``); the writer is
    a daemon thread and nothing is registered with :mod:`atexit`.

    Args:
        path: the database file; None for :func:`default_ledger_path`, ``":memory:"`` for a
            private in-memory database. Missing parent directories are created.
        timeout: seconds to wait for opening the database and for each read.
        busy_timeout: seconds SQLite waits for another process's lock before a write fails (the
            batch is then dropped and logged).

    Raises:
        LedgerUnavailable: the database cannot be opened, created or written (a read-only file is
            found here, by a write that is rolled back), or its schema is newer than this package's.
        InvalidOptions: ``path`` is empty.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        busy_timeout: float = 5.0,
    ) -> None:
        if path is None:
            path = default_ledger_path()
        text = os.fspath(path)
        if not isinstance(text, str) or not text.strip():
            raise InvalidOptions(f"usage ledger path must name a file or ':memory:', not {text!r}", field="path",
                                 hint="pass None for the default ledger in the user's data directory")
        self._memory = text == MEMORY
        self._path = MEMORY if self._memory else str(Path(text).expanduser().absolute())
        self._timeout = timeout
        self._busy_timeout = busy_timeout
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed, _pending, _dropped and queue puts vs close
        self._closed = False
        self._pending = 0
        self._dropped = 0
        self._commits = 0
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="fabstir-usage-writer", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout)
        except concurrent.futures.TimeoutError:
            self._closed = True
            self._queue.put(_STOP)
            raise LedgerUnavailable(f"usage ledger {self._path}: not open within {timeout:g} s") from None
        except LedgerUnavailable:
            self._closed = True
            raise
        except Exception as exc:
            self._closed = True
            raise LedgerUnavailable(f"usage ledger {self._path}: cannot open: {exc}") from exc

    # ------------------------------------------------------------------ state

    @property
    def path(self) -> str:
        """The absolute database path, or ``":memory:"``."""
        return self._path

    @property
    def pending(self) -> int:
        """Records recorded but not yet committed (or dropped)."""
        return self._pending

    @property
    def dropped(self) -> int:
        """Records lost to write errors since the ledger opened (each loss is logged)."""
        return self._dropped

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        extra = ", closed=True" if self._closed else ""
        return f"UsageLedger(path={self._path!r}, pending={self._pending}{extra})"

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def record(self, rec: UsageRecord) -> None:
        """Queue ``rec`` for the writer thread and return at once.

        Safe from any thread and from the event loop: this is a queue put, never disk I/O. Disk
        problems surface later in the log and in :attr:`dropped`, never here.

        Raises:
            LedgerClosed: :meth:`close` was called.
            TypeError: ``rec`` is not a :class:`UsageRecord` or a field has the wrong type.
            ValueError: ``time`` or ``duration`` is not a number.
        """
        if not isinstance(rec, UsageRecord):
            raise TypeError(f"usage ledger: expected a UsageRecord, got {type(rec).__name__}")
        row = _row(_stamped(rec))
        with self._lock:
            if self._closed:
                raise LedgerClosed(f"usage ledger {self._path}: closed")
            self._pending += 1
            self._queue.put(row)

    def record_job(self, job: JobRecord) -> None:
        """Queue ``job`` (a new job, or the same job settled: the later record replaces the earlier).

        Like :meth:`record`: a queue put, never disk I/O; stamped with this process's id.

        Raises:
            LedgerClosed: :meth:`close` was called.
            TypeError: ``job`` is not a :class:`JobRecord`.
        """
        if job.client_id is None:
            job = dataclasses.replace(job, client_id=current_client_id())
        row = _job_row(job)
        with self._lock:
            if self._closed:
                raise LedgerClosed(f"usage ledger {self._path}: closed")
            self._pending += 1
            self._queue.put(row)

    def jobs(self, *, client_id: str | None = None) -> list[JobRecord]:
        """Return the paid jobs recorded, oldest first (every process's, or ``client_id``'s).

        Raises:
            LedgerClosed, LedgerUnavailable, TimeoutError: as :meth:`records`.
        """
        def read(conn: sqlite3.Connection) -> list[JobRecord]:
            sql, params = _SELECT_JOBS, []
            if client_id is not None:
                sql += " WHERE client_id = ?"
                params.append(client_id)
            return [_job_from_row(row) for row in conn.execute(sql + " ORDER BY opened_at", params).fetchall()]

        return self._call(read, self._timeout)

    def jobs_frame(self, *, client_id: str | None = None) -> pd.DataFrame:
        """The paid jobs as a DataFrame, one row per job (amounts in base units, as on chain)."""
        import pandas as pd

        jobs = self.jobs(client_id=client_id)
        frame: pd.DataFrame = pd.DataFrame([dataclasses.asdict(job) for job in jobs], columns=list(JOB_COLUMNS))
        return frame

    def reconcile(self, *, client_id: str | None = None) -> pd.DataFrame:
        """Per paid job, the ledger's tokens and cost beside what the chain billed (:func:`reconcile`).

        Args:
            client_id: only this process's jobs (``current_client_id()``); ``None``: every process's.
        """
        jobs = self.jobs(client_id=client_id)
        records = self.records(client_id=client_id)
        return reconcile(records, jobs)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record queued before this call is committed (or dropped and logged).

        Returns at once after :meth:`close`, which already drained the queue.

        Raises:
            TimeoutError: the writer did not get there within ``timeout`` seconds; the records
                stay queued.
        """
        if self._closed:
            return
        try:
            self._call(lambda conn: None, timeout)
        except LedgerClosed:
            return  # closed meanwhile: close() drains

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, close the database and stop the writer thread.

        Idempotent. Afterwards :meth:`record` and reads raise :class:`LedgerClosed`. If the writer
        does not finish within ``timeout`` seconds a warning is logged and the daemon thread is
        left to finish (or die with the process).
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("usage ledger %s: writer still busy after %g s; %d records pending",
                           self._path, timeout, self._pending)

    # ------------------------------------------------------------------ reading

    def records(self, since: float | datetime | None = None, limit: int | None = None, *,
                client_id: str | None = None) -> list[UsageRecord]:
        """Return the records, oldest first, including every one recorded before this call.

        Args:
            since: keep records whose ``time`` is at or after this (epoch seconds or datetime).
            limit: keep only the newest ``limit`` of them.
            client_id: keep only the records of this process id (``current_client_id()``: this
                kernel's); None keeps every process's.

        Raises:
            LedgerClosed: :meth:`close` was called.
            LedgerUnavailable: the database could not be read.
            TimeoutError: the writer did not answer within the ledger's ``timeout``.
        """
        start = _epoch(since)
        if limit is not None:
            limit = operator.index(limit)
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")

        def read(conn: sqlite3.Connection) -> list[UsageRecord]:
            sql = _SELECT
            params: list[object] = []
            where = []
            if start is not None:
                where.append("time >= ?")
                params.append(start)
            if client_id is not None:
                where.append("client_id = ?")
                params.append(client_id)
            if where:
                sql += " WHERE " + " AND ".join(where)
            if limit is None:
                rows = conn.execute(sql + " ORDER BY time, id", params).fetchall()
            else:
                rows = conn.execute(sql + " ORDER BY time DESC, id DESC LIMIT ?", [*params, limit]).fetchall()
                rows.reverse()
            return [_from_row(row) for row in rows]

        return self._call(read, self._timeout)

    def to_frame(self, since: float | datetime | None = None, limit: int | None = None, *,
                 client_id: str | None = None) -> pd.DataFrame:
        """Return the records as a pandas DataFrame, one row per record, oldest first.

        Columns are the :class:`UsageRecord` fields in order, with the derived
        ``tokens_per_second`` after ``duration``. Dtypes are fixed, also when empty: ``float64``
        for times, rates and cost (NaN when unknown), ``Int64`` for host-reported token counts
        (``<NA>`` when unknown), ``int64`` for ``received_tokens`` and ``attempt``, ``bool`` for
        ``cached``, ``string`` for text. ``time`` stays epoch seconds
        (``pd.to_datetime(df.time, unit="s")`` converts).

        Arguments and errors are those of :meth:`records`; pandas is imported here.
        """

        return _records_frame(self.records(since=since, limit=limit, client_id=client_id))

    def summary(self, by: str | tuple[str, ...] = "host", since: float | datetime | None = None, *,
                client_id: str | None = None) -> pd.DataFrame:
        """Return usage per group, one row per distinct value of ``by`` (missing values included).

        The columns are those of :func:`summarize`: ``requests``, ``attempts``, ``failed``,
        ``retried``, token sums, ``cost``, ``cost_unit``, ``mean_ttft``, ``mean_tokens_per_second``.

        Args:
            by: a column name, or a tuple of them: ``"host"``, ``"model"``, ``("host", "model")``...
            since, client_id: as in :meth:`records`.

        Raises:
            ValueError: ``by`` names no column.
            LedgerClosed, LedgerUnavailable, TimeoutError: as in :meth:`records`.
        """
        _group_keys(by)  # a bad column fails before the read
        return summarize(self.to_frame(since=since, client_id=client_id), by)

    # ------------------------------------------------------------------ the writer thread

    def _call(self, fn: Callable[[sqlite3.Connection], _T], timeout: float) -> _T:
        """Run ``fn(connection)`` on the writer thread after everything queued so far."""
        job = _Job(fn)
        with self._lock:
            if self._closed:
                raise LedgerClosed(f"usage ledger {self._path}: closed")
            self._queue.put(job)
        try:
            return job.future.result(timeout)
        except concurrent.futures.TimeoutError:
            job.future.cancel()
            raise TimeoutError(f"usage ledger {self._path}: no answer from the writer within {timeout:g} s") from None
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"usage ledger {self._path}: read failed: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        if not self._memory:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        try:
            if not self._memory:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    logger.warning("usage ledger %s: journal mode is %s, not wal", self._path, mode)
                conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerUnavailable(
                    f"usage ledger {self._path}: schema version {version} is newer than this package's "
                    f"{SCHEMA_VERSION}",
                    hint="upgrade fabstir-jupyter or use another path",
                )
            if version < SCHEMA_VERSION:
                self._create_or_migrate(conn)
            self._check_writable(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        """Create the table, or bring an older one to :data:`SCHEMA_VERSION`, in one transaction.

        The version is read again under the write lock: another process may have done it meanwhile.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(_CREATE_TABLE)
                conn.execute(_CREATE_INDEX)
                conn.execute(_CREATE_CLIENT_INDEX)
                conn.execute(_CREATE_JOB_INDEX)
                conn.execute(_CREATE_JOBS)
            else:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
                if version < SCHEMA_VERSION:
                    logger.info("usage ledger %s: migrated from schema %d to %d", self._path, version,
                                SCHEMA_VERSION)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _check_writable(self, conn: sqlite3.Connection) -> None:
        """Write once in a transaction that is rolled back, so a read-only file fails here, not on
        every record later. Another process's lock is transient: it only delays the check."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                logger.warning("usage ledger %s: locked by another process; not checked for writing", self._path)
                return
            raise LedgerUnavailable(
                f"usage ledger {self._path}: cannot write: {exc}",
                hint="make the file and its directory writable, or pass another path (':memory:' keeps no file)",
            ) from exc

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._open()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            stop = False
            while not stop:
                items = [self._queue.get()]
                while len(items) < _MAX_BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                rows: list[tuple[Any, ...]] = []
                for item in items:
                    if isinstance(item, tuple):
                        rows.append(item)
                        continue
                    self._write(conn, rows)  # jobs see every record queued before them
                    rows = []
                    if item is _STOP:
                        stop = True  # record() refuses after _STOP is queued: nothing follows it
                        break
                    self._run_job(conn, item)
                self._write(conn, rows)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        started = _time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, [row for row in rows if not isinstance(row, _JobRow)])
            conn.executemany(_UPSERT_JOB, [row for row in rows if isinstance(row, _JobRow)])
            conn.execute("COMMIT")
            self._commits += 1
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            with self._lock:
                self._dropped += len(rows)
            logger.error("usage ledger %s: dropped %d records after %.3g s: %s",
                         self._path, len(rows), _time.monotonic() - started, exc)
        finally:
            with self._lock:
                self._pending -= len(rows)

    @staticmethod
    def _run_job(conn: sqlite3.Connection, job: _Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # the caller timed out and gave up
        try:
            job.future.set_result(job.fn(conn))
        except BaseException as exc:
            job.future.set_exception(exc)


_FrameDtype: TypeAlias = Literal["bool", "boolean", "int64", "Int64", "float64", "string"]


def _frame_dtype(name: str) -> _FrameDtype:
    decl = _COLUMNS[name][0] if name in _COLUMNS else "REAL"
    if name == "cached":
        return "bool"
    if name == "encrypted":
        return "boolean"  # pandas' nullable bool: unknown in older rows
    if decl.startswith("INTEGER"):
        return "int64" if decl.endswith("NOT NULL") else "Int64"
    if decl.startswith("REAL"):
        return "float64"
    return "string"


def group_cost_unit(values: Any) -> str | None:
    """The cost unit of a group of usage records (a pandas Series): the one unit, ``"mixed"``, or
    ``None`` when none is known."""
    units = set(values.dropna())
    if not units:
        return None
    return str(units.pop()) if len(units) == 1 else "mixed"


def _records_frame(recs: Iterable[UsageRecord]) -> pd.DataFrame:
    import pandas as pd

    dicts = [rec.to_dict() for rec in recs]
    frame: pd.DataFrame = pd.DataFrame(
        {name: pd.Series([d[name] for d in dicts], dtype=_frame_dtype(name)) for name in _FRAME_COLUMNS}
    )
    return frame


#: Values for columns a hand-made records frame may lack (anything else missing is unknown: NA).
_DEFAULTS: dict[str, Any] = {"time": 0.0, "received_tokens": 0, "duration": 0.0, "cached": False, "attempt": 1,
                             "kind": "stream"}


def _complete(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every column of :meth:`UsageLedger.to_frame` (a row without a request id is a
    request of its own), in that column's dtype."""
    import pandas as pd

    missing = [name for name in _FRAME_COLUMNS if name not in frame.columns]
    if not missing:
        return frame
    frame = frame.copy()
    for name in missing:
        if name == "request_id":
            frame[name] = [f"row-{i}" for i in range(len(frame))]
        elif name in _DEFAULTS:
            frame[name] = _DEFAULTS[name]
        else:
            frame[name] = None
        frame[name] = frame[name].astype(_frame_dtype(name)) if len(frame) else pd.Series(dtype=_frame_dtype(name))
    return frame


def _group_keys(by: str | tuple[str, ...] | list[str]) -> list[str]:
    keys = [by] if isinstance(by, str) else list(by)
    if not keys:
        raise ValueError("summary needs at least one column to group by")
    for key in keys:
        if key not in _FRAME_COLUMNS:
            raise ValueError(f"cannot group usage by {key!r}: not a column")
    return keys


def summarize(frame: pd.DataFrame, by: str | tuple[str, ...] = "host") -> pd.DataFrame:
    """Summarise a records frame (:meth:`UsageLedger.to_frame`) per group of ``by`` (missing values
    included), one row per group, indexed by ``by``.

    Columns:
        requests: requests whose last attempt is in the group (each request counts once, where it ended);
        attempts: records (attempts) in the group;
        failed: requests whose last attempt failed (has an ``error_code``);
        retried: failed attempts that another attempt of the same request followed (a ``HOST_BUSY``
            retry, a failover): they did not fail the request;
        prompt_tokens, completion_tokens, received_tokens: sums of the known counts;
        cost: the sum of known costs; NaN when none is known or the group mixes units;
        cost_unit: the group's one unit, ``"mixed"``, or missing;
        mean_ttft, mean_tokens_per_second: means over the records where they are known.

    The last attempt of a request is its highest ``attempt`` number (the latest ``time`` among equals),
    within ``frame``: summarise whole requests, not a ``limit`` cut through one.

    Raises:
        ValueError: ``by`` names no column.
    """
    import pandas as pd

    keys = _group_keys(by)
    frame = _complete(frame.reset_index(drop=True))
    order = frame.sort_values(["attempt", "time"], kind="stable")
    last = pd.Series(False, index=frame.index)
    last[order.drop_duplicates("request_id", keep="last").index] = True
    failed = frame["error_code"].notna()
    frame = frame.assign(_last=last, _failed=last & failed, _retried=~last & failed)
    groups = frame.groupby(keys if len(keys) > 1 else keys[0], dropna=False, sort=True)
    units = groups["cost_unit"].agg(group_cost_unit).astype("string")
    cost = groups["cost"].sum(min_count=1).astype("float64")
    cost = cost.mask(units == "mixed")
    summary: pd.DataFrame = pd.DataFrame(
        {
            "requests": groups["_last"].sum().astype("int64"),
            "attempts": groups.size().astype("int64"),
            "failed": groups["_failed"].sum().astype("int64"),
            "retried": groups["_retried"].sum().astype("int64"),
            "prompt_tokens": groups["prompt_tokens"].sum().astype("Int64"),
            "completion_tokens": groups["completion_tokens"].sum().astype("Int64"),
            "received_tokens": groups["received_tokens"].sum().astype("int64"),
            "cost": cost,
            "cost_unit": units,
            "mean_ttft": groups["ttft"].mean().astype("float64"),
            "mean_tokens_per_second": groups["tokens_per_second"].mean().astype("float64"),
        }
    )
    return summary
