"""Widget traffic: what streaming a 10 000-token answer into the notebook sends, ours against naive.

A scripted stream of ``--tokens`` tokens (default 10 000) of 4 to 6 characters arrives at each
``--rate`` tokens/s (default 5, 20, 85 (the embedded model's speed) and 200) after a 0.3 s first
token, on a fake clock (no sleeping). Every widget's comm is replaced by a recorder, so the real
ipywidgets serialisation runs and each message is counted as the kernel would publish it:

* ours: :class:`~fabstir_jupyter.notebook.widgets.StreamOutput`: pending text goes out as a
  bare-string delta as soon as 50 ms have passed since the previous message (and the deltas' byte
  pool has room), a snapshot when the text doubles (within its budget), the ``text`` trait once at
  the end;
* baseline, naive: a widget whose ``Unicode`` trait is set after every token (each update resends
  the whole text so far: O(n²) bytes);
* baseline, naive batched: the same trait set once per 50 ms batch (fewer messages, still O(n²)).

Columns: messages (custom + state updates), the most in any second of stream time, the text
they carry, the JSON of their contents (``content`` of custom messages, ``state`` of updates:
what the 4× target counts), and the whole iopub message as jupyter_client serialises it (header,
parent header, metadata, comm id, HMAC signature). Ratios are to the answer's UTF-8 size. Then
how long the tokens waited for the first message that shows them (the view's lag behind the
stream: median, 99th percentile, longest) and, for ours, the CPU time per token (append,
pacing, serialising; this script's counting too).

Targets (ours, at every rate): at most 25 messages in any second, content bytes at most 4× the
text, and no token waiting more than 100 ms for its message.

Run:  python benchmarks/widget_traffic.py [--tokens 10000] [--rate 5 20 85 200]   (~20 s of CPU)
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field

import _common
import anywidget
import comm
import traitlets
from _common import Meter, verdict

from fabstir_jupyter.inference import InferenceResult
from fabstir_jupyter.notebook.widgets import StreamOutput

TTFT = 0.3
INTERVAL = 0.05


class FakeClock:
    """The stream's time, moved by the script."""

    now = 1000.0

    def __call__(self) -> float:
        return self.now


def json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


@dataclass
class Traffic:
    """What one approach published on its widget's comm, and when each message made text visible."""

    name: str
    clock: FakeClock
    session: object
    messages: int = 0
    text_bytes: int = 0  # the answer's text carried, in UTF-8
    content_bytes: int = 0  # JSON of custom contents and update states
    wire_bytes: int = 0  # serialised iopub messages
    times: list[float] = field(default_factory=list)
    shown: list[tuple[float, int]] = field(default_factory=list)  # (time, characters a view shows)
    _length: int = 0

    def record(self, comm_id: str, data: dict) -> None:
        self.messages += 1
        now = self.clock()
        self.times.append(now)
        text = None
        if data.get("method") == "custom":
            body = data["content"]
            if isinstance(body, str):  # a delta
                self._length += len(body)
                text = body
            elif "text" in body:  # a snapshot
                self._length = len(body["text"])
                text = body["text"]
        else:
            body = data.get("state", {})
            text = body.get("text", body.get("value"))
            if text:
                self._length = len(text)
        if text:
            self.text_bytes += len(text.encode())
            self.shown.append((now, self._length))
        self.content_bytes += json_size(body)
        msg = self.session.msg("comm_msg", content={"comm_id": comm_id, "data": data})
        self.wire_bytes += sum(len(frame) for frame in self.session.serialize(msg))

    def waits(self, tokens: list[str], arrivals: list[float]) -> list[float]:
        """How long each token waited for the first message that shows all of it (seconds)."""
        waits, end, shown = [], 0, iter(self.shown)
        when, length = next(shown, (float("inf"), 0))
        for token, arrival in zip(tokens, arrivals, strict=True):
            end += len(token)
            while length < end:
                when, length = next(shown, (float("inf"), float("inf")))
            waits.append(when - arrival)
        return waits

    def max_per_second(self) -> int:
        best, first = 0, 0
        for last, now in enumerate(self.times):
            while now - self.times[first] >= 1.0:
                first += 1
            best = max(best, last - first + 1)
        return best


class Recording:
    """Route the comms of widgets created inside the block to a :class:`Traffic`."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def __enter__(self) -> Traffic:
        traffic = self.traffic

        class RecordingComm(comm.DummyComm):
            def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
                if msg_type == "comm_msg" and traffic.recording:
                    traffic.record(self.comm_id, data or {})

        self._saved = comm.create_comm
        comm.create_comm = RecordingComm
        traffic.recording = False  # type: ignore[attr-defined]
        return traffic

    def __exit__(self, *exc_info: object) -> None:
        comm.create_comm = self._saved


class NaiveOutput(anywidget.AnyWidget):
    """The approach to avoid: the whole text in a synced trait, set as it grows."""

    _esm = "export default { render({ model, el }) { el.textContent = model.get('value'); } }"
    value = traitlets.Unicode("").tag(sync=True)


def make_tokens(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [" " + "".join(rng.choice(letters) for _ in range(rng.randint(3, 5))) for _ in range(count)]


def arrival_times(count: int, rate: float) -> list[float]:
    """When each token arrives on the fake clock."""
    return [FakeClock.now + TTFT + index / rate for index in range(count)]


def run_ours(tokens: list[str], arrivals: list[float], session: object) -> tuple[Traffic, float]:
    clock = FakeClock()
    with Recording(Traffic("ours (StreamOutput)", clock, session)) as traffic:
        widget = StreamOutput(clock=clock, interval=INTERVAL, show=False)
        traffic.recording = True  # type: ignore[attr-defined]
        with Meter() as meter:
            widget.start(host="http://h1:8080", model="smol")
            for token, arrival in zip(tokens, arrivals, strict=True):
                clock.now = arrival
                widget.append(token)
            text = widget.batcher.text
            widget.finish(InferenceResult(text=text, finish_reason="stop", usage=None, host="http://h1:8080",
                                          model="smol", ttft=TTFT, request_id="bench"))
    assert widget.text == text
    return traffic, meter.cpu


def run_naive(tokens: list[str], arrivals: list[float], session: object, batched: bool) -> Traffic:
    clock = FakeClock()
    name = "baseline: trait per 50 ms batch" if batched else "baseline: trait per token"
    with Recording(Traffic(name, clock, session)) as traffic:
        widget = NaiveOutput()
        traffic.recording = True  # type: ignore[attr-defined]
        parts: list[str] = []
        last = clock.now
        for token, arrival in zip(tokens, arrivals, strict=True):
            clock.now = arrival
            parts.append(token)
            if not batched or clock.now - last >= INTERVAL:
                widget.value = "".join(parts)
                last = clock.now
        widget.value = "".join(parts)
    return traffic


def percentile(values: list[float], share: float) -> float:
    """The value below which ``share`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--rate", type=float, nargs="+", default=[5.0, 20.0, 85.0, 200.0],
                        help="tokens per second of stream time (one run each)")
    args = parser.parse_args()

    from jupyter_client.session import Session

    session = Session(key=b"0" * 64, username="bench")
    rates = ", ".join(f"{rate:g}" for rate in args.rate)
    _common.print_header(
        "widget traffic",
        f"{args.tokens} tokens of 4-6 characters at {rates} tokens/s: StreamOutput vs a trait set per token",
        packages=("fabstir-jupyter", "anywidget", "ipywidgets", "jupyter_client"),
    )
    tokens = make_tokens(args.tokens)
    text_size = len("".join(tokens).encode())
    summary = []
    for rate in args.rate:
        arrivals = arrival_times(len(tokens), rate)
        duration = TTFT + (args.tokens - 1) / rate
        ours, cpu = run_ours(tokens, arrivals, session)
        runs = [ours, run_naive(tokens, arrivals, session, batched=True),
                run_naive(tokens, arrivals, session, batched=False)]

        print(f"\n-- {rate:g} tokens/s: answer of {text_size:,} bytes of text, {duration:.1f} s of stream time")
        print(f"{'approach':32} {'messages':>9} {'max/s':>6} {'text carried':>16} "
              f"{'content bytes':>20} {'wire bytes':>22} {'token waits ms: p50 p99 max':>30}")
        for run in runs:
            waits = run.waits(tokens, arrivals)
            print(f"{run.name:32} {run.messages:9,} {run.max_per_second():6} "
                  f"{run.text_bytes:>12,} {run.text_bytes / text_size:>5.2f}x"
                  f"{run.content_bytes:>14,} {run.content_bytes / text_size:>6.2f}x"
                  f"{run.wire_bytes:>15,} {run.wire_bytes / text_size:>7.2f}x"
                  f"{percentile(waits, 0.5) * 1000:>19.0f} {percentile(waits, 0.99) * 1000:>4.0f} "
                  f"{max(waits) * 1000:>4.0f}")
        naive = runs[-1]
        print(f"baseline per token / ours: {naive.messages / ours.messages:.1f}x the messages, "
              f"{naive.content_bytes / ours.content_bytes:,.0f}x the content bytes, "
              f"{naive.wire_bytes / ours.wire_bytes:,.0f}x the wire bytes")
        print(f"ours: {cpu / args.tokens * 1e6:.1f} µs of CPU per token (append, pacing, ipywidgets and "
              f"jupyter_client serialising, and this script's counting)")
        summary.append((rate, ours, max(ours.waits(tokens, arrivals))))

    print("\ntargets (ours, every rate): at most 25 messages in any second; content bytes at most 4x the text; "
          "no token waits more than 100 ms")
    for rate, ours, max_wait in summary:
        per_second, ratio = ours.max_per_second(), ours.content_bytes / text_size
        print(f"  {rate:>6g} tokens/s: {ours.messages:6,} messages, max {per_second:2}/s -> "
              f"{verdict(per_second <= 25)}; {ratio:.2f}x the text -> {verdict(ours.content_bytes <= 4 * text_size)}; "
              f"longest wait {max_wait * 1000:.0f} ms -> {verdict(max_wait <= 0.100)}")


if __name__ == "__main__":
    main()
