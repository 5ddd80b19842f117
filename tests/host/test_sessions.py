"""Plaintext sessions, chat messages and assistant-prefill continuation on the scripted backend."""

from __future__ import annotations

from _timing import wait_until
from fabstir_jupyter.host import ScriptedBackend, scripted_text
from fabstir_jupyter.protocol import prompt_frame, session_init_frame

from .conftest import Result


def words(text: str) -> int:
    return len(text.split())


async def open_session(peer, session_id: str = "s1", **kwargs) -> dict:
    await peer.send(session_init_frame(session_id, **kwargs))
    return await peer.recv()


async def turn(peer, prompt: str, *, session_id: str | None = "s1", max_tokens: int = 4, rid=None, **request) -> Result:
    frame = prompt_frame(prompt, session_id=session_id, model="scripted-1", max_tokens=max_tokens, temperature=0,
                         request_id=rid, **request)
    await peer.send(frame)
    return Result(await peer.until_end())


async def test_host_acknowledges_session_init(peer):
    """session_init gets session_init_ack echoing session, job (a number, as production), chain and id."""
    ack = await open_session(peer, "sess-9", job_id=12, chain_id=84532, request_id="i1")
    assert ack["type"] == "session_init_ack" and ack["status"] == "success"
    assert ack["session_id"] == "sess-9" and ack["job_id"] == 12 and ack["chain_id"] == 84532 and ack["id"] == "i1"


async def test_host_accepts_camel_case_session_fields(peer):
    """sessionId / jobId / chainId are accepted like the snake_case names; a numeric jobId string is a number."""
    await peer.send({"type": "session_init", "sessionId": "cc", "jobId": "3", "chainId": 1})
    ack = await peer.recv()
    assert ack["session_id"] == "cc" and ack["job_id"] == 3


async def test_host_keeps_a_non_numeric_job_id_as_sent(peer):
    """A job id that is not a number is echoed as the string it was (production would send null)."""
    ack = await open_session(peer, "s", job_id="job-x")
    assert ack["job_id"] == "job-x"


async def test_host_streams_a_session_prompt(peer):
    """A prompt in a session streams the scripted answer to that prompt."""
    await open_session(peer)
    result = await turn(peer, "first question", rid="t1")
    assert result.text == scripted_text("first question", 4)
    assert result.end["id"] == "t1" and result.end["reason"] == "complete"


async def test_host_session_keeps_memory(peer):
    """The second turn's prompt holds the first turn and its answer (prompt_tokens grows)."""
    await open_session(peer)
    first = await turn(peer, "one two three")
    assert first.end["usage"]["prompt_tokens"] == 3
    second = await turn(peer, "four five")
    assert second.end["usage"]["prompt_tokens"] == 3 + words(first.text) + 2
    third = await turn(peer, "six")
    assert third.end["usage"]["prompt_tokens"] == 3 + 4 + 2 + 4 + 1


async def test_host_prompt_uses_connection_session_when_id_omitted(peer):
    """A prompt without session_id uses the session opened on this connection."""
    await open_session(peer, "mine")
    await turn(peer, "a b", session_id=None)
    second = await turn(peer, "c", session_id=None)
    assert second.end["usage"]["prompt_tokens"] == 2 + 4 + 1


async def test_host_prompt_without_session_is_session_not_found(peer):
    """A prompt with no session on the connection gets SESSION_NOT_FOUND."""
    await peer.send(prompt_frame("hi", session_id=None, model="scripted-1", max_tokens=2, temperature=0,
                                 request_id="x"))
    error = await peer.recv()
    assert error["code"] == "SESSION_NOT_FOUND" and error["id"] == "x"


async def test_host_prompt_with_unknown_session_is_session_not_found(peer):
    """A prompt naming a session that was never opened gets SESSION_NOT_FOUND."""
    await open_session(peer, "known")
    await peer.send(prompt_frame("hi", session_id="unknown", model="scripted-1", max_tokens=2, temperature=0))
    error = await peer.recv()
    assert error["code"] == "SESSION_NOT_FOUND" and "unknown" in error["message"]


async def test_host_session_messages_replace_memory_for_a_turn(peer):
    """request.messages replace the remembered transcript for that turn, and become the memory."""
    await open_session(peer)
    await turn(peer, "lots of words in this first turn")
    replaced = await turn(peer, "ignored", messages=[{"role": "user", "content": "just this"}])
    assert replaced.end["usage"]["prompt_tokens"] == 2
    assert replaced.text == scripted_text("just this", 4)
    after = await turn(peer, "next")
    assert after.end["usage"]["prompt_tokens"] == 2 + 4 + 1


async def test_host_session_memory_is_bounded(start_host, make_peer):
    """The transcript keeps at most max_session_messages messages."""
    server = await start_host(max_session_messages=2)
    peer = await make_peer(server)
    await open_session(peer)
    await turn(peer, "a a a a a a a a a a")
    await turn(peer, "b")
    third = await turn(peer, "c")
    assert third.end["usage"]["prompt_tokens"] == 1 + 4 + 1


async def test_host_session_init_resets_memory(peer):
    """Opening a session id again starts an empty transcript."""
    await open_session(peer)
    await turn(peer, "a b c")
    await open_session(peer)
    again = await turn(peer, "d")
    assert again.end["usage"]["prompt_tokens"] == 1


async def test_host_forgets_idle_sessions(start_host, make_peer):
    """A session unused for session_idle_timeout is evicted."""
    server = await start_host(session_idle_timeout=0.1)
    peer = await make_peer(server)
    await open_session(peer)
    await wait_until(lambda: len(server.sessions) == 0, what="the idle session evicted")  # len() evicts idle ones
    await peer.send(prompt_frame("hi", session_id="s1", model="scripted-1", max_tokens=2, temperature=0))
    assert (await peer.recv())["code"] == "SESSION_NOT_FOUND"


async def test_host_bounds_the_number_of_sessions(start_host, make_peer):
    """Past max_sessions the least recently used session is evicted."""
    server = await start_host(max_sessions=1)
    peer = await make_peer(server)
    await open_session(peer, "old")
    await open_session(peer, "new")
    await peer.send(prompt_frame("hi", session_id="old", model="scripted-1", max_tokens=2, temperature=0))
    assert (await peer.recv())["code"] == "SESSION_NOT_FOUND"
    assert (await turn(peer, "hi", session_id="new")).end["reason"] == "complete"


async def test_host_session_shared_across_connections(start_host, make_peer):
    """A session opened on one connection can be continued from another (same host)."""
    server = await start_host()
    first, second = await make_peer(server), await make_peer(server)
    await open_session(first, "shared")
    await turn(first, "a b", session_id="shared")
    result = await turn(second, "c", session_id="shared")
    assert result.end["usage"]["prompt_tokens"] == 2 + 4 + 1


async def test_host_cancelled_turn_keeps_partial_answer(start_host, make_peer):
    """A cancelled turn is remembered with the text that was sent."""
    server = await start_host(backend=ScriptedBackend(token_rate=200))
    peer = await make_peer(server)
    await open_session(peer)
    await peer.send(prompt_frame("q", session_id="s1", model="scripted-1", max_tokens=1000, temperature=0))
    await peer.recv()
    await peer.send({"type": "stream_cancel"})
    frames = await peer.until_end()
    sent = 1 + sum(1 for f in frames if f["type"] == "stream_chunk")
    nxt = await turn(peer, "r")
    assert nxt.end["usage"]["prompt_tokens"] == 1 + sent + 1


# ---------------------------------------------------------------------------- messages and prefill


async def test_host_messages_answer_the_last_user_message(peer):
    """With chat messages, the scripted answer is keyed by the last user message."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second question"},
    ]
    result = await peer.infer("", messages=messages, max_tokens=5)
    assert result.text == scripted_text("second question", 5)
    assert result.end["usage"]["prompt_tokens"] == 2 + 1 + 1 + 2


async def test_host_continues_assistant_prefill_exactly(peer):
    """A last assistant message is continued: prefill + answer is the uninterrupted answer."""
    prompt = "explain tides"
    prefill = scripted_text(prompt, 4)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": prefill}]
    result = await peer.infer("", messages=messages, max_tokens=6)
    assert result.text == scripted_text(prompt, 6, start=4)
    assert prefill + result.text == scripted_text(prompt, 10)


async def test_host_continuation_from_any_prefix_matches(peer):
    """Continuing from each prefix length reproduces the same full answer (seeded)."""
    prompt, full = "moves between hosts", scripted_text("moves between hosts", 8, seed=5)
    for k in (0, 1, 5, 7):
        prefill = scripted_text(prompt, k, seed=5)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": prefill}]
        result = await peer.infer("", messages=messages, max_tokens=8 - k, seed=5)
        assert prefill + result.text == full


async def test_host_session_turn_with_prefill_extends_the_assistant_message(peer):
    """A session turn that continues a prefill is remembered as one assistant message."""
    await open_session(peer)
    prefill = scripted_text("q", 2)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": prefill}]
    result = await turn(peer, "q", messages=messages, max_tokens=3)
    assert result.text == scripted_text("q", 3, start=2)
    nxt = await turn(peer, "z")
    assert nxt.end["usage"]["prompt_tokens"] == 1 + 5 + 1
