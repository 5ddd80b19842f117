"""The notebook widgets: stream traffic, view catch-up, states, reprs, the dashboard, the JS modules."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import comm
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fabstir_jupyter.errors import ModelNotAvailable
from fabstir_jupyter.hosts import HostInfo, HostManager
from fabstir_jupyter.inference import InferenceResult
from fabstir_jupyter.notebook import widgets
from fabstir_jupyter.notebook.tables import HOST_COLUMNS, USAGE_COLUMNS
from fabstir_jupyter.notebook.text_deltas import DeltaBatcher
from fabstir_jupyter.notebook.widgets import BatchProgress, HostDashboard, StreamOutput
from fabstir_jupyter.usage import ListSink, UsageLedger, UsageRecord

STATIC = Path(widgets.__file__).parent / "static"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A ``send`` seam that keeps each message with the fake time it was sent at."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.messages: list[dict] = []
        self.times: list[float] = []

    def __call__(self, content: dict) -> None:
        self.messages.append(content)
        self.times.append(self.clock())


def json_bytes(value) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def make_tokens(count: int, seed: int = 7) -> list[str]:
    """Tokens of 4 to 6 characters, words and spaces."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [" " + "".join(rng.choice(letters) for _ in range(rng.randint(3, 5))) for _ in range(count)]


def stream(sink, clock: FakeClock, tokens: list[str], rate: float, ttft: float = 0.3) -> float:
    """Append ``tokens`` at ``rate`` tokens per second of fake time; return the stream's duration."""
    start = clock.now
    for index, token in enumerate(tokens):
        clock.now = start + ttft + index / rate
        sink.append(token)
    return clock.now - start


def max_per_second(times: list[float]) -> int:
    """The most messages in any one-second window."""
    best, first = 0, 0
    for last, now in enumerate(times):
        while now - times[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


class ViewSimulator:
    """The live view's rules of js/src/live_text.ts (applyMessage), in Python."""

    def __init__(self) -> None:
        self.text = ""
        self.in_step = False

    @classmethod
    def of(cls, messages) -> ViewSimulator:
        """A view that received ``messages``."""
        view = cls()
        for message in messages:
            view.apply(message)
        return view

    def apply(self, message) -> None:
        if isinstance(message, str):  # a delta
            if self.in_step:
                self.text += message
        elif message["type"] == "snapshot":
            self.text, self.in_step = message["text"], True
        elif message["type"] == "reset":
            self.text, self.in_step = "", True


def message_text(message) -> str:
    """The text a delta or snapshot carries."""
    return message if isinstance(message, str) else message.get("text", "")


def result(text: str, *, host="http://h1:8080", tokens=5, cost=0.00021, ttft=0.25, duration=1.25):
    usage = UsageRecord(time=0.0, request_id="r1", host="http://h1:8080", model="smol", received_tokens=tokens,
                        completion_tokens=tokens, ttft=ttft, duration=duration, cost=cost, cost_unit="USDC",
                        finish_reason="stop")
    return InferenceResult(text=text, finish_reason="stop", usage=usage, host=host, model="smol", ttft=ttft,
                           request_id="r1")


def stream_output(clock: FakeClock, **kwargs) -> tuple[StreamOutput, Recorder]:
    recorder = Recorder(clock)
    return StreamOutput(clock=clock, send=recorder, show=False, **kwargs), recorder


@pytest.fixture
def comm_log(monkeypatch):
    """Record every message that widgets created in the test publish on their comm."""
    log: list[tuple[str, dict]] = []

    class RecordingComm(comm.DummyComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            log.append((msg_type, data or {}))

    monkeypatch.setattr(comm, "create_comm", RecordingComm)
    return log


# --------------------------------------------------------------------------- stream traffic


def test_stream_of_10000_tokens_sends_at_most_25_messages_per_second():
    """A 10 000-token stream at 200 tokens/s sends at most 25 messages in any second of stream time."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host="http://h1:8080", model="smol")
    duration = stream(widget, clock, make_tokens(10_000), rate=200)
    widget.finish(result(widget.batcher.text))
    assert max_per_second(recorder.times) <= 25
    assert len(recorder.messages) <= 25 * duration


@pytest.mark.parametrize("count", [10_000, 5_500, 11_000])
def test_stream_bytes_stay_within_four_times_the_text(count):
    """Custom messages plus the final trait stay within 4× the text, JSON keys included."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host=None, model=None)
    stream(widget, clock, make_tokens(count), rate=200)
    widget.finish(result(widget.batcher.text))
    text = widget.text
    total = sum(json_bytes(m) for m in recorder.messages) + json_bytes(text)
    assert total <= 4 * len(text.encode())
    assert widget.batcher.bytes_sent == sum(json_bytes(m) for m in recorder.messages)


@pytest.mark.parametrize("rate", [5, 20, 85, 200, 2000])
def test_text_payload_stays_under_four_times_the_text_at_any_rate(rate):
    """The text carried by deltas, snapshots and the final trait is under 4× the text, however slow."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host=None, model=None)
    stream(widget, clock, make_tokens(2_000), rate=rate)
    widget.finish(result(widget.batcher.text))
    payload = sum(len(message_text(m)) for m in recorder.messages) + len(widget.text)
    assert payload < 4 * len(widget.text)


def make_short_tokens(count: int, seed: int = 11) -> list[str]:
    """Tokens of 1 to 8 characters, letters and spaces (JSON bytes = UTF-8 bytes = characters)."""
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 8))) for _ in range(count)]


def text_size(text: str) -> int:
    """JSON bytes of ``text`` inside a string (its UTF-8 bytes when nothing needs escaping)."""
    return json_bytes(text) - 2


def byte_bound(batcher: DeltaBatcher, size: int) -> float:
    """The bound the batcher guarantees for its messages plus the final trait (see its docstring)."""
    return ((2 + batcher.delta_share + batcher.snapshot_share) * size + batcher.delta_slack
            + batcher.snapshot_slack + 2)


def run_batcher(tokens: list[str], rate: float, **options):
    """Stream ``tokens`` into a DeltaBatcher at ``rate`` tokens/s of fake time, then flush (the end).

    Returns the batcher, the recorder, per message ``(wait, budget_wait)`` and the tokens' arrival
    times: ``wait`` is how long the oldest character the message carries had been pending,
    ``budget_wait`` how long the stream took, from that character on, to bring 4 characters (bytes,
    for the ASCII tokens the latency tests use; 4 ≥ a delta's 2 quotes / delta_share).
    """
    clock = FakeClock()
    recorder = Recorder(clock)
    batcher = DeltaBatcher(recorder, clock=clock, **options)
    starts: list[float] = []  # append time of each character, in order
    start = clock.now
    for index, token in enumerate(tokens):
        clock.now = start + 0.3 + index / rate
        starts.extend([clock.now] * len(token))
        batcher.append(token)
    batcher.flush()
    arrivals = [start + 0.3 + index / rate for index in range(len(tokens))]
    ends = []  # time at which 4 bytes had arrived counting from each character on
    for index in range(len(starts)):
        ends.append(starts[index + 3] if index + 3 < len(starts) else float("inf"))
    waits, covered = [], 0
    for message, sent_at in zip(recorder.messages, recorder.times, strict=True):
        first = covered
        covered = covered + len(message) if isinstance(message, str) else len(message["text"])
        waits.append((sent_at - starts[first], ends[first] - starts[first]))
    return batcher, recorder, waits, arrivals


@pytest.mark.parametrize("rate", [5, 20, 85, 200, 2000])
@pytest.mark.parametrize("count", [2_000, 10_000])
def test_traffic_at_any_rate_stays_within_25_per_second_and_four_times_the_text(rate, count):
    """Tokens of 1-8 characters at 5 to 2000 tokens/s: ≤ 25 messages in any second of stream time,
    messages plus the final trait ≤ 4× the text (and ≤ the batcher's stated bound), latency bounded."""
    tokens = make_short_tokens(count, seed=rate)
    batcher, recorder, waits, _ = run_batcher(tokens, rate)
    text = "".join(tokens)
    assert batcher.text == text
    view = ViewSimulator()
    for message in recorder.messages:
        view.apply(message)
    assert view.text == text
    assert max_per_second(recorder.times) <= 25
    total = sum(json_bytes(m) for m in recorder.messages) + json_bytes(text)
    assert total == batcher.bytes_sent + json_bytes(text)
    assert total <= 4 * len(text.encode())
    assert total <= byte_bound(batcher, text_size(text))
    period = 1 / rate
    for wait, budget_wait in waits[:-1]:  # the last is the end's flush
        # at most the interval (plus the gap to the next append), unless the delta pool was short:
        # then no later than when 4 bytes (≥ 2 quotes / delta_share) had arrived from it on
        assert wait <= max(batcher.interval, budget_wait) + period + 1e-9


@pytest.mark.parametrize("rate", [20, 85, 200])
def test_the_first_text_goes_out_at_once(rate):
    """Time to first token: the first append sends a snapshot at once, however little text it has."""
    _, recorder, _, arrivals = run_batcher(make_short_tokens(50, seed=rate), rate)
    assert recorder.messages[0]["type"] == "snapshot" and recorder.times[0] == arrivals[0]


@pytest.mark.parametrize("rate", [5, 20, 50, 85, 200, 2000])
def test_no_character_waits_more_than_100_ms_for_its_message(rate):
    """Tokens of 4-6 characters (the widget benchmark's) at 5 to 2000 tokens/s: every character is sent
    within 100 ms of its arrival (at most the interval plus the gap to the next append), within 25
    messages a second and 4× the text."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host=None, model=None)
    stream(widget, clock, make_tokens(3_000, seed=rate), rate=rate)
    widget.finish(result(widget.batcher.text))
    assert widget.batcher.max_wait <= min(0.1, widget.batcher.interval + 1 / rate) + 1e-9
    assert max_per_second(recorder.times) <= 25
    total = sum(json_bytes(m) for m in recorder.messages) + json_bytes(widget.text)
    assert total <= 4 * len(widget.text.encode())


short_token = st.text(alphabet=st.sampled_from([*"abc \n\"\\<", "é", "😀", "\t", "\x01"]),
                      min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(short_token, min_size=1, max_size=400), rate=st.sampled_from([5, 20, 85, 200, 2000]),
       interval=st.sampled_from([0, 0.05]))
def test_short_streams_stay_within_the_stated_bound(tokens, rate, interval):
    """Any stream, escapes included: messages + final trait ≤ (2 + delta_share + snapshot_share) × J
    + delta_slack + snapshot_slack + 2 = 3.9 J + 338 bytes (J: the text's JSON bytes), each pool within
    its share, and the view rebuilds the text."""
    batcher, recorder, _, _ = run_batcher(tokens, rate, interval=interval)
    text = "".join(tokens)
    size = text_size(text)
    assert size == batcher.size
    total = sum(json_bytes(m) for m in recorder.messages) + json_bytes(text)
    assert total <= byte_bound(batcher, size)
    assert byte_bound(batcher, size) == pytest.approx(3.9 * size + 338)
    assert batcher.snapshot_bytes <= batcher.snapshot_share * size + batcher.snapshot_slack
    assert batcher.envelope_bytes <= batcher.delta_share * size + batcher.delta_slack
    view = ViewSimulator()
    for message in recorder.messages:
        view.apply(message)
    assert view.text == text



def test_widget_traffic_through_a_recording_comm(comm_log, monkeypatch):
    """On the real comm: ≤ 25 messages per second, ≤ 4× the text, and the text trait is sent once."""
    clock = FakeClock()
    times: list[float] = []
    widget = StreamOutput(clock=clock, show=False)
    opened = len(comm_log)
    real_send = widget._send

    def timed_send(msg, buffers=None):
        times.append(clock())
        real_send(msg, buffers)

    monkeypatch.setattr(widget, "_send", timed_send)
    widget.start(host="http://h1:8080", model="smol")
    stream(widget, clock, make_tokens(10_000), rate=200)
    widget.finish(result(widget.batcher.text))
    sent = [data for kind, data in comm_log[opened:] if kind == "comm_msg"]
    custom = [d["content"] for d in sent if d["method"] == "custom"]
    updates = [d["state"] for d in sent if d["method"] == "update"]
    assert max_per_second(times) <= 25
    assert [s["text"] for s in updates if s.get("text")] == [widget.text]  # the full text goes once
    total = sum(json_bytes(c) for c in custom) + sum(json_bytes(s) for s in updates)
    assert total <= 4 * len(widget.text.encode())


def test_first_text_is_a_snapshot_then_bare_string_deltas_as_the_interval_allows():
    """The first text goes out at once as a snapshot; then each pending text as a bare-string delta as
    soon as the interval has passed; a snapshot when the text has doubled."""
    clock = FakeClock()
    sent: list = []
    batcher = DeltaBatcher(sent.append, interval=0.05, clock=clock)
    clock.now += 0.2
    batcher.append("Hello world")
    assert sent == [{"type": "snapshot", "text": "Hello world"}]
    clock.now += 0.01
    batcher.append(" and")
    batcher.append(" more")
    assert len(sent) == 1  # within the interval
    clock.now += 0.04
    batcher.append("!")
    assert sent[1] == " and more!"  # the interval has passed: sent at once, however little
    assert batcher.max_wait == pytest.approx(0.04)
    clock.now += 0.05
    batcher.append(" Twice as long now.")
    assert sent[2] == {"type": "snapshot", "text": "Hello world and more! Twice as long now."}
    assert batcher.messages == 3 and batcher.snapshots == 2


def test_idle_append_sends_pending_text_once_the_interval_has_passed():
    """append("") after a pause sends what is pending; nothing is sent when nothing is pending."""
    clock = FakeClock()
    sent: list = []
    batcher = DeltaBatcher(sent.append, clock=clock)
    clock.now += 1
    batcher.append("abcdef")
    batcher.append("g")
    assert len(sent) == 1
    batcher.append("")
    assert len(sent) == 1  # within the interval
    clock.now += 0.05
    batcher.append("")
    assert sent[-1] == "g"
    clock.now += 1
    batcher.append("")
    assert len(sent) == 2


def test_one_character_tokens_at_a_low_rate_are_grouped_once_the_slack_is_spent():
    """Deltas' quotes come from a pool of 0.65 bytes per byte of text: 1-byte tokens each go alone
    while the slack lasts, then about 3 to a message; the bytes stay within the stated bound."""
    clock = FakeClock()
    sent: list = []
    batcher = DeltaBatcher(sent.append, clock=clock)
    for _ in range(2000):
        clock.now += 0.2  # 5 tokens/s
        batcher.append("x")
    batcher.flush()
    deltas = [m for m in sent if isinstance(m, str)]
    assert deltas[1] == "x"  # early on: each alone
    assert max(len(d) for d in deltas[-100:]) <= 4 and sum(map(len, deltas[-100:])) >= 300
    assert batcher.envelope_bytes <= batcher.delta_share * batcher.size + batcher.delta_slack
    assert batcher.bytes_sent + json_bytes(batcher.text) <= byte_bound(batcher, batcher.size)


def test_deltas_carry_any_text_and_the_view_rebuilds_it():
    """Emoji, quotes, backslashes and controls travel in deltas as JSON strings; their cost is counted."""
    sent: list = []
    batcher = DeltaBatcher(sent.append, interval=0, clock=FakeClock())
    for piece in ["😀é", 'x"\\', "𝔘ñ\n", "y\x01"]:
        batcher.append(piece)
    assert [type(m).__name__ for m in sent] == ["dict", "str", "dict", "str"]
    view = ViewSimulator()
    for message in sent:
        view.apply(message)
    assert view.text == batcher.text == '😀éx"\\𝔘ñ\ny\x01'
    assert batcher.bytes_sent == sum(json_bytes(m) for m in sent)


def test_interval_must_not_be_negative():
    """A negative or NaN interval is a ValueError."""
    with pytest.raises(ValueError):
        DeltaBatcher(lambda m: None, interval=-1)
    with pytest.raises(ValueError):
        DeltaBatcher(lambda m: None, interval=float("nan"))


# --------------------------------------------------------------------------- the view catches up

token_text = st.text(
    # U+1D518, a letter outside the Basic Multilingual Plane (two UTF-16 code units in the view), on purpose
    alphabet=st.sampled_from([*"ab c\n\"\\<>", "é", "😀", "𝔘", "\t"]), min_size=1, max_size=6  # noqa: RUF001
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(token_text, min_size=1, max_size=250),
    gaps=st.lists(st.floats(min_value=0, max_value=0.12), min_size=1, max_size=250),
    data=st.data(),
)
def test_view_reconstructs_the_text_after_any_dropped_prefix(tokens, gaps, data):
    """A view that missed any prefix of messages shows a prefix of the text, then exactly the text."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host=None, model=None)
    for index, token in enumerate(tokens):
        clock.now += gaps[index % len(gaps)]
        widget.append(token)
    widget.finish(result(widget.batcher.text))
    messages = recorder.messages
    dropped = data.draw(st.integers(min_value=0, max_value=len(messages)), label="dropped")
    view = ViewSimulator()
    sent_text = ""
    synced = False
    for index, message in enumerate(messages):
        is_delta = isinstance(message, str)
        sent_text = sent_text + message if is_delta else message["text"]
        if index < dropped:
            continue
        view.apply(message)
        assert sent_text.startswith(view.text)
        synced = synced or not is_delta or dropped == 0
        if synced:
            assert view.text == sent_text
    view.text = widget.text  # the final trait
    assert view.text == "".join(tokens)


@settings(max_examples=60, deadline=None)
@given(rate=st.integers(min_value=5, max_value=3000), count=st.integers(min_value=1, max_value=3000))
def test_a_snapshot_follows_before_the_text_grows_eightfold(rate, count):
    """No batch leaves the text 8× longer (in bytes) than at the last snapshot without being a snapshot;
    snapshots come at doublings at the earliest."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host=None, model=None)
    stream(widget, clock, make_tokens(count, seed=rate), rate=rate)
    widget.finish(result(widget.batcher.text))
    last_snapshot, size = 0, 0
    for message in recorder.messages:
        if isinstance(message, str):
            size += json_bytes(message) - 2
            assert size < widget.batcher.max_growth * last_snapshot
        else:
            assert size == 0 or json_bytes(message["text"]) - 2 >= 2 * last_snapshot
            last_snapshot = size = json_bytes(message["text"]) - 2


# --------------------------------------------------------------------------- states and reprs


def test_finish_sets_the_text_once_and_the_status():
    """finish() flushes, sets text and a done status with host, model, TTFT, tokens/s, tokens, cost."""
    clock = FakeClock()
    widget, recorder = stream_output(clock, note="mode cheapest")
    widget.start(host="http://h1:8080", model="smol")
    assert widget.status["state"] == "running"
    clock.now += 0.25
    widget.append("Hello")
    widget.append(" world")
    assert widget.text == ""  # not during the stream
    host = HostInfo.from_url("http://h1:8080", address="0xabc")
    widget.finish(SimpleNamespace(**{**result("Hello world").__dict__, "host": host}))
    status = widget.status
    assert widget.text == "Hello world"
    view = ViewSimulator()
    for message in recorder.messages:
        view.apply(message)
    assert view.text == "Hello world"  # the pending batch was flushed
    assert status["state"] == "done"
    assert status["host"] == "http://h1:8080" and status["model"] == "smol"
    assert status["ttft"] == 0.25 and status["tokens"] == 5 and status["cost"] == 0.00021
    assert status["tokens_per_second"] == pytest.approx(4 / 1.0)
    assert status["cost_unit"] == "USDC" and status["note"] == "mode cheapest"
    json.dumps(status, allow_nan=False)


def test_the_wait_for_the_network_shows_its_steps_and_the_times_count_from_the_cell():
    """While the cell waits for its network, the status names the step in progress; once ready it
    says how long the wait took, and the TTFT counts from the cell's start (not the request's)."""
    clock = FakeClock(100.0)
    widget = StreamOutput(interval=0.05, clock=clock, send=Recorder(clock), show=False, started_at=99.5)
    widget.start(host=None, model="smol")
    widget.network_step("starting the local chain and 1 host")
    assert widget.status["step"] == "starting the local chain and 1 host"
    assert "starting the local chain and 1 host…" in widget.static_html()
    clock.now = 101.0
    widget.network_step("discovering hosts")
    clock.now = 102.0
    widget.network_ready()
    assert widget.status["step"] is None and widget.status["network"] == 2.5
    clock.now = 102.3
    widget.append("Rivers")
    assert widget.status["ttft"] == pytest.approx(2.8)
    widget.finish(result("Rivers", ttft=0.3))  # the request's own TTFT is 0.3 s
    assert widget.status["ttft"] == pytest.approx(2.8) and widget.status["network"] == 2.5
    assert "network ready in 2.5 s · TTFT 2.8 s" in widgets.status_text(widget.status)
    widget.start(host=None, model="smol")  # reused: counts from its own start now
    clock.now = 102.5
    widget.append("x")
    assert widget.status["ttft"] == pytest.approx(0.2) and widget.status["network"] is None


def test_failed_shows_code_message_and_hint():
    """failed() keeps the text so far and puts the error's code, message and hint in the status."""
    clock = FakeClock()
    widget, _ = stream_output(clock)
    widget.start(host=None, model="smol")
    clock.now += 1
    widget.append("partial")
    widget.failed(ModelNotAvailable("model 'x' is not served", hint="try --model smol"))
    assert widget.status["state"] == "error"
    assert widget.status["error"] == {"code": "MODEL_NOT_AVAILABLE", "message": "model 'x' is not served",
                                      "hint": "try --model smol"}
    assert widget.text == "partial"
    assert repr(widget) == "partial\n[MODEL_NOT_AVAILABLE] model 'x' is not served (try --model smol)"


def test_failed_accepts_a_plain_exception():
    """A non-Fabstir error shows its class name as the code."""
    widget, _ = stream_output(FakeClock())
    widget.start(host=None, model=None)
    widget.failed(RuntimeError("boom"))
    assert widget.status["error"]["code"] == "RuntimeError"
    assert repr(widget) == "[RuntimeError] boom"


def test_cancelled_keeps_the_partial_text_and_ignores_later_ends():
    """cancelled() marks the output cancelled; a finish() after it changes nothing."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.start(host="http://h1:8080", model="smol")
    clock.now += 1
    widget.append("half an")
    widget.append(" answer")
    widget.cancelled()
    assert widget.status["state"] == "cancelled" and widget.status["host"] == "http://h1:8080"
    assert widget.text == "half an answer"
    assert ViewSimulator.of(recorder.messages).text == "half an answer"  # flushed before the end
    widget.finish(result("other"))
    widget.failed(RuntimeError("late"))
    assert widget.status["state"] == "cancelled" and widget.text == "half an answer"
    assert repr(widget) == "half an answer\n[cancelled]"


def test_finish_after_a_failover_names_both_hosts_and_where_it_switched():
    """A stream that broke on host A after 37 tokens and continued on host B shows A → B after 37
    tokens in its status (the issue: only B was named)."""
    widget, _ = stream_output(FakeClock())
    widget.start(host=None, model="smol")
    widget.append("x")
    records = (
        UsageRecord(time=0.0, request_id="r1", host="http://a:1", model="smol", received_tokens=37,
                    error_code="CONNECTION_LOST", attempt=1),
        UsageRecord(time=1.0, request_id="r1", host="http://b:2", model="smol", received_tokens=20, attempt=2),
    )
    done = result("x", host="http://b:2", tokens=57)
    widget.finish(InferenceResult(**{**done.__dict__, "records": records}))
    assert widget.status["route"] == [{"host": "http://a:1", "tokens": 37}, {"host": "http://b:2", "tokens": 20}]
    assert widget.status["host"] == "http://b:2"
    line = widgets.status_text(widget.status)
    assert line.startswith("http://a:1 → http://b:2 after 37 tokens · smol")
    assert "57 tokens" in line and "http://a:1 → http://b:2 after 37 tokens" in widget.static_html()


def test_a_retry_on_the_same_host_is_no_switch():
    """HOST_BUSY then success on one host: one host in the status, no route."""
    widget, _ = stream_output(FakeClock())
    widget.start(host=None, model="smol")
    records = (UsageRecord(time=0.0, request_id="r1", host="http://h1:8080", error_code="HOST_BUSY", attempt=1),
               UsageRecord(time=1.0, request_id="r1", host="http://h1:8080", received_tokens=5, attempt=2))
    widget.finish(InferenceResult(**{**result("hi").__dict__, "records": records}))
    assert widget.status["route"] is None and widgets.status_text(widget.status).startswith("http://h1:8080 · smol")


def test_cancelled_with_the_stopped_request_keeps_host_tokens_and_cost():
    """cancelled(result) keeps the host, tokens and cost in the status (the issue: only the TTFT)."""
    clock = FakeClock()
    widget, _ = stream_output(clock)
    widget.start(host=None, model=None)
    clock.now += 0.032
    widget.append("half")
    stopped = result("half", tokens=12, cost=0.000024)
    widget.cancelled(InferenceResult(**{**stopped.__dict__, "finish_reason": "cancelled"}))
    status = widget.status
    assert status["state"] == "cancelled" and status["host"] == "http://h1:8080" and status["model"] == "smol"
    assert (status["tokens"], status["cost"], status["cost_unit"]) == (12, 0.000024, "USDC")
    assert widgets.status_text(status) == "http://h1:8080 · smol · TTFT 32 ms · 12 tokens · 0.000024 USDC"


@pytest.mark.parametrize("fmt, text, present, absent", [
    ("markdown", "**bold** <script>alert(1)</script>", ["<strong>bold</strong>", "&lt;script&gt;"], ["<script>"]),
    ("markdown", "[x](javascript:alert(1))", ["[x](javascript:alert(1))"], ["href="]),
    ("text", "a <b>c</b>", ["a &lt;b&gt;c&lt;/b&gt;"], ["<b>"]),
    ("code", "```html\n<script>x</script>\n```", ["<pre", "&lt;script&gt;x&lt;/script&gt;"], ["<script>", "```"]),
    ("json", '{"a": "<i>"}', ["&quot;a&quot;: &quot;&lt;i&gt;&quot;"], ["<i>"]),
])
def test_final_display_data_carries_escaped_static_fallbacks(fmt, text, present, absent):
    """After the stream, the display data has the full text as text/plain and a static text/html
    rendering in which the model's own markup is text, never HTML."""
    widget, _ = stream_output(FakeClock(), format=fmt)
    widget.start(host=None, model="smol")
    widget.append(text)
    widget.finish(result(text))
    data, _ = widget._repr_mimebundle_()
    assert data["text/plain"] == text
    page = data["text/html"]
    for fragment in present:
        assert fragment in page
    for fragment in absent:
        assert fragment not in page
    assert "5 tokens" in page  # the status line too


def test_display_data_while_streaming_and_after_an_error():
    """Before the end the fallback says it is streaming; after an error it shows the code and hint."""
    widget, _ = stream_output(FakeClock())
    widget.start(host=None, model="smol")
    assert "streaming" in widget._repr_mimebundle_()[0]["text/html"]
    widget.append("partial <b>")
    widget.failed(ModelNotAvailable("model 'x' is not served", hint="try --model smol"))
    page = widget._repr_mimebundle_()[0]["text/html"]
    assert "partial &lt;b&gt;" in page and "[MODEL_NOT_AVAILABLE] model &#x27;x&#x27; is not served" in page
    assert "try --model smol" in page and "streaming" not in page


def test_repr_is_the_text():
    """The text/plain repr is the final text, without a memory address."""
    widget, _ = stream_output(FakeClock())
    widget.start(host=None, model=None)
    widget.append("# Title\n\nBody")
    widget.finish(result("# Title\n\nBody"))
    data, _metadata = widget._repr_mimebundle_()
    assert repr(widget) == str(widget) == data["text/plain"] == "# Title\n\nBody"
    assert "application/vnd.jupyter.widget-view+json" in data
    assert " at 0x" not in data["text/plain"]


def test_pretty_repr_is_the_text():
    """IPython's pretty printer shows the text too."""
    from IPython.lib.pretty import pretty

    widget, _ = stream_output(FakeClock())
    widget.finish(result("just this"))
    assert pretty(widget) == "just this"


def test_append_before_start_starts_and_restart_resets_the_view():
    """append() without start() starts; a second start() sends a reset and begins with a snapshot."""
    clock = FakeClock()
    widget, recorder = stream_output(clock)
    widget.append("x")
    assert widget.state == "running"
    widget.finish(result("x"))
    widget.start(host=None, model=None)
    assert recorder.messages[-1] == {"type": "reset"}
    assert widget.text == "" and widget.status["state"] == "running"
    clock.now += 1
    widget.append("y")
    assert recorder.messages[-1] == {"type": "snapshot", "text": "y"}


def test_stop_button_message_calls_on_stop():
    """The view's {type: "stop"} message calls every registered stop callback."""
    calls: list[str] = []
    widget, _ = stream_output(FakeClock(), background=True, on_stop=lambda: calls.append("init"))
    widget.set_cancel(lambda: calls.append("cancel"))
    widget._handle_custom_msg({"type": "stop"}, [])
    widget._handle_custom_msg({"type": "other"}, [])
    assert calls == ["init", "cancel"]
    assert widget.background is True


def test_a_failing_stop_callback_does_not_hide_the_others():
    """A stop callback that raises is logged; the next one still runs."""
    calls: list[str] = []
    widget, _ = stream_output(FakeClock())
    widget.on_stop(lambda: 1 / 0)
    widget.on_stop(lambda: calls.append("second"))
    widget._handle_custom_msg({"type": "stop"}, [])
    assert calls == ["second"]


def test_update_interval_is_an_alias_of_interval():
    """The magics' update_interval sets the batching interval."""
    widget = StreamOutput(update_interval=0.2, show=False)
    assert widget.batcher.interval == 0.2
    assert widget.format == "markdown"


# --------------------------------------------------------------------------- the host dashboard


def sample_hosts() -> list[HostInfo]:
    fast = HostInfo.from_url("http://fast:1", address="0x1111111111111111111111111111111111111111",
                             models=("smol",), region="eu", stake=1000.0, latency_ms=12.0, health="ok",
                             prices={"smol": {"stable": 2000, "native": 0}})
    slow = HostInfo.from_url("http://slow:2", address="0x2222222222222222222222222222222222222222",
                             models=("smol", "big"), region="us", stake=50.0, latency_ms=180.0, health="ok",
                             prices={"smol": {"native": 10**12}, "big": {"stable": 9000}})
    new = HostInfo.from_url("http://new:3", models=(), region=None, latency_ms=None, health="unknown",
                            requests=3, failures=1)
    return [slow, new, fast]


def sample_records() -> list[UsageRecord]:
    return [
        UsageRecord(time=1.0, request_id="a", host="http://fast:1", model="smol", received_tokens=10,
                    completion_tokens=10, ttft=0.1, duration=1.1, cost=0.00002, cost_unit="USDC"),
        UsageRecord(time=2.0, request_id="b", host="http://fast:1", model="smol", received_tokens=30,
                    completion_tokens=30, ttft=0.3, duration=1.3, cost=0.00006, cost_unit="USDC"),
        UsageRecord(time=3.0, request_id="c", host="http://slow:2", model="big", received_tokens=0,
                    error_code="HOST_BUSY", finish_reason="error"),
    ]


def test_dashboard_rows_from_host_infos():
    """Rows carry address, URL, models, region, stake, price per 1k tokens, latency, status and counts."""
    sink = ListSink()
    sink.records.extend(sample_records())
    dashboard = HostDashboard(lambda: (sample_hosts(), sink))
    rows = {row["url"]: row for row in dashboard.rows}
    assert set(rows) == {"http://fast:1", "http://slow:2", "http://new:3"}
    assert all(tuple(row) == HOST_COLUMNS for row in dashboard.rows)
    fast, slow, new = rows["http://fast:1"], rows["http://slow:2"], rows["http://new:3"]
    assert fast["models"] == ["smol"] and fast["region"] == "eu" and fast["stake"] == 1000.0
    assert fast["price"] == pytest.approx(0.002) and fast["price_unit"] == "USDC"  # 2000/1000/1e6 × 1000
    assert slow["price"] == pytest.approx(0.009) and slow["price_unit"] == "USDC"  # USDC preferred
    assert (fast["requests"], fast["tokens"], fast["failed"], fast["retried"]) == (2, 40, 0, 0)  # from usage
    assert (slow["requests"], slow["failed"]) == (1, 1)
    assert (new["requests"], new["tokens"], new["failed"], new["retried"]) == (3, 0, 1, None)  # its counters
    assert new["price"] is None and new["latency_ms"] is None and new["status"] == "unknown"
    json.dumps(dashboard.rows, allow_nan=False)


def test_dashboard_usage_summary_per_host_and_model():
    """usage_rows has one row per host and model with requests, failures, tokens, cost, TTFT, tokens/s."""
    sink = ListSink()
    sink.records.extend(sample_records())
    dashboard = HostDashboard(lambda: (sample_hosts(), sink))
    usage = {(row["host"], row["model"]): row for row in dashboard.usage_rows}
    assert set(usage) == {("http://fast:1", "smol"), ("http://slow:2", "big")}
    fast = usage[("http://fast:1", "smol")]
    assert (fast["requests"], fast["failed"], fast["retried"], fast["tokens"]) == (2, 0, 0, 40)
    assert fast["cost"] == pytest.approx(0.00008) and fast["cost_unit"] == "USDC"
    assert fast["mean_ttft_ms"] == pytest.approx(200.0) and fast["tokens_per_second"] == pytest.approx((9 + 29) / 2)
    assert usage[("http://slow:2", "big")]["cost"] is None
    json.dumps(dashboard.usage_rows, allow_nan=False)


def test_dashboard_sorting_puts_missing_values_last():
    """sort_by/sort_ascending order the rows; hosts without the value come last either way."""
    dashboard = HostDashboard(lambda: (sample_hosts(), None))
    assert dashboard.sort_by == "latency_ms" and dashboard.sort_ascending
    assert [r["url"] for r in dashboard.sorted_rows()] == ["http://fast:1", "http://slow:2", "http://new:3"]
    dashboard.sort_ascending = False
    assert [r["url"] for r in dashboard.sorted_rows()] == ["http://slow:2", "http://fast:1", "http://new:3"]
    dashboard.sort_by, dashboard.sort_ascending = "region", True
    assert [r["region"] for r in dashboard.sorted_rows()] == ["eu", "us", None]
    dashboard.sort_by = "models"  # lists sort by their joined text
    assert [r["models"] for r in dashboard.sorted_rows()] == [[], ["smol"], ["smol", "big"]]


def test_dashboard_frames():
    """hosts_frame and usage_frame are DataFrames of the same data, the hosts in the table's order."""
    sink = ListSink()
    sink.records.extend(sample_records())
    dashboard = HostDashboard(lambda: (sample_hosts(), sink))
    hosts = dashboard.hosts_frame
    assert list(hosts.columns) == list(HOST_COLUMNS)
    assert list(hosts["url"]) == ["http://fast:1", "http://slow:2", "http://new:3"]
    usage = dashboard.usage_frame
    assert list(usage.columns) == list(USAGE_COLUMNS) and len(usage) == 2
    empty = HostDashboard(lambda: ([], None))
    assert empty.hosts_frame.empty and list(empty.usage_frame.columns) == list(USAGE_COLUMNS)


def test_dashboard_refresh_message_calls_the_source_again():
    """A {type: "refresh"} message from the view reads the source again and resets the rows."""
    calls = []
    hosts = sample_hosts()

    def source():
        calls.append(1)
        return hosts[: len(calls)], None

    dashboard = HostDashboard(source)
    assert len(dashboard.rows) == 1
    before = dashboard.updated
    dashboard._handle_custom_msg({"type": "refresh"}, [])
    assert len(calls) == 2 and len(dashboard.rows) == 2 and dashboard.updated >= before
    dashboard.refresh()
    assert len(dashboard.rows) == 3 and repr(dashboard) == "HostDashboard: 3 hosts"


def test_dashboard_refresh_failure_keeps_the_rows_and_sets_error():
    """A source that fails on refresh leaves the rows and shows the error; the next success clears it."""
    state = {"fail": False}

    def source():
        if state["fail"]:
            raise RuntimeError("registry unreachable")
        return sample_hosts(), None

    dashboard = HostDashboard(source)
    state["fail"] = True
    dashboard._handle_custom_msg({"type": "refresh"}, [])  # logged, not raised
    assert len(dashboard.rows) == 3 and "registry unreachable" in dashboard.error
    with pytest.raises(RuntimeError):
        dashboard.refresh()
    state["fail"] = False
    dashboard.refresh()
    assert dashboard.error == ""


def test_dashboard_from_a_host_manager_and_a_ledger(tmp_path):
    """A HostManager's known hosts and a UsageLedger (records or summary frames) feed the dashboard."""
    manager = HostManager(["http://fast:1"])
    for host in sample_hosts():
        manager.add_host(host)
    ledger = UsageLedger(tmp_path / "usage.sqlite")
    try:
        for record in sample_records():
            ledger.record(record)
        dashboard = HostDashboard(manager, ledger, auto_refresh=30)
        assert len(dashboard.rows) == 3 and dashboard.auto_refresh == 30
        assert {(r["host"], r["model"]) for r in dashboard.usage_rows} == {("http://fast:1", "smol"),
                                                                            ("http://slow:2", "big")}
        summary = HostDashboard(lambda: (manager.hosts, ledger.summary(by=("host", "model"))))
        assert summary.usage_rows == dashboard.usage_rows
    finally:
        ledger.close()


def test_dashboard_counts_retried_attempts_apart_from_failed_requests():
    """A HOST_BUSY attempt that was retried and then answered is not a failure: the host shows one
    request, no failure and one retried attempt (the issue: it showed in the Errors column)."""
    sink = ListSink()
    sink.records.extend([
        UsageRecord(time=1.0, request_id="r", host="http://fast:1", model="smol", error_code="HOST_BUSY",
                    finish_reason="error", attempt=1),
        UsageRecord(time=2.0, request_id="r", host="http://fast:1", model="smol", received_tokens=8, attempt=2),
        UsageRecord(time=3.0, request_id="lost", host="http://slow:2", model="big", error_code="HOST_ERROR",
                    finish_reason="error"),
    ])
    dashboard = HostDashboard(lambda: (sample_hosts(), sink))
    rows = {row["url"]: row for row in dashboard.rows}
    assert (rows["http://fast:1"]["requests"], rows["http://fast:1"]["failed"], rows["http://fast:1"]["retried"]) \
        == (1, 0, 1)
    assert (rows["http://slow:2"]["failed"], rows["http://slow:2"]["retried"]) == (1, 0)
    usage = {row["host"]: row for row in dashboard.usage_rows}
    assert (usage["http://fast:1"]["failed"], usage["http://fast:1"]["retried"], usage["http://fast:1"]["tokens"]) \
        == (0, 1, 8)


def test_dashboard_shows_this_kernels_usage_unless_all_kernels(tmp_path):
    """A ledger shared with another kernel: by default the dashboard counts this kernel's records
    (so another notebook's host does not appear); all_kernels (the view's checkbox) counts them all."""
    ledger = UsageLedger(tmp_path / "shared.sqlite3")
    try:
        for record in sample_records():
            ledger.record(record)
        ledger.record(UsageRecord(time=4.0, request_id="elsewhere", host="http://other-kernel:9", model="smol",
                                  received_tokens=7, client_id="another-kernel"))
        dashboard = HostDashboard(lambda: (sample_hosts(), ledger))
        assert {row["host"] for row in dashboard.usage_rows} == {"http://fast:1", "http://slow:2"}
        assert "other-kernel" not in dashboard.static_html()
        dashboard.all_kernels = True  # what the checkbox sets: recounted without calling the source again
        assert {row["host"] for row in dashboard.usage_rows} == {"http://fast:1", "http://slow:2",
                                                                  "http://other-kernel:9"}
        assert "http://other-kernel:9" in dashboard.static_html() and "all kernels" in dashboard.static_html()
        everything = HostDashboard(lambda: (sample_hosts(), ledger), all_kernels=True)
        assert everything.usage_rows == dashboard.usage_rows
    finally:
        ledger.close()


def test_dashboard_display_data_carries_escaped_html_tables():
    """The dashboard's display data has an HTML table per host and the usage summary; host-provided
    text is escaped."""
    hosts = sample_hosts()
    hosts.append(HostInfo.from_url("http://evil:4", region="<script>alert(1)</script>", health="ok"))
    sink = ListSink()
    sink.records.extend(sample_records())
    dashboard = HostDashboard(lambda: (hosts, sink))
    data, _ = dashboard._repr_mimebundle_()
    page = data["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in data and data["text/plain"] == "HostDashboard: 4 hosts"
    assert page.count("<tr") == 1 + 4 + 1 + 2  # header and 4 hosts; header and 2 usage rows
    for url in ("http://fast:1", "http://slow:2", "http://new:3", "http://evil:4"):
        assert url in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_dashboard_refresh_updates_its_displays(make_shell, monkeypatch):
    """Displayed (an Out[] result or display()), the dashboard shows under its own display id; a
    refresh sends update_display with the new tables, so saved outputs show the latest ones."""
    shell = make_shell(load=False)
    published = []
    monkeypatch.setattr(shell.display_pub, "publish",
                        lambda data, metadata=None, transient=None, update=False, **kw:
                        published.append((data, transient, update)))
    hosts = sample_hosts()
    calls = []

    def source():
        calls.append(1)
        return hosts[: len(calls)], None

    dashboard = HostDashboard(source)
    shell.user_ns["dashboard"] = dashboard
    shell.run_cell("dashboard")
    assert len(published) == 1
    data, transient, update = published[0]
    assert not update and transient["display_id"] and data["text/html"].count("http://") == 1
    dashboard.refresh()
    data, transient2, update = published[-1]
    assert update and transient2 == transient and "http://new:3" in data["text/html"]


def test_dashboard_repr_counts_hosts():
    """The text/plain repr is stable: 'HostDashboard: N hosts'."""
    dashboard = HostDashboard(sample_hosts()[:1])
    assert repr(dashboard) == "HostDashboard: 1 host"
    assert dashboard._repr_mimebundle_()[0]["text/plain"] == "HostDashboard: 1 host"


def test_batch_progress_updates_and_repr():
    """update() sets done, total and errors in one sync; None keeps a value."""
    progress = BatchProgress(10, description="prompts")
    progress.update(3)
    progress.update(7, errors=1)
    assert (progress.done, progress.total, progress.errors) == (7, 10, 1)
    progress.update(8, total=12)
    assert repr(progress) == "BatchProgress: prompts: 8/12 done, 1 error"


def test_importing_the_widgets_does_not_import_pandas():
    """pandas loads only when a frame is asked for."""
    code = "import sys, fabstir_jupyter.notebook.widgets; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------- the JS modules
# The bundles' own tests (DOM, buttons, Markdown safety, the chart) run under Node: test_widget_bundle.py.


@pytest.mark.parametrize("cls, stem", [
    (StreamOutput, "stream_output"), (HostDashboard, "host_dashboard"), (BatchProgress, "batch_progress"),
])
def test_static_files_are_the_widgets_modules_and_styles(cls, stem):
    """Each widget's _esm and _css hold the contents of its built files in the package's static folder."""
    assert str(cls._esm) == (STATIC / f"{stem}.js").read_text()
    assert str(cls._css) == (STATIC / f"{stem}.css").read_text()


def run_node(tmp_path: Path, script: str) -> str:
    for source in STATIC.glob("*.js"):
        shutil.copy(source, tmp_path / (source.stem + ".mjs"))
    main = tmp_path / "main.mjs"
    main.write_text(script)
    done = subprocess.run([NODE, str(main)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_node
@pytest.mark.parametrize("name, hooks", [
    ("stream_output", ["initialize", "render"]),
    ("host_dashboard", ["initialize", "render"]),
    ("batch_progress", ["render"]),
])
def test_js_files_are_es_modules_with_a_default_export(tmp_path, name, hooks):
    """node --check passes and the default export holds render (and initialize where used)."""
    copy = tmp_path / f"{name}.mjs"
    shutil.copy(STATIC / f"{name}.js", copy)
    check = subprocess.run([NODE, "--check", str(copy)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    out = run_node(tmp_path, f"""
        import widget from "./{name}.mjs";
        console.log(JSON.stringify(Object.keys(widget).filter((k) => typeof widget[k] === "function")));
    """)
    assert sorted(json.loads(out)) == sorted(hooks)


@needs_node
def test_js_view_applies_messages_like_the_python_simulator(tmp_path):
    """The bundle's applyMessage rebuilds the same text as the simulator from the kernel's own messages,
    emoji and a missed prefix included."""
    clock = FakeClock()
    rng = random.Random(3)
    pieces = ["😀", "é", "ab", "\n", "𝔘x", " ", "\"q\"", "<b>"]  # noqa: RUF001 - U+1D518, outside the BMP on purpose
    widget, recorder = stream_output(clock, interval=0.05)
    widget.start(host=None, model=None)
    for _ in range(600):
        clock.now += rng.choice([0.0, 0.01, 0.03, 0.06])
        widget.append(rng.choice(pieces))
    widget.finish(result(widget.batcher.text))
    messages = recorder.messages
    assert any(isinstance(m, str) for m in messages) and any(isinstance(m, dict) for m in messages)
    cases = []
    for dropped in (0, 1, 2, 5, len(messages) // 2, len(messages) - 1):
        cases.append({"dropped": dropped, "expected": ViewSimulator.of(messages[dropped:]).text})
    (tmp_path / "messages.json").write_text(json.dumps({"messages": messages, "cases": cases}))
    out = run_node(tmp_path, """
        import { readFileSync } from "node:fs";
        import { applyMessage, newLiveText } from "./stream_output.mjs";
        const { messages, cases } = JSON.parse(readFileSync("messages.json", "utf8"));
        const results = cases.map(({ dropped, expected }) => {
          const live = newLiveText();
          for (const m of messages.slice(dropped)) applyMessage(live, m);
          return live.text === expected;
        });
        console.log(JSON.stringify(results));
    """)
    assert json.loads(out) == [True] * len(cases)
    assert cases[0]["expected"] == widget.text


@needs_node
def test_js_sorts_rows_like_python(tmp_path):
    """host_dashboard.js's sortRows orders rows as HostDashboard.sorted_rows does."""
    dashboard = HostDashboard(lambda: (sample_hosts(), None))
    orders = {}
    for key in ("latency_ms", "region", "price", "address", "requests"):
        for ascending in (True, False):
            dashboard.sort_by, dashboard.sort_ascending = key, ascending
            orders[f"{key}:{ascending}"] = [r["url"] for r in dashboard.sorted_rows()]
    (tmp_path / "rows.json").write_text(json.dumps(dashboard.rows))
    out = run_node(tmp_path, """
        import { readFileSync } from "node:fs";
        import { sortRows } from "./host_dashboard.mjs";
        const rows = JSON.parse(readFileSync("rows.json", "utf8"));
        const orders = {};
        for (const key of ["latency_ms", "region", "price", "address", "requests"])
          for (const ascending of [true, false])
            orders[`${key}:${ascending ? "True" : "False"}`] = sortRows(rows, key, ascending).map((r) => r.url);
        console.log(JSON.stringify(orders));
    """)
    assert json.loads(out) == orders


@needs_node
def test_js_status_line_matches_python(tmp_path):
    """stream_output.js's status line (what the view shows) equals widgets.status_text (what the
    static fallback and text/plain readers see), failover routes, costs, paid jobs and locks included."""
    statuses = [
        {"state": "done", "host": "http://b:2", "model": "smol", "ttft": 0.0321, "tokens_per_second": 85.04,
         "tokens": 57, "cost": 0.000114, "cost_unit": "USDC", "finish_reason": "length", "note": "mode cheapest",
         "route": [{"host": "http://a:1", "tokens": 37}, {"host": "http://b:2", "tokens": 20}]},
        {"state": "cancelled", "host": "http://h1:8080", "model": "smol", "ttft": 0.032, "tokens": 12,
         "cost": 0.000024, "cost_unit": "USDC", "route": None},
        {"state": "done", "host": "http://h", "cost": 0.125, "cost_unit": "ETH", "finish_reason": "stop",
         "route": [{"host": "http://h", "tokens": 3}]},
        {"state": "done", "cost": 0, "tokens": 0, "route": [{"host": "http://a", "tokens": 0},
                                                         {"host": "http://b", "tokens": 4},
                                                         {"host": "http://c", "tokens": 1}]},
        {"state": "done", "cost": 1.23456789, "cost_unit": "USDC"},
        {"state": "cancelled", "host": "http://h", "tokens": 1, "cost": 0.0000035, "cost_unit": "USDC"},
        {"state": "done", "host": "http://h", "model": "smol", "network": 2.14, "ttft": 2.36, "tokens": 3},
        {"state": "error", "network": 0.96, "ttft": 0.9996},
        {"state": "done", "host": "http://h", "tokens": 40, "cost": 0.00008, "cost_unit": "USDC", "cost_estimate": True,
         "job_ids": [3], "encrypted": True},
        {"state": "cancelled", "host": "http://h", "cost": 0.0002, "cost_unit": "USDC", "cost_estimate": True,
         "job_ids": [3, 4], "encrypted": False, "finish_reason": "length"},
        {"state": "done", "host": "http://h", "tokens": 2, "encrypted": None, "job_ids": None},
    ]
    (tmp_path / "statuses.json").write_text(json.dumps(statuses))
    out = run_node(tmp_path, """
        import { readFileSync } from "node:fs";
        import { statusParts } from "./stream_output.mjs";
        const statuses = JSON.parse(readFileSync("statuses.json", "utf8"));
        console.log(JSON.stringify(statuses.map((s) => statusParts(s).join(" · "))));
    """)
    assert json.loads(out) == [widgets.status_text(status) for status in statuses]


# --------------------------------------------------------------------------- paid streams and the lock


def live(job_ids=(7,), cost=None, encrypted=True):
    from fabstir_jupyter.notebook.rendering import LiveStatus

    return LiveStatus(tuple(job_ids), cost, "USDC" if cost is not None else None, encrypted)


def test_live_status_shows_the_job_and_lock_at_once_and_the_cost_at_most_twice_a_second():
    """live(): a new job or encryption shows at once; cost updates at most every 0.5 s (held back
    ones show with a later append), counted on a fake clock; the final status takes the result's."""
    clock = FakeClock()
    widget, _ = stream_output(clock)
    widget.start(host="http://h1:8080", model="smol")
    shown = []
    widget.observe(lambda change: shown.append((clock.now, dict(change["new"]))), names="status")
    price = 0.000002  # per token
    for token in range(1, 101):  # 100 tokens, 50 per second of fake time
        clock.now += 0.02
        widget.live(live(cost=token * price))
        widget.append(" w")
    first = shown[0][1]
    assert first["job_ids"] == [7] and first["encrypted"] is True and first["cost_estimate"] is True
    costs: list[tuple[float, float]] = []  # (when, cost) each time the shown cost changed
    for now, status in shown:
        if status.get("cost") is not None and (not costs or costs[-1][1] != status["cost"]):
            costs.append((now, status["cost"]))
    assert costs[0] == (pytest.approx(100.02), pytest.approx(price))  # at once: a new job
    assert len(costs) == 1 + 3  # then one per 0.5 s of the rest of the 2 s stream (the next token after each)
    assert all(later[0] - earlier[0] >= widgets.LIVE_STATUS_INTERVAL for earlier, later in itertools.pairwise(costs))
    assert [round(cost / price) for _, cost in costs] == [1, 27, 53, 79]  # the tokens streamed by then
    widget.live(live(job_ids=(7, 8), cost=101 * price))  # the answer went on on a new job: at once
    assert widget.status["job_ids"] == [7, 8] and widget.status["cost"] == pytest.approx(101 * price)
    clock.now += 0.1
    widget.live(live(job_ids=(7, 8), cost=102 * price))
    assert widget.status["cost"] == pytest.approx(101 * price)  # held back
    clock.now += 0.5
    widget.append("")  # an idle tick shows what was held back
    assert widget.status["cost"] == pytest.approx(102 * price)
    assert widgets.status_text(widget.status) == ("http://h1:8080 · smol · TTFT 20 ms · 0.000204 USDC est. · "
                                                  "jobs 7, 8 · 🔒")
    final = InferenceResult(**{**result(widget.batcher.text, tokens=102).__dict__, "job_ids": (7, 8),
                               "cost": 102 * price, "cost_unit": "USDC", "encrypted": True})
    widget.finish(final)
    assert widget.status["job_ids"] == [7, 8] and widget.status["cost_estimate"] is True
    assert widget.status["cost"] == pytest.approx(102 * price) and widget.status["encrypted"] is True
    widget.live(live(job_ids=(9,), cost=1.0))  # after the end: ignored
    assert widget.status["job_ids"] == [7, 8]


@pytest.mark.parametrize("encrypted, lock", [(True, "🔒"), (False, "🔓 plaintext"), (None, None)])
def test_the_lock_is_in_the_widget_state_and_its_static_fallback(encrypted, lock):
    """The stream's encryption is in the widget's status (True, False or None) and the status line of
    its static HTML shows 🔒, 🔓 plaintext, or no lock when unknown."""
    widget, _ = stream_output(FakeClock())
    widget.start(host="http://h1:8080", model="smol")
    widget.live(live(job_ids=(), encrypted=encrypted))
    widget.append("hi")
    assert widget.status["encrypted"] is encrypted
    running = widget.static_html()
    widget.finish(InferenceResult(**{**result("hi").__dict__, "encrypted": encrypted}))
    assert widget.status["encrypted"] is encrypted and widget.status["job_ids"] is None
    done = widget._repr_mimebundle_()[0]["text/html"]
    for page in (running, done):
        if lock is None:
            assert "🔒" not in page and "🔓" not in page
        else:
            assert lock in page
    assert widget._repr_mimebundle_()[0]["text/plain"] == "hi"  # the answer only: saved notebooks stay stable


def test_a_failed_or_cancelled_paid_stream_keeps_its_job_cost_and_lock():
    """failed() and cancelled() without a result keep the job, the cost so far and the lock."""
    for end in ("failed", "cancelled"):
        widget, _ = stream_output(FakeClock())
        widget.start(host="http://h1:8080", model="smol")
        widget.live(live(cost=0.0001))
        widget.append("partial")
        if end == "failed":
            widget.failed(ModelNotAvailable("gone"))
        else:
            widget.cancelled()
        status = widget.status
        assert (status["job_ids"], status["cost"], status["cost_estimate"], status["encrypted"]) == \
            ([7], 0.0001, True, True), end
        assert "0.0001 USDC est. · job 7 · 🔒" in widgets.status_text(status)


def sample_job_rows():
    return [
        {"job_id": 3, "host": "http://h1:8080", "model": "smol", "kind": None, "deposit": 0.5, "tokens": 100,
         "billed": 0.0002, "refund": 0.4998, "unit": "USDC", "status": "completed"},
        {"job_id": 4, "host": "http://h1:8080", "model": "smol", "kind": "tab", "deposit": 4.096, "tokens": 120,
         "billed": 0.00024, "refund": None, "unit": "USDC", "status": "open"},
    ]


def test_dashboard_jobs_table_from_a_paying_source():
    """A source giving job rows fills job_rows and paid; jobs_frame is the jobs DataFrame and the static
    fallback has the jobs table, escaped; a source without jobs (unpaid) has no jobs table."""
    from fabstir_jupyter.notebook.tables import JOB_COLUMNS

    rows = sample_job_rows()
    rows[1]["host"] = "<b>h</b>"
    dashboard = HostDashboard(lambda: (sample_hosts(), None, rows))
    assert dashboard.paid and dashboard.job_rows == rows
    frame = dashboard.jobs_frame
    assert list(frame.columns) == list(JOB_COLUMNS)
    assert list(frame["job_id"]) == [3, 4] and list(frame["status"]) == ["completed", "open"]
    assert frame["refund"].isna().tolist() == [False, True] and frame["billed"].sum() == pytest.approx(0.00044)
    page = dashboard.static_html()
    assert "Paid jobs" in page and "&lt;b&gt;h&lt;/b&gt;" in page and "<b>h</b>" not in page
    unpaid = HostDashboard(lambda: (sample_hosts(), None))
    assert not unpaid.paid and unpaid.job_rows == [] and len(unpaid.jobs_frame) == 0
    assert "Paid jobs" not in unpaid.static_html()
    empty = HostDashboard(lambda: (sample_hosts(), None, []))
    assert empty.paid and "No paid jobs yet." in empty.static_html()
