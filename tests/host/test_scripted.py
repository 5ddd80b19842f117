"""The scripted backend: predictable text, token rate, and each fault-injection mode."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.exceptions import ConnectionClosedError

from _timing import wait_until
from fabstir_jupyter.errors import InvalidOptions
from fabstir_jupyter.host import GenerationParams, GenerationStats, ScriptedBackend, scripted_text, scripted_token
from fabstir_jupyter.host.scripted import VOCABULARY
from fabstir_jupyter.protocol import cancel_frame, inference_frame

from .conftest import get_json


def test_scripted_token_is_a_vocabulary_word_with_a_space():
    """Each token is one vocabulary word followed by a space."""
    for i in range(50):
        token = scripted_token("prompt", i)
        assert token.endswith(" ") and token[:-1] in VOCABULARY


def test_scripted_token_is_deterministic():
    """The same (prompt, position, seed) always gives the same token."""
    assert [scripted_token("a", i, seed=3) for i in range(20)] == [scripted_token("a", i, seed=3) for i in range(20)]


def test_scripted_text_depends_on_prompt_and_seed():
    """Another prompt or seed gives another answer; seed None differs from seed 0."""
    base = scripted_text("a", 20)
    assert base != scripted_text("b", 20)
    assert base != scripted_text("a", 20, seed=0)
    assert scripted_text("a", 20, seed=0) != scripted_text("a", 20, seed=1)


def test_scripted_text_joins_tokens_from_start():
    """scripted_text(start=k) is the tokens from position k on."""
    assert scripted_text("q", 5, start=3) == "".join(scripted_token("q", i) for i in range(3, 8))
    assert scripted_text("q", 3) + scripted_text("q", 4, start=3) == scripted_text("q", 7)


def test_scripted_text_survives_odd_unicode():
    """Prompts with lone surrogates and emoji hash without error."""
    assert scripted_text("\ud800 🙂", 3)


def test_scripted_backend_rejects_negative_options():
    """Negative fault settings are refused with INVALID_OPTIONS."""
    with pytest.raises(InvalidOptions):
        ScriptedBackend(fail_after=-1)


async def test_scripted_backend_counts_prompt_words():
    """Prompt tokens are whitespace words over all messages; the stream yields max_tokens tokens."""
    backend = ScriptedBackend()
    stats = GenerationStats()
    params = GenerationParams(messages=(("system", "be nice"), ("user", "hello there you")), model="scripted-1",
                              max_tokens=4)
    tokens = [t async for t in backend.generate(params, asyncio.Event(), stats)]
    assert stats.prompt_tokens == 5 and stats.finish_reason == "length"
    assert "".join(tokens) == scripted_text("hello there you", 4)


async def test_scripted_token_rate_paces_the_stream(start_host, make_peer):
    """At 200 tokens/s, 20 tokens take about 0.1 s."""
    server = await start_host(backend=ScriptedBackend(token_rate=200))
    peer = await make_peer(server)
    started = time.monotonic()
    result = await peer.infer(max_tokens=20)
    elapsed = time.monotonic() - started
    assert len(result.chunks) == 20 and 0.08 <= elapsed < 2.0


async def test_scripted_first_token_delay(start_host, make_peer):
    """first_token_delay holds back the first chunk."""
    server = await start_host(backend=ScriptedBackend(first_token_delay=0.2))
    peer = await make_peer(server)
    started = time.monotonic()
    await peer.send(inference_frame(prompt="x", model="scripted-1", max_tokens=2, temperature=0))
    first = await peer.recv()
    assert first["type"] == "stream_chunk" and time.monotonic() - started >= 0.19


async def test_scripted_fail_after_sends_error_then_end(start_host, make_peer):
    """fail_after=N: N chunks, HOST_ERROR with the id, then stream_end(error); socket still usable."""
    server = await start_host(backend=ScriptedBackend(fail_after=3))
    peer = await make_peer(server)
    result = await peer.infer("f", rid="f1", max_tokens=10)
    assert result.text == scripted_text("f", 3)
    assert [(e["code"], e["id"]) for e in result.errors] == [("HOST_ERROR", "f1")]
    assert result.frames[-2]["type"] == "error"
    end = result.end
    assert end["reason"] == "error" and end["finish_reason"] == "error" and end["usage"]["completion_tokens"] == 3
    assert (await peer.infer(max_tokens=2)).end["reason"] == "complete"


async def test_scripted_close_after_drops_the_connection(start_host, make_peer):
    """close_after=N: N chunks, then the TCP connection drops without a close frame."""
    server = await start_host(backend=ScriptedBackend(close_after=2))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="c", model="scripted-1", max_tokens=10, temperature=0))
    chunks = [await peer.recv(), await peer.recv()]
    assert [c["type"] for c in chunks] == ["stream_chunk"] * 2
    with pytest.raises(ConnectionClosedError) as info:
        await peer.recv()
    assert info.value.rcvd is None
    assert server.active_streams == 0


@pytest.mark.parametrize("code", ["RATE_LIMIT_EXCEEDED", "HOST_ERROR", "MODEL_NOT_AVAILABLE"])
async def test_scripted_error_code_answers_every_request(start_host, make_peer, code):
    """error_code=X answers each request with an X error then stream_end(error)."""
    server = await start_host(backend=ScriptedBackend(error_code=code))
    peer = await make_peer(server)
    for rid in ("e1", "e2"):
        result = await peer.infer(rid=rid)
        assert [(e["code"], e["id"]) for e in result.errors] == [(code, rid)]
        assert result.chunks == [] and result.end["reason"] == "error"


async def test_scripted_never_answer_stays_silent_until_cancel(start_host, make_peer):
    """never_answer accepts a request and sends nothing; a cancel still ends it."""
    server = await start_host(backend=ScriptedBackend(never_answer=True))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="hello", model="scripted-1", max_tokens=5, temperature=0, request_id="n"))
    assert await peer.silent_for(0.3)
    _status, health = await get_json(server, "/health")
    assert health["active_streams"] == 1
    await peer.send(cancel_frame())
    end = await peer.recv()
    assert end["type"] == "stream_end" and end["reason"] == "cancelled" and end["id"] == "n"


async def test_scripted_max_concurrency_queues_generations(start_host, make_peer):
    """With max_concurrency=1, a second stream waits until the first ends, then completes."""
    server = await start_host(backend=ScriptedBackend(token_rate=100, max_concurrency=1))
    a, b = await make_peer(server), await make_peer(server)
    await a.send(inference_frame(prompt="a", model="scripted-1", max_tokens=10, temperature=0))
    await a.recv()
    result_b = asyncio.create_task(b.infer("b", max_tokens=3))
    await wait_until(lambda: server.backend.queue_depth == 1)
    await a.until_end()
    assert (await result_b).text == scripted_text("b", 3)
    assert server.backend.queue_depth == 0
