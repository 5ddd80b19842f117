"""Live outputs of ``%%fabstir``: the :class:`OutputSink` protocol and the plain-text fallback.

Every live output implements :class:`OutputSink`. The magic calls ``start`` once (before any text),
``append`` for each batch of text as it arrives, and then exactly one of ``finish``, ``failed`` or
``cancelled``. In a blocking cell every call comes from the main thread; in ``--background`` mode
they come from the loop thread, in the context (and so the output area) of the cell that started
the stream.

:func:`make_output` picks the live widget (``widgets.StreamOutput``) where a widget front end is
available, else :class:`TextOutput`: text streamed to stdout, then the final rendering and a
one-line status.

Every final rendering also carries static HTML (:func:`answer_html`: Markdown rendered by
markdown-it with raw HTML off, the same rules as the widget's front end), so a notebook exported
by nbconvert, or shown by GitHub or any viewer without the widget JavaScript, still reads well, and
model text can never become markup there.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO, TypeVar, runtime_checkable

from .rendering import (
    STATUS_PREFIX,
    Rendering,
    answer_html,
    attempt_route,
    format_error,
    hosts_part,
    network_part,
    render,
    route_text,
    status_line,
    usage_parts,
)

__all__ = [
    "OutputSink",
    "TextOutput",
    "Rendering",
    "answer_html",
    "attempt_route",
    "route_text",
    "make_output",
    "render",
    "status_line",
    "widgets_available",
]

logger = logging.getLogger("fabstir_jupyter.notebook")


@runtime_checkable
class OutputSink(Protocol):
    """What a live output of ``%%fabstir`` implements.

    ``result`` in :meth:`finish` is an :class:`~fabstir_jupyter.inference.InferenceResult` (or a
    finished :class:`~fabstir_jupyter.inference.InferenceStream`): ``text``, ``usage`` (a
    :class:`~fabstir_jupyter.usage.UsageRecord` or None), ``finish_reason``, ``ttft``, ``host`` (a
    URL string, or a ``HostInfo`` on a stream) and ``model``.

    ``records`` on ``result``, where present, are the request's attempts (one
    :class:`~fabstir_jupyter.usage.UsageRecord` each): a request that failed over to another host
    shows both hosts and where it switched (:func:`attempt_route`).

    Optional extras, used when present: ``set_cancel(callback)`` (a stop button calls ``callback()``
    to cancel a ``--background`` stream; the callback is thread-safe and returns at once);
    ``network_step(label)`` and ``network_ready()``, called before any text while the cell waits
    for its network to start (each step as it begins, then once when it is ready);
    ``shows_errors``, true when :meth:`failed` shows the error itself (the magic then raises it
    without repeating it); ``live(status)``, called with a :class:`~.rendering.LiveStatus` whenever
    what the stream's status line says besides its text changes (its paid job, the answer's cost so
    far, its encryption), no later than the text it came with (a widget shows it at its own pace).

    Times shown (time to first token, the wait for the network) count from the cell's start: the
    ``started_at`` the outputs of :func:`make_output` take, else their ``start()``.
    """

    def start(self, *, host: str | None, model: str | None) -> None:
        """Show the output (before any text arrives); ``host``/``model`` as requested, if known."""

    def append(self, text: str) -> None:
        """Add text that just arrived (one or more tokens)."""

    def finish(self, result: Any) -> None:
        """Show the final rendering and the status line."""

    def failed(self, error: BaseException) -> None:
        """Mark the output failed (``error`` is a ``FabstirError``, or an unexpected exception of a
        ``--background`` stream). An output that can show the error does (a blocking cell also
        raises it; a ``--background`` stream cannot, so its output is the only place it shows)."""

    def cancelled(self, result: Any = None) -> None:
        """Mark the output cancelled (kernel interrupt, stop button or ``%fabstir cancel``).

        ``result``, when known, is the stopped request as in :meth:`finish` (its host, partial
        text and usage so far), so the output keeps the host, tokens and cost.
        """


# --------------------------------------------------------------------------- rendering

def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is there whenever the magic runs
        return None
    return get_ipython()


def _in_kernel() -> bool:
    """Whether we run inside a Jupyter kernel (a front end that renders rich output)."""
    return getattr(_shell(), "kernel", None) is not None


class TextOutput:
    """The fallback output: text to stdout as it arrives, then the final rendering and a status line.

    In a kernel (a notebook with ``FABSTIR_NO_WIDGETS=1``, or without anywidget) the streamed text
    is replaced by the final rendering (Markdown by default); in a terminal the streamed text stays
    and only the status line follows (and, for ``--format json``, the pretty-printed JSON).

    Args:
        format: ``markdown``, ``text``, ``code`` or ``json``.
        background: the stream runs in the background (calls come from the loop thread).
        note: appended to the status line (e.g. a selection mode this network cannot honour).
        rich: display the final rendering (default: only inside a kernel).
        stream: where text goes (default: ``sys.stdout`` at the time of each write).
        started_at: when the cell started, on ``clock``'s scale (default: when :meth:`start` is called).
        clock: a monotonic clock (tests pass a fake one).

    A blocking cell's error is raised by the magic, so :meth:`failed` shows nothing then; in
    ``--background`` mode it writes the error's one line to stderr.
    """

    def __init__(self, format: str = "markdown", *, background: bool = False, note: str | None = None,
                 rich: bool | None = None, stream: TextIO | None = None, started_at: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.format = format
        self.background = background
        self.note = note
        self.rich = rich
        self._stream = stream
        self._clock = clock
        self._started_at = started_at
        self._first_text_at: float | None = None
        self.network: float | None = None  # seconds the cell waited for its network, if it did
        self.shows_errors = background  # a blocking cell raises the error, which shows it
        self._parts: list[str] = []
        self.state = "new"
        self.host: str | None = None
        self.model: str | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self._flush_each = True

    def __repr__(self) -> str:
        return f"<TextOutput {self.state} chars={len(self.text)}>"

    @property
    def text(self) -> str:
        """The text shown so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _write(self, text: str, *, flush: bool = True) -> None:
        out = self._out()
        out.write(text)
        if flush:
            out.flush()

    def _end_line(self) -> None:
        if self._parts and not self.text.endswith("\n"):
            self._write("\n")

    def start(self, *, host: str | None = None, model: str | None = None) -> None:
        self.host, self.model = host, model
        self.state = "streaming"
        if self._started_at is None:
            self._started_at = self._clock()
        # A kernel's stdout sends what it holds every 0.2 s on its own; flushing each piece there
        # would send one message per token (Jupyter Server drops iopub output above 1000 msg/s).
        self._flush_each = not _in_kernel()

    def network_step(self, label: str) -> None:
        """Say what the network the cell waits for is doing (one line)."""
        self._write(f"{STATUS_PREFIX} {label}…\n")

    def network_ready(self) -> None:
        self.network = self._clock() - (self._started_at or self._clock())
        self._write(f"{STATUS_PREFIX} {network_part(self.network)}\n")

    def append(self, text: str) -> None:
        if not text:
            return
        if self._first_text_at is None:
            self._first_text_at = self._clock()
        self._parts.append(text)
        self._write(text, flush=self._flush_each)

    def finish(self, result: Any) -> None:
        self.result = result
        self.state = "done"
        text = getattr(result, "text", None)
        text = self.text if text is None else str(text)
        rich = _in_kernel() if self.rich is None else self.rich
        if rich and self.format != "text":
            from IPython.display import clear_output, display

            clear_output(wait=True)
            display(render(text, self.format))
        else:
            self._end_line()
            if self.format == "json":
                bundle = render(text, "json")._repr_mimebundle_()
                if "application/json" in bundle:
                    self._write(bundle["text/plain"] + "\n")
        ttft = None
        if self._first_text_at is not None and self._started_at is not None:
            ttft = self._first_text_at - self._started_at
        self._write(status_line(result, self.note, ttft=ttft, network=self.network) + "\n")

    def failed(self, error: BaseException) -> None:
        self.error = error
        self.state = "failed"
        self._end_line()
        if self.background:  # no cell raises it: this line is where it shows
            print(format_error(error), file=sys.stderr, flush=True)

    def cancelled(self, result: Any = None) -> None:
        if self.state in ("done", "failed", "cancelled"):
            return
        self.state = "cancelled"
        self.result = result
        self._end_line()
        parts = [f"cancelled after {len(self.text)} characters"]
        if result is not None:
            hosts = hosts_part(result)
            parts.extend(([hosts] if hosts else []) + usage_parts(getattr(result, "usage", None), result))
        self._write(f"{STATUS_PREFIX} " + " | ".join(parts) + "\n")


# --------------------------------------------------------------------------- choosing an output


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def widgets_available() -> bool:
    """Whether the live widget can be used: a kernel with a comm manager, ipywidgets and anywidget
    installed, and ``FABSTIR_NO_WIDGETS`` unset."""
    if _env_flag("FABSTIR_NO_WIDGETS"):
        return False
    kernel = getattr(_shell(), "kernel", None)
    if kernel is None or getattr(kernel, "comm_manager", None) is None:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("ipywidgets", "anywidget"))


_Made = TypeVar("_Made")


def _construct(factory: Callable[..., _Made], **kwargs: Any) -> _Made:
    """Call ``factory`` with the keyword arguments it accepts."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in parameters})


def make_output(format: str = "markdown", background: bool = False, *, update_interval: float = 0.05,
                note: str | None = None, started_at: float | None = None) -> OutputSink:
    """Return the live output for one ``%%fabstir`` cell: the widget where usable, else text.

    ``started_at`` is when the cell started (``time.monotonic()``): its times count from there.

    The widget module is imported here, lazily; if it fails to import or build, the text fallback
    is used (and the reason logged).
    """
    if widgets_available():
        try:
            from .widgets import StreamOutput

            return _construct(StreamOutput, format=format, background=background,
                              update_interval=update_interval, note=note, started_at=started_at)
        except Exception as exc:  # the fallback must always work
            logger.warning("fabstir: live widget unavailable (%s: %s); streaming as text",
                           type(exc).__name__, exc)
    return TextOutput(format, background=background, note=note, started_at=started_at)
