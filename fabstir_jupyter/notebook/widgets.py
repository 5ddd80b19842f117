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

The widgets only adapt: the pacing rules live in :mod:`.text_deltas`, the host and usage tables
(rows, prices, sorting, DataFrames) in :mod:`.tables`, neither of which imports a widget library.
The front end is TypeScript in the repository's ``js/`` folder, bundled by esbuild into
``static/`` (committed, so installing the package needs no Node; a test rebuilds and compares).
pandas is imported only by the ``*_frame`` properties.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import anywidget
import traitlets

from .text_deltas import DEFAULT_INTERVAL, DeltaBatcher
from .tables import host_rows, host_text, hosts_dataframe, sort_rows, usage_dataframe, usage_rows

if TYPE_CHECKING:
    import pandas as pd

    from ..errors import FabstirError

__all__ = ["StreamOutput", "HostDashboard", "BatchProgress"]

logger = logging.getLogger("fabstir_jupyter.notebook")

STATIC = Path(__file__).parent / "static"

FORMATS = ("markdown", "text", "code", "json")


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
        interval: least seconds between two messages (``update_interval`` is an alias, the
            name the magics' config uses).
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
        send: Callable[[Any], None] | None = None,
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
            self.status = self._status("running", host=host_text(host), model=model)
        if self._show and self._display_handle is None:
            self._display_handle = _display(self)

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

    def tick(self) -> None:
        """Send pending text that is due; same as ``append("")``."""
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
            host=host_text(getattr(result, "host", None)) or self.status.get("host"),
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
        return sort_rows(self.rows, self.sort_by, self.sort_ascending)

    @property
    def hosts_frame(self) -> pd.DataFrame:
        """The host table as a DataFrame, in the table's order (``models`` as text)."""
        return hosts_dataframe(self.sorted_rows())

    @property
    def usage_frame(self) -> pd.DataFrame:
        """The usage summary as a DataFrame, one row per host and model."""
        return usage_dataframe(self.usage_rows)

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
