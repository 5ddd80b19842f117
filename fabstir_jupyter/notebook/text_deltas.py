"""Pace a growing text into the delta and snapshot messages of a live output; no I/O, no widgets.

:class:`DeltaBatcher` is the pure half of :class:`~fabstir_jupyter.notebook.widgets.StreamOutput`:
text goes in through :meth:`~DeltaBatcher.append`, JSON-able message contents come out through the
``send`` callable it was given::

    " more words"                                    # a delta: a bare string, appended by a view in step
    {"type": "snapshot", "text": "the whole text"}   # replaces the view's text (catch-up)

(:class:`~fabstir_jupyter.notebook.widgets.StreamOutput` also sends ``{"type": "reset"}`` when a
stream restarts.) A delta is a bare JSON string because it is the message of nearly every token
at low rates: a typed object such as ``{"type":"delta","offset":120,"text":" more"}`` spends ~40
bytes of keys on ~5 bytes of text. The view needs no offset either: a comm delivers messages in
order and loses only those sent before the view's handler existed (a prefix), so a view is in
step once it has seen a snapshot or a reset, and ignores deltas until then (``js/src/live_text.ts``).

Imports neither anywidget nor ipywidgets, so the pacing rules are testable (and usable) alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_INTERVAL", "DELTA_KEYS", "SNAPSHOT_KEYS", "DeltaBatcher"]

#: Least time between two messages of :class:`DeltaBatcher` (and the widget), seconds (at most 20/s).
DEFAULT_INTERVAL = 0.05

#: ``""``: what a delta costs besides its text (the quotes of a bare JSON string).
DELTA_KEYS = 2
#: ``{"type":"snapshot","text":""}``: what a snapshot costs besides its text.
SNAPSHOT_KEYS = 29

# Float noise in "interval has passed" (a clock of start + i / rate): 1 ns.
_EPSILON = 1e-9


def _json_size(content: Any) -> int:
    """Bytes of ``content`` as compact UTF-8 JSON (what a message costs on the wire, framing aside)."""
    return len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())


def _string_size(text: str) -> int:
    """Bytes of ``text`` inside a JSON string, quotes aside (its UTF-8 size unless it has escapes)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text)
    return _json_size(text) - 2


class DeltaBatcher:
    """Turn a growing text into delta and snapshot messages, as soon as the budgets allow.

    Sizes below are JSON bytes of text ("J"): the text's UTF-8 bytes, plus one byte for each
    quote, backslash, newline or tab and five for other control characters.

    **When a message goes out.** ``append`` collects text; what is pending goes out through
    ``send(content)``

    * at once for the first text of a stream (time to first token matters), then
    * as soon as text is pending, ``interval`` has passed since the previous message (at most
      ``1/interval`` messages per second, 20 by default, plus the one of :meth:`flush` at the
      end) and the delta pool (below) has room for the message's 2 bytes of quotes; or
    * on :meth:`flush` (the end of the stream), whatever the rules.

    So a character waits at most ``interval`` plus the time to the next ``append`` (the widget's
    caller appends each token and calls ``append("")`` when idle), while the stream brings at
    least ``DELTA_KEYS / delta_share`` ≈ 3 bytes per message: tokens of 4-6 characters at any
    rate (``benchmarks/widget_traffic.py``: 0 ms at 5 and 20 tokens/s, under 50 ms at 85 and 200). A
    stream of 1-2 character tokens at a low rate spends the pool's slack, then groups about 3
    bytes per message.

    **Delta or snapshot.** The first message is a snapshot; later, one replaces the delta when
    the text has doubled (in bytes) since the last snapshot and the snapshot pool has room, and
    at the latest once it has grown ``max_growth`` times, so a view that missed messages (one
    that rendered late) always catches up within a bounded growth of the text.

    **Byte budget.** Two pools grow with the text ``J``: deltas' quotes may spend
    ``delta_share × J + delta_slack`` bytes (2 of them kept for the last delta), snapshots
    ``snapshot_share × J + snapshot_slack`` (their text and keys). A snapshot forced by
    ``max_growth`` = 8 always fits the defaults' pool (for a last snapshot of ``L`` ≥ 39 bytes the
    pool grew by ``1.25 × 7L`` since; smaller ones are covered by the slack of 208 ≥ 29 × 6
    snapshots + 29). So the messages' JSON plus the final text trait's (``J + 2``) stay within::

        (2 + delta_share + snapshot_share) × J + delta_slack + snapshot_slack + 2
        = 3.9 × J + 338 bytes with the defaults

    (deltas' text ``J``, final trait ``J + 2``, the two pools; :meth:`flush` is called once, at
    the end, and spends the reserve): at most 4× the text once it is 3.4 kB or longer (some 750
    tokens), whatever the rate, and a few hundred bytes more for a shorter answer.

    Thread-safe: in ``--background`` mode the calls come from the loop thread.

    Args:
        send: called with each message's content (a JSON-able str or dict).
        interval: least seconds between two messages (0: no rate limit).
        clock: a monotonic clock in seconds (tests pass a fake one).
        delta_share, delta_slack: the deltas' pool, per byte of text and in bytes.
        snapshot_share, snapshot_slack: the snapshots' pool, per byte of text and in bytes.
        max_growth: a due snapshot is sent regardless of its pool once the text is this many
            times longer (in bytes) than at the last snapshot.

    Raises:
        ValueError: ``interval`` is negative or NaN.
    """

    def __init__(
        self,
        send: Callable[[Any], None],
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        delta_share: float = 0.65,
        delta_slack: int = 128,
        snapshot_share: float = 1.25,
        snapshot_slack: int = 208,
        max_growth: float = 8.0,
    ) -> None:
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self._send = send
        self.interval = float(interval)
        self.clock = clock
        self.delta_share = delta_share
        self.delta_slack = delta_slack
        self.snapshot_share = snapshot_share
        self.snapshot_slack = snapshot_slack
        self.max_growth = max_growth
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget the text and counters (a new stream starts); the next message is a snapshot."""
        with self._lock:
            self._sent: list[str] = []  # text already sent, in pieces compacted now and then
            self._pending: list[str] = []  # text appended since the last message
            self._length = 0  # characters appended so far
            self._sent_length = 0  # characters the sent messages cover
            self._size = 0  # JSON bytes of the text appended so far
            self._sent_size = 0  # JSON bytes of the text the sent messages cover
            self._snapshot_size = 0  # JSON bytes of the text at the last snapshot
            self._last_send: float | None = None  # clock of the last message
            self._pending_since: float | None = None  # clock of the oldest pending character
            self.messages = 0
            self.snapshots = 0
            self.bytes_sent = 0
            self.envelope_bytes = 0  # bytes of deltas' quotes sent (the delta pool's spending)
            self.snapshot_bytes = 0  # bytes of snapshots sent (the snapshot pool's spending)
            self.max_wait = 0.0  # the longest a character waited for its message

    @property
    def text(self) -> str:
        """All the text appended since the last :meth:`reset`."""
        with self._lock:
            return self._sent_text() + "".join(self._pending)

    @property
    def size(self) -> int:
        """JSON bytes of :attr:`text` (its UTF-8 bytes when it has no quotes, backslashes or controls)."""
        return self._size

    def _sent_text(self) -> str:
        if len(self._sent) > 1:
            self._sent[:] = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    @property
    def pending(self) -> int:
        """Characters appended but not yet sent."""
        return self._length - self._sent_length

    def append(self, piece: str) -> None:
        """Add ``piece``; send what is pending if the budgets allow (see the class's rules).

        An empty ``piece`` only sends what is pending (call it when idle, so a pause in the
        stream does not hold back the last tokens).
        """
        with self._lock:
            now = self.clock()
            if piece:
                self._pending.append(piece)
                self._length += len(piece)
                self._size += _string_size(piece)
                if self._pending_since is None:
                    self._pending_since = now
            if self._length > self._sent_length and self._due(now):
                self._send_pending(now)

    def flush(self) -> None:
        """Send what is pending now, as a delta or a snapshot, whatever the rules."""
        with self._lock:
            if self._length > self._sent_length:
                self._send_pending(self.clock())

    def _due(self, now: float) -> bool:
        """Whether the pending text goes out now (see the class's rules)."""
        if self._sent_length == 0:
            return True  # the first text of the stream: at once
        if self._last_send is not None and now - self._last_send < self.interval - _EPSILON:
            return False
        if self._snapshot_now():
            return True  # paid from the snapshot pool
        # DELTA_KEYS for this delta, DELTA_KEYS kept for the last one (flush)
        return self.envelope_bytes + 2 * DELTA_KEYS <= self.delta_share * self._size + self.delta_slack

    def _snapshot_now(self) -> bool:
        """Whether the pending text goes out as a snapshot (see the class's rules)."""
        last, size = self._snapshot_size, self._size
        if last == 0:
            return True
        if size < 2 * last:
            return False
        if size >= self.max_growth * last:
            return True
        cost = size + SNAPSHOT_KEYS
        return self.snapshot_bytes + cost <= self.snapshot_share * size + self.snapshot_slack

    def _send_pending(self, now: float) -> None:
        batch = "".join(self._pending)
        self._pending.clear()
        self._sent.append(batch)
        content: Any
        if self._snapshot_now():
            content = {"type": "snapshot", "text": self._sent_text()}
            cost = _json_size(content)
            self._snapshot_size = self._size
            self.snapshots += 1
            self.snapshot_bytes += cost
        else:
            content = batch
            cost = self._size - self._sent_size + DELTA_KEYS
            self.envelope_bytes += DELTA_KEYS
            if len(self._sent) >= 256:
                self._sent_text()
        if self._pending_since is not None:
            self.max_wait = max(self.max_wait, now - self._pending_since)
        self._sent_length = self._length
        self._sent_size = self._size
        self._pending_since = None
        self._last_send = now
        self.messages += 1
        self.bytes_sent += cost
        self._send(content)
