"""The notebook bridge: one loop thread, streams consumed from the main thread, cancellation, lifecycle."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from fabstir_jupyter.errors import Cancelled, ModelNotAvailable
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text
from fabstir_jupyter.notebook import bridge as bridge_module
from fabstir_jupyter.notebook.bridge import (
    LOOP_THREAD_NAME,
    LoopTask,
    NetworkSettings,
    NotebookBridge,
    close_bridge,
    get_bridge,
)

from .conftest import wait_until

PROMPT = "Tell me about rivers"


class RecordingSink:
    """An OutputSink that records every call and the thread it came from."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.threads: set[str] = set()
        self.interrupt_after = interrupt_after
        self.cancel_callback = None
        self.text_times: list[float] = []  # when each non-empty append came
        self.clock = time.monotonic  # what text_times reads

    def _record(self, name: str, value: object = None) -> None:
        self.calls.append((name, value))
        self.threads.add(threading.current_thread().name)

    def start(self, *, host=None, model=None):
        self._record("start", (host, model))

    def append(self, text):
        self._record("append", text)
        if text:
            self.text_times.append(self.clock())
        if self.interrupt_after is not None and self.appended_count == self.interrupt_after:
            raise KeyboardInterrupt

    def finish(self, result):
        self._record("finish", result)

    def failed(self, error):
        self._record("failed", error)

    def cancelled(self, result=None):
        self._record("cancelled", result)

    def set_cancel(self, callback):
        self.cancel_callback = callback

    @property
    def appended_count(self) -> int:
        return sum(1 for name, _ in self.calls if name == "append")

    @property
    def text(self) -> str:
        return "".join(value for name, value in self.calls if name == "append")

    @property
    def outcome(self) -> list[str]:
        return [name for name, _ in self.calls if name != "append"]


@pytest.fixture
def bridge(isolated_env):
    """A private bridge (closed afterwards)."""
    b = NotebookBridge()
    yield b
    b.close()


def settings_for(*servers) -> NetworkSettings:
    return NetworkSettings(hosts=tuple(s.ws_url for s in servers), usage_db=":memory:")


def factory(bridge, settings, prompt=PROMPT, **options):
    async def make():
        manager = await bridge.manager(settings)
        return manager.stream(prompt, **options)

    return make


def test_run_stream_delivers_every_piece_on_the_main_thread(bridge, host):
    """All text reaches sink.append on the calling thread, then finish(result)."""
    settings = settings_for(host)
    sink = RecordingSink()
    result = bridge.run_stream(factory(bridge, settings, max_tokens=50), sink)
    assert sink.text == result.text == scripted_text(PROMPT, 50)
    assert sink.outcome == ["finish"] and sink.calls[-1][1] is result
    assert sink.threads == {threading.current_thread().name}


class MainThreadClock:
    """The ``time`` module as the bridge sees it, remembering the last ``monotonic()`` the main thread
    read: the batching clock reading just before an append (the loop thread's readings are ignored)."""

    def __init__(self) -> None:
        self.last: float | None = None

    def __getattr__(self, name: str):
        return getattr(time, name)

    def monotonic(self) -> float:
        now = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self.last = now
        return now


def test_run_stream_batches_appends_by_interval(bridge, start_host, monkeypatch):
    """With an interval, appends are coalesced: at most one per interval (plus the last), nothing lost.
    The gaps are measured on the bridge's own clock readings, so a busy machine cannot shrink them."""
    clock = MainThreadClock()
    monkeypatch.setattr(bridge_module, "time", clock)
    slow = start_host(backend=ScriptedBackend(token_rate=400))
    sink = RecordingSink()
    sink.clock = lambda: clock.last
    result = bridge.run_stream(factory(bridge, settings_for(slow), max_tokens=100), sink, interval=0.05)
    assert sink.text == result.text == scripted_text(PROMPT, 100)
    assert len(sink.text_times) < 100  # tokens were coalesced
    # Consecutive batches are an interval apart (the last one, flushed at the end, may come sooner).
    gaps = [later - earlier for earlier, later in itertools.pairwise(sink.text_times[:-1])]
    assert gaps and min(gaps) >= 0.05


def test_run_stream_reports_failures_to_the_sink(bridge, host):
    """A FabstirError reaches sink.failed and is re-raised."""
    sink = RecordingSink()
    with pytest.raises(ModelNotAvailable):
        bridge.run_stream(factory(bridge, settings_for(host), model="nope"), sink)
    assert sink.outcome == ["failed"] and isinstance(sink.calls[-1][1], ModelNotAvailable)


def test_interrupt_from_the_sink_cancels_cleanly_and_keeps_the_socket(bridge, start_host):
    """KeyboardInterrupt on the main thread: stream_cancel drains the host stream, the socket goes back
    clean to the pool, the sink is marked cancelled, and the interrupt propagates."""
    slow = start_host(backend=ScriptedBackend(token_rate=200))
    settings = settings_for(slow)
    sink = RecordingSink(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        bridge.run_stream(factory(bridge, settings, max_tokens=2000), sink, interval=0.02)
    assert sink.outcome == ["cancelled"]
    stopped = sink.calls[-1][1]  # the stopped request: its host and what it used, for the status line
    assert stopped.host and stopped.finish_reason == "cancelled" and stopped.usage.received_tokens > 0
    assert stopped.records and stopped.records[-1].host == stopped.host
    manager = bridge.sdk(settings).inference_manager
    assert manager.pool.stats() == {"idle": 1, "in_use": 0}  # cleanup finished before the re-raise
    assert wait_until(lambda: slow.active_streams == 0)
    again = bridge.run_stream(factory(bridge, settings, max_tokens=3), RecordingSink())
    assert again.text == scripted_text(PROMPT, 3)


def test_a_real_sigint_cancels_the_stream(bridge, start_host):
    """A SIGINT while the main thread waits for tokens cancels the stream and raises KeyboardInterrupt."""
    slow = start_host(backend=ScriptedBackend(token_rate=100))
    timers = []

    class SignallingSink(RecordingSink):
        def append(self, text):
            super().append(text)
            if not timers:  # 0.2 s after the first text, as a user pressing Ctrl-C would
                timers.append(threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)))
                timers[0].start()

    sink = SignallingSink()
    try:
        with pytest.raises(KeyboardInterrupt):
            bridge.run_stream(factory(bridge, settings_for(slow), max_tokens=1000), sink)
    finally:
        for timer in timers:
            timer.join()
    assert sink.outcome == ["cancelled"] and 0 < len(sink.text) < len(scripted_text(PROMPT, 1000))
    assert wait_until(lambda: slow.active_streams == 0)


def test_loop_task_done_waits_for_the_coroutines_cleanup(bridge):
    """LoopTask.done is set only after the coroutine's finally block has run, unlike a cancelled future."""
    cleaned = threading.Event()

    started = threading.Event()

    async def slow_cleanup():
        try:
            started.set()
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)
            cleaned.set()

    task = bridge.submit(slow_cleanup())
    assert started.wait(3)
    task.cancel()
    assert not task.done.is_set()
    assert task.done.wait(3) and cleaned.is_set() and task.future.cancelled()


def test_a_task_cancelled_before_it_starts_never_runs(bridge):
    """Cancelling at once still settles the task (done set, future cancelled)."""
    ran = threading.Event()

    async def body():
        ran.set()

    loop = bridge.loop_thread.loop
    blocker = threading.Event()
    loop.call_soon_threadsafe(blocker.wait, 1.0)  # keep the loop busy so the task cannot start yet
    task = LoopTask(loop, body())
    task.cancel()
    blocker.set()
    assert task.done.wait(3) and task.future.cancelled() and not ran.is_set()


def test_coroutines_run_in_the_callers_context(bridge):
    """Submitted coroutines see the submitting thread's context variables (so output finds its cell)."""
    var = contextvars.ContextVar("cell", default="none")
    var.set("cell-7")

    async def read():
        return var.get(), threading.current_thread().name

    assert bridge.run(read()) == ("cell-7", LOOP_THREAD_NAME)


def test_background_stream_updates_the_sink_from_the_loop_thread(bridge, start_host):
    """run_background returns at once; the sink is fed from the loop thread and finished; on_result runs."""
    slow = start_host(backend=ScriptedBackend(token_rate=200))
    sink = RecordingSink()
    results = []
    run = bridge.run_background(factory(bridge, settings_for(slow), max_tokens=20), sink, interval=0.02,
                                on_result=results.append)
    assert not run.done()
    assert sink.cancel_callback == run.cancel
    result = run.result(5)
    assert run.wait(1) and sink.text == result.text == scripted_text(PROMPT, 20)
    assert sink.outcome == ["finish"] and results == [result]
    assert sink.threads == {LOOP_THREAD_NAME}
    assert wait_until(lambda: run not in bridge.background)


def test_background_stream_stops_on_cancel(bridge, start_host):
    """The handle's cancel (the stop button) ends the stream on the host and marks the sink cancelled."""
    slow = start_host(backend=ScriptedBackend(token_rate=100))
    sink = RecordingSink()
    run = bridge.run_background(factory(bridge, settings_for(slow), max_tokens=1000), sink)
    assert wait_until(lambda: sink.text)
    sink.cancel_callback()
    assert run.wait(3) and run.cancelled()
    assert sink.outcome == ["cancelled"]
    stopped = sink.calls[-1][1]
    assert stopped.host and stopped.finish_reason == "cancelled" and stopped.usage.received_tokens > 0
    assert wait_until(lambda: slow.active_streams == 0)


def test_background_failure_reaches_on_error(bridge, host):
    """A failing background stream calls sink.failed and on_error."""
    sink = RecordingSink()
    errors = []
    run = bridge.run_background(factory(bridge, settings_for(host), model="nope"), sink, on_error=errors.append)
    assert run.wait(5)
    assert sink.outcome == ["failed"] and isinstance(errors[0], ModelNotAvailable) and run.error is errors[0]


def test_closing_the_bridge_ends_a_blocking_stream_with_a_coded_error(bridge, start_host):
    """If the bridge closes under a running stream, the caller gets CANCELLED, not a bare CancelledError."""
    slow = start_host(backend=ScriptedBackend(token_rate=100))
    sink = RecordingSink()
    threading.Timer(0.3, bridge.close).start()
    with pytest.raises(Cancelled):
        bridge.run_stream(factory(bridge, settings_for(slow), max_tokens=1000), sink)
    assert sink.outcome == ["cancelled"]


def test_ending_a_session_from_another_thread_cancels_its_blocking_turn(bridge, start_host):
    """end_session from another thread while run_stream blocks on that session's turn: the turn is
    cancelled on the host, run_stream raises CANCELLED, the sink shows it cancelled, and ``store``
    gets the partial answer with the error."""
    slow, spare = start_host(backend=ScriptedBackend(token_rate=50)), start_host()
    settings = settings_for(slow, spare)
    enders: list[threading.Thread] = []

    class EndingSink(RecordingSink):
        def append(self, text):
            super().append(text)
            if len(self.text.split()) >= 3 and not enders:
                enders.append(threading.Thread(target=bridge.end_session, args=("s",)))
                enders[0].start()

    async def make():
        manager = await bridge.manager(settings)
        session = await bridge.named_session("s", settings, host=slow.ws_url)
        return manager.sessions.stream(session.id, PROMPT, max_tokens=1000)

    sink, stored = EndingSink(), []
    with pytest.raises(Cancelled) as info:
        bridge.run_stream(make, sink, store=stored.append)
    enders[0].join(5)
    assert sink.outcome == ["cancelled"]
    (partial,) = stored
    assert partial.error is info.value and partial.finish_reason == "cancelled"
    assert partial.text == sink.text == info.value.partial_text
    assert partial.text == scripted_text(PROMPT, partial.usage.received_tokens)
    assert wait_until(lambda: slow.active_streams == 0) and spare.active_streams == 0
    ledger = bridge.sdk(settings).inference_manager.usage
    ledger.flush()
    assert list(ledger.to_frame()["finish_reason"]) == ["cancelled"]  # one attempt, no failover after the end
    assert "s" not in bridge.sessions


def test_configure_closes_the_sdks_of_other_settings(bridge, start_host):
    """Switching the default network closes the old SDK and forgets its named sessions."""
    a, b = start_host(), start_host()
    first, second = settings_for(a), settings_for(b)
    bridge.configure(first)
    bridge.run_stream(factory(bridge, first, max_tokens=2), RecordingSink())
    bridge.run(bridge.named_session("chat", first))
    old = bridge.sdk()
    bridge.configure(second)
    assert old._closed and "chat" not in bridge.sessions
    assert bridge.sdk() is not old and bridge.sdk().settings.hosts == (b.ws_url,)


def test_close_stops_the_loop_thread_and_is_idempotent(bridge, host):
    """close() stops the loop thread and closes the SDKs; a second close does nothing."""
    settings = settings_for(host)
    bridge.run_stream(factory(bridge, settings, max_tokens=2), RecordingSink())
    sdk = bridge.sdk(settings)
    bridge.close()
    assert not bridge.running and sdk._closed and bridge.closed
    bridge.close()
    with pytest.raises(RuntimeError):
        bridge.loop_thread  # noqa: B018


def test_get_bridge_is_one_per_process_until_closed(isolated_env):
    """get_bridge() returns the same bridge until close_bridge(), then a new one."""
    first = get_bridge()
    assert get_bridge() is first
    close_bridge()
    assert first.closed and get_bridge() is not first
    close_bridge()


# --------------------------------------------------------------------------- the live status of paid streams


class ScriptedPaidStream:
    """A stand-in for a paid InferenceStream: one token per piece, billed to job 7 at ``price`` per
    token, moving to job 8 after ``switch_at`` tokens (an answer that went on on a new job)."""

    def __init__(self, tokens: int, price: float, switch_at: int, encrypted: bool) -> None:
        self.tokens, self.price, self.switch_at = tokens, price, switch_at
        self.sent = 0
        self.encrypted: bool | None = None  # set once the request is sent, as a real stream does
        self._encrypted = encrypted

    @property
    def job_ids(self) -> tuple[int, ...]:
        return (7,) if self.sent <= self.switch_at else (7, 8)

    @property
    def running_cost(self) -> tuple[float, str]:
        return self.sent * self.price, "USDC"

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def __aiter__(self):
        return self._pieces()

    async def _pieces(self):
        self.encrypted = self._encrypted
        for index in range(self.tokens):
            self.sent += 1
            yield f"w{index} "
            await asyncio.sleep(0)

    def result(self):
        return SimpleNamespace(text="".join(f"w{i} " for i in range(self.tokens)), job_ids=self.job_ids,
                               cost=self.running_cost[0], cost_unit="USDC", encrypted=self.encrypted)


class LiveSink(RecordingSink):
    """A RecordingSink that also takes the stream's live status (the OutputSink extra)."""

    def live(self, status):
        self._record("live", status)


@pytest.mark.parametrize("background", [False, True])
def test_a_paid_streams_job_cost_and_lock_reach_the_sink_before_the_text_they_came_with(bridge, background):
    """Each piece that changes the stream's live status (its job, its cost so far at the job's price,
    its encryption) is preceded by one live(status); counts follow the tokens, not the clock."""
    from fabstir_jupyter.notebook.rendering import LiveStatus

    price = 0.000002
    stream = ScriptedPaidStream(tokens=30, price=price, switch_at=20, encrypted=True)
    sink = LiveSink()
    if background:
        run = bridge.run_background(lambda: stream, sink, interval=0)
        assert run.wait(10)
    else:
        bridge.run_stream(lambda: stream, sink)
    statuses = [value for name, value in sink.calls if name == "live"]
    assert len(statuses) == 30  # the cost grows with every token
    assert all(isinstance(s, LiveStatus) and s.encrypted is True and s.cost_unit == "USDC" for s in statuses)
    assert [round(s.cost / price) for s in statuses] == list(range(1, 31))
    assert [s.job_ids for s in statuses] == [(7,)] * 20 + [(7, 8)] * 10
    text_before = ""
    for name, value in sink.calls:  # no status comes after the text it came with (text may be batched)
        if name == "live":
            tokens = round(value.cost / price)
            assert "".join(f"w{i} " for i in range(tokens - 1)).startswith(text_before)
        elif name == "append":
            text_before += value
    assert sink.outcome[-1] == "finish"


def test_an_unpaid_streams_lock_reaches_the_sink_once(bridge, host):
    """On a host without a key (the static scripted host) the stream is in clear: one live status,
    no job, no cost, encrypted False, before the first text."""
    sink = LiveSink()
    bridge.run_stream(factory(bridge, settings_for(host), max_tokens=20), sink)
    statuses = [value for name, value in sink.calls if name == "live"]
    assert len(statuses) == 1 and statuses[0].job_ids == () and statuses[0].cost is None
    assert statuses[0].encrypted is False
    assert [name for name, _ in sink.calls][:2] == ["live", "append"]
