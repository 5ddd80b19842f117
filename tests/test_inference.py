"""The client against the reference host (scripted backend) on loopback: every path of a request."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import pytest

from _timing import wait_until
from fabstir_jupyter import InferenceOptions
from fabstir_jupyter.errors import (
    ConnectionFailed,
    DeadlineExceeded,
    FabstirError,
    FirstTokenTimeout,
    HostError,
    IdleTimeout,
    InvalidPrompt,
    ModelNotAvailable,
    NoHostsAvailable,
    PaymentRequired,
    RateLimitExceeded,
)
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text

PROMPT = "Tell me about rivers"


async def collect(stream_cm):
    async with stream_cm as stream:
        pieces = [piece async for piece in stream]
    return stream, pieces


async def test_client_streams_the_hosts_text_in_order(start_host, make_manager):
    """Pieces arrive in order and join to the scripted answer; results are filled at the end."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    stream, pieces = await collect(manager.stream(PROMPT, max_tokens=20))
    assert "".join(pieces) == scripted_text(PROMPT, 20)
    assert all(pieces) and 1 <= len(pieces) <= 20  # chunks already buffered together come as one piece
    assert stream.text == scripted_text(PROMPT, 20)
    assert stream.finish_reason == "length"
    assert stream.model == "scripted-1"
    assert stream.host is not None and stream.host.ws_url == host.ws_url
    assert stream.ttft is not None and stream.ttft > 0
    usage = stream.usage
    assert (usage.received_tokens, usage.completion_tokens) == (20, 20)
    assert usage.prompt_tokens == len(PROMPT.split())
    assert usage.total_tokens == usage.prompt_tokens + 20


async def test_brief_generators_yield_the_same_tokens(start_host, make_manager):
    """stream_inference and direct_inference are thin wrappers over the stream."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    auto = [t async for t in manager.stream_inference(PROMPT, InferenceOptions(max_tokens=8))]
    direct = [t async for t in manager.direct_inference(PROMPT, host.ws_url, max_tokens=8)]
    assert "".join(auto) == "".join(direct) == scripted_text(PROMPT, 8)


async def test_stream_false_yields_the_whole_text_once(start_host, make_manager):
    """stream=False delivers one piece holding the whole answer."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    _, pieces = await collect(manager.stream(PROMPT, max_tokens=12, stream=False))
    assert pieces == [scripted_text(PROMPT, 12)]


async def test_natural_end_reports_stop(start_host, make_manager):
    """A host answer that ends before max_tokens finishes with 'stop'."""
    host = await start_host(backend=ScriptedBackend(answer_tokens=4))
    manager = make_manager([host.ws_url])
    stream, pieces = await collect(manager.stream(PROMPT, max_tokens=50))
    assert stream.finish_reason == "stop" and "".join(pieces) == scripted_text(PROMPT, 4)
    assert stream.usage.received_tokens == 4


@pytest.mark.parametrize("stop_at", [0, 3, 7])
async def test_stop_sequence_cuts_the_text_and_is_not_returned(start_host, make_manager, stop_at):
    """The text ends right before the stop sequence, also when it spans tokens."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    full = scripted_text(PROMPT, 30)
    words = full.split(" ")
    stop = words[stop_at][2:] + " " + words[stop_at + 1][:2]  # spans two tokens
    expected = full[: full.index(stop)]
    stream, pieces = await collect(manager.stream(PROMPT, max_tokens=30, stop_sequences=[stop]))
    assert "".join(pieces) == expected == stream.text
    assert stream.finish_reason == "stop"


async def test_client_enforces_stops_on_a_host_that_ignores_them(start_host, make_manager):
    """On a legacy (production-like) host the client cuts, cancels and keeps the socket clean."""
    host = await start_host(legacy=True)
    manager = make_manager([host.ws_url])
    full = scripted_text(PROMPT, 40)
    stop = full.split(" ")[5]
    stream, pieces = await collect(manager.stream(PROMPT, max_tokens=40, stop_sequences=[stop]))
    assert "".join(pieces) == full[: full.index(stop)]
    assert stream.finish_reason == "stop"
    assert manager.pool.stats() == {"idle": 1, "in_use": 0}
    # The same socket serves the next request: the cancelled stream was drained.
    again, _ = await collect(manager.stream(PROMPT, max_tokens=3))
    assert again.text == scripted_text(PROMPT, 3)


async def test_legacy_host_terminal_chunk_is_not_yielded(start_host, make_manager):
    """Production hosts' empty terminal chunk and missing usage are absorbed."""
    host = await start_host(legacy=True)
    manager = make_manager([host.ws_url])
    stream, pieces = await collect(manager.stream(PROMPT, max_tokens=6))
    assert all(pieces) and "".join(pieces) == scripted_text(PROMPT, 6)
    assert stream.finish_reason == "length"
    assert stream.usage.received_tokens == 6


async def test_breaking_out_cancels_the_host_stream_and_returns_the_socket(start_host, make_manager):
    """Leaving the block early sends stream_cancel; the socket is reused by the next request."""
    host = await start_host(backend=ScriptedBackend(token_rate=200))
    manager = make_manager([host.ws_url])
    async with manager.stream(PROMPT, max_tokens=1000) as stream:
        async for _ in stream:
            if len(stream.text.split()) >= 3:
                break
    assert stream.finish_reason == "cancelled"
    assert host.active_streams == 0
    assert manager.pool.stats() == {"idle": 1, "in_use": 0}
    follow, _ = await collect(manager.stream(PROMPT, max_tokens=4))
    assert follow.text == scripted_text(PROMPT, 4)


async def test_cancelling_the_consumer_task_cancels_the_host_stream(start_host, make_manager):
    """Task cancellation reaches the host: its stream stops and the pool is left consistent."""
    host = await start_host(backend=ScriptedBackend(token_rate=100))
    manager = make_manager([host.ws_url])
    started = asyncio.Event()

    async def consume():
        async with manager.stream(PROMPT, max_tokens=4000) as stream:
            async for _ in stream:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        if host.active_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert host.active_streams == 0
    assert manager.pool.stats()["in_use"] == 0


async def test_retry_moves_to_another_host_when_one_is_down(start_host, make_manager):
    """A dead host costs one failed attempt; the answer comes from the live host."""
    live = await start_host()
    manager = make_manager(["ws://127.0.0.1:9/v1/ws", live.ws_url])
    manager.host_manager.rng.seed(1)
    stream, _ = await collect(manager.stream(PROMPT, max_tokens=5))
    assert stream.text == scripted_text(PROMPT, 5)
    assert stream.host.ws_url == live.ws_url


async def test_retries_are_bounded_by_max_retries(start_host, make_manager):
    """A host that always rate-limits is tried 1 + max_retries times, each recorded, then the error."""
    host = await start_host(backend=ScriptedBackend(error_code="RATE_LIMIT_EXCEEDED"))
    manager = make_manager([host.ws_url], max_retries=2)
    with pytest.raises(RateLimitExceeded):
        await collect(manager.stream(PROMPT, max_tokens=5))
    records = manager.usage.records
    assert len(records) == 3
    assert [r.attempt for r in records] == [1, 2, 3]
    assert {r.error_code for r in records} == {"RATE_LIMIT_EXCEEDED"}


async def test_non_retryable_error_is_not_retried(start_host, make_manager):
    """An unknown model is MODEL_NOT_AVAILABLE at once, listing what the host serves."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    with pytest.raises(ModelNotAvailable) as info:
        await collect(manager.stream(PROMPT, model="llama-2-7b"))
    assert "scripted-1" in str(info.value)
    assert len(manager.usage.records) == 1


async def test_model_names_resolve_to_the_hosts_id(start_host, make_manager):
    """repo/file and repo:file forms reach the host as its own id."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    for name in ("scripted-1", "some-org/scripted-1", "some-org:scripted-1"):
        stream, _ = await collect(manager.stream(PROMPT, model=name, max_tokens=2))
        assert stream.model == "scripted-1"


async def test_first_token_timeout_fires_on_a_silent_host(start_host, make_manager):
    """A host that accepts and never answers gives FirstTokenTimeout after the retries."""
    host = await start_host(backend=ScriptedBackend(never_answer=True))
    manager = make_manager([host.ws_url], first_token_timeout=0.3, max_retries=1)
    with pytest.raises(FirstTokenTimeout) as info:
        await asyncio.wait_for(collect(manager.stream(PROMPT)), 10)
    assert info.value.code == "INFERENCE_TIMEOUT"
    assert len(manager.usage.records) == 2


async def test_slow_first_token_within_the_timeout_is_fine(start_host, make_manager):
    """A first token that takes a while but less than the timeout is not an error."""
    host = await start_host(backend=ScriptedBackend(first_token_delay=0.3))
    manager = make_manager([host.ws_url], first_token_timeout=2.0)
    stream, _ = await collect(manager.stream(PROMPT, max_tokens=3))
    assert stream.text == scripted_text(PROMPT, 3)
    assert stream.ttft >= 0.3


async def test_idle_timeout_fires_when_a_stream_stalls(start_host, make_manager):
    """A stream slower than idle_timeout between frames fails with IdleTimeout (no retries allowed)."""
    host = await start_host(backend=ScriptedBackend(token_rate=2))
    manager = make_manager([host.ws_url], idle_timeout=0.1, first_token_timeout=5, max_retries=0)
    with pytest.raises(IdleTimeout):
        await collect(manager.stream(PROMPT, max_tokens=10))
    assert len(manager.usage.records) == 1


async def test_request_deadline_ends_a_stream_that_keeps_progressing(start_host, make_manager):
    """deadline bounds the whole request, even while tokens keep coming within idle_timeout; the text
    delivered so far stays with the error, and nothing is retried."""
    host = await start_host(backend=ScriptedBackend(token_rate=40))
    manager = make_manager([host.ws_url], deadline=0.4, idle_timeout=2.0, first_token_timeout=2.0, max_retries=2)
    pieces: list[str] = []
    with pytest.raises(DeadlineExceeded) as info:
        async with manager.stream(PROMPT, max_tokens=400) as stream:
            async for piece in stream:
                pieces.append(piece)
    assert pieces and info.value.partial_text == "".join(pieces) == stream.text
    assert scripted_text(PROMPT, 400).startswith(stream.text)
    assert len(manager.usage.records) == 1 and manager.usage.records[0].error_code == "INFERENCE_TIMEOUT"


async def test_slow_consumer_is_not_mistaken_for_a_stalled_host(start_host, make_manager):
    """Timeouts are measured at the socket reader: a consumer slower than idle_timeout is fine."""
    host = await start_host()
    manager = make_manager([host.ws_url], idle_timeout=0.1, stream_buffer_size=1)
    async with manager.stream(PROMPT, max_tokens=4) as stream:
        pieces = []
        async for piece in stream:
            pieces.append(piece)
            await asyncio.sleep(0.25)
    assert "".join(pieces) == scripted_text(PROMPT, 4)


async def test_host_closing_mid_stream_is_connection_failed(start_host, make_manager):
    """With no retries left, an abrupt close after some tokens raises ConnectionFailed; the text so far stays."""
    host = await start_host(backend=ScriptedBackend(close_after=3))
    manager = make_manager([host.ws_url], max_retries=0)
    received = []
    with pytest.raises(ConnectionFailed):
        async with manager.stream(PROMPT, max_tokens=10) as stream:
            async for piece in stream:
                received.append(piece)
    assert "".join(received) == scripted_text(PROMPT, 3)
    assert stream.finish_reason == "error"
    assert manager.pool.stats() == {"idle": 0, "in_use": 0}


async def test_mid_stream_host_error_is_raised_with_its_code(start_host, make_manager):
    """A host error after some tokens raises HostError; the partial text stays readable."""
    host = await start_host(backend=ScriptedBackend(fail_after=2))
    manager = make_manager([host.ws_url], max_retries=0)
    with pytest.raises(HostError):
        await collect(manager.stream(PROMPT, max_tokens=10))
    assert manager.usage.records[-1].error_code == "HOST_ERROR"


async def test_failover_continues_the_answer_on_another_host_without_gap_or_repeat(start_host, make_manager):
    """When the serving host drops mid-stream, the next host continues from the partial answer exactly."""
    failing = await start_host(backend=ScriptedBackend(close_after=4))
    healthy = await start_host()
    manager = make_manager([failing.ws_url, healthy.ws_url])
    # Make the failing host the first choice.
    for info in await manager.host_manager.discover_all_active_hosts():
        info.latency_ms = 1.0 if info.ws_url == failing.ws_url else 500.0
    stream, pieces = await collect(manager.stream(PROMPT, max_tokens=20, seed=5))
    assert "".join(pieces) == scripted_text(PROMPT, 20, seed=5)
    assert stream.finish_reason == "length"
    first, second = manager.usage.records
    assert (first.host, first.error_code, first.received_tokens) == (failing.http_url, "CONNECTION_FAILED", 4)
    assert (second.host, second.error_code, second.received_tokens) == (healthy.http_url, None, 16)
    assert stream.usage.received_tokens == 20 and stream.host.ws_url == healthy.ws_url


async def test_failover_on_the_same_host_when_it_is_the_only_one(start_host, make_manager):
    """A lone host that keeps dropping is resumed from the partial answer until the budget is met."""
    host = await start_host(backend=ScriptedBackend(close_after=3))
    manager = make_manager([host.ws_url], max_retries=5)
    _stream, pieces = await collect(manager.stream(PROMPT, max_tokens=10))
    assert "".join(pieces) == scripted_text(PROMPT, 10)
    assert [r.received_tokens for r in manager.usage.records] == [3, 3, 3, 1]


async def test_failover_after_an_idle_stall(start_host, make_manager):
    """A host that stalls past idle_timeout mid-stream is replaced; the text stays continuous."""
    stalling = await start_host(backend=ScriptedBackend(token_rate=40, first_token_delay=0))
    fast = await start_host()
    manager = make_manager([stalling.ws_url, fast.ws_url], idle_timeout=0.01)
    for info in await manager.host_manager.discover_all_active_hosts():
        info.latency_ms = 1.0 if info.ws_url == stalling.ws_url else 500.0
    stream, _ = await collect(manager.stream(PROMPT, max_tokens=12))
    assert stream.text == scripted_text(PROMPT, 12)
    assert manager.usage.records[0].error_code == "INFERENCE_TIMEOUT"


async def test_host_busy_is_retried(start_host, make_manager):
    """HOST_BUSY at the host's stream limit is retryable; the request succeeds once a slot frees."""
    host = await start_host(max_concurrent_streams=1, backend=ScriptedBackend(token_rate=100))
    manager = make_manager([host.ws_url], backoff_initial=0.05, backoff_max=0.2, max_retries=8)
    first = asyncio.create_task(collect(manager.stream(PROMPT, max_tokens=20)))
    await wait_until(lambda: host.active_streams == 1, what="the first stream holding the host's one slot")
    second, _ = await collect(manager.stream("another prompt", max_tokens=3))
    assert second.text == scripted_text("another prompt", 3)
    stream, _ = await first
    assert stream.text == scripted_text(PROMPT, 20)
    assert "HOST_BUSY" in [r.error_code for r in manager.usage.records]  # the second was refused, then retried


async def test_no_hosts_and_unreachable_hosts_are_coded(make_manager):
    """No hosts, or only dead ones, give NO_HOSTS_AVAILABLE / CONNECTION_FAILED."""
    with pytest.raises(NoHostsAvailable):
        await collect(make_manager([]).stream(PROMPT))
    manager = make_manager(["ws://127.0.0.1:9/v1/ws"], max_retries=1)
    with pytest.raises((ConnectionFailed, NoHostsAvailable)):
        await collect(manager.stream(PROMPT))


# --------------------------------------------------------------------------- pinned hosts that do not answer


async def test_a_silent_pinned_host_fails_within_connection_timeout(make_manager):
    """A pinned host that accepts TCP and never answers: one attempt, over within connection_timeout
    (the description read overlaps it), and the error says how far the connection got."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:  # never accepts: the kernel does
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}/v1/ws"
        manager = make_manager([], connection_timeout=1.0, max_retries=3)
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            async for _ in manager.direct_inference(PROMPT, url, max_tokens=3):
                pass
        elapsed = time.monotonic() - started
    assert len(manager.usage.records) == 1  # no retry on the same silent host
    assert "accepted the tcp connection but did not answer the websocket handshake within 1 s" in info.value.message
    assert "pinned" in info.value.hint
    assert elapsed < 4.0  # a safety net: one connection_timeout of 1 s (it was 5 s of probe + 4 attempts)


async def test_a_refused_pinned_host_gets_one_quick_retry(make_manager):
    """A pinned host that refuses connections (maybe restarting) is tried twice, not 1 + max_retries times."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}/v1/ws"
        manager = make_manager([], max_retries=3)
        with pytest.raises(ConnectionFailed) as info:
            async with manager.stream(PROMPT, host=url, max_tokens=3) as stream:
                await stream.read()
    assert stream.attempts == 2 and [r.error_code for r in manager.usage.records] == ["CONNECTION_FAILED"] * 2
    assert "pinned" in info.value.hint


async def test_a_websocket_without_greeting_is_named_in_the_error(make_manager):
    """A server that completes the websocket upgrade but never sends 'connected' is named as such."""
    from websockets.asyncio.server import serve

    async def mute(connection):
        await connection.wait_closed()

    async with serve(mute, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        manager = make_manager([], connection_timeout=0.5)
        with pytest.raises(ConnectionFailed) as info:
            async with manager.stream(PROMPT, host=f"ws://127.0.0.1:{port}/v1/ws", max_tokens=3) as stream:
                await stream.read()
    assert "accepted the websocket but sent no 'connected' greeting within 0.5 s" in info.value.message
    assert stream.attempts == 1


async def test_concurrent_streams_use_separate_sockets_without_interleaving(start_host, make_manager):
    """Four concurrent requests to one host get four sockets and each its own text."""
    host = await start_host(backend=ScriptedBackend(token_rate=500))
    manager = make_manager([host.ws_url])
    prompts = [f"prompt number {i}" for i in range(4)]
    results = await asyncio.gather(*(collect(manager.stream(p, max_tokens=15)) for p in prompts))
    for prompt, (stream, _) in zip(prompts, results, strict=True):
        assert stream.text == scripted_text(prompt, 15)
    assert manager.pool.stats() == {"idle": 4, "in_use": 0}


async def test_chat_messages_and_system_prompt_reach_the_host(start_host, make_manager):
    """Stateless chat input is sent as messages; the answer is keyed on the last user turn."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    stream, _ = await collect(manager.stream(
        "and the sea?", max_tokens=5, system_prompt="be brief",
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    assert stream.text == scripted_text("and the sea?", 5)
    assert stream.usage.prompt_tokens == len(["be", "brief", "hi", "hello", "and", "the", "sea?"])


async def test_seeded_requests_are_served_from_the_cache_when_enabled(start_host, make_manager):
    """With cache_responses, a repeated deterministic request is a recorded cache hit."""
    host = await start_host()
    manager = make_manager([host.ws_url], cache_responses=True)
    first, _ = await collect(manager.stream(PROMPT, max_tokens=6, seed=3))
    second, pieces = await collect(manager.stream(PROMPT, max_tokens=6, seed=3))
    other, _ = await collect(manager.stream(PROMPT, max_tokens=7, seed=3))
    assert second.text == first.text and pieces == [first.text]
    assert [r.cached for r in manager.usage.records] == [False, True, False]
    assert manager.usage.records[1].received_tokens == 6
    assert other.text == scripted_text(PROMPT, 7, seed=3)


async def test_sampled_requests_are_never_cached(start_host, make_manager):
    """Without temperature 0 or a seed nothing is cached."""
    host = await start_host()
    manager = make_manager([host.ws_url], cache_responses=True)
    for _ in range(2):
        await collect(manager.stream(PROMPT, max_tokens=3, temperature=0.8))
    assert [r.cached for r in manager.usage.records] == [False, False]


async def test_client_rate_limit_spaces_requests(start_host, make_manager):
    """With a client-side rate of 20/s and burst 1, five requests need at least 0.2 s."""
    host = await start_host()
    manager = make_manager([host.ws_url], rate_limit=20.0, rate_burst=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):
        await collect(manager.stream(PROMPT, max_tokens=1))
    assert loop.time() - started >= 0.19


async def test_content_filter_rewrites_or_refuses_the_prompt(start_host, make_manager):
    """The content filter runs before sending; raising InvalidPrompt refuses the request."""
    host = await start_host()

    def redact(text):
        if "forbidden" in text:
            raise InvalidPrompt("prompt refused by the content filter", field="prompt")
        return text.replace("secret", "[redacted]")

    manager = make_manager([host.ws_url], content_filter=redact)
    stream, _ = await collect(manager.stream("a secret river", max_tokens=3))
    assert stream.text == scripted_text("a [redacted] river", 3)
    with pytest.raises(InvalidPrompt):
        manager.stream("forbidden words")


async def test_base_sepolia_refuses_inference_before_any_io(make_manager):
    """Production hosts get no unpaid inference (spec §10)."""
    manager = make_manager(["ws://127.0.0.1:9/v1/ws"], network="base-sepolia")
    with pytest.raises(PaymentRequired) as info:
        manager.stream(PROMPT)
    assert info.value.code == "PAYMENT_REQUIRED"


async def test_chunks_coalesce_pieces_at_an_interval(start_host, make_manager):
    """chunks(interval) yields fewer, larger pieces with the same text."""
    host = await start_host(backend=ScriptedBackend(token_rate=400))
    manager = make_manager([host.ws_url])
    async with manager.stream(PROMPT, max_tokens=40) as stream:
        chunks = [c async for c in stream.chunks(0.05)]
    assert "".join(chunks) == scripted_text(PROMPT, 40)
    assert 1 <= len(chunks) < 40


async def test_connect_to_host_returns_a_connected_client(start_host, make_manager):
    """connect_to_host opens a socket that received the host's greeting."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    client = await manager.connect_to_host(host.http_url)
    try:
        assert client.is_open and client.connected_latency > 0
    finally:
        await client.close()


async def test_select_best_host_prefers_the_host_serving_the_model(start_host, make_manager):
    """select_best_host filters on the model and probes hosts."""
    a = await start_host(backend=ScriptedBackend(model_id="alpha"))
    b = await start_host(backend=ScriptedBackend(model_id="beta"))
    manager = make_manager([a.ws_url, b.ws_url])
    from fabstir_jupyter import HostRequirements

    chosen = await manager.select_best_host(HostRequirements(model="beta"))
    assert chosen.ws_url == b.ws_url and chosen.latency_ms is not None
    with pytest.raises(ModelNotAvailable) as info:
        await manager.select_best_host(HostRequirements(model="gamma"))
    assert "alpha" in str(info.value) and "beta" in str(info.value)


@pytest.fixture
def threaded_host(start_threaded_host):
    """A scripted host on its own loop thread, so a blocking call on the test's loop cannot starve it."""
    return start_threaded_host()


async def test_blocking_infer_works_inside_a_running_loop(threaded_host, make_manager):
    """infer() called from a coroutine (as in a notebook cell) runs on the manager's own loop thread."""
    manager = make_manager([threaded_host.ws_url])
    result = manager.infer(PROMPT, max_tokens=4)  # blocks this loop, but must not deadlock
    assert str(result) == scripted_text(PROMPT, 4)
    assert result.finish_reason == "length" and result.usage.received_tokens == 4
    # The manager now belongs to its loop thread; streams are still consumable from this loop.
    stream, _ = await collect(manager.stream(PROMPT, max_tokens=2))
    assert stream.text == scripted_text(PROMPT, 2)
    await manager.aclose()
    assert not any(t.name == "fabstir-loop" and t.is_alive() for t in threading.enumerate())


def test_blocking_infer_works_from_a_plain_script(threaded_host):
    """infer() from a thread with no loop starts a private loop thread, and close() stops it."""
    from fabstir_jupyter import InferenceConfig, InferenceManager

    with InferenceManager([threaded_host.ws_url], InferenceConfig(usage_db=":memory:")) as manager:
        assert manager.infer(PROMPT, max_tokens=3).text == scripted_text(PROMPT, 3)
        with pytest.raises(InvalidPrompt):
            manager.infer("")
    assert not any(t.name == "fabstir-loop" and t.is_alive() for t in threading.enumerate())


async def test_wire_trace_logs_frames_without_prompt_text(start_host, make_manager, caplog):
    """trace=True logs frame shapes at DEBUG; the prompt text never appears."""
    host = await start_host()
    manager = make_manager([host.ws_url], trace=True)
    with caplog.at_level(logging.DEBUG, logger="fabstir_jupyter.wire"):
        await collect(manager.stream("my private question", max_tokens=2))
    wire = [r.getMessage() for r in caplog.records if r.name == "fabstir_jupyter.wire"]
    assert any('"type":"inference"' in line for line in wire)
    assert not any("private question" in line for line in wire)


async def test_unreachable_hosts_are_rechecked_once_for_concurrent_requests_and_again_for_a_later_one(make_manager):
    """Concurrent requests that find no reachable host share one round of pings; a request made after
    that round looks again (a host may have come back), so no time window hides a revived host."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}/v1/ws"
        manager = make_manager([url], max_retries=0)
        prober = manager.host_manager.prober
        pings: list[str] = []
        real_ping = prober.ping

        async def counting_ping(host):
            pings.append(host.ws_url)
            return await real_ping(host)

        prober.ping = counting_ping
        await manager.host_manager.discover_all_active_hosts()  # the discovery probe marks it unreachable
        assert pings == [url]

        async def one() -> None:
            with pytest.raises(NoHostsAvailable):
                async with manager.stream(PROMPT, max_tokens=3) as stream:
                    await stream.read()

        await asyncio.gather(*(one() for _ in range(5)))
        assert len(pings) == 2  # one shared recheck round for the five
        await one()
        assert len(pings) == 3  # a later request looks again


async def test_a_break_on_the_only_host_is_named_in_the_final_error(make_manager):
    """The only host drops the stream after 3 tokens and is then gone: the final error says the
    stream broke there after 3 tokens and that no host could continue it (it used to be a bare
    NO_HOSTS_AVAILABLE that did not say the answer had broken off); the partial text stays."""
    from websockets.asyncio.server import serve

    async def three_tokens_then_gone(ws):
        await ws.send(json.dumps({"type": "connected"}))
        frame = json.loads(await ws.recv())  # a discovery ping closes here; the stream sends its request
        for word in ("one ", "two ", "three "):
            await ws.send(json.dumps({"type": "stream_chunk", "content": word, "tokens": 1, "id": frame.get("id")}))
        server.close(close_connections=False)  # nobody gets a connection after this one
        ws.transport.abort()

    async with serve(three_tokens_then_gone, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        manager = make_manager([url], max_retries=2)
        with pytest.raises(FabstirError) as info:
            async with manager.stream(PROMPT, max_tokens=10) as stream:
                await stream.read()
    assert stream.text == "one two three " and info.value.partial_text == stream.text
    message = info.value.message
    assert message.startswith(f"the stream broke on {url} after 3 tokens (CONNECTION_FAILED: ")
    assert "and no host could continue it: " in message
    assert [r.received_tokens for r in manager.usage.records] == [3, 0, 0]
