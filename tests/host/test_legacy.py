"""Legacy mode: the host imitates a production node and its quirks (spec/PROTOCOL.md §4)."""

from __future__ import annotations

import json

import pytest

from fabstir_jupyter.host import ScriptedBackend, scripted_text, scripted_token
from fabstir_jupyter.protocol import (
    ResponseReader,
    cancel_frame,
    inference_frame,
    parse_host_frame,
    ping_frame,
    prompt_frame,
)

from .conftest import get_json


@pytest.fixture
async def legacy(start_host, make_peer):
    """A peer on a legacy-mode host."""
    return await make_peer(await start_host(legacy=True))


async def test_legacy_host_ends_without_usage_and_with_empty_chunk(legacy):
    """Chunks, then the empty terminal chunk, then stream_end with no usage or finish_reason."""
    result = await legacy.infer("old", rid="L", max_tokens=4)
    assert result.text == scripted_text("old", 4)
    assert result.chunks[-1] == {"type": "stream_chunk", "content": "", "tokens": 0, "id": "L"}
    assert result.end == {"type": "stream_end", "reason": "complete", "tokens_used": 4, "id": "L"}


async def test_legacy_frames_are_read_by_the_client_reader(legacy):
    """protocol.ResponseReader reads a legacy answer to the same text."""
    result = await legacy.infer("old", max_tokens=4)
    reader = ResponseReader(max_tokens=4)
    text = "".join(piece for f in result.frames for piece in reader.receive(parse_host_frame(json.dumps(f))))
    assert text == scripted_text("old", 4) and reader.done


async def test_legacy_http_endpoints_imitate_production(start_host):
    """/v1/version has no features, /v1/models is 503, /health is degraded."""
    server = await start_host(legacy=True)
    assert (await get_json(server, "/v1/version"))[1]["features"] == []
    assert (await get_json(server, "/v1/models"))[0] == 503
    assert (await get_json(server, "/health")) == (200, {"status": "degraded"})


async def test_legacy_host_drops_malformed_frames_and_pings(legacy):
    """Malformed frames, unknown types and JSON pings get no reply at all."""
    for frame in ("{bad", b"\x00", '{"type": "teleport"}', '{"type": "inference", "request": {"prompt": "x"}}'):
        await legacy.send(frame)
    await legacy.send(ping_frame())
    assert await legacy.silent_for(0.2)


async def test_legacy_host_drops_requests_on_busy_connection(start_host, make_peer):
    """A second request during a stream is dropped silently."""
    peer = await make_peer(await start_host(backend=ScriptedBackend(token_rate=200), legacy=True))
    await peer.send(inference_frame(prompt="a", model="scripted-1", max_tokens=5, temperature=0, request_id="1"))
    await peer.send(inference_frame(prompt="b", model="scripted-1", max_tokens=5, temperature=0, request_id="2"))
    frames = await peer.until_end()
    assert {f.get("id") for f in frames} == {"1"}
    assert await peer.silent_for(0.1)


async def test_legacy_host_ignores_stop_seed_and_unknown_model(legacy):
    """Stop sequences and seed are ignored; an unknown model falls back to the default."""
    full = scripted_text("q", 6)
    result = await legacy.infer("q", model="whatever", max_tokens=6, stop=[full.split()[1]], seed=9)
    assert "".join(c["content"] for c in result.chunks) == full


async def test_legacy_host_reports_mid_stream_error_as_text(start_host, make_peer):
    """A failure mid-stream is an "Error: " chunk then stream_end(complete)."""
    peer = await make_peer(await start_host(backend=ScriptedBackend(fail_after=2), legacy=True))
    result = await peer.infer("e", max_tokens=5)
    contents = [c["content"] for c in result.chunks]
    assert contents[:2] == [scripted_token("e", 0), scripted_token("e", 1)]
    assert contents[2].startswith("Error: ")
    assert result.end["reason"] == "complete" and "usage" not in result.end


async def test_legacy_host_answers_context_overflow_with_empty_stream(start_host, make_peer):
    """A prompt over the context window gives an empty stream with tokens_used 0."""
    peer = await make_peer(await start_host(backend=ScriptedBackend(context_window=2), legacy=True))
    result = await peer.infer("far too many words", max_tokens=5)
    assert result.text == "" and result.errors == []
    assert result.end == {"type": "stream_end", "reason": "complete", "tokens_used": 0}


async def test_legacy_host_sends_flat_coded_errors(start_host, make_peer):
    """Coded errors have production's flat shape (no nested error object)."""
    peer = await make_peer(await start_host(backend=ScriptedBackend(error_code="RATE_LIMIT_EXCEEDED"), legacy=True))
    result = await peer.infer(rid="r")
    assert result.errors == [
        {"type": "error", "code": "RATE_LIMIT_EXCEEDED", "message": result.errors[0]["message"], "id": "r"}
    ]
    assert result.end["reason"] == "error"


async def test_legacy_host_ends_a_cancelled_stream_as_production(start_host, make_peer):
    """A cancel gets one stream_end(cancelled) with finish_reason and session_id, no id, no empty chunk."""
    peer = await make_peer(await start_host(backend=ScriptedBackend(token_rate=100), legacy=True))
    await peer.send({"type": "session_init", "session_id": "77", "id": "i"})
    assert (await peer.recv())["type"] == "session_init_ack"
    await peer.send(prompt_frame("a", session_id="77", model="scripted-1", max_tokens=500, temperature=0,
                                 request_id="p"))
    await peer.recv()
    await peer.send(cancel_frame())
    frames = await peer.until_end()
    end = frames[-1]
    assert end == {"type": "stream_end", "reason": "cancelled", "tokens_used": end["tokens_used"],
                   "finish_reason": "cancelled", "session_id": "77"}
    assert 1 <= end["tokens_used"] < 500
    assert all(f["type"] == "stream_chunk" and f["content"] for f in frames[:-1])


async def test_legacy_host_answers_encrypted_messages_as_a_node_without_a_key(legacy):
    """encrypted_message: MISSING_SESSION_ID with no session, then SESSION_KEY_NOT_FOUND; ids echoed."""
    payload = {"ciphertextHex": "00" * 20, "nonceHex": "11" * 24, "aadHex": ""}
    await legacy.send({"type": "encrypted_message", "id": "e1", "payload": payload})
    assert await legacy.recv() == {"type": "error", "code": "MISSING_SESSION_ID",
                                   "message": "encrypted_message requires session_id", "id": "e1"}
    await legacy.send({"type": "session_init", "session_id": "9"})
    await legacy.recv()
    await legacy.send({"type": "encrypted_message", "id": "e2", "payload": payload})
    assert await legacy.recv() == {"type": "error", "code": "SESSION_KEY_NOT_FOUND",
                                   "message": "No session key found for session_id: 9", "id": "e2"}


async def test_legacy_host_runs_a_prompt_without_session_or_request(legacy):
    """Production answers a prompt with no session_init and no request object, from its top-level fields."""
    await legacy.send({"type": "prompt", "prompt": "bare", "max_tokens": 3, "id": "b"})
    result = await legacy.until_end()
    assert "".join(f["content"] for f in result if f["type"] == "stream_chunk") == scripted_text("bare", 3)
    assert result[-1] == {"type": "stream_end", "reason": "complete", "tokens_used": 3, "id": "b"}
