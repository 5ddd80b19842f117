"""The reference host over real sockets: messages, HTTP, cancel, busy, limits, malformed frames."""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar

import pytest
from websockets.exceptions import ConnectionClosed

from _timing import wait_until
from fabstir_jupyter.host import Backend, ModelInfo, ScriptedBackend, scripted_text
from fabstir_jupyter.protocol import (
    FEATURES,
    cancel_frame,
    inference_frame,
    parse_host_frame,
    ping_frame,
    session_init_frame,
)

from .conftest import get_json

# ---------------------------------------------------------------------------- basic exchange


async def test_host_greets_with_connected(peer):
    """Host sends `connected` right after the upgrade."""
    assert peer.greeting["type"] == "connected"
    assert peer.greeting["message"]


async def test_host_streams_scripted_answer_with_usage(peer):
    """Host streams one chunk per token, then stream_end with usage and finish_reason."""
    result = await peer.infer("tell me a story", rid="r1", max_tokens=6)
    assert result.text == scripted_text("tell me a story", 6)
    assert [c["tokens"] for c in result.chunks] == [1] * 6
    end = result.end
    assert end["reason"] == "complete" and end["finish_reason"] == "length"
    assert end["tokens_used"] == 6
    assert end["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10, "context_window_size": 8192}


async def test_host_frames_parse_with_the_client_parser(peer):
    """Every frame the host sends is read by protocol.parse_host_frame without error."""
    await peer.send(inference_frame(prompt="hi", model="scripted-1", max_tokens=3, temperature=0, request_id="p"))
    for frame in await peer.until_end():
        parse_host_frame(json.dumps(frame))


async def test_host_echoes_id_on_every_reply(peer):
    """Chunks, stream_end and errors carry the request's id."""
    result = await peer.infer(rid="abc", max_tokens=3)
    assert all(f["id"] == "abc" for f in result.frames)
    await peer.send({"type": "inference", "id": "bad",
                     "request": {"prompt": "x", "model": "scripted-1", "max_tokens": 0}})
    error = await peer.recv()
    assert error["type"] == "error" and error["id"] == "bad"
    await peer.send({"type": "mystery", "id": "m1"})
    assert (await peer.recv())["id"] == "m1"


async def test_host_omits_id_when_request_has_none(peer):
    """Replies to a request without id carry no id."""
    result = await peer.infer(max_tokens=2)
    assert all("id" not in f for f in result.frames)


async def test_host_answers_json_ping_with_pong(peer):
    """A JSON ping gets a JSON pong."""
    await peer.send(ping_frame())
    assert await peer.recv() == {"type": "pong"}


async def test_host_answers_websocket_ping(peer):
    """A WebSocket Ping frame gets a Pong."""
    pong = await peer.ws.ping()
    await asyncio.wait_for(pong, 5)


async def test_host_non_streaming_request_gets_one_chunk(peer):
    """stream:false sends the whole text as one chunk counting all tokens, then stream_end."""
    result = await peer.infer("whole", stream=False, max_tokens=5)
    assert len(result.chunks) == 1
    assert result.chunks[0] == {"type": "stream_chunk", "content": scripted_text("whole", 5), "tokens": 5}
    assert result.end["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("missing", ["model", "prompt", "max_tokens"])
async def test_host_rejects_request_without_model_prompt_or_max_tokens(peer, missing):
    """A request lacking a field production needs is INVALID_OPTIONS naming it (production drops it silently)."""
    body = {"prompt": "x", "model": "scripted-1", "max_tokens": 3}
    del body[missing]
    await peer.send({"type": "inference", "id": "m", "request": body})
    error = await peer.recv()
    assert error["type"] == "error" and error["code"] == "INVALID_OPTIONS" and error["id"] == "m"
    assert f"'{missing}'" in error["message"]
    assert error["error"] == {"code": "INVALID_OPTIONS", "message": error["message"]}
    assert await peer.silent_for(0.05)


@pytest.mark.parametrize(("request_fields", "code"),
                         [({"prompt": ""}, "INVALID_PROMPT"), ({"model": ""}, "INVALID_OPTIONS")])
async def test_host_rejects_empty_prompt_or_model(peer, request_fields, code):
    """An empty prompt or model is answered with a coded error, not a default."""
    await peer.send({"type": "inference", "id": "e",
                     "request": {"prompt": "x", "model": "scripted-1", "max_tokens": 3, **request_fields}})
    error = await peer.recv()
    assert error["type"] == "error" and error["code"] == code and error["id"] == "e"


async def test_host_fills_defaults_for_a_prompt_frame_without_request(start_host, make_peer):
    """A session prompt without request uses the default model and default_max_tokens (production fills its own)."""
    server = await start_host(default_max_tokens=3)
    peer = await make_peer(server)
    await peer.send(session_init_frame("d"))
    await peer.recv()
    await peer.send({"type": "prompt", "prompt": "defaults"})
    result_frames = await peer.until_end()
    assert result_frames[-1]["usage"]["completion_tokens"] == 3


async def test_host_seed_changes_the_scripted_answer(peer):
    """The seed selects another deterministic answer."""
    plain = await peer.infer("p", max_tokens=6)
    seeded = await peer.infer("p", max_tokens=6, seed=42)
    assert seeded.text == scripted_text("p", 6, seed=42) != plain.text


async def test_host_resolves_model_aliases(peer):
    """A repo/file style name whose last part is the id resolves to the model."""
    result = await peer.infer(model="someone/scripted-1", max_tokens=2)
    assert result.end["reason"] == "complete"


async def test_host_ends_with_stop_when_answer_ends_naturally(start_host, make_peer):
    """A backend that ends its answer before max_tokens gives finish_reason stop."""
    server = await start_host(backend=ScriptedBackend(answer_tokens=3))
    peer = await make_peer(server)
    result = await peer.infer(max_tokens=10)
    assert result.end["finish_reason"] == "stop" and result.end["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------- stop sequences


async def test_host_cuts_at_stop_sequence(peer):
    """The text stops before a stop sequence, which is not sent; finish_reason is stop."""
    full = scripted_text("stops", 12)
    words = full.split()
    stop = words[5]
    cut = full[: full.index(stop)]
    result = await peer.infer("stops", max_tokens=12, stop=[stop])
    assert result.text == cut
    assert result.end["finish_reason"] == "stop" and result.end["reason"] == "complete"
    assert stop not in result.text


async def test_host_cuts_stop_sequence_spanning_tokens(peer):
    """A stop sequence that spans two tokens is cut too."""
    full = scripted_text("span", 12)
    words = full.split()
    stop = f"{words[3][-2:]} {words[4][:2]}"
    result = await peer.infer("span", max_tokens=12, stop=[stop])
    assert result.text == full[: full.index(stop)]
    assert result.end["finish_reason"] == "stop"


# ---------------------------------------------------------------------------- cancel


async def test_host_cancel_ends_stream_with_cancelled(start_host, make_peer):
    """stream_cancel stops the stream: stream_end(cancelled) and no chunk after it."""
    server = await start_host(backend=ScriptedBackend(token_rate=200))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="long", model="scripted-1", max_tokens=4000, temperature=0, request_id="c1"))
    for _ in range(3):
        assert (await peer.recv())["type"] == "stream_chunk"
    await peer.send(cancel_frame(reason="user"))
    frames = await peer.until_end()
    end = frames[-1]
    assert end["reason"] == "cancelled" and end["finish_reason"] == "cancelled" and end["id"] == "c1"
    assert end["usage"]["completion_tokens"] < 100
    assert await peer.silent_for(0.1)
    assert (await peer.infer(max_tokens=2)).end["reason"] == "complete"


async def test_host_cancel_before_first_token(start_host, make_peer):
    """A cancel while the first token is delayed ends the stream at once."""
    server = await start_host(backend=ScriptedBackend(first_token_delay=30))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="slow", model="scripted-1", max_tokens=5, temperature=0))
    await wait_until(lambda: server.active_streams == 1, what="the stream started")
    await peer.send(cancel_frame())
    frames = await peer.until_end(timeout=2)
    assert frames == [frames[-1]] and frames[-1]["reason"] == "cancelled"
    assert frames[-1]["usage"]["completion_tokens"] == 0


async def test_host_ignores_cancel_when_idle(peer):
    """A stream_cancel with no stream running gets no reply."""
    await peer.send(cancel_frame())
    await peer.send(ping_frame())
    assert await peer.recv() == {"type": "pong"}


class _DeafBackend(Backend):
    """A backend that ignores the cancel event (it sleeps between tokens)."""

    models: ClassVar[list[ModelInfo]] = [ModelInfo("deaf", "deaf", 1000)]

    async def generate(self, params, cancel, stats):
        while True:
            await asyncio.sleep(0.05)
            yield "x "
            await asyncio.sleep(30)


async def test_host_forces_cancel_of_a_backend_that_ignores_it(start_host, make_peer):
    """A backend that does not stop is interrupted after the grace period."""
    server = await start_host(backend=_DeafBackend(), cancel_grace=0.1)
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="x", model="deaf", max_tokens=5, temperature=0))
    assert (await peer.recv())["type"] == "stream_chunk"
    await peer.send(cancel_frame())
    end = (await peer.until_end(timeout=2))[-1]
    assert end["reason"] == "cancelled" and end["usage"]["completion_tokens"] == 1
    assert server.active_streams == 0


async def test_host_cancels_generation_when_client_disconnects(start_host, make_peer):
    """A client leaving mid-stream frees its stream slot on the host."""
    server = await start_host(backend=ScriptedBackend(token_rate=100))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="bye", model="scripted-1", max_tokens=4000, temperature=0))
    await peer.recv()
    assert server.active_streams == 1
    await peer.ws.close()
    await wait_until(lambda: server.active_streams == 0)
    _status, health = await get_json(server, "/health")
    assert health["active_streams"] == 0 and health["connections"] == 0


# ---------------------------------------------------------------------------- busy


async def test_host_rejects_second_request_on_busy_connection(start_host, make_peer):
    """A second request while a stream runs gets HOST_BUSY with its id; the first completes."""
    server = await start_host(backend=ScriptedBackend(token_rate=200))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="one", model="scripted-1", max_tokens=10, temperature=0, request_id="1"))
    await peer.recv()
    await peer.send(inference_frame(prompt="two", model="scripted-1", max_tokens=10, temperature=0, request_id="2"))
    frames = await peer.until_end()
    busy = [f for f in frames if f["type"] == "error"]
    assert len(busy) == 1 and busy[0]["code"] == "HOST_BUSY" and busy[0]["id"] == "2"
    assert frames[-1]["id"] == "1" and frames[-1]["reason"] == "complete"
    assert "".join(f["content"] for f in frames if f["type"] == "stream_chunk") in scripted_text("one", 10)


async def test_host_session_init_on_busy_connection_is_busy(start_host, make_peer):
    """A session_init during a stream is answered with HOST_BUSY, not dropped."""
    server = await start_host(backend=ScriptedBackend(token_rate=100))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="one", model="scripted-1", max_tokens=5, temperature=0))
    await peer.recv()
    await peer.send({"type": "session_init", "session_id": "s", "id": "si"})
    frames = await peer.until_end()
    assert any(f["type"] == "error" and f["code"] == "HOST_BUSY" and f["id"] == "si" for f in frames)


async def test_host_busy_at_concurrent_stream_limit(start_host, make_peer):
    """Over max_concurrent_streams on the whole host, a request gets HOST_BUSY."""
    server = await start_host(backend=ScriptedBackend(token_rate=100), max_concurrent_streams=1)
    first, second = await make_peer(server), await make_peer(server)
    await first.send(inference_frame(prompt="a", model="scripted-1", max_tokens=50, temperature=0))
    await first.recv()
    await second.send(inference_frame(prompt="b", model="scripted-1", max_tokens=5, temperature=0, request_id="b"))
    error = await second.recv()
    assert error["type"] == "error" and error["code"] == "HOST_BUSY" and error["id"] == "b"
    assert error["error"] == {"code": "HOST_BUSY", "message": error["message"]}
    await first.send(cancel_frame())
    await first.until_end()
    assert (await second.infer(max_tokens=2)).end["reason"] == "complete"


async def test_host_frees_a_streams_slot_before_its_stream_end_goes_out(start_host, make_peer):
    """The host-wide stream count drops before stream_end is written, so a client that sends its next
    request as soon as it reads stream_end, on any socket, is never refused: with a limit of 1, 20
    back-to-back requests alternating between two sockets are all served."""
    server = await start_host(max_concurrent_streams=1)
    active_at_end = []
    send_locked = server._send_locked

    async def spy(conn, text):
        if '"stream_end"' in text:
            active_at_end.append(server.active_streams)
        await send_locked(conn, text)

    server._send_locked = spy
    peers = [await make_peer(server), await make_peer(server)]
    for i in range(20):
        peer = peers[i % 2]
        await peer.send(inference_frame(prompt=f"prompt {i}", model="scripted-1", max_tokens=3, temperature=0,
                                        request_id=f"r{i}"))
        first = await peer.recv()
        assert first["type"] == "stream_chunk", first
        assert (await peer.until_end())[-1]["reason"] == "complete"
    assert active_at_end == [0] * 20


async def test_host_health_reports_streams_and_queue(start_host, make_peer):
    """/health shows active streams and the backend's queue depth while they run."""
    server = await start_host(backend=ScriptedBackend(token_rate=100, max_concurrency=1))
    first, second = await make_peer(server), await make_peer(server)
    await first.send(inference_frame(prompt="a", model="scripted-1", max_tokens=500, temperature=0))
    await first.recv()
    await second.send(inference_frame(prompt="b", model="scripted-1", max_tokens=5, temperature=0))
    await wait_until(lambda: server.backend.queue_depth == 1)
    status, health = await get_json(server, "/health")
    assert status == 200
    assert health["active_streams"] == 2 and health["queue_depth"] == 1 and health["connections"] == 2
    await first.send(cancel_frame())
    await first.until_end()
    assert (await second.until_end())[-1]["reason"] == "complete"


# ---------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"prompt": "x" * 101}, "INVALID_PROMPT"),
        ({"messages": [{"role": "user", "content": "y" * 101}]}, "INVALID_PROMPT"),
        ({"max_tokens": 0}, "INVALID_OPTIONS"),
        ({"max_tokens": -3}, "INVALID_OPTIONS"),
        ({"max_tokens": 51}, "INVALID_OPTIONS"),
        ({"temperature": 2.5}, "INVALID_OPTIONS"),
        ({"temperature": -0.1}, "INVALID_OPTIONS"),
        ({"top_p": 0}, "INVALID_OPTIONS"),
        ({"top_p": 1.5}, "INVALID_OPTIONS"),
        ({"stop": ["s"] * 17}, "INVALID_OPTIONS"),
        ({"stop": ["z" * 300]}, "INVALID_OPTIONS"),
        ({"model": "gpt-9"}, "MODEL_NOT_AVAILABLE"),
    ],
)
async def test_host_answers_each_limit_with_its_code(start_host, make_peer, change, code):
    """Each limit gets one coded error with the id, and the connection stays usable."""
    server = await start_host(max_prompt_chars=100, max_tokens_cap=50)
    peer = await make_peer(server)
    body = {"prompt": "ok", "model": "scripted-1", "max_tokens": 5, "temperature": 0.5}
    body.update(change)
    await peer.send({"type": "inference", "id": "lim", "request": body})
    error = await peer.recv()
    assert error["type"] == "error" and error["code"] == code and error["id"] == "lim"
    assert error["error"]["code"] == code
    assert await peer.silent_for(0.05)
    assert (await peer.infer(max_tokens=2)).end["reason"] == "complete"


async def test_host_unknown_model_lists_available_models(peer):
    """MODEL_NOT_AVAILABLE names the models the host serves."""
    await peer.send({"type": "inference", "request": {"prompt": "x", "model": "llama-2-7b", "max_tokens": 3}})
    error = await peer.recv()
    assert error["code"] == "MODEL_NOT_AVAILABLE" and "scripted-1" in error["message"]


async def test_host_max_tokens_cap_can_be_raised(start_host, make_peer):
    """A high max_tokens_cap admits long requests (benchmarks)."""
    server = await start_host(max_tokens_cap=200_000)
    peer = await make_peer(server)
    result = await peer.infer(max_tokens=3000)
    assert result.end["usage"]["completion_tokens"] == 3000


async def test_host_rate_limit_per_connection(start_host, make_peer):
    """Over the per-connection rate, a request gets RATE_LIMIT_EXCEEDED."""
    server = await start_host(rate_limit_per_connection=2, rate_limit_per_address=0)
    peer = await make_peer(server)
    for _ in range(2):
        assert (await peer.infer(max_tokens=1)).end["reason"] == "complete"
    await peer.send(inference_frame(prompt="x", model="scripted-1", max_tokens=1, temperature=0, request_id="r"))
    error = await peer.recv()
    assert error["code"] == "RATE_LIMIT_EXCEEDED" and error["id"] == "r"
    other = await make_peer(server)
    assert (await other.infer(max_tokens=1)).end["reason"] == "complete"


async def test_host_rate_limit_per_address(start_host, make_peer):
    """The per-address rate is shared by all connections from one address."""
    server = await start_host(rate_limit_per_connection=0, rate_limit_per_address=2)
    a, b = await make_peer(server), await make_peer(server)
    assert (await a.infer(max_tokens=1)).end["reason"] == "complete"
    assert (await b.infer(max_tokens=1)).end["reason"] == "complete"
    await a.send(inference_frame(prompt="x", model="scripted-1", max_tokens=1, temperature=0))
    assert (await a.recv())["code"] == "RATE_LIMIT_EXCEEDED"


async def test_host_reports_context_overflow(start_host, make_peer):
    """A prompt over the context window gets CONTEXT_OVERFLOW, then stream_end(error)."""
    server = await start_host(backend=ScriptedBackend(context_window=5))
    peer = await make_peer(server)
    result = await peer.infer("one two three four five six", rid="o")
    assert [e["code"] for e in result.errors] == ["CONTEXT_OVERFLOW"]
    assert result.end["reason"] == "error" and result.end["finish_reason"] == "error" and result.end["id"] == "o"


async def test_host_drops_connection_on_oversize_frame(start_host, make_peer):
    """A message over max_frame_bytes closes the connection with 1009."""
    server = await start_host(max_frame_bytes=1024)
    peer = await make_peer(server)
    await peer.send({"type": "inference", "request": {"prompt": "x" * 2000, "model": "scripted-1", "max_tokens": 1}})
    with pytest.raises(ConnectionClosed) as info:
        await peer.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# ---------------------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "PROTOCOL_ERROR"),
        (b"\x00\x01binary", "PROTOCOL_ERROR"),
        ("[1, 2]", "PROTOCOL_ERROR"),
        ('{"no_type": 1}', "PROTOCOL_ERROR"),
        ('{"type": "teleport"}', "PROTOCOL_ERROR"),
        ('{"type": "inference"}', "INVALID_OPTIONS"),
        ('{"type": "inference", "request": {"prompt": 5}}', "INVALID_PROMPT"),
        ('{"type": "inference", "request": {"prompt": "x", "max_tokens": "ten"}}', "INVALID_OPTIONS"),
        ('{"type": "inference", "request": {"prompt": "x", "stream": "yes"}}', "INVALID_OPTIONS"),
        ('{"type": "inference", "request": {"prompt": "x", "messages": "hi"}}', "INVALID_OPTIONS"),
        ('{"type": "inference", "request": []}', "INVALID_OPTIONS"),
        ('{"type": "session_init", "session_id": ""}', "INVALID_OPTIONS"),
        ('{"type": "encrypted_session_init", "session_id": "s"}', "ENCRYPTION_NOT_SUPPORTED"),
    ],
)
async def test_host_answers_malformed_frame_and_stays_usable(peer, frame, code):
    """A malformed frame gets a coded error; the next request on the socket works."""
    await peer.send(frame)
    error = await peer.recv()
    assert error["type"] == "error" and error["code"] == code and error["message"]
    assert (await peer.infer(max_tokens=2)).end["reason"] == "complete"


async def test_host_echoes_id_of_malformed_request(peer):
    """A request with bad fields still gets its id echoed on the error."""
    await peer.send({"type": "inference", "id": 7, "request": {"prompt": "x", "top_p": "high"}})
    error = await peer.recv()
    assert error["code"] == "INVALID_OPTIONS" and error["id"] == "7"


# ---------------------------------------------------------------------------- backend failures


class _BrokenBackend(Backend):
    """A backend with a bug: it raises a plain exception after one token."""

    models: ClassVar[list[ModelInfo]] = [ModelInfo("broken", "broken", 1000)]

    async def generate(self, params, cancel, stats):
        stats.prompt_tokens = 1
        yield "one "
        raise KeyError("oops")


async def test_host_reports_backend_bug_as_host_error(start_host, make_peer):
    """An unexpected backend exception becomes HOST_ERROR then stream_end(error)."""
    server = await start_host(backend=_BrokenBackend())
    peer = await make_peer(server)
    result = await peer.infer(model="broken", rid="b")
    assert result.text == "one "
    assert [e["code"] for e in result.errors] == ["HOST_ERROR"]
    assert result.end["reason"] == "error" and result.end["usage"]["completion_tokens"] == 1
    assert (await peer.infer(model="broken")).errors


# ---------------------------------------------------------------------------- HTTP


async def test_host_health_is_truthful(host):
    """/health says ok, model loaded, and the counts."""
    status, body = await get_json(host, "/health")
    assert status == 200
    assert body["status"] == "ok" and body["model_loaded"] is True and body["models"] == ["scripted-1"]
    assert body["queue_depth"] == 0 and body["active_streams"] == 0


async def test_host_version_lists_features(host):
    """/v1/version returns the version and every feature of protocol.FEATURES."""
    status, body = await get_json(host, "/v1/version")
    assert status == 200 and body["features"] == list(FEATURES) and body["version"]


async def test_host_version_states_its_stream_limit_except_in_legacy_mode(start_host):
    """/v1/version says max_concurrent_streams, so clients schedule to it; a legacy host (a production
    node) does not, while /health says it in both."""
    limited = await start_host(max_concurrent_streams=3)
    legacy = await start_host(legacy=True, max_concurrent_streams=3)
    assert (await get_json(limited, "/v1/version"))[1]["max_concurrent_streams"] == 3
    assert (await get_json(limited, "/health"))[1]["max_concurrent_streams"] == 3
    assert "max_concurrent_streams" not in (await get_json(legacy, "/v1/version"))[1]


async def test_host_lists_models(host):
    """/v1/models lists id, name and context window."""
    status, body = await get_json(host, "/v1/models")
    assert status == 200
    assert body == {"models": [{"id": "scripted-1", "name": "scripted model scripted-1", "context_window": 8192}]}


@pytest.mark.parametrize("path", ["/", "/v1", "/v2/ws", "/health/x", "/ws"])
async def test_host_answers_other_paths_with_404(host, path):
    """Paths other than the endpoints and /v1/ws are 404."""
    status, body = await get_json(host, path)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"


async def test_host_refuses_websocket_on_other_path(host):
    """A WebSocket upgrade on another path is refused with 404."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        await connect(host.ws_url.replace("/v1/ws", "/ws"))
    assert info.value.response.status_code == 404


async def test_host_accepts_permessage_deflate(start_host, make_peer):
    """Compression is negotiated when enabled, and refused when disabled."""
    with_deflate = await make_peer(await start_host())
    assert [e.name for e in with_deflate.ws.protocol.extensions] == ["permessage-deflate"]
    without = await make_peer(await start_host(compression=False))
    assert without.ws.protocol.extensions == []
    assert (await without.infer(max_tokens=2)).end["reason"] == "complete"


async def test_host_close_ends_open_connections(start_host, make_peer):
    """close() closes client connections with 1001 and frees the port."""
    server = await start_host(backend=ScriptedBackend(token_rate=50))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="x", model="scripted-1", max_tokens=1000, temperature=0))
    await peer.recv()
    await server.close()
    with pytest.raises(ConnectionClosed):
        while True:
            await peer.recv()
    assert server.active_streams == 0


async def test_host_refuses_connections_over_the_limit(start_host, make_peer):
    """Past max_connections, a WebSocket upgrade is refused with 503."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    server = await start_host(max_connections=1)
    await make_peer(server)
    with pytest.raises(InvalidStatus) as info:
        await connect(server.ws_url)
    assert info.value.response.status_code == 503
