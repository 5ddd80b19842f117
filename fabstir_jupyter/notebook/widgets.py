"""The notebook's anywidget widgets: the live answer, the host dashboard and batch progress.

:class:`StreamOutput` shows one ``%%fabstir`` answer as it streams (it implements the magics'
``OutputSink``: ``start``, ``append``, ``finish``, ``failed``, ``cancelled``). Setting a trait
resends its whole value, so appending tokens to a trait costs O(n²) bytes. Instead
:class:`DeltaBatcher` turns the growing text into custom messages, batched for ``interval``
seconds (the front end also drops iopub output above 1000 messages/s)::

    {"type": "delta", "offset": 120, "text": " more words"}   # applies where the view has 120 chars
    {"type": "snapshot", "text": "the whole text so far"}      # catch-up for a view that missed some

A custom message sent before the front end has loaded the widget's module is lost, and a message
from the view is not handled while the cell runs, so the kernel pushes catch-up state unasked: a
snapshot replaces the delta of a batch each time the text has doubled since the last snapshot.
The full ``text`` trait is set once, at the end (saved widget state and re-renders are right).
The text carried stays under 4× the text: deltas 1×, snapshots under 2×, the final trait 1×.
Past a few KiB, snapshots also leave room for the messages' JSON keys, so that a stream of
tokens at a normal rate stays within 4× its text in bytes as well (see :class:`DeltaBatcher`).

The ES modules and styles are hand-written files in ``static/`` (no bundler, no build step).
pandas is imported only by the ``*_frame`` properties.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import anywidget
import traitlets

if TYPE_CHECKING:
    import pandas as pd

    from ..errors import FabstirError
    from ..hosts.info import HostInfo

__all__ = [
    "DeltaBatcher",
    "StreamOutput",
    "HostDashboard",
    "BatchProgress",
    "HOST_COLUMNS",
    "USAGE_COLUMNS",
    "host_rows",
    "usage_rows",
]

logger = logging.getLogger("fabstir_jupyter.notebook")

STATIC = Path(__file__).parent / "static"

FORMATS = ("markdown", "text", "code", "json")

#: Default batching interval of :class:`StreamOutput`, seconds (at most 20 delta messages/s).
DEFAULT_INTERVAL = 0.05


def _json_size(content: Any) -> int:
    """Bytes of ``content`` as compact UTF-8 JSON (what a message costs on the wire, framing aside)."""
    return len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())


# --------------------------------------------------------------------------- the stream's traffic


class DeltaBatcher:
    """Turn a growing text into batched delta and snapshot messages; no I/O of its own.

    ``append`` collects text; a batch goes out through ``send(content)`` once ``interval`` seconds
    (of ``clock``) have passed since the previous one, or on :meth:`flush`. A batch is sent as::

        {"type": "delta", "offset": <length of the text before it>, "text": <the batch>}

    or, when a snapshot is due and sent, as ``{"type": "snapshot", "text": <the whole text>}``
    instead (a view in step applies it just as well). A snapshot is due each time the text has
    doubled since the last one (the first batch is always one). It is sent

    * while the text is shorter than ``free_snapshot_chars`` (early, when views are most likely
      to have missed something and snapshots are cheap), or
    * when the bytes sent so far plus the snapshot stay within ``3 ×`` the text, so that with the
      final trait the total stays within 4× the text, JSON keys included, or
    * at the latest once the text has grown ``max_growth`` times since the last snapshot, so a
      view that missed messages always catches up within a bounded growth of the text.

    A delta's keys cost about 41 bytes, so batches of 50 characters (200 tokens/s of 5 characters
    in 50 ms batches) cost 1.8× their text; the budget then defers snapshots beyond doubling. A
    slow stream with batches of a few characters exceeds 4× by the keys alone (20 tokens/s: about
    8×, a few hundred bytes per second); the text carried stays under 4× whatever the rate.

    Thread-safe: in ``--background`` mode the calls come from the loop thread.

    Args:
        send: called with each message's content (a JSON-able dict).
        interval: seconds to batch text before sending it.
        clock: a monotonic clock in seconds (tests pass a fake one).
        free_snapshot_chars: below this length snapshots ignore the byte budget.
        max_growth: a due snapshot is sent regardless of the budget once the text is this many
            times longer than at the last snapshot.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        free_snapshot_chars: int = 4096,
        max_growth: float = 8.0,
    ) -> None:
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self._send = send
        self.interval = float(interval)
        self.clock = clock
        self.free_snapshot_chars = free_snapshot_chars
        self.max_growth = max_growth
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget the text and counters (a new stream starts); the next batch is a snapshot."""
        with self._lock:
            self._sent: list[str] = []  # text already sent, in pieces compacted now and then
            self._pending: list[str] = []  # text appended since the last batch
            self._length = 0  # characters appended so far
            self._sent_length = 0  # characters the sent messages cover
            self._snapshot_length = 0  # length of the text at the last snapshot
            self._text_bytes = 0  # UTF-8 bytes of the sent text
            self._last_flush = self.clock()
            self.messages = 0
            self.snapshots = 0
            self.bytes_sent = 0

    @property
    def text(self) -> str:
        """All the text appended since the last :meth:`reset`."""
        with self._lock:
            return self._sent_text() + "".join(self._pending)

    def _sent_text(self) -> str:
        if len(self._sent) > 1:
            self._sent[:] = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    @property
    def pending(self) -> int:
        """Characters appended but not yet sent."""
        return self._length - self._sent_length

    def append(self, piece: str) -> None:
        """Add ``piece``; send the batch if ``interval`` has passed since the last one.

        An empty ``piece`` only sends a batch that is due (call it when idle, so a pause in
        the stream does not hold back the last tokens).
        """
        with self._lock:
            if piece:
                self._pending.append(piece)
                self._length += len(piece)
            if self._length > self._sent_length and self.clock() - self._last_flush >= self.interval:
                self.flush()

    def flush(self) -> None:
        """Send what is pending now, as a delta or a snapshot."""
        with self._lock:
            self._last_flush = self.clock()
            if self._length == self._sent_length:
                return
            batch = "".join(self._pending)
            self._pending.clear()
            self._sent.append(batch)
            self._text_bytes += len(batch.encode())
            if self._snapshot_now():
                content: dict[str, Any] = {"type": "snapshot", "text": self._sent_text()}
                self._snapshot_length = self._length
                self.snapshots += 1
            else:
                content = {"type": "delta", "offset": self._sent_length, "text": batch}
                if len(self._sent) >= 256:
                    self._sent_text()
            self._sent_length = self._length
            self.messages += 1
            self.bytes_sent += _json_size(content)
            self._send(content)

    def _snapshot_now(self) -> bool:
        """Whether this batch goes out as a snapshot (see the class's rules)."""
        last, length = self._snapshot_length, self._length
        if last == 0:
            return True
        if length < 2 * last:
            return False
        if length < self.free_snapshot_chars or length >= self.max_growth * last:
            return True
        # Keys and quotes of a snapshot: {"type":"snapshot","text":""} (JSON escapes not counted).
        return self.bytes_sent + self._text_bytes + 29 <= 3 * self._text_bytes


# --------------------------------------------------------------------------- the live answer


def _host_text(host: Any) -> str | None:
    if host is None:
        return None
    return str(getattr(host, "api_url", host))


def _number(value: Any) -> float | int | None:
    """A JSON-safe number: None for missing, NaN or infinite values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return int(value) if isinstance(value, int) else number


class StreamOutput(anywidget.AnyWidget):
    """The live output of one ``%%fabstir`` answer (an ``OutputSink`` for the magics).

    Call :meth:`start`, then :meth:`append` as text arrives, then one of :meth:`finish`,
    :meth:`failed` or :meth:`cancelled`. ``start`` displays the widget (unless ``show=False``);
    the end updates that display, so its ``text/plain`` is the final text.

    Traits (synced): ``text`` (the final text, set once at the end), ``status`` (``state``:
    running, done, cancelled or error; ``host``, ``model``, ``ttft`` in seconds,
    ``tokens_per_second``, ``tokens``, ``cost``, ``cost_unit``, ``finish_reason``, ``note``,
    ``error``: ``{code, message, hint}``), ``format`` (markdown, text, code, json) and
    ``background`` (show a stop button while running).

    Args:
        format: how the final text is rendered.
        background: show a stop button; clicking it calls the :meth:`on_stop` callbacks.
        interval: seconds to batch text before sending it (``update_interval`` is an alias,
            the name the magics' config uses).
        clock: a monotonic clock (tests pass a fake one).
        send: where messages go (default: the widget's comm); tests pass a recorder.
        on_stop: a callback for the stop button.
        note: appended to the status line.
        show: display the widget on :meth:`start`.
    """

    _esm = STATIC / "stream_output.js"
    _css = STATIC / "stream_output.css"

    text = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Dict().tag(sync=True)
    format = traitlets.Enum(FORMATS, default_value="markdown").tag(sync=True)
    background = traitlets.Bool(False).tag(sync=True)
    # Keys the JS module's per-model state (initialize and render see different model proxies).
    _key = traitlets.Unicode("").tag(sync=True)

    def __init__(
        self,
        *,
        format: str = "markdown",
        background: bool = False,
        interval: float = DEFAULT_INTERVAL,
        update_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[[dict[str, Any]], None] | None = None,
        on_stop: Callable[[], Any] | None = None,
        note: str | None = None,
        show: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(format=format, background=background, _key=uuid.uuid4().hex, **kwargs)
        self._custom_send = send
        self.batcher = DeltaBatcher(
            self._send_message,
            interval=interval if update_interval is None else update_interval,
            clock=clock,
        )
        self.note = note
        self._show = show
        self._display_handle: Any = None
        self._stop_callbacks: list[Callable[[], Any]] = []
        self._started_at: float | None = None
        self._first_text_at: float | None = None
        self._state = "new"
        if on_stop is not None:
            self.on_stop(on_stop)
        self.on_msg(self._handle_message)

    # ---------------------------------------------------------------- the OutputSink protocol

    def start(self, *, host: str | None = None, model: str | None = None) -> None:
        """Show the widget, running, before any text arrives (``host``/``model`` as requested)."""
        if self._state != "new":
            self._send_message({"type": "reset"})
        self.batcher.reset()
        self._state = "running"
        self._started_at = self.batcher.clock()
        self._first_text_at = None
        with self.hold_sync():
            self.text = ""
            self.status = self._status("running", host=_host_text(host), model=model)
        if self._show and self._display_handle is None:
            self._display_handle = _display(self)

    def append(self, text: str) -> None:
        """Add text that just arrived; it reaches the view within ``interval`` seconds.

        ``append("")`` sends a batch that is due without adding text: call it when the stream
        is idle (e.g. on each queue timeout) so a pause does not hold back the last tokens.
        """
        if self._state == "new":
            self.start()
        elif self._state != "running":
            return
        if text and self._first_text_at is None:
            self._first_text_at = self.batcher.clock()
            if self._started_at is not None:
                self.status = {**self.status, "ttft": self._first_text_at - self._started_at}
        self.batcher.append(text)

    def tick(self) -> None:
        """Send a batch that is due; same as ``append("")``."""
        self.append("")

    def finish(self, result: Any) -> None:
        """Show the final rendering of ``result.text`` and the status line."""
        if not self._ending():
            return
        text = getattr(result, "text", None)
        text = self.batcher.text if text is None else str(text)
        usage = getattr(result, "usage", None)
        tokens = None
        if usage is not None:
            tokens = getattr(usage, "received_tokens", None) or getattr(usage, "completion_tokens", None)
        ttft = getattr(result, "ttft", None)
        if ttft is None:
            ttft = self.status.get("ttft")
        status = self._status(
            "done",
            host=_host_text(getattr(result, "host", None)) or self.status.get("host"),
            model=getattr(result, "model", None) or self.status.get("model"),
            ttft=_number(ttft),
            tokens_per_second=_number(getattr(usage, "tokens_per_second", None)),
            tokens=_number(tokens),
            cost=_number(getattr(usage, "cost", None)),
            cost_unit=getattr(usage, "cost_unit", None),
            finish_reason=getattr(result, "finish_reason", None),
        )
        self._end("done", text, status)

    def failed(self, error: FabstirError | BaseException) -> None:
        """Show the error as ``[CODE] message`` with its hint; the text so far stays."""
        if not self._ending():
            return
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        detail = {
            "code": str(getattr(error, "code", None) or type(error).__name__),
            "message": str(message),
            "hint": getattr(error, "hint", None),
        }
        host = getattr(error, "host", None)
        status = self._status("error", host=host or self.status.get("host"), model=self.status.get("model"),
                              ttft=self.status.get("ttft"), error=detail)
        self._end("error", self.batcher.text, status)

    def cancelled(self) -> None:
        """Mark the output cancelled; the text so far stays."""
        if not self._ending():
            return
        status = self._status("cancelled", host=self.status.get("host"), model=self.status.get("model"),
                              ttft=self.status.get("ttft"))
        self._end("cancelled", self.batcher.text, status)

    def set_cancel(self, callback: Callable[[], Any]) -> None:
        """Have the stop button call ``callback()`` (the magics' optional ``OutputSink`` extra)."""
        self.on_stop(callback)

    # ---------------------------------------------------------------- the rest of the API

    @property
    def state(self) -> str:
        """``new``, ``running``, ``done``, ``cancelled`` or ``error``."""
        return self._state

    def on_stop(self, callback: Callable[[], Any], remove: bool = False) -> None:
        """Register (or with ``remove=True`` drop) a callback for the stop button."""
        if remove:
            self._stop_callbacks = [cb for cb in self._stop_callbacks if cb is not callback]
        else:
            self._stop_callbacks.append(callback)

    def show(self) -> Any:
        """Display the widget (once) and return its display handle."""
        if self._display_handle is None:
            self._display_handle = _display(self)
        return self._display_handle

    def plain_text(self) -> str:
        """The ``text/plain`` rendering: the text, and a last line for a cancelled or failed stream."""
        text = self.text if self._state in ("done", "cancelled", "error") else self.batcher.text
        note = ""
        if self._state == "cancelled":
            note = "[cancelled]"
        elif self._state == "error":
            error = self.status.get("error") or {}
            note = f"[{error.get('code')}] {error.get('message')}"
            if error.get("hint"):
                note += f" ({error['hint']})"
        if note:
            return f"{text}\n{note}" if text else note
        return text

    def __repr__(self) -> str:
        return self.plain_text()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.plain_text())

    # ---------------------------------------------------------------- internals

    def _ending(self) -> bool:
        """Get ready to end the stream: False if it has already ended (the later call is ignored)."""
        if self._state == "new":
            self.start()
        if self._state != "running":
            return False
        self.batcher.flush()
        return True

    def _status(self, state: str, **fields: Any) -> dict[str, Any]:
        status: dict[str, Any] = {
            "state": state,
            "host": None,
            "model": None,
            "ttft": None,
            "tokens_per_second": None,
            "tokens": None,
            "cost": None,
            "cost_unit": None,
            "finish_reason": None,
            "note": self.note,
            "error": None,
        }
        status.update(fields)
        return status

    def _end(self, state: str, text: str, status: dict[str, Any]) -> None:
        self._state = state
        with self.hold_sync():
            self.text = text
            self.status = status
        if self._display_handle is not None:
            try:
                self._display_handle.update(self)
            except Exception as exc:  # the display is cosmetic; the widget state is already right
                logger.debug("fabstir: could not update the widget's display: %s", exc)

    def _send_message(self, content: dict[str, Any]) -> None:
        if self._custom_send is not None:
            self._custom_send(content)
        else:
            self.send(content)

    def _handle_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "stop":
            for callback in list(self._stop_callbacks):
                try:
                    callback()
                except Exception:  # one failing callback must not hide the others
                    logger.exception("fabstir: stop callback %r failed", callback)


def _display(widget: Any) -> Any:
    """Display ``widget`` with a display id; None outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    if get_ipython() is None:
        return None
    return display(widget, display_id=True)


# --------------------------------------------------------------------------- the host dashboard

#: The host table's columns, in order (``price`` is per 1000 tokens of the host's cheapest model).
HOST_COLUMNS = (
    "address", "url", "models", "region", "stake", "price", "price_unit", "latency_ms", "status",
    "requests", "tokens", "errors",
)
#: The usage summary's columns, one row per host and model.
USAGE_COLUMNS = (
    "host", "model", "requests", "errors", "tokens", "cost", "cost_unit", "mean_ttft_ms", "tokens_per_second",
)


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


def host_rows(hosts: Iterable[HostInfo], usage: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Return one JSON-safe row per host (:data:`HOST_COLUMNS`).

    ``requests``, ``tokens`` and ``errors`` come from the usage summary rows of that host (by URL)
    when there are any, else from the host's own counters (this process's requests; no tokens).
    """
    by_host: dict[str, dict[str, int]] = {}
    for row in usage:
        totals = by_host.setdefault(str(row.get("host")), {"requests": 0, "tokens": 0, "errors": 0})
        for key in totals:
            totals[key] += int(row.get(key) or 0)
    rows = []
    for host in hosts:
        url = getattr(host, "api_url", None) or str(host)
        price, unit = _host_price(host)
        totals = by_host.get(url)
        rows.append({
            "address": getattr(host, "address", None),
            "url": url,
            "models": list(getattr(host, "models", ()) or ()),
            "region": getattr(host, "region", None),
            "stake": _clean(getattr(host, "stake", None)),
            "price": _clean(price),
            "price_unit": unit,
            "latency_ms": _clean(getattr(host, "latency_ms", None)),
            "status": getattr(host, "health", None) or "unknown",
            "requests": totals["requests"] if totals else int(getattr(host, "requests", 0) or 0),
            "tokens": totals["tokens"] if totals else 0,
            "errors": totals["errors"] if totals else int(getattr(host, "failures", 0) or 0),
        })
    return rows


def usage_rows(usage: Any) -> list[dict[str, Any]]:
    """Return the per host/model usage summary rows (:data:`USAGE_COLUMNS`) of ``usage``.

    ``usage`` is None, a records DataFrame (``UsageLedger.to_frame()``), a summary DataFrame
    (``UsageLedger.summary(by=("host", "model"))``), a ledger or sink (anything with
    ``to_frame()`` or a ``records`` list of :class:`~fabstir_jupyter.usage.UsageRecord`), or a
    list of usage records.
    """
    if usage is None:
        return []
    import pandas as pd

    frame = usage
    if not isinstance(frame, pd.DataFrame):
        if hasattr(frame, "to_frame") and callable(frame.to_frame):
            frame = frame.to_frame()
        else:
            records = getattr(frame, "records", frame)
            records = records() if callable(records) else records
            frame = pd.DataFrame([r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records])
    if frame.empty:
        return []
    if "requests" in frame.columns:  # already a summary
        frame = frame.reset_index()
        summary = pd.DataFrame({
            "host": frame.get("host"),
            "model": frame.get("model"),
            "requests": frame["requests"],
            "errors": frame.get("errors", 0),
            "tokens": frame.get("received_tokens", 0),
            "cost": frame.get("cost"),
            "cost_unit": frame.get("cost_unit"),
            "mean_ttft_ms": frame["mean_ttft"] * 1000 if "mean_ttft" in frame else None,
            "tokens_per_second": frame.get("mean_tokens_per_second"),
        })
    else:
        frame = frame.copy()
        for column in ("host", "model", "error_code", "cost", "cost_unit", "ttft", "tokens_per_second"):
            if column not in frame:
                frame[column] = None
        if "received_tokens" not in frame:
            frame["received_tokens"] = 0
        groups = frame.groupby(["host", "model"], dropna=False, sort=True)
        summary = pd.DataFrame({
            "requests": groups.size(),
            "errors": groups["error_code"].count(),
            "tokens": groups["received_tokens"].sum(),
            "cost": groups["cost"].sum(min_count=1),
            "cost_unit": groups["cost_unit"].agg(_one_unit),
            "mean_ttft_ms": groups["ttft"].mean() * 1000,
            "tokens_per_second": groups["tokens_per_second"].mean(),
        }).reset_index()
    return [{column: _clean(row.get(column)) for column in USAGE_COLUMNS}
            for row in summary.to_dict(orient="records")]


def _one_unit(values: Any) -> str | None:
    units = set(values.dropna())
    if not units:
        return None
    return str(units.pop()) if len(units) == 1 else "mixed"


def _sort_key(value: Any) -> tuple[int, Any]:
    """Nulls last; numbers by value; text case-insensitively; lists by their joined text."""
    if value is None:
        return (2, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return (1, str(value).lower())


class HostDashboard(anywidget.AnyWidget):
    """Discovered hosts: a sortable table, a usage summary and a latency/price chart.

    Args:
        source: where the data comes from. Either a callable returning ``(hosts, usage)`` (a
            list of :class:`~fabstir_jupyter.hosts.HostInfo`, and usage as :func:`usage_rows`
            accepts, or None), or a :class:`~fabstir_jupyter.hosts.HostManager` (its known
            hosts, no I/O), or a list of hosts.
        ledger: usage for a manager or list source (a ``UsageLedger``, a frame...).
        auto_refresh: seconds between refreshes requested by the view; 0 is off. They run in
            the kernel when it is idle.

    The refresh button (and auto-refresh) sends ``{"type": "refresh"}``: the kernel calls the
    source again and resets ``rows``/``usage_rows``. A source that raises leaves the rows as they
    were and sets ``error``.
    """

    _esm = STATIC / "host_dashboard.js"
    _css = STATIC / "host_dashboard.css"

    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    usage_rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    auto_refresh = traitlets.Float(0.0, min=0.0).tag(sync=True)
    sort_by = traitlets.Unicode("latency_ms").tag(sync=True)
    sort_ascending = traitlets.Bool(True).tag(sync=True)
    updated = traitlets.Float(0.0).tag(sync=True)  # epoch seconds of the last refresh
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, source: Any, ledger: Any = None, *, auto_refresh: float = 0.0, **kwargs: Any) -> None:
        super().__init__(auto_refresh=auto_refresh, **kwargs)
        self._source = source
        self._ledger = ledger
        self.on_msg(self._handle_message)
        self.refresh()

    def _load(self) -> tuple[list[Any], Any]:
        source = self._source
        if callable(source) and not hasattr(source, "hosts"):
            hosts, usage = source()
        else:
            hosts = getattr(source, "hosts", source)
            usage = self._ledger
        return list(hosts or ()), usage

    def refresh(self) -> None:
        """Read the source again and replace ``rows`` and ``usage_rows`` (one sync message).

        Raises:
            Exception: whatever the source raised (``error`` is also set); a refresh from the
                view's button logs it instead.
        """
        try:
            hosts, usage = self._load()
            summary = usage_rows(usage)
            rows = host_rows(hosts, summary)
        except Exception as exc:
            self.error = f"refresh failed: {exc}"
            raise
        with self.hold_sync():
            self.rows = rows
            self.usage_rows = summary
            self.error = ""
            self.updated = time.time()

    def sorted_rows(self) -> list[dict[str, Any]]:
        """The rows in the table's order (``sort_by``, ``sort_ascending``; missing values last)."""
        key = self.sort_by
        present = [r for r in self.rows if r.get(key) is not None]
        missing = [r for r in self.rows if r.get(key) is None]
        present.sort(key=lambda r: _sort_key(r.get(key)), reverse=not self.sort_ascending)
        return present + missing

    @property
    def hosts_frame(self) -> pd.DataFrame:
        """The host table as a DataFrame, in the table's order."""
        import pandas as pd

        return pd.DataFrame(self.sorted_rows(), columns=list(HOST_COLUMNS))

    @property
    def usage_frame(self) -> pd.DataFrame:
        """The usage summary as a DataFrame, one row per host and model."""
        import pandas as pd

        return pd.DataFrame(self.usage_rows, columns=list(USAGE_COLUMNS))

    def __repr__(self) -> str:
        count = len(self.rows)
        return f"HostDashboard: {count} host{'' if count == 1 else 's'}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _handle_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "refresh":
            try:
                self.refresh()
            except Exception:
                logger.exception("fabstir: dashboard refresh failed")


# --------------------------------------------------------------------------- batch progress


class BatchProgress(anywidget.AnyWidget):
    """A progress bar for a batch of requests: done of total, with errors.

    Call :meth:`update` as requests finish; each call sends one small state update.
    """

    _esm = STATIC / "batch_progress.js"
    _css = STATIC / "batch_progress.css"

    done = traitlets.Int(0, min=0).tag(sync=True)
    total = traitlets.Int(0, min=0).tag(sync=True)
    errors = traitlets.Int(0, min=0).tag(sync=True)
    description = traitlets.Unicode("").tag(sync=True)

    def __init__(self, total: int = 0, *, description: str = "", **kwargs: Any) -> None:
        super().__init__(total=total, description=description, **kwargs)

    def update(self, done: int, total: int | None = None, errors: int | None = None) -> None:
        """Show ``done`` of ``total`` finished (``errors`` of them failed); None keeps a value."""
        with self.hold_sync():
            if total is not None:
                self.total = total
            self.done = done
            if errors is not None:
                self.errors = errors

    def __repr__(self) -> str:
        label = f"{self.description}: " if self.description else ""
        errors = f", {self.errors} error{'' if self.errors == 1 else 's'}" if self.errors else ""
        return f"BatchProgress: {label}{self.done}/{self.total} done{errors}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))
