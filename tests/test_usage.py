"""Tests for fabstir_jupyter.usage: records, the SQLite ledger and its pandas views."""

from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from _timing import poll_until
from fabstir_jupyter import usage
from fabstir_jupyter.errors import FabstirError
from fabstir_jupyter.usage import (
    SCHEMA_VERSION,
    JobRecord,
    LedgerClosed,
    LedgerUnavailable,
    ListSink,
    UsageLedger,
    UsageRecord,
    UsageSink,
    current_client_id,
)

REPO = Path(__file__).resolve().parents[1]


def make(request_id: str = "r1", **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "time": 1_700_000_000.0,
        "request_id": request_id,
        "host": "ws://h1:1/v1/ws",
        "host_address": "0xabc",
        "model": "llama-2-7b",
        "prompt_tokens": 12,
        "completion_tokens": 21,
        "received_tokens": 21,
        "total_tokens": 33,
        "ttft": 0.5,
        "duration": 2.5,
        "finish_reason": "stop",
        "cost": 0.25,
        "cost_unit": "USDC",
        "session_id": None,
        "attempt": 1,
        "kind": "stream",
    }
    values.update(fields)
    return UsageRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def ledger():
    led = UsageLedger(":memory:")
    yield led
    led.close()


# --------------------------------------------------------------------------- the record


def test_record_computes_rate_after_first_token():
    """tokens_per_second counts the tokens after the first over the time after ttft."""
    assert make(received_tokens=21, ttft=0.5, duration=2.5).tokens_per_second == pytest.approx(10.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"ttft": None},
        {"received_tokens": 1},
        {"received_tokens": 0},
        {"ttft": 2.0, "duration": 2.0},
    ],
)
def test_record_rate_is_none_when_undefined(fields):
    """tokens_per_second is None without a ttft, with < 2 tokens, or with no time after ttft."""
    assert make(**fields).tokens_per_second is None


def test_record_is_frozen_and_keyword_only():
    """A record cannot be changed and takes its fields by keyword only."""
    rec = make()
    with pytest.raises(AttributeError):
        rec.host = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        UsageRecord(1.0, "r")  # type: ignore[misc]


def test_record_to_dict_holds_fields_and_rate():
    """to_dict lists every field in order with tokens_per_second after duration."""
    data = make().to_dict()
    names = [f for f in UsageRecord.__dataclass_fields__]
    expected = [*names[:names.index("duration") + 1], "tokens_per_second", *names[names.index("duration") + 1:]]
    assert list(data) == expected
    assert data["tokens_per_second"] == pytest.approx(10.0)
    data.pop("tokens_per_second")
    assert UsageRecord(**data) == make()


def test_list_sink_is_a_usage_sink():
    """ListSink and UsageLedger satisfy the UsageSink protocol; ListSink keeps records."""
    sink = ListSink()
    sink.record(make())
    assert sink.records == [make()]
    assert isinstance(sink, UsageSink)
    assert isinstance(UsageLedger.__new__(UsageLedger), UsageSink)


# --------------------------------------------------------------------------- round trips


def test_memory_ledger_round_trips_records(ledger):
    """Records come back from a :memory: ledger equal to what was recorded."""
    recs = [make("a"), make("b", host=None, error_code="NO_HOSTS_AVAILABLE", cached=True, ttft=None)]
    for rec in recs:
        ledger.record(rec)
    assert ledger.records() == [replace(rec, client_id=current_client_id()) for rec in recs]


def test_file_ledger_round_trips_records(tmp_path):
    """Records come back from a file ledger equal to what was recorded."""
    recs = [make(f"r{i}", time=1_700_000_000.0 + i, attempt=i + 1) for i in range(5)]
    with UsageLedger(tmp_path / "usage.sqlite3") as led:
        for rec in recs:
            led.record(rec)
        assert led.records() == [replace(rec, client_id=current_client_id()) for rec in recs]


def test_ledger_accepts_numpy_integers(ledger):
    """Integer-like values (numpy scalars) are stored as plain ints."""
    np = pytest.importorskip("numpy")
    ledger.record(make(prompt_tokens=np.int64(7), received_tokens=np.int32(3)))
    (rec,) = ledger.records()
    assert rec.prompt_tokens == 7 and type(rec.prompt_tokens) is int
    assert rec.received_tokens == 3


def test_ledger_rejects_bad_records(ledger):
    """record() refuses non-records and wrongly typed fields before queueing."""
    with pytest.raises(TypeError, match="expected a UsageRecord"):
        ledger.record({"request_id": "r"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt_tokens"):
        ledger.record(make(prompt_tokens=1.5))
    with pytest.raises(ValueError, match="duration"):
        ledger.record(make(duration=math.nan))
    assert ledger.pending == 0
    assert ledger.records() == []


def test_ledger_records_filters_since_and_limit(ledger):
    """records(since=, limit=) keeps later records, oldest first, and the newest `limit` of them."""
    for i in (3, 1, 4, 0, 2):
        ledger.record(make(f"r{i}", time=100.0 + i))
    assert [r.request_id for r in ledger.records()] == ["r0", "r1", "r2", "r3", "r4"]
    assert [r.request_id for r in ledger.records(since=102.0)] == ["r2", "r3", "r4"]
    assert [r.request_id for r in ledger.records(limit=2)] == ["r3", "r4"]
    assert [r.request_id for r in ledger.records(since=101.0, limit=0)] == []
    with pytest.raises(ValueError, match="limit"):
        ledger.records(limit=-1)


def test_ledger_keeps_records_from_many_threads(ledger):
    """Records recorded concurrently from many threads all land."""
    threads_n, per_thread = 8, 250

    def work(t: int) -> None:
        for i in range(per_thread):
            ledger.record(make(f"t{t}-{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = {rec.request_id for rec in ledger.records()}
    assert ids == {f"t{t}-{i}" for t in range(threads_n) for i in range(per_thread)}


def test_ledger_reads_see_prior_writes_without_flush(tmp_path):
    """A read right after record() sees the record, with no flush in between."""
    with UsageLedger(tmp_path / "u.sqlite3") as led:
        for i in range(100):
            led.record(make(f"r{i}"))
            assert len(led.records()) == i + 1


def test_ledger_flush_commits_everything_queued(tmp_path):
    """After flush() another connection sees every record and nothing is pending."""
    path = tmp_path / "u.sqlite3"
    with UsageLedger(path) as led:
        for i in range(500):
            led.record(make(f"r{i}"))
        led.flush()
        assert led.pending == 0
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT count(*) FROM requests").fetchone()[0] == 500


# --------------------------------------------------------------------------- lifecycle


def test_ledger_close_is_idempotent_and_drains(tmp_path):
    """close() commits queued records, stops the thread and may be called again."""
    path = tmp_path / "u.sqlite3"
    led = UsageLedger(path)
    for i in range(50):
        led.record(make(f"r{i}"))
    led.close()
    led.close()
    assert led.closed and not led._thread.is_alive()
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT count(*) FROM requests").fetchone()[0] == 50


def test_ledger_refuses_record_and_reads_after_close():
    """record() and reads after close() raise LedgerClosed, a RuntimeError; flush() is a no-op."""
    led = UsageLedger(":memory:")
    led.close()
    with pytest.raises(LedgerClosed, match="closed") as info:
        led.record(make())
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FabstirError)
    with pytest.raises(LedgerClosed):
        led.records()
    led.flush()


def test_ledger_context_manager_closes():
    """Leaving a with block closes the ledger."""
    with UsageLedger(":memory:") as led:
        led.record(make())
    assert led.closed


def test_ledger_repr_shows_path_and_pending(tmp_path):
    """repr names the path and the count of pending writes, and closed when closed."""
    led = UsageLedger(tmp_path / "u.sqlite3")
    assert repr(led) == f"UsageLedger(path={str(tmp_path / 'u.sqlite3')!r}, pending=0)"
    led.close()
    assert repr(led).endswith("pending=0, closed=True)")


def test_ledger_default_path_is_in_user_data_dir(tmp_path, monkeypatch):
    """path=None puts usage.sqlite3 in platformdirs' user data dir, creating the directories."""
    seen = []

    def fake_user_data_dir(appname: str) -> str:
        seen.append(appname)
        return str(tmp_path / "data" / appname)

    monkeypatch.setattr(usage.platformdirs, "user_data_dir", fake_user_data_dir)
    with UsageLedger() as led:
        assert led.path == str(tmp_path / "data" / "fabstir-jupyter" / "usage.sqlite3")
    assert seen == ["fabstir-jupyter"]
    assert Path(led.path).is_file()


@pytest.mark.timeout(20)
def test_ledger_bad_path_fails_at_construction(tmp_path):
    """A path whose directory cannot be created raises LedgerUnavailable at once, naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = blocker / "sub" / "usage.sqlite3"
    # "cannot open", not "not open within 60 s": the writer thread reported the failure, no timeout passed.
    with pytest.raises(LedgerUnavailable, match="cannot open") as info:
        UsageLedger(bad, timeout=60)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, OSError)


@pytest.mark.timeout(20)
def test_ledger_directory_path_fails_at_construction(tmp_path):
    """A path that is a directory raises LedgerUnavailable at construction."""
    with pytest.raises(LedgerUnavailable, match="cannot open"):
        UsageLedger(tmp_path)


def test_ledger_refuses_newer_schema(tmp_path):
    """A database with a newer schema version is refused, not overwritten."""
    path = tmp_path / "u.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerUnavailable, match="newer"):
        UsageLedger(path)


# A child process that opens a ledger the way a user without write permission would. Root writes
# through file modes, so as root the child first drops the capabilities that allow it
# (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from its bounding set before exec.
_OPEN_LEDGER = """
import json, sys, time
from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.usage import UsageLedger, UsageRecord
path = sys.argv[1]
out = {}
for name, build in (("ledger", lambda: UsageLedger(path)),
                    ("manager", lambda: InferenceManager(["ws://127.0.0.1:9"], InferenceConfig(usage_db=path)))):
    try:
        built = build()
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "code": getattr(exc, "code", None), "message": str(exc),
                     "hint": getattr(exc, "hint", None)}
        continue
    ledger = built if name == "ledger" else built.usage
    ledger.record(UsageRecord(time=time.time(), request_id="r"))
    ledger.flush()
    out[name] = {"constructed": True, "dropped": ledger.dropped}
    ledger.close()
print(json.dumps(out))
"""


def _drop_write_override() -> None:
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(77)


def _open_without_write_permission(path: Path) -> dict:
    import json
    import os

    as_root = os.geteuid() == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _OPEN_LEDGER, str(path)], capture_output=True, text=True,
                          timeout=60, env=env, preexec_fn=_drop_write_override if as_root else None)
    if proc.returncode == 77:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: file modes do not bind root")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_ledger_is_refused_at_construction(tmp_path, what):
    """An existing ledger that cannot be written (a read-only file, or a read-only directory for its WAL
    files) raises LEDGER_UNAVAILABLE at construction, from UsageLedger and from InferenceManager,
    naming the path; it was constructed, and every record then dropped with only a log line."""
    folder = tmp_path / "ledgers"
    folder.mkdir()
    path = folder / "usage.sqlite3"
    UsageLedger(path).close()
    try:
        (path if what == "file" else folder).chmod(0o444 if what == "file" else 0o555)
        result = _open_without_write_permission(path)
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    for name in ("ledger", "manager"):
        error = result[name]
        assert error.get("code") == "LEDGER_UNAVAILABLE", (name, error)
        assert error["error"] == "LedgerUnavailable" and str(path) in error["message"]
    if what == "file":
        assert "cannot write" in result["ledger"]["message"] and "writable" in result["ledger"]["hint"]


def test_memory_and_writable_ledgers_pass_the_write_check(tmp_path):
    """':memory:' and a fresh or reopened file pass the construction-time write check, leaving no
    trace: the schema version is unchanged and no row was added."""
    path = tmp_path / "u.sqlite3"
    for target in (":memory:", path, path):
        with UsageLedger(target) as led:
            assert led.records() == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_ledger_path_is_invalid_options(tmp_path, monkeypatch, path):
    """An empty path is refused (it used to resolve to the current directory)."""
    from fabstir_jupyter.errors import InvalidOptions

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidOptions) as info:
        UsageLedger(path)
    assert info.value.field == "path" and "':memory:'" in info.value.message
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- SQLite details


def test_file_ledger_uses_wal_schema_version_and_time_index(tmp_path):
    """A file ledger sets WAL mode, the schema version and an index on requests.time."""
    path = tmp_path / "u.sqlite3"
    with UsageLedger(path):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = conn.execute("PRAGMA index_list(requests)").fetchall()
        columns = {conn.execute(f"PRAGMA index_info({row[1]})").fetchone()[2] for row in indexes}
        assert "time" in columns


def test_second_ledger_sees_persisted_records(tmp_path):
    """A second ledger on the same file, opened later or alongside, sees the records."""
    path = tmp_path / "u.sqlite3"
    with UsageLedger(path) as first:
        first.record(make("a"))
        first.flush()
        with UsageLedger(path) as alongside:
            assert [r.request_id for r in alongside.records()] == ["a"]
        first.record(make("b"))
    with UsageLedger(path) as later:
        assert [r.request_id for r in later.records()] == ["a", "b"]


def test_ledger_record_returns_while_writer_is_stuck(tmp_path):
    """record() is a queue put: it returns at once while the writer waits on a lock, then all land in few commits."""
    path = tmp_path / "u.sqlite3"
    with UsageLedger(path) as led:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            led.record(make("first"))
            poll_until(led._queue.empty, what="the writer took the first record")  # and waits for the lock
            for i in range(1000):
                led.record(make(f"r{i}"))
            # Every call returned while the writer could write nothing: none waited for the disk.
            assert led.pending == 1001 and led._commits == 0 and led.dropped == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        led.flush()
        assert len(led.records()) == 1001
        assert led._commits <= 3  # whatever was queued went in one transaction


class _RefusingConnection:
    """A connection whose first statement fails as Python 3.10's sqlite3 reports it: a message and no
    ``sqlite_errorcode`` (added in 3.11)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def execute(self, sql: str) -> None:
        raise sqlite3.OperationalError(self.message)


def test_ledger_write_check_reads_a_lock_without_sqlite_errorcode(tmp_path, caplog):
    """On Python 3.10 (no sqlite_errorcode) a lock held elsewhere still only delays the write check, and a
    read-only file still fails as LedgerUnavailable, not AttributeError."""
    with UsageLedger(tmp_path / "u.sqlite3") as led:
        with caplog.at_level(logging.WARNING, logger="fabstir_jupyter.usage"):
            led._check_writable(_RefusingConnection("database is locked"))
        assert "locked by another process" in caplog.text
        with pytest.raises(LedgerUnavailable, match="cannot write: attempt to write a readonly database"):
            led._check_writable(_RefusingConnection("attempt to write a readonly database"))


def test_ledger_logs_and_drops_on_write_error(tmp_path, caplog):
    """A write that fails (database locked past busy_timeout) is logged and counted, never raised."""
    path = tmp_path / "u.sqlite3"
    with UsageLedger(path, busy_timeout=0.05) as led:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with caplog.at_level(logging.ERROR, logger="fabstir_jupyter.usage"):
                led.record(make("lost"))
                led.flush()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert led.dropped == 1 and led.pending == 0
        assert any("dropped 1 records" in r.getMessage() for r in caplog.records)
        led.record(make("kept"))
        assert [r.request_id for r in led.records()] == ["kept"]


# --------------------------------------------------------------------------- pandas views


def test_ledger_to_frame_has_one_column_per_field(ledger):
    """to_frame has the record's columns, fixed dtypes and the recorded values."""
    pd = pytest.importorskip("pandas")
    ledger.record(make("a"))
    ledger.record(make("b", host=None, prompt_tokens=None, ttft=None, cost=None, cached=True, attempt=2))
    frame = ledger.to_frame()
    assert list(frame.columns) == list(make().to_dict())
    assert len(frame) == 2
    dtypes = frame.dtypes
    assert dtypes["time"] == "float64" and dtypes["duration"] == "float64"
    assert dtypes["prompt_tokens"] == "Int64" and dtypes["total_tokens"] == "Int64"
    assert dtypes["received_tokens"] == "int64" and dtypes["attempt"] == "int64"
    assert dtypes["cached"] == "bool"
    assert pd.api.types.is_string_dtype(dtypes["host"]) and pd.api.types.is_string_dtype(dtypes["kind"])
    first, second = frame.iloc[0], frame.iloc[1]
    assert first["request_id"] == "a" and first["host"] == "ws://h1:1/v1/ws"
    assert first["prompt_tokens"] == 12 and first["tokens_per_second"] == pytest.approx(10.0)
    assert pd.isna(second["host"]) and pd.isna(second["prompt_tokens"]) and math.isnan(second["cost"])
    assert bool(second["cached"]) is True and second["attempt"] == 2


def test_ledger_to_frame_empty_keeps_columns_and_dtypes(ledger):
    """An empty ledger gives an empty frame with the same columns and dtypes."""
    pytest.importorskip("pandas")
    frame = ledger.to_frame()
    assert frame.empty and list(frame.columns) == list(make().to_dict())
    assert frame.dtypes["prompt_tokens"] == "Int64" and frame.dtypes["cached"] == "bool"


def test_ledger_summary_by_host(ledger):
    """summary(by="host") counts requests, failures, tokens, cost and mean rates per host."""
    pd = pytest.importorskip("pandas")
    h1, h2 = "ws://h1:1/v1/ws", "ws://h2:1/v1/ws"
    ledger.record(make("a", host=h1, prompt_tokens=10, completion_tokens=20, received_tokens=21,
                       ttft=0.5, duration=2.5, cost=0.25))
    ledger.record(make("b", host=h1, prompt_tokens=5, completion_tokens=None, received_tokens=0,
                       ttft=None, duration=1.0, cost=None, error_code="INFERENCE_TIMEOUT"))
    ledger.record(make("c", host=h2, prompt_tokens=1, completion_tokens=2, received_tokens=11,
                       ttft=1.0, duration=3.0, cost=0.5))
    ledger.record(make("d", host=None, prompt_tokens=None, completion_tokens=None, received_tokens=0,
                       ttft=None, cost=None, error_code="NO_HOSTS_AVAILABLE"))
    out = ledger.summary(by="host")
    assert list(out.columns) == [
        "requests", "attempts", "failed", "retried", "prompt_tokens", "completion_tokens", "received_tokens",
        "cost", "cost_unit", "mean_ttft", "mean_tokens_per_second",
    ]
    assert len(out) == 3  # the record without a host is a group of its own
    assert out.loc[h1, "requests"] == 2 and out.loc[h1, "failed"] == 1 and out.loc[h1, "retried"] == 0
    assert out.loc[h1, "prompt_tokens"] == 15 and out.loc[h1, "completion_tokens"] == 20
    assert out.loc[h1, "received_tokens"] == 21
    assert out.loc[h1, "cost"] == pytest.approx(0.25) and out.loc[h1, "cost_unit"] == "USDC"
    assert out.loc[h1, "mean_ttft"] == pytest.approx(0.5)
    assert out.loc[h1, "mean_tokens_per_second"] == pytest.approx(10.0)
    assert out.loc[h2, "mean_tokens_per_second"] == pytest.approx(5.0)
    missing = out[out.index.isna()].iloc[0]
    assert missing["failed"] == 1 and pd.isna(missing["cost"])


def test_summary_separates_failed_requests_from_retried_attempts(ledger):
    """A HOST_BUSY retry that then succeeded is a retried attempt, not a failed request; a request
    fails only when its last attempt failed; a failover counts the request where it ended."""
    pytest.importorskip("pandas")
    h1, h2 = "ws://h1:1/v1/ws", "ws://h2:1/v1/ws"
    # r1: busy on h1, then answered by h1. r2: busy twice on h1, then failed on h2 for good.
    # r3: broke on h1 after 37 tokens, continued on h2.
    ledger.record(make("r1", host=h1, attempt=1, error_code="HOST_BUSY", received_tokens=0, time=1.0))
    ledger.record(make("r1", host=h1, attempt=2, time=2.0))
    ledger.record(make("r2", host=h1, attempt=1, error_code="HOST_BUSY", received_tokens=0, time=3.0))
    ledger.record(make("r2", host=h1, attempt=2, error_code="HOST_BUSY", received_tokens=0, time=4.0))
    ledger.record(make("r2", host=h2, attempt=3, error_code="INFERENCE_TIMEOUT", received_tokens=0, time=5.0))
    ledger.record(make("r3", host=h1, attempt=1, error_code="CONNECTION_LOST", received_tokens=37, time=6.0))
    ledger.record(make("r3", host=h2, attempt=2, received_tokens=20, time=7.0))
    by_host = ledger.summary(by="host")
    assert by_host.loc[h1, ["requests", "attempts", "failed", "retried"]].tolist() == [1, 5, 0, 4]
    assert by_host.loc[h2, ["requests", "attempts", "failed", "retried"]].tolist() == [2, 2, 1, 0]
    by_model = ledger.summary(by="model").iloc[0]
    assert (by_model["requests"], by_model["attempts"], by_model["failed"], by_model["retried"]) == (3, 7, 1, 4)
    assert by_model["received_tokens"] == 21 + 37 + 20


def test_records_of_one_client_and_of_all(ledger):
    """Each record carries its process's client id; reads can keep one process's records."""
    ledger.record(make("mine"))
    ledger.record(make("theirs", client_id="another-kernel"))
    assert {r.request_id: r.client_id for r in ledger.records()} == {
        "mine": current_client_id(), "theirs": "another-kernel"}
    assert [r.request_id for r in ledger.records(client_id=current_client_id())] == ["mine"]
    assert ledger.to_frame(client_id="another-kernel")["request_id"].tolist() == ["theirs"]
    assert ledger.summary(by="host", client_id=current_client_id())["requests"].sum() == 1


def test_client_id_is_new_in_every_process():
    """Another process (another kernel) records under another id; this process keeps one id."""
    code = "from fabstir_jupyter.usage import current_client_id as c; print(c(), c() == c())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    other, same = done.stdout.split()
    assert same == "True" and len(other) == 16 and other != current_client_id()
    assert current_client_id() == current_client_id()


_V1_TABLE = (
    "CREATE TABLE requests (id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL, host TEXT, "
    "host_address TEXT, model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, "
    "received_tokens INTEGER NOT NULL, total_tokens INTEGER, ttft REAL, duration REAL NOT NULL, "
    "finish_reason TEXT, cost REAL, cost_unit TEXT, error_code TEXT, cached INTEGER NOT NULL, "
    "session_id TEXT, attempt INTEGER NOT NULL, kind TEXT NOT NULL)"
)


def test_ledger_migrates_a_version_1_file(tmp_path):
    """A ledger file of schema 1 (no client_id) is migrated when opened: its rows stay, without a
    client id (so they belong to no kernel of today), and new rows get one."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(_V1_TABLE)
        conn.execute("CREATE INDEX requests_time ON requests (time)")
        conn.execute("INSERT INTO requests (time, request_id, host, received_tokens, duration, cached, attempt, kind)"
                     " VALUES (1.0, 'old', 'ws://h1:1/v1/ws', 5, 0.5, 0, 1, 'stream')")
        conn.execute("PRAGMA user_version = 1")
    with UsageLedger(path) as led:
        led.record(make("new"))
        records = led.records()
        mine = led.records(client_id=current_client_id())
    assert [(r.request_id, r.received_tokens, r.client_id) for r in records] == [
        ("old", 5, None), ("new", 21, current_client_id())]
    assert [r.request_id for r in mine] == ["new"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(requests)")}
        assert {"requests_time", "requests_client"} <= indexes
    with UsageLedger(path) as again:  # opening a migrated file changes nothing
        assert len(again.records()) == 2


def test_ledger_migrates_a_version_2_file_and_keeps_whether_requests_were_encrypted(tmp_path):
    """A schema 2 file (no encrypted column) gains it when opened: its rows read encrypted=None
    (unknown), new rows keep True or False, and the DataFrame column is pandas' nullable bool."""
    path = tmp_path / "v2.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(_V1_TABLE)
        conn.execute("ALTER TABLE requests ADD COLUMN client_id TEXT")
        conn.execute("INSERT INTO requests (time, request_id, received_tokens, duration, cached, attempt, kind, "
                     "client_id) VALUES (1.0, 'old', 5, 0.5, 0, 1, 'stream', 'k')")
        conn.execute("PRAGMA user_version = 2")
    with UsageLedger(path) as led:
        led.record(make("sealed", encrypted=True))
        led.record(make("clear", encrypted=False))
        records = led.records()
        frame = led.to_frame()
    assert [(r.request_id, r.encrypted) for r in records] == [("old", None), ("sealed", True), ("clear", False)]
    assert str(frame["encrypted"].dtype) == "boolean"
    assert frame["encrypted"].isna().tolist() == [True, False, False]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _job(job_id: int = 7, **fields: object) -> JobRecord:
    values: dict[str, object] = {
        "job_id": job_id, "chain_id": 31337, "marketplace": "0xm", "host": "http://h1:1", "host_address": "0xabc",
        "model": "llama-2-7b", "model_id": "0x" + "11" * 32, "token": "0xusdc", "unit": "USDC", "decimals": 6,
        "deposit": 500_000, "price_per_token": 2_000, "proof_interval": 100, "open_tx": "0xopen",
        "opened_at": 1_700_000_000.0,
    }
    values.update(fields)
    return JobRecord(**values)  # type: ignore[arg-type]


def test_ledger_migrates_a_version_3_file_and_gains_the_jobs_table(tmp_path):
    """A schema 3 file (no job_id, tx_hash, jobs table) is migrated when opened: old rows read job_id=None,
    new rows keep their job and opening transaction, and jobs (amounts past 2**63 included) are kept."""
    path = tmp_path / "v3.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(_V1_TABLE)
        conn.execute("ALTER TABLE requests ADD COLUMN client_id TEXT")
        conn.execute("ALTER TABLE requests ADD COLUMN encrypted INTEGER")
        conn.execute("INSERT INTO requests (time, request_id, received_tokens, duration, cached, attempt, kind) "
                     "VALUES (1.0, 'old', 5, 0.5, 0, 1, 'stream')")
        conn.execute("PRAGMA user_version = 3")
    with UsageLedger(path) as led:
        led.record(make("paid", job_id=7, tx_hash="0xopen"))
        led.record_job(_job(deposit=10**20, token="0x0", unit="ETH", decimals=18))
        led.record_job(_job(deposit=10**20, token="0x0", unit="ETH", decimals=18, status="completed",
                            tokens_billed=100, chain_cost=200, host_earnings=180, treasury_fee=20,
                            refund=10**20 - 200))
        records = led.records()
        jobs = led.jobs()
    assert [(r.request_id, r.job_id, r.tx_hash) for r in records] == [("old", None, None), ("paid", 7, "0xopen")]
    assert len(jobs) == 1 and jobs[0].status == "completed" and jobs[0].deposit == 10**20
    assert jobs[0].refund == 10**20 - 200 and jobs[0].client_id is not None
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


def test_reconcile_puts_the_ledger_beside_the_chain_per_job(ledger):
    """Per job: the attempts' host-reported tokens and their cost at the job's price beside the chain's
    settlement; a bill that is the cadence's agrees and says why it differs; an open job is not settled."""
    pytest.importorskip("pandas")
    ledger.record(make("a", job_id=7, tx_hash="0xopen", completion_tokens=300, received_tokens=300, time=1.0))
    ledger.record(make("b", job_id=7, tx_hash="0xopen", completion_tokens=50, received_tokens=50, time=2.0))
    ledger.record(make("c", job_id=8, tx_hash="0xopen", completion_tokens=40, received_tokens=40, time=3.0))
    ledger.record(make("d", completion_tokens=9))  # unpaid: in no job
    ledger.record_job(_job(7, status="completed", tokens_billed=300, chain_cost=600, host_earnings=540,
                           treasury_fee=60, refund=499_400, settle_tx="0xsettle"))
    ledger.record_job(_job(8, opened_at=1_700_000_001.0))
    frame = ledger.reconcile().set_index("job_id")
    settled, open_job = frame.loc[7], frame.loc[8]
    assert (settled["requests"], settled["ledger_tokens"], settled["billed_tokens"]) == (2, 350, 300)
    assert settled["token_difference"] == -50 and bool(settled["agrees"])
    assert settled["ledger_cost"] == pytest.approx(350 * 2_000 / 1000 / 1e6)
    assert settled["chain_cost"] == pytest.approx(0.0006) and settled["refund"] == pytest.approx(0.4994)
    assert "50 streamed after the last proof" in settled["reason"]
    assert open_job["reason"] == "not settled yet" and pd_na(open_job["billed_tokens"])
    assert open_job["expected_tokens"] == 100  # the minimum billing a settlement would apply


def test_a_job_id_reused_by_a_new_local_chain_is_another_job(ledger):
    """The local network's chain has the same chain id and addresses in every run, so job 7 of a new run
    (another kernel, another test account) shares (chain, marketplace, job id) with yesterday's job 7: both
    stay in the ledger, told apart by their opening transactions, and each reconciles with its own attempts.
    (The second replaced the first, and reconcile() counted both runs' attempts against one job.)"""
    pytest.importorskip("pandas")
    ledger.record(make("yesterday", job_id=7, tx_hash="0xold", completion_tokens=300, received_tokens=300, time=1.0))
    ledger.record(make("today", job_id=7, tx_hash="0xnew", completion_tokens=40, received_tokens=40, time=2.0))
    ledger.record_job(_job(7, open_tx="0xold", opened_at=1.0, status="completed", tokens_billed=300,
                           chain_cost=600, host_earnings=540, treasury_fee=60, refund=499_400))
    ledger.record_job(_job(7, open_tx="0xnew", opened_at=2.0))
    ledger.record_job(_job(7, open_tx="0xnew", opened_at=2.0, status="completed", tokens_billed=100,
                           chain_cost=200, host_earnings=180, treasury_fee=20, refund=499_800))
    jobs = ledger.jobs()
    assert [(j.open_tx, j.tokens_billed) for j in jobs] == [("0xold", 300), ("0xnew", 100)]
    frame = ledger.reconcile()
    assert frame["open_tx"].tolist() == ["0xold", "0xnew"]
    assert frame["ledger_tokens"].tolist() == [300, 40] and frame["agrees"].tolist() == [True, True]


def test_ledger_migrates_a_version_4_file_keeping_its_jobs(tmp_path):
    """A schema 4 file (jobs keyed without their opening transaction) is migrated when opened: its jobs
    stay, and a job with the same id but another opening transaction is kept beside them."""
    path = tmp_path / "v4.sqlite3"
    with UsageLedger(path) as led:
        led.record_job(_job(7, open_tx="0xold"))
    with sqlite3.connect(path) as conn:  # back to schema 4's table, as a version 4 client wrote it
        columns = ", ".join(f.name for f in dataclasses.fields(JobRecord))
        conn.execute("ALTER TABLE jobs RENAME TO jobs_new")
        conn.execute(conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs_new'").fetchone()[0]
                     .replace("jobs_new", "jobs").replace(", open_tx)", ")"))
        conn.execute(f"INSERT INTO jobs ({columns}) SELECT {columns} FROM jobs_new")
        conn.execute("DROP TABLE jobs_new")
        conn.execute("PRAGMA user_version = 4")
    with UsageLedger(path) as led:
        led.record_job(_job(7, open_tx="0xnew"))
        jobs = led.jobs()
    assert sorted(j.open_tx for j in jobs) == ["0xnew", "0xold"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


def pd_na(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_ledger_summary_by_model_and_host_model(ledger):
    """summary groups by model, or by (host, model), with one row per pair."""
    pytest.importorskip("pandas")
    ledger.record(make("a", host="h1", model="m1", cost=1.0))
    ledger.record(make("b", host="h1", model="m2", cost=2.0))
    ledger.record(make("c", host="h2", model="m1", cost=4.0))
    by_model = ledger.summary(by="model")
    assert by_model.loc["m1", "requests"] == 2 and by_model.loc["m1", "cost"] == pytest.approx(5.0)
    pairs = ledger.summary(by=("host", "model"))
    assert list(pairs.index.names) == ["host", "model"]
    assert pairs.loc[("h1", "m2"), "cost"] == pytest.approx(2.0)
    assert len(pairs) == 3


def test_ledger_summary_does_not_add_mixed_units(ledger):
    """A group whose costs are in different units reports cost_unit "mixed" and no cost."""
    pytest.importorskip("pandas")
    ledger.record(make("a", model="m", cost=1.0, cost_unit="USDC"))
    ledger.record(make("b", model="m", cost=0.001, cost_unit="ETH"))
    out = ledger.summary(by="model")
    assert out.loc["m", "cost_unit"] == "mixed" and math.isnan(out.loc["m", "cost"])
    by_unit = ledger.summary(by=("model", "cost_unit"))
    assert by_unit.loc[("m", "USDC"), "cost"] == pytest.approx(1.0)


def test_ledger_summary_rejects_unknown_column(ledger):
    """summary(by=...) naming no column raises ValueError."""
    with pytest.raises(ValueError, match="nope"):
        ledger.summary(by="nope")


def test_ledger_summary_of_empty_ledger_is_empty(ledger):
    """An empty ledger summarises to an empty frame with the summary columns."""
    pytest.importorskip("pandas")
    out = ledger.summary(by=("host", "model"))
    assert out.empty and "requests" in out.columns


def test_importing_usage_does_not_import_pandas():
    """Importing fabstir_jupyter.usage (and recording) leaves pandas unimported."""
    code = (
        "import sys\n"
        "from fabstir_jupyter.usage import UsageLedger, UsageRecord\n"
        "with UsageLedger(':memory:') as led:\n"
        "    led.record(UsageRecord(time=0.0, request_id='r'))\n"
        "    assert len(led.records()) == 1\n"
        "assert 'pandas' not in sys.modules, 'pandas was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_ledger_errors_pickle_with_their_fields():
    """LedgerClosed and LedgerUnavailable keep class, code and message through pickle."""
    import pickle

    for error in (LedgerClosed("usage ledger x: closed"), LedgerUnavailable("usage ledger x: cannot open", hint="h")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.code == error.code
        assert str(copy) == str(error) and copy.hint == error.hint
