"""The notebook's anywidget widgets: the live answer, the host dashboard and batch progress.

:class:`StreamOutput` shows one ``%%fabstir`` answer as it streams (it implements the magics'
``OutputSink``: ``start``, ``append``, ``finish``, ``failed``, ``cancelled``). Setting a trait
resends its whole value, so appending tokens to a trait costs O(n²) bytes. Instead
:class:`~.text_deltas.DeltaBatcher` turns the growing text into custom messages, as soon as text
is pending and at most one per ``interval`` seconds (the front end also drops iopub output above
1000 messages/s)::

    " more words"                                    # a delta: appended by a view in step
    {"type": "snapshot", "text": "the whole text"}   # catch-up for a view that missed some
    {"type": "reset"}                                # a new stream on the same widget

A custom message sent before the front end has loaded the widget's module is lost, and a message
from the view is not handled while the cell runs, so the kernel pushes catch-up state unasked: a
snapshot replaces a delta when the text has doubled since the last snapshot (and the snapshot
budget has room), at the latest when it has grown 8×. The full ``text`` trait is set once, at the
end (saved widget state and re-renders are right). Deltas' quotes and snapshots each spend from a
byte pool that grows with the text, so messages plus the final trait stay within 3.9× the text +
338 bytes at any token rate: under 4× past 3.4 kB (see :class:`~.text_deltas.DeltaBatcher`).

Each widget's display data also carries static fallbacks (``text/plain`` and escaped
``text/html``), updated when the answer ends or the dashboard refreshes, so a saved notebook reads
well where the widget JavaScript does not run: nbconvert without widget state, GitHub, viewers.

The widgets only adapt: the pacing rules live in :mod:`.text_deltas`, the host and usage tables
(rows, prices, sorting, DataFrames) in :mod:`.tables`, neither of which imports a widget library.
The front end is TypeScript in the repository's ``js/`` folder, bundled by esbuild into
``static/`` (committed, so installing the package needs no Node; a test rebuilds and compares).
pandas is imported only by the ``*_frame`` properties.
"""

from __future__ import annotations

import html
import logging
import math
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from .rendering import LiveStatus, answer_html, attempt_route, job_text, lock_text, network_part, route_text
from .tables import (
    host_rows,
    host_text,
    hosts_dataframe,
    jobs_dataframe,
    sort_rows,
    tables_html,
    usage_dataframe,
    usage_rows,
)
from .text_deltas import DEFAULT_INTERVAL, DeltaBatcher

if TYPE_CHECKING:
    import pandas as pd

    from ..errors import FabstirError

__all__ = ["StreamOutput", "HostDashboard", "BatchProgress"]

logger = logging.getLogger("fabstir_jupyter.notebook")

STATIC = Path(__file__).parent / "static"

FORMATS = ("markdown", "text", "code", "json")
#: Least seconds between two updates of a running stream's paid cost in its status line (a change of
#: job or of encryption shows at once).
LIVE_STATUS_INTERVAL = 0.5


# --------------------------------------------------------------------------- the live answer


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


def _cost_text(cost: float) -> str:
    """A cost with a few significant digits and no exponent (js/src/format.ts formatCost)."""
    if cost == 0:
        return "0"
    rounded = float(f"{cost:.4f}") if abs(cost) >= 0.01 else float(f"{cost:.3g}")
    text = format(Decimal(repr(rounded)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def status_text(status: dict[str, Any]) -> str:
    """The widget's status line as text (js/src/stream_output.ts statusParts): host (``A → B after
    N tokens`` after a failover), model, the wait for the network, TTFT, tokens/s, tokens, cost
    (``est.`` for a paid answer: its job settles later), the paid job, the encryption lock, finish
    reason, note."""
    parts: list[str] = []
    route = status.get("route") or []
    if len(route) > 1:
        parts.append(route_text(route))
    elif status.get("host"):
        parts.append(str(status["host"]))
    if status.get("model"):
        parts.append(str(status["model"]))
    if isinstance(status.get("network"), (int, float)):
        parts.append(network_part(status["network"]))
    if isinstance(status.get("ttft"), (int, float)):
        parts.append(f"TTFT {_seconds_text(status['ttft'])}")
    if isinstance(status.get("tokens_per_second"), (int, float)):
        parts.append(f"{status['tokens_per_second']:.1f} tok/s")
    if isinstance(status.get("tokens"), (int, float)):
        parts.append(f"{status['tokens']} token{'' if status['tokens'] == 1 else 's'}")
    if isinstance(status.get("cost"), (int, float)):
        cost = f"{_cost_text(status['cost'])} {status.get('cost_unit') or ''}".strip()
        parts.append(f"{cost} est." if status.get("cost_estimate") else cost)
    for part in (job_text(status.get("job_ids")), lock_text(status.get("encrypted"))):
        if part:
            parts.append(part)
    if status.get("finish_reason") and status["finish_reason"] != "stop":
        parts.append(f"finish: {status['finish_reason']}")
    if status.get("note"):
        parts.append(str(status["note"]))
    return " · ".join(parts)


def _seconds_text(seconds: float) -> str:
    """``140 ms`` under a second, else ``2.3 s`` (js/src/stream_output.ts durationText)."""
    return f"{round(seconds * 1000)} ms" if seconds < 1 else f"{seconds:.1f} s"


def _usage_fields(result: Any) -> dict[str, Any]:
    """The status fields a result's usage gives: tokens, tokens/s, cost, and the hosts it used."""
    usage = getattr(result, "usage", None)
    tokens = None
    if usage is not None:
        tokens = getattr(usage, "received_tokens", None) or getattr(usage, "completion_tokens", None)
    route = attempt_route(getattr(result, "records", None))
    fields = {
        "tokens_per_second": _number(getattr(usage, "tokens_per_second", None)),
        "tokens": _number(tokens),
        "cost": _number(getattr(usage, "cost", None)),
        "cost_unit": getattr(usage, "cost_unit", None),
        "route": route if len(route) > 1 else None,
        "encrypted": getattr(result, "encrypted", None),
    }
    job_ids = [int(job) for job in getattr(result, "job_ids", None) or ()]
    if job_ids:  # a paid answer: its cost at its jobs' prices, an estimate until they settle
        fields.update(job_ids=job_ids, cost_estimate=True)
        if getattr(result, "cost", None) is not None:
            fields.update(cost=_number(result.cost), cost_unit=getattr(result, "cost_unit", None))
    return fields


class StreamOutput(anywidget.AnyWidget):
    """The live output of one ``%%fabstir`` answer (an ``OutputSink`` for the magics).

    Call :meth:`start`, then :meth:`append` as text arrives, then one of :meth:`finish`,
    :meth:`failed` or :meth:`cancelled`. ``start`` displays the widget (unless ``show=False``);
    the end updates that display, so its ``text/plain`` is the final text.

    Traits (synced): ``text`` (the final text, set once at the end), ``status`` (``state``:
    running, done, cancelled or error; ``host``, ``model``, ``ttft`` in seconds from the cell's
    start, ``step``: what the network the cell waits for is doing, else None, ``network``: seconds
    the cell waited for its network to start, else None, ``tokens_per_second``, ``tokens``,
    ``cost``, ``cost_unit``, ``finish_reason``, ``note``, ``error``: ``{code, message, hint}``,
    ``route``: ``[{host, tokens}, ...]`` when the request went through more than one host, else
    None; on a paid network ``job_ids``: the jobs the answer is billed to, and ``cost_estimate``:
    true, the cost being the tokens so far at the jobs' prices until they settle; ``encrypted``:
    true, false or None as the stream's, shown as a lock), ``format`` (markdown, text, code, json)
    and ``background`` (show a stop button while running).

    While the stream runs, :meth:`live` shows its paid job, its cost so far and its lock: a change
    of job or of encryption at once, the cost at most every :data:`LIVE_STATUS_INTERVAL` seconds.

    Its display data carries, besides the widget view, the final text as ``text/plain`` and as
    escaped ``text/html`` with the status line (see :func:`~.output.answer_html`).

    Args:
        format: how the final text is rendered.
        background: show a stop button; clicking it calls the :meth:`on_stop` callbacks.
        interval: least seconds between two messages (``update_interval`` is an alias, the
            name the magics' config uses).
        clock: a monotonic clock (tests pass a fake one).
        send: where messages go (default: the widget's comm); tests pass a recorder.
        on_stop: a callback for the stop button.
        note: appended to the status line.
        show: display the widget on :meth:`start`.
        started_at: when the cell started, on ``clock``'s scale: the first :meth:`start` counts
            its times (TTFT, the wait for the network) from there (default: from itself).
    """

    _esm = STATIC / "stream_output.js"
    _css = STATIC / "stream_output.css"
    shows_errors = True  # failed() shows the error (see the magics' OutputSink)

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
        send: Callable[[Any], None] | None = None,
        on_stop: Callable[[], Any] | None = None,
        note: str | None = None,
        show: bool = True,
        started_at: float | None = None,
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
        self._cell_started_at = started_at
        self._first_text_at: float | None = None
        self._live: LiveStatus | None = None  # not shown yet
        self._live_shown_at: float | None = None
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
        self._started_at = self.batcher.clock() if self._cell_started_at is None else self._cell_started_at
        self._cell_started_at = None  # a later start (the widget reused) counts from itself
        self._first_text_at = None
        self._live, self._live_shown_at = None, None
        with self.hold_sync():
            self.text = ""
            self.status = self._status("running", host=host_text(host), model=model)
        if self._show and self._display_handle is None:
            self._display_handle = _display(self)

    def network_step(self, label: str) -> None:
        """Show what the network the cell waits for is doing (before any text)."""
        if self._state == "new":
            self.start()
        if self._state == "running":
            self.status = {**self.status, "step": label}

    def network_ready(self) -> None:
        """The network the cell waited for is ready: the status line shows how long that took."""
        if self._state == "new":
            self.start()
        if self._state == "running" and self._started_at is not None:
            self.status = {**self.status, "step": None, "network": self.batcher.clock() - self._started_at}

    def append(self, text: str) -> None:
        """Add text that just arrived; it is sent at once when ``interval`` has passed since the
        last message, else with the next ``append`` after that (see :class:`~.text_deltas.DeltaBatcher`).

        ``append("")`` sends pending text that is due without adding any: call it when the stream
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
        if self._live is not None and self._live_due():
            self._show_live()

    def live(self, status: LiveStatus) -> None:
        """Show what the running stream's status line says besides its text: its paid job and
        encryption at once when they change, its cost so far at most every
        :data:`LIVE_STATUS_INTERVAL` seconds (a later :meth:`append`, even ``append("")``, shows one
        held back). Ignored once the stream has ended."""
        if self._state == "new":
            self.start()
        if self._state != "running":
            return
        self._live = status
        shown = (self.status.get("job_ids"), self.status.get("encrypted"))
        if shown != (list(status.job_ids) or None, status.encrypted) or self._live_due():
            self._show_live()

    def _live_due(self) -> bool:
        return self._live_shown_at is None or self.batcher.clock() - self._live_shown_at >= LIVE_STATUS_INTERVAL

    def _show_live(self) -> None:
        assert self._live is not None
        self.status = {**self.status, **self._live.fields()}
        self._live, self._live_shown_at = None, self.batcher.clock()

    def tick(self) -> None:
        """Send pending text that is due; same as ``append("")``."""
        self.append("")

    def finish(self, result: Any) -> None:
        """Show the final rendering of ``result.text`` and the status line (both hosts and where it
        switched, when ``result.records`` show a failover)."""
        if not self._ending():
            return
        text = getattr(result, "text", None)
        text = self.batcher.text if text is None else str(text)
        ttft = self.status.get("ttft")  # from the cell's start
        if ttft is None:
            ttft = getattr(result, "ttft", None)
        status = self._status(
            "done",
            host=host_text(getattr(result, "host", None)) or self.status.get("host"),
            model=getattr(result, "model", None) or self.status.get("model"),
            ttft=_number(ttft),
            network=self.status.get("network"),
            finish_reason=getattr(result, "finish_reason", None),
            **_usage_fields(result),
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
        if self._live is not None:
            self._show_live()
        kept = {key: self.status.get(key) for key in ("ttft", "network", "job_ids", "encrypted", "cost", "cost_unit",
                                                      "cost_estimate")}
        status = self._status("error", host=host or self.status.get("host"), model=self.status.get("model"),
                              error=detail, **kept)
        self._end("error", self.batcher.text, status)

    def cancelled(self, result: Any = None) -> None:
        """Mark the output cancelled; the text so far stays. ``result`` (the stopped request, when
        known) keeps its host, tokens and cost in the status line."""
        if not self._ending():
            return
        if result is None and self._live is not None:
            self._show_live()
        fields: dict[str, Any] = (_usage_fields(result) if result is not None else
                                  {key: self.status.get(key) for key in ("job_ids", "encrypted", "cost", "cost_unit",
                                                                         "cost_estimate")})
        fields.pop("tokens_per_second", None)  # a rate over a cut-off stream says little
        status = self._status("cancelled", host=host_text(getattr(result, "host", None)) or self.status.get("host"),
                              model=getattr(result, "model", None) or self.status.get("model"),
                              ttft=self.status.get("ttft"), network=self.status.get("network"), **fields)
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

    def static_html(self) -> str:
        """The ``text/html`` fallback: the final rendering (escaped), then the status line."""
        state = self._state
        text = self.text if state in ("done", "cancelled", "error") else self.batcher.text
        parts = ['<div class="fabstir-stream-static">']
        if text:
            parts.append(answer_html(text, "text" if state in ("new", "running") else self.format))
        if state == "error":
            error = self.status.get("error") or {}
            line = f"[{error.get('code') or 'ERROR'}] {error.get('message') or ''}"
            if error.get("hint"):
                line += f" (hint: {error['hint']})"
            parts.append(f"<p><strong>{html.escape(line)}</strong></p>")
        elif state == "cancelled":
            parts.append("<p><em>Cancelled: the text above is what arrived before the stop.</em></p>")
        elif state in ("new", "running"):
            step = self.status.get("step")
            parts.append(f"<p><em>{html.escape(str(step)) if step else 'streaming'}…</em></p>")
        line = status_text(self.status)
        if line:
            parts.append(f'<p style="font-size: smaller; opacity: 0.75">{html.escape(line)}</p>')
        parts.append("</div>")
        return "\n".join(parts)

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        return {**data, "text/plain": self.plain_text(), "text/html": self.static_html()}, metadata

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
            "step": None,
            "network": None,
            "ttft": None,
            "tokens_per_second": None,
            "tokens": None,
            "cost": None,
            "cost_unit": None,
            "finish_reason": None,
            "note": self.note,
            "error": None,
            "route": None,
            "job_ids": None,
            "cost_estimate": None,
            "encrypted": None,
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

    def _send_message(self, content: Any) -> None:
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


class HostDashboard(anywidget.AnyWidget):
    """Discovered hosts: a sortable table, a usage summary, this kernel's paid jobs and a
    latency/price chart.

    Args:
        source: where the data comes from. Either a callable returning ``(hosts, usage)`` or
            ``(hosts, usage, jobs)`` (a list of :class:`~fabstir_jupyter.hosts.HostInfo`, usage as
            :func:`usage_rows` accepts or None, and the paid jobs as :func:`~.tables.job_rows`
            rows, or None where nothing is paid), or a :class:`~fabstir_jupyter.hosts.HostManager`
            (its known hosts, no I/O), or a list of hosts.
        ledger: usage for a manager or list source (a ``UsageLedger``, a frame...).
        auto_refresh: seconds between refreshes requested by the view; 0 is off. They run in
            the kernel when it is idle.
        all_kernels: count the whole usage ledger. By default a ``UsageLedger`` (one file shared by
            every kernel) is read for this kernel's records only; the view has a checkbox for it.

    The refresh button (and auto-refresh) sends ``{"type": "refresh"}``: the kernel calls the
    source again and resets ``rows``/``usage_rows``/``job_rows``. ``paid`` says whether the source
    gave jobs (the view then shows the jobs table, even empty). A source that raises leaves the rows
    as they were and sets ``error``. Displayed, the dashboard carries its tables as escaped ``text/html``
    too (for nbconvert, GitHub and other viewers without the widget JavaScript); a refresh
    updates every display of it.
    """

    _esm = STATIC / "host_dashboard.js"
    _css = STATIC / "host_dashboard.css"

    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    usage_rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    job_rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    paid = traitlets.Bool(False).tag(sync=True)
    auto_refresh = traitlets.Float(0.0, min=0.0).tag(sync=True)
    sort_by = traitlets.Unicode("latency_ms").tag(sync=True)
    sort_ascending = traitlets.Bool(True).tag(sync=True)
    all_kernels = traitlets.Bool(False).tag(sync=True)
    updated = traitlets.Float(0.0).tag(sync=True)  # epoch seconds of the last refresh
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, source: Any, ledger: Any = None, *, auto_refresh: float = 0.0, all_kernels: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(auto_refresh=auto_refresh, all_kernels=all_kernels, **kwargs)
        self._source = source
        self._ledger = ledger
        self._hosts: list[Any] = []
        self._usage: Any = None
        self._jobs: list[dict[str, Any]] | None = None
        self._display_id = f"fabstir-dashboard-{uuid.uuid4().hex}"
        self._displayed = False
        self.on_msg(self._handle_message)
        self.observe(self._scope_changed, names="all_kernels")
        self.refresh()

    def _load(self) -> tuple[list[Any], Any, list[dict[str, Any]] | None]:
        source = self._source
        jobs = None
        if callable(source) and not hasattr(source, "hosts"):
            loaded = source()
            hosts, usage = loaded[0], loaded[1]
            jobs = loaded[2] if len(loaded) > 2 else None
        else:
            hosts = getattr(source, "hosts", source)
            usage = self._ledger
        return list(hosts or ()), usage, None if jobs is None else list(jobs)

    def refresh(self) -> None:
        """Read the source again and replace ``rows`` and ``usage_rows`` (one sync message), and
        the static fallback of every display of the dashboard.

        Raises:
            Exception: whatever the source raised (``error`` is also set); a refresh from the
                view's button logs it instead.
        """
        try:
            hosts, usage, jobs = self._load()
            rows, summary = self._tables(hosts, usage)
        except Exception as exc:
            self.error = f"refresh failed: {exc}"
            raise
        self._hosts, self._usage, self._jobs = hosts, usage, jobs
        self._show_tables(rows, summary)

    def _tables(self, hosts: list[Any], usage: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        summary = usage_rows(usage, all_kernels=self.all_kernels)
        return host_rows(hosts, summary), summary

    def _show_tables(self, rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
        with self.hold_sync():
            self.rows = rows
            self.usage_rows = summary
            self.job_rows = self._jobs or []
            self.paid = self._jobs is not None
            self.error = ""
            self.updated = time.time()
        self._update_displays()

    def _scope_changed(self, _change: Any) -> None:
        """The view's "all kernels" checkbox: recount the usage already loaded (no new discovery)."""
        try:
            rows, summary = self._tables(self._hosts, self._usage)
        except Exception as exc:
            self.error = f"usage unavailable: {exc}"
            logger.exception("fabstir: dashboard usage failed")
            return
        self._show_tables(rows, summary)

    def sorted_rows(self) -> list[dict[str, Any]]:
        """The rows in the table's order (``sort_by``, ``sort_ascending``; missing values last)."""
        return sort_rows(self.rows, self.sort_by, self.sort_ascending)

    @property
    def hosts_frame(self) -> pd.DataFrame:
        """The host table as a DataFrame, in the table's order (``models`` as text)."""
        return hosts_dataframe(self.sorted_rows())

    @property
    def usage_frame(self) -> pd.DataFrame:
        """The usage summary as a DataFrame, one row per host and model."""
        return usage_dataframe(self.usage_rows)

    @property
    def jobs_frame(self) -> pd.DataFrame:
        """This kernel's paid jobs as a DataFrame (:data:`~.tables.JOB_COLUMNS`: job, host, model, deposit,
        tokens, billed, refund, status; a job not settled yet bills an estimate and has no refund)."""
        return jobs_dataframe(self.job_rows)

    def __repr__(self) -> str:
        count = len(self.rows)
        return f"HostDashboard: {count} host{'' if count == 1 else 's'}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def static_html(self) -> str:
        """The ``text/html`` fallback: the host table (in the table's order) and the usage summary."""
        scope = "all kernels" if self.all_kernels else "this kernel"
        return tables_html(self.sorted_rows(), self.usage_rows, scope=scope,
                           job_table=self.job_rows if self.paid else None)

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        return {**data, "text/html": self.static_html()}, metadata

    def _ipython_display_(self) -> None:
        """Display with this dashboard's display id, so a refresh can update the static fallback
        (an ``Out[]`` result cannot be updated; this display can)."""
        from IPython.display import display

        bundle = self._repr_mimebundle_()
        if bundle is None:
            return
        data, metadata = bundle
        display(data, metadata=metadata, raw=True, display_id=self._display_id)
        self._displayed = True

    def _update_displays(self) -> None:
        if not self._displayed:
            return
        try:
            from IPython.display import update_display

            bundle = self._repr_mimebundle_()
            if bundle is not None:
                update_display(bundle[0], metadata=bundle[1], raw=True, display_id=self._display_id)
        except Exception as exc:  # the fallback is cosmetic; the widget's own state is right
            logger.debug("fabstir: could not update the dashboard's display: %s", exc)

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
