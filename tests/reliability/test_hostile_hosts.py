"""Client against hostile hosts (issue 5): a real loopback server plays arbitrary frame sequences.

The fake host (:class:`HostileHost`) answers the upgrade, greets with ``connected``, then answers
each inference request with a scripted list of frames. Whatever it sends, the client must end with
text pieces plus a result, or a :class:`FabstirError`, within its own timeouts: never a hang, never
another exception type, never unbounded memory, never a dirty socket back in the pool.

Script steps:

* ``("json", obj)``: send ``obj`` as JSON text; an ``"id"`` equal to :data:`ID` becomes the request's id;
* ``("text", str)`` / ``("bytes", bytes)``: send as is (a text or a binary frame);
* ``("sleep", seconds)``;
* ``("forever", obj)``: send ``obj`` again and again until the socket breaks (or, with
  ``honour_cancel``, until the client's ``stream_cancel``, answered with ``stream_end``);
* ``("abort",)``: drop the TCP connection; ``("close",)``: close the WebSocket cleanly;
* ``("hang",)``: never answer again on this socket;
* ``("await", fn)``: await ``fn()`` (the test's own signal, e.g. "the consumer took a piece").

``/v1/version`` answers 404 (a production host: no features) unless ``features`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from http import HTTPStatus
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.asyncio.server import serve

from fabstir_jupyter import protocol
from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.errors import (
    FabstirError,
    FirstTokenTimeout,
    HostError,
    IdleTimeout,
    InferenceTimeout,
    ProtocolError,
)
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.usage import ListSink

ID = object()  # placeholder for the id of the request being answered


def _subst(obj: Any, request_id: Any) -> Any:
    if isinstance(obj, dict) and obj.get("id") is ID:
        obj = dict(obj)
        if request_id is None:
            del obj["id"]
        else:
            obj["id"] = request_id
    return obj


class HostileHost:
    def __init__(self, scripts: list[list[tuple]], *, features: list[str] | None = None,
                 honour_cancel: bool = False) -> None:
        self.scripts = scripts
        self.features = features
        self.honour_cancel = honour_cancel
        self.requests: list[dict[str, Any]] = []  # every inference/prompt frame received
        self.cancels = 0
        self.connections = 0
        self.open_connections = 0
        self._server: Any = None
        self.url = ""

    async def start(self) -> HostileHost:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._http,
                                   max_size=None, ping_interval=None, compression=None)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self._server.wait_closed()

    async def __aenter__(self) -> HostileHost:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _http(self, connection: Any, request: Any) -> Any:
        if request.path == "/v1/version" and self.features is not None:
            return connection.respond(HTTPStatus.OK, json.dumps({"version": "hostile", "features": self.features}))
        if request.path != "/v1/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def _handle(self, ws: Any) -> None:
        self.connections += 1
        self.open_connections += 1
        player: asyncio.Task[None] | None = None
        cancelled = asyncio.Event()
        try:
            await ws.send(json.dumps({"type": "connected", "message": "hostile"}))
            async for message in ws:
                try:
                    frame = json.loads(message)
                except ValueError:
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind in ("inference", "prompt"):
                    script = self.scripts[min(len(self.requests), len(self.scripts) - 1)]
                    self.requests.append(frame)
                    cancelled = asyncio.Event()
                    if player is not None and not player.done():
                        player.cancel()
                    player = asyncio.create_task(self._play(ws, script, frame.get("id"), cancelled))
                elif kind == "stream_cancel":
                    self.cancels += 1
                    cancelled.set()
        except Exception:
            pass
        finally:
            if player is not None:
                player.cancel()
                with contextlib.suppress(BaseException):
                    await player
            self.open_connections -= 1

    async def _play(self, ws: Any, script: list[tuple], request_id: Any, cancelled: asyncio.Event) -> None:
        try:
            for step in script:
                op = step[0]
                if op == "json":
                    await ws.send(json.dumps(_subst(step[1], request_id)))
                elif op == "text":
                    await ws.send(step[1])
                elif op == "bytes":
                    await ws.send(bytes(step[1]))
                elif op == "sleep":
                    await asyncio.sleep(step[1])
                elif op == "forever":
                    text = json.dumps(_subst(step[1], request_id))
                    while not (self.honour_cancel and cancelled.is_set()):
                        await ws.send(text)
                        await asyncio.sleep(0)
                    await ws.send(json.dumps({"type": "stream_end", "reason": "cancelled", "id": request_id}))
                elif op == "abort":
                    ws.transport.abort()
                    return
                elif op == "close":
                    await ws.close()
                    return
                elif op == "hang":
                    await asyncio.Event().wait()
                elif op == "await":
                    await step[1]()
        except Exception:
            pass


# --------------------------------------------------------------------------- client side helpers

FRAME_LIMIT = 64 * 1024


def client_config(**changes: Any) -> InferenceConfig:
    values: dict[str, Any] = dict(
        connection_timeout=2.0, first_token_timeout=0.3, idle_timeout=0.3, max_retries=0,
        backoff_initial=0.0, backoff_max=0.01, usage_db=":memory:", max_frame_bytes=FRAME_LIMIT,
    )
    values.update(changes)
    return InferenceConfig(**values)


def chunk(content: Any, rid: Any = ID, **extra: Any) -> tuple:
    return ("json", {"type": "stream_chunk", "content": content, "id": rid, **extra})


def end(rid: Any = ID, **extra: Any) -> tuple:
    return ("json", {"type": "stream_end", "reason": "complete", "id": rid, **extra})


async def run_stream(manager: InferenceManager, url: str, **options: Any) -> tuple[list[str], Any]:
    pieces: list[str] = []
    async with manager.stream("hello", host=url, **options) as stream:
        async for piece in stream:
            pieces.append(piece)
    return pieces, stream


async def no_sockets_in_use(manager: InferenceManager) -> None:
    await asyncio.sleep(0)
    assert manager.pool.stats()["in_use"] == 0


@pytest.fixture
async def hostile():
    hosts: list[HostileHost] = []
    managers: list[InferenceManager] = []

    async def start(scripts, *, features=None, honour_cancel=False, **config):
        host = await HostileHost(scripts, features=features, honour_cancel=honour_cancel).start()
        manager = InferenceManager([host.url], client_config(**config), usage=ListSink())
        hosts.append(host)
        managers.append(manager)
        return host, manager

    yield start
    for manager in managers:
        await manager.aclose()
    for host in hosts:
        await host.close()


# --------------------------------------------------------------------------- targeted hostile hosts


async def test_host_streaming_forever_is_cut_at_the_clients_max_tokens(hostile):
    host, manager = await hostile([[("forever", {"type": "stream_chunk", "content": "tok", "id": ID})]])
    pieces, stream = await asyncio.wait_for(run_stream(manager, host.url, max_tokens=20), 10)
    assert stream.finish_reason == "length"
    assert "".join(pieces) == stream.text == "tok" * 20
    assert stream.usage.received_tokens == 20
    await no_sockets_in_use(manager)
    # The host never answered the cancel with stream_end: the socket is closed, never pooled dirty.
    assert manager.pool.stats()["idle"] == 0
    assert host.cancels == 1


async def test_forever_host_that_honours_cancel_leaves_a_clean_reusable_socket(hostile):
    host, manager = await hostile(
        [[("forever", {"type": "stream_chunk", "content": "tok", "id": ID})], [chunk("fresh"), end()]],
        honour_cancel=True,
    )
    _, stream = await asyncio.wait_for(run_stream(manager, host.url, max_tokens=5), 10)
    assert stream.finish_reason == "length" and stream.text == "tok" * 5
    _, stream = await asyncio.wait_for(run_stream(manager, host.url, max_tokens=5), 10)
    assert stream.text == "fresh" and stream.finish_reason == "stop"
    await no_sockets_in_use(manager)


@pytest.mark.parametrize("frame", [
    chunk("a" * (2 * FRAME_LIMIT)),
    ("bytes", b"\0" * (2 * FRAME_LIMIT)),
    ("text", "x" * (FRAME_LIMIT + 1)),
], ids=["chunk", "binary", "text"])
async def test_gigantic_frames_are_a_protocol_error(hostile, frame):
    host, manager = await hostile([[chunk("ok"), frame, end()]])
    with pytest.raises(ProtocolError) as info:
        await asyncio.wait_for(run_stream(manager, host.url, max_tokens=50), 10)
    assert info.value.code == "PROTOCOL_ERROR"
    await no_sockets_in_use(manager)
    assert manager.pool.stats()["idle"] == 0


@pytest.mark.parametrize("frame", [
    chunk("x", "someone-else"),
    end("someone-else"),
    ("json", {"type": "error", "code": "HOST_BUSY", "message": "busy", "id": "someone-else"}),
], ids=["chunk", "end", "error"])
async def test_an_answer_for_another_request_id_is_a_protocol_error(hostile, frame):
    host, manager = await hostile([[frame, chunk("never"), end()]])
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(run_stream(manager, host.url), 10)
    await no_sockets_in_use(manager)
    assert manager.pool.stats()["idle"] == 0


@pytest.mark.parametrize("leak_id", [ID, None], ids=["with-id", "without-id"])
async def test_tokens_after_stream_end_are_dropped_and_never_reach_the_next_request(hostile, leak_id):
    leaked = asyncio.Event()

    async def mark_leaked() -> None:
        leaked.set()

    leak = [chunk("LEAK", leak_id), chunk("LEAK", leak_id), end(leak_id), ("await", mark_leaked)]
    host, manager = await hostile([[chunk("a"), end(), *leak], [chunk("b"), end()]])
    pieces, first = await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert pieces == ["a"] and first.finish_reason == "stop"
    await asyncio.wait_for(leaked.wait(), 10)  # the trailing frames are on the wire now
    pieces, second = await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert pieces == ["b"] and second.text == "b"
    assert host.connections == 2  # the dirty socket was not reused
    await no_sockets_in_use(manager)


async def test_late_frames_with_the_old_id_fail_the_reused_socket_and_a_retry_recovers(hostile):
    # Frames that arrive after the socket went back to the pool cannot be told from the next
    # answer unless they carry the old id: then they are a protocol error, retried on a new socket.
    host, manager = await hostile([[chunk("a"), end(), ("sleep", 0.1), chunk("LEAK"), end()], [chunk("b"), end()]],
                                  max_retries=1)
    pieces, _first = await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert pieces == ["a"]
    pieces, second = await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert "LEAK" not in second.text and second.text == "b"
    await no_sockets_in_use(manager)


async def test_error_chunks_are_host_errors_without_coded_errors(hostile):
    host, manager = await hostile([[chunk("Error: model exploded"), end()]])
    with pytest.raises(HostError) as info:
        await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert "model exploded" in info.value.message
    await no_sockets_in_use(manager)


async def test_error_chunks_are_text_on_a_host_with_coded_errors(hostile):
    host, manager = await hostile([[chunk("Error: is a word"), end()]], features=list(protocol.FEATURES))
    _pieces, stream = await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert stream.text == "Error: is a word"


@pytest.mark.parametrize("noise", [
    {"type": "ping"}, {"type": "pong"}, {"type": "connected"}, {"type": "whatever", "data": 1},
    {"type": "stream_chunk", "content": "", "tokens": 0, "id": ID},
], ids=["ping", "pong", "connected", "unknown", "empty-chunk"])
async def test_a_flood_of_noise_does_not_extend_the_first_token_timeout(hostile, noise):
    # Decision: only progress (text, stream_end, error) counts as an answer; pings, unknown frames
    # and empty chunks do not restart first_token_timeout, so a chatty host cannot stall forever.
    # A timer restarted by noise would never fire: wait_for's 10 s would end the test instead.
    host, manager = await hostile([[("forever", noise)]])
    with pytest.raises(FirstTokenTimeout) as info:
        await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert "first_token_timeout=0.3 s" in str(info.value)
    await no_sockets_in_use(manager)


async def test_a_flood_of_noise_mid_stream_does_not_extend_the_idle_timeout(hostile):
    host, manager = await hostile([[chunk("a"), ("forever", {"type": "ping"})]])
    with pytest.raises(IdleTimeout) as info:
        await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert "idle_timeout=0.3 s" in str(info.value)


async def test_noise_before_a_timely_answer_is_ignored(hostile):
    host, manager = await hostile([[*[("json", {"type": "ping"})] * 50, ("json", {"type": "x"}), chunk("hi"), end()]])
    pieces, _stream = await asyncio.wait_for(run_stream(manager, host.url), 10)
    assert pieces == ["hi"]


@pytest.mark.parametrize(("tokens", "max_tokens", "reason"), [(3, 10, "stop"), (3, 3, "length")])
async def test_stream_end_without_usage_infers_the_finish_reason(hostile, tokens, max_tokens, reason):
    host, manager = await hostile([[*[chunk("t")] * tokens, ("json", {"type": "stream_end"})]])
    _pieces, stream = await asyncio.wait_for(run_stream(manager, host.url, max_tokens=max_tokens), 10)
    assert stream.text == "t" * tokens and stream.finish_reason == reason


async def test_chunks_already_buffered_come_as_one_piece(hostile):
    """Chunks that wait in the socket together are handed over as one piece: same text, same counts."""
    words = [f"w{i} " for i in range(10)]
    # The host sends every frame without yielding to the loop: they all reach the client's buffer first.
    host, manager = await hostile([[*(chunk(w) for w in words), end(usage={"prompt_tokens": 1,
                                                                          "completion_tokens": 10,
                                                                          "total_tokens": 11})]])
    pieces, stream = await asyncio.wait_for(run_stream(manager, host.url, max_tokens=20), 10)
    assert pieces == ["".join(words)]
    assert stream.text == "".join(words) and stream.finish_reason == "stop"
    assert (stream.usage.received_tokens, stream.usage.completion_tokens) == (10, 10)


async def test_text_buffered_before_a_bad_frame_is_delivered_before_the_error(hostile):
    """Chunks read in the same batch as a frame that fails reach the consumer first, then the error."""
    host, manager = await hostile([[chunk("a"), chunk("b"), ("text", "not json"), chunk("c"), end()]])
    pieces: list[str] = []
    with pytest.raises(ProtocolError) as info:
        async with manager.stream("hello", host=host.url, max_tokens=20) as stream:
            async for piece in stream:
                pieces.append(piece)
    assert "".join(pieces) == stream.text == info.value.partial_text == "ab"
    assert stream.records[-1].received_tokens == 2
    await no_sockets_in_use(manager)


async def test_a_consumer_that_keeps_up_gets_one_piece_per_chunk(hostile):
    """When each chunk arrives alone (the host waits for the consumer), each is its own piece."""
    words = [f"w{i} " for i in range(6)]
    taken = asyncio.Semaphore(0)
    script: list[tuple] = []
    for word in words:
        script += [chunk(word), ("await", taken.acquire)]
    host, manager = await hostile([[*script, end()]])
    pieces: list[str] = []
    async with manager.stream("hello", host=host.url, max_tokens=20) as stream:
        async for piece in stream:
            pieces.append(piece)
            taken.release()
    assert pieces == words and stream.usage.received_tokens == 6


async def test_host_that_never_answers_is_a_first_token_timeout(hostile):
    host, manager = await hostile([[("hang",)]])
    with pytest.raises(InferenceTimeout):
        await asyncio.wait_for(run_stream(manager, host.url), 10)
    await no_sockets_in_use(manager)


# --------------------------------------------------------------------------- property-based fuzz

_ids = st.one_of(st.just(ID), st.none(), st.text(max_size=8), st.integers(-5, 5), st.booleans(), st.just([]))
_counts = st.one_of(st.none(), st.integers(-3, 10), st.integers(2**62, 2**80), st.floats(allow_nan=True),
                    st.text(max_size=3), st.booleans())
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_codes = st.sampled_from([
    "HOST_BUSY", "RATE_LIMIT_EXCEEDED", "CONTEXT_OVERFLOW", "INVALID_PROMPT", "PROTOCOL_ERROR", "CANCELLED",
    "DECRYPTION_FAILED", "NOT_A_CODE", "", "HOST_ERROR", "MODEL_NOT_AVAILABLE",
])
_error_frames = st.one_of(
    st.builds(lambda c, m, i: {"type": "error", "code": c, "message": m, "id": i}, _codes, _json, _ids),
    st.builds(lambda m, i: {"type": "error", "error": m, "id": i}, _json, _ids),
    st.builds(lambda c, m, i: {"type": "error", "error": {"code": c, "message": m}, "id": i}, _json, _json, _ids),
)
_chunks = st.builds(
    lambda content, tokens, rid, finish: {"type": "stream_chunk", "content": content, "tokens": tokens, "id": rid,
                                          "finish_reason": finish},
    st.one_of(st.text(max_size=12), st.just(""), st.just("Error: boom"), _json), _counts, _ids,
    st.one_of(st.none(), st.sampled_from(["stop", "length", "weird"]), _json),
)
_ends = st.builds(
    lambda reason, used, usage, finish, rid: {"type": "stream_end", "reason": reason, "tokens_used": used,
                                              "usage": usage, "finish_reason": finish, "id": rid},
    st.one_of(st.sampled_from(["complete", "cancelled", "error", "length"]), _json), _counts,
    st.one_of(st.none(), st.fixed_dictionaries({"prompt_tokens": _counts, "completion_tokens": _counts,
                                                "total_tokens": _counts}), _json),
    st.one_of(st.none(), st.sampled_from(["stop", "length"]), _json), _ids,
)
_steps = st.one_of(
    st.tuples(st.just("json"), st.one_of(_chunks, _chunks, _chunks, _ends, _error_frames)),
    st.tuples(st.just("json"), st.one_of(
        _json, st.builds(lambda t, d: {"type": t, "data": d}, st.one_of(_json, st.sampled_from(
            ["ping", "pong", "connected", "session_init_ack", "inference"])), _json))),
    st.tuples(st.just("text"), st.one_of(st.text(max_size=30), st.just("[" * 200), st.just('{"type":'),
                                         st.just("x" * (FRAME_LIMIT + 10)))),
    st.tuples(st.just("bytes"), st.binary(max_size=30)),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.05, 0.4])),
)
_scripts = st.tuples(
    st.lists(_steps, max_size=12),
    st.sampled_from([[("abort",)], [("close",)], [("hang",)], []]),
)


async def _fuzz_once(script: list[tuple], max_retries: int, features: list[str] | None, max_tokens: int) -> None:
    host = await HostileHost([script], features=features).start()
    # The default usage sink: the real SQLite ledger must take whatever counts a host reports.
    manager = InferenceManager([host.url], client_config(max_retries=max_retries))
    pieces: list[str] = []
    try:
        stream = manager.stream("hello", host=host.url, max_tokens=max_tokens)

        async def consume() -> None:
            async with stream:
                async for piece in stream:
                    assert isinstance(piece, str) and piece
                    pieces.append(piece)

        try:
            # Each attempt is bounded by the 0.3 s timeouts plus the script's sleeps (< 5 s):
            # the safety net must never fire.
            await asyncio.wait_for(consume(), 20)
        except FabstirError as exc:
            assert isinstance(exc.code, str) and exc.code
            assert stream.finish_reason in ("error", "cancelled")
        else:
            result = stream.result()
            assert result.text == "".join(pieces)
            assert result.finish_reason in protocol.FINISH_REASONS
            assert stream.usage is not None and stream.usage.received_tokens <= max_tokens
        # The client's own bound, whatever the host sent (chunk contents here hold at most 20 characters).
        assert len(stream.text) <= 20 * max_tokens, (stream.text, script, stream.records)
        assert manager.pool.stats()["in_use"] == 0
    finally:
        await manager.aclose()
        await host.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    script=_scripts,
    max_retries=st.integers(0, 1),
    features=st.one_of(st.none(), st.just(list(protocol.FEATURES))),
    max_tokens=st.integers(1, 8),
)
def test_fuzz_any_frame_sequence_ends_in_a_result_or_a_coded_error(script, max_retries, features, max_tokens):
    steps, ending = script
    asyncio.run(_fuzz_once(steps + ending, max_retries, features, max_tokens))


# --------------------------------------------------------------------------- fast path = general path

_steps_without_sleeps = st.one_of(
    st.tuples(st.just("json"), st.one_of(_chunks, _chunks, _chunks, _ends, _error_frames)),
    st.tuples(st.just("json"), st.builds(lambda c, t: {"type": "stream_chunk", "content": c, "tokens": t, "id": ID},
                                         st.one_of(st.text(min_size=1, max_size=6),
                                                   st.sampled_from(["Error: boom", "a.b", "x"])),
                                         st.integers(0, 2))),
    st.tuples(st.just("json"), st.sampled_from([{"type": "pong"}, {"type": "nope"}, {"type": "stream_chunk"}])),
    st.tuples(st.just("text"), st.sampled_from(["not json", "[" * 200, '{"type":'])),
)


async def _outcome(script: list[tuple], features: list[str] | None, max_tokens: int, stops: list[str], *,
                   fast: bool) -> tuple:
    """Run one request against ``script``; return what the caller sees (text, finish, error, usage)."""
    host = await HostileHost([script], features=features).start()
    manager = InferenceManager([host.url], client_config(), usage=ListSink())
    pieces: list[str] = []
    error = None
    try:
        with contextlib.ExitStack() as patches:
            if not fast:  # every frame through parse_host_frame + ResponseReader.receive
                patches.enter_context(mock.patch.object(protocol.ResponseReader, "receive_text",
                                                        lambda self, data, out: False))
            stream = manager.stream("hello", host=host.url, max_tokens=max_tokens, stop_sequences=stops)
            try:
                async with stream:
                    async for piece in stream:
                        pieces.append(piece)
            except FabstirError as exc:
                error = (type(exc), exc.code)
        await no_sockets_in_use(manager)
        records = [(r.received_tokens, r.completion_tokens, r.finish_reason, r.error_code)
                   for r in manager.usage.records]
        return "".join(pieces), stream.text, stream.finish_reason, error, records
    finally:
        await manager.aclose()
        await host.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    steps=st.lists(_steps_without_sleeps, max_size=10),
    ending=st.sampled_from([[end()], [("close",)], [("abort",)], [("hang",)]]),
    features=st.one_of(st.none(), st.just(list(protocol.FEATURES))),
    max_tokens=st.integers(1, 8),
    stops=st.sampled_from([[], ["."], ["b", "xa"]]),
)
def test_fuzz_the_fast_path_and_the_general_path_give_the_same_result(steps, ending, features, max_tokens, stops):
    """The same frames read through the reader's fast path and through parse + receive end the same:
    text, finish reason, error, and usage records (pieces may be batched differently, not their text)."""
    script = steps + ending
    fast = asyncio.run(_outcome(script, features, max_tokens, stops, fast=True))
    general = asyncio.run(_outcome(script, features, max_tokens, stops, fast=False))
    assert fast == general, script
