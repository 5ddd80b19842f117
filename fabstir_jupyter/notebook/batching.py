"""Batch a growing text into the delta and snapshot messages of a live output; no I/O, no widgets.

:class:`DeltaBatcher` is the pure half of :class:`~fabstir_jupyter.notebook.widgets.StreamOutput`:
text goes in through :meth:`~DeltaBatcher.append`, JSON-able message contents come out through the
``send`` callable it was given::

    {"type": "delta", "offset": 120, "text": " more words"}   # applies where the view has 120 chars
    {"type": "snapshot", "text": "the whole text so far"}      # catch-up for a view that missed some

Imports neither anywidget nor ipywidgets, so the batching rules are testable (and usable) alone.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

__all__ = ["DEFAULT_INTERVAL", "DeltaBatcher"]

#: Default batching interval of :class:`DeltaBatcher` (and the widget), seconds (at most 20 delta messages/s).
DEFAULT_INTERVAL = 0.05


def _json_size(content: Any) -> int:
    """Bytes of ``content`` as compact UTF-8 JSON (what a message costs on the wire, framing aside)."""
    return len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())


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
