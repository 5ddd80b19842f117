"""The host, usage and paid-job tables behind the dashboard and ``%fabstir hosts``: rows, prices, frames.

Pure table logic shared by :class:`~fabstir_jupyter.notebook.widgets.HostDashboard` (its synced
rows and ``*_frame`` properties) and the magics' DataFrame fallback, so both show the same columns
built by the same code. Rows are JSON-safe dicts (``models`` a list); the DataFrames join
``models`` into text. Imports neither anywidget nor ipywidgets; pandas is imported only inside
the functions that need it.

The default usage ledger is one file shared by every kernel of a user, so a ledger is read for
this process's records (this kernel's hosts and requests) unless ``all_kernels`` asks for all.
A request *failed* only if its last attempt failed; failed attempts followed by another attempt
(a ``HOST_BUSY`` retry, a failover) are *retried*, not failures (:func:`~fabstir_jupyter.usage.summarize`).

The jobs table lists this kernel's paid jobs (:func:`job_rows`, from ``manager.payments``): open
ones with what they have billed so far (an estimate until settled) and settled ones as the chain
settled them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from ..hosts.info import HostInfo
    from ..payments import Payments

__all__ = [
    "HOST_COLUMNS",
    "USAGE_COLUMNS",
    "JOB_COLUMNS",
    "host_rows",
    "job_rows",
    "host_text",
    "usage_rows",
    "sort_rows",
    "hosts_dataframe",
    "usage_dataframe",
    "jobs_dataframe",
    "tables_html",
]

#: The host table's columns, in order (``price`` is per 1000 tokens of the host's cheapest model).
HOST_COLUMNS = (
    "address", "url", "models", "region", "stake", "price", "price_unit", "latency_ms", "status",
    "requests", "tokens", "failed", "retried",
)
#: The usage summary's columns, one row per host and model.
USAGE_COLUMNS = (
    "host", "model", "requests", "failed", "retried", "tokens", "cost", "cost_unit", "mean_ttft_ms",
    "tokens_per_second",
)
#: The jobs table's columns, one row per paid job of this kernel. Amounts are whole tokens of ``unit``;
#: ``tokens`` and ``billed`` of a job not settled yet are what settling it now would bill (an estimate:
#: the chain fixes the bill at settlement), and its ``refund`` is empty.
JOB_COLUMNS = ("job_id", "host", "model", "kind", "deposit", "tokens", "billed", "refund", "unit", "status")
_COUNTS = ("requests", "tokens", "failed", "retried")


def _clean(value: Any) -> Any:
    """A JSON-safe cell: pandas' NA/NaN and infinities become None, numpy scalars plain numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (ImportError, TypeError, ValueError):
        pass
    return str(value)


def host_text(host: Any) -> str | None:
    """How a host is shown: its ``api_url`` (a :class:`HostInfo`), else its text; ``None`` for none."""
    if host is None:
        return None
    return str(getattr(host, "api_url", host))


def _host_price(host: Any) -> tuple[float | None, str | None]:
    """The price of 1000 tokens of the host's cheapest model (USDC preferred over the native token)."""
    best: dict[str, float] = {}
    cost = getattr(host, "cost", None)
    for model in getattr(host, "prices", None) or {}:
        value, unit = cost(model, 1000) if cost is not None else (None, None)
        if value is not None and unit is not None and (unit not in best or value < best[unit]):
            best[unit] = value
    for unit in ("USDC", *sorted(best)):
        if unit in best:
            return best[unit], unit
    return None, None


def _status(host: Any) -> str:
    """The host's health, or ``"overbilled"`` for a reachable host that billed a paid job for more
    tokens than it reported (selection passes it over)."""
    health = getattr(host, "health", None) or "unknown"
    return "overbilled" if getattr(host, "overbilled_tokens", 0) and health != "unreachable" else health


def host_rows(hosts: Iterable[HostInfo], usage: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Return one JSON-safe row per host (:data:`HOST_COLUMNS`).

    ``requests``, ``tokens``, ``failed`` and ``retried`` come from the usage summary rows of that
    host (by URL) when there are any, else from the host's own counters (this process's attempts
    and failed attempts; no tokens, and retries cannot be told apart there: ``retried`` is None
    unless nothing failed).
    """
    by_host: dict[str, dict[str, int]] = {}
    for row in usage:
        totals = by_host.setdefault(str(row.get("host")), dict.fromkeys(_COUNTS, 0))
        for key in totals:
            totals[key] += int(row.get(key) or 0)
    rows = []
    for host in hosts:
        url = getattr(host, "api_url", None) or str(host)
        price, unit = _host_price(host)
        host_totals = by_host.get(url)
        failures = int(getattr(host, "failures", 0) or 0)
        rows.append({
            "address": getattr(host, "address", None),
            "url": url,
            "models": list(getattr(host, "models", ()) or ()),
            "region": getattr(host, "region", None),
            "stake": _clean(getattr(host, "stake", None)),
            "price": _clean(price),
            "price_unit": unit,
            "latency_ms": _clean(getattr(host, "latency_ms", None)),
            "status": _status(host),
            "requests": host_totals["requests"] if host_totals else int(getattr(host, "requests", 0) or 0),
            "tokens": host_totals["tokens"] if host_totals else 0,
            "failed": host_totals["failed"] if host_totals else failures,
            "retried": host_totals["retried"] if host_totals else (None if failures else 0),
        })
    return rows


def usage_rows(usage: Any, *, all_kernels: bool = False) -> list[dict[str, Any]]:
    """Return the per host/model usage summary rows (:data:`USAGE_COLUMNS`) of ``usage``.

    ``usage`` is None, a records DataFrame (``UsageLedger.to_frame()``), a summary DataFrame
    (``UsageLedger.summary(by=("host", "model"))``), a ledger or sink (anything with
    ``to_frame()`` or a ``records`` list of :class:`~fabstir_jupyter.usage.UsageRecord`), or a
    list of usage records. A write-only sink (``record`` but nothing to read back) has no rows.

    A :class:`~fabstir_jupyter.usage.UsageLedger` is read for this process's records only (this
    kernel's), unless ``all_kernels``; frames and record lists are taken as they are.
    """
    if usage is None or (hasattr(usage, "record") and not hasattr(usage, "to_frame")
                         and not hasattr(usage, "records")):
        return []
    import pandas as pd

    from ..usage import UsageLedger, current_client_id, summarize

    frame = usage
    if isinstance(frame, UsageLedger):
        frame = frame.to_frame(client_id=None if all_kernels else current_client_id())
    elif not isinstance(frame, pd.DataFrame):
        if hasattr(frame, "to_frame") and callable(frame.to_frame):
            frame = frame.to_frame()
        else:
            records = getattr(frame, "records", frame)
            records = records() if callable(records) else records
            frame = pd.DataFrame([r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records])
    if frame.empty:
        return []
    if "requests" not in frame.columns:  # records, not a summary yet
        frame = summarize(frame, ("host", "model"))
    frame = frame.reset_index()
    summary = pd.DataFrame({
        "host": frame.get("host"),
        "model": frame.get("model"),
        "requests": frame["requests"],
        "failed": frame.get("failed", frame.get("errors", 0)),
        "retried": frame.get("retried", 0),
        "tokens": frame.get("received_tokens", 0),
        "cost": frame.get("cost"),
        "cost_unit": frame.get("cost_unit"),
        "mean_ttft_ms": frame["mean_ttft"] * 1000 if "mean_ttft" in frame else None,
        "tokens_per_second": frame.get("mean_tokens_per_second"),
    })
    return [{column: _clean(row.get(column)) for column in USAGE_COLUMNS}
            for row in summary.to_dict(orient="records")]


def job_rows(payments: Payments | None) -> list[dict[str, Any]]:
    """Return one JSON-safe row per paid job of ``payments`` (:data:`JOB_COLUMNS`), by job id.

    ``status`` is ``open``, ``closing`` (being settled) or ``unsettled`` (its settlement failed: the job
    stays Active on chain) for a job not settled yet, else the chain's ``completed`` or ``timed_out``.
    ``None`` (an unpaid network) has no rows. Read it on the payments' event loop (the notebook
    bridge's loop thread), where the jobs change.
    """
    if payments is None:
        return []
    rows = []
    for job in payments.open_jobs:
        scale = 10**job.decimals
        cadence = job.cadence
        rows.append({
            "job_id": job.job_id, "host": job.host.api_url, "model": job.model, "kind": job.kind,
            "deposit": job.deposit / scale, "tokens": cadence.settled() if cadence.streamed else 0,
            "billed": _clean(job.running_cost), "refund": None, "unit": job.unit, "status": job.state,
        })
    for settled in payments.settlements:
        rows.append({
            "job_id": settled.job_id, "host": settled.host, "model": settled.model, "kind": None,
            "deposit": settled.amount(settled.deposit), "tokens": settled.tokens_billed,
            "billed": settled.amount(settled.cost), "refund": settled.amount(settled.refund), "unit": settled.unit,
            "status": settled.status,
        })
    return sorted(rows, key=lambda row: row["job_id"])


def _sort_key(value: Any) -> tuple[int, Any]:
    """Nulls last; numbers by value; text case-insensitively; lists by their joined text."""
    if value is None:
        return (2, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return (1, str(value).lower())


def sort_rows(rows: Iterable[dict[str, Any]], key: str, ascending: bool = True) -> list[dict[str, Any]]:
    """Return ``rows`` ordered by their ``key`` value; rows without one come last either way."""
    rows = list(rows)
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: _sort_key(r.get(key)), reverse=not ascending)
    return present + missing


def hosts_dataframe(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Return host rows (:func:`host_rows`, in the caller's order) as a DataFrame of :data:`HOST_COLUMNS`.

    ``models`` becomes text (``"a, b"``), the way a DataFrame shows it best.
    """
    import pandas as pd

    shown = [{**row, "models": ", ".join(map(str, row.get("models") or ()))} for row in rows]
    frame = pd.DataFrame(shown, columns=list(HOST_COLUMNS))
    typed: pd.DataFrame = frame.astype(dict.fromkeys(_COUNTS, "Int64"))  # counts stay integers where one is unknown
    return typed


def usage_dataframe(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Return usage summary rows (:func:`usage_rows`) as a DataFrame of :data:`USAGE_COLUMNS`."""
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(USAGE_COLUMNS))
    typed: pd.DataFrame = frame.astype(dict.fromkeys(_COUNTS, "Int64"))
    return typed


def jobs_dataframe(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Return job rows (:func:`job_rows`) as a DataFrame of :data:`JOB_COLUMNS`."""
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(JOB_COLUMNS))
    typed: pd.DataFrame = frame.astype({"job_id": "Int64", "tokens": "Int64", "deposit": "float64",
                                        "billed": "float64", "refund": "float64"})
    return typed


def tables_html(host_table: Iterable[dict[str, Any]], usage_table: Iterable[dict[str, Any]], *,
                scope: str = "", job_table: Iterable[dict[str, Any]] | None = None) -> str:
    """Return the host table, the usage summary and (``job_table``, on a paid network) the paid jobs
    as static HTML (the dashboard without its JavaScript: for nbconvert, GitHub and other viewers).
    Every cell is escaped."""
    hosts = hosts_dataframe(host_table)
    usage = usage_dataframe(usage_table)
    parts = ['<div class="fabstir-dash-static">',
             f"<p><strong>Hosts</strong> ({len(hosts)})</p>",
             hosts.to_html(index=False, escape=True, na_rep="—", border=0)]
    title = "Usage per host and model" + (f" ({_escape(scope)})" if scope else "")
    parts.append(f"<p><strong>{title}</strong></p>")
    parts.append(usage.to_html(index=False, escape=True, na_rep="—", border=0) if len(usage)
                 else "<p>No requests yet.</p>")
    if job_table is not None:
        jobs = jobs_dataframe(job_table)
        parts.append("<p><strong>Paid jobs (this kernel; billed is an estimate until a job is settled)</strong></p>")
        parts.append(jobs.to_html(index=False, escape=True, na_rep="—", border=0) if len(jobs)
                     else "<p>No paid jobs yet.</p>")
    parts.append("</div>")
    return "\n".join(parts)


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)
