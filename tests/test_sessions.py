"""Sessions on the reference host: context across turns, transcript kept by the client."""

from __future__ import annotations

import logging

import pytest

from fabstir_jupyter.errors import Cancelled, SessionNotFound
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text


async def turn(manager, session_id, prompt, **options):
    async with manager.sessions.stream(session_id, prompt, **options) as stream:
        pieces = [p async for p in stream]
    return stream, "".join(pieces)


async def test_session_keeps_the_transcript_and_pins_one_socket(start_host, make_manager):
    """Three turns run on one pinned socket; the transcript holds every turn in order."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session(system_prompt="be brief")
    texts = []
    for prompt in ("hello", "how do rivers form?", "and lakes?"):
        stream, text = await turn(manager, session.id, prompt, max_tokens=5)
        assert text == scripted_text(prompt, 5)
        assert stream.usage.session_id == session.id
        texts.append(text)
    assert session.turns == 3
    assert [m["role"] for m in session.transcript] == ["user", "assistant"] * 3
    assert [m["content"] for m in session.transcript[1::2]] == texts
    assert manager.pool.stats() == {"idle": 0, "in_use": 1}  # pinned, not returned
    await manager.sessions.end_session(session.id)
    assert manager.pool.stats()["in_use"] == 0


async def test_host_remembers_the_conversation(start_host, make_manager):
    """The host's prompt token count grows with the remembered history (host-side memory)."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session()
    first, _ = await turn(manager, session.id, "one two three", max_tokens=4)
    second, _ = await turn(manager, session.id, "four five", max_tokens=4)
    assert first.usage.prompt_tokens == 3
    assert second.usage.prompt_tokens == 3 + 4 + 2


async def test_brief_session_inference_generator(start_host, make_manager):
    """InferenceManager.session_inference is the same operation as the session manager's."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session()
    text = "".join([t async for t in manager.session_inference(session.id, "hi there", max_tokens=3)])
    assert text == scripted_text("hi there", 3)


async def test_transcript_is_resent_after_the_socket_breaks(start_host, make_manager):
    """When the pinned socket dies, the next turn opens a new one and resends the history."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session()
    await turn(manager, session.id, "one two three", max_tokens=4)
    await manager.sessions.pinned_socket(session.id).close()  # the host sees a dropped connection
    again, text = await turn(manager, session.id, "four five", max_tokens=4)
    assert text == scripted_text("four five", 4)
    assert again.usage.prompt_tokens == 3 + 4 + 2  # history arrived as messages


async def test_cancelled_turn_keeps_the_pinned_socket(start_host, make_manager):
    """Breaking out of a session turn cancels on the host and keeps the socket for the next turn."""
    host = await start_host(backend=ScriptedBackend(token_rate=200))
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session()
    async with manager.sessions.stream(session.id, "long answer please", max_tokens=1000) as stream:
        async for _ in stream:
            if len(stream.text.split()) >= 2:
                break
    pinned = manager.sessions.pinned_socket(session.id)
    assert pinned is not None and pinned.is_open
    _, text = await turn(manager, session.id, "short", max_tokens=2)
    assert manager.sessions.pinned_socket(session.id) is pinned
    assert text == scripted_text("short", 2)


async def test_unknown_and_ended_sessions_are_session_not_found(start_host, make_manager):
    """Turns on unknown or ended sessions raise SESSION_NOT_FOUND before any I/O."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    with pytest.raises(SessionNotFound):
        manager.sessions.stream("nope", "hello")
    session = await manager.sessions.create_session()
    await manager.sessions.end_session(session.id)
    with pytest.raises(SessionNotFound):
        manager.sessions.stream(session.id, "hello")
    assert manager.sessions.sessions == []


async def test_ending_a_session_cancels_its_streaming_turn_on_the_host(start_host, make_manager, caplog):
    """end_session while a turn streams: the host gets stream_cancel, the turn ends cancelled without
    failing over to the other host, and nothing more is recorded for the session."""
    slow = await start_host(backend=ScriptedBackend(token_rate=50))
    spare = await start_host()
    manager = make_manager([slow.ws_url, spare.ws_url])
    session = await manager.sessions.create_session(host=slow.ws_url)
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    pieces: list[str] = []
    async with manager.sessions.stream(session.id, "a long story", max_tokens=1000) as stream:
        with pytest.raises(Cancelled) as info:
            async for piece in stream:
                pieces.append(piece)
                if len(pieces) == 5:
                    ended = await manager.sessions.end_session(session.id)
                    rows_at_end = len(manager.usage.records)
    assert ended is session and session.ended
    assert stream.finish_reason == "cancelled" and stream.attempts == 1
    text = "".join(pieces)
    assert stream.text == text == info.value.partial_text == scripted_text("a long story", stream.usage.received_tokens)
    host_lines = [r.getMessage() for r in caplog.records if f"request {stream.request_id}:" in r.getMessage()]
    assert len(host_lines) == 1 and "cancelled after" in host_lines[0]  # stream_cancel, on the slow host only
    rows = [r for r in manager.usage.records if r.session_id == session.id]
    assert len(rows) == rows_at_end == 1
    assert rows[0].finish_reason == "cancelled" and rows[0].host == slow.http_url
    assert (session.turns, session.cancelled_turns, session.transcript) == (0, 1, [])
    assert slow.active_streams == 0 and spare.active_streams == 0
    assert manager.pool.stats()["in_use"] == 0


async def test_a_turn_started_after_its_session_ended_does_not_run(start_host, make_manager):
    """A turn created before end_session and started after it raises SESSION_NOT_FOUND, sending nothing."""
    host = await start_host()
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session(host=host.ws_url)
    stream = manager.sessions.stream(session.id, "too late", max_tokens=3)
    await manager.sessions.end_session(session.id)
    with pytest.raises(SessionNotFound):
        async with stream:
            await stream.read()
    assert manager.usage.records == [] and manager.pool.stats() == {"idle": 0, "in_use": 0}


async def test_session_on_a_legacy_host_flattens_the_history(start_host, make_manager):
    """A host without plaintext memory gets the transcript flattened into each prompt."""
    host = await start_host(legacy=True)
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session()
    await turn(manager, session.id, "first question", max_tokens=3)
    _second, text = await turn(manager, session.id, "second question", max_tokens=3)
    # The legacy host keys on the whole (flattened) prompt, so the answer differs from a fresh one.
    flattened = ("User: first question\nAssistant: " + scripted_text("first question", 3)
                 + "\nUser: second question\nAssistant:")
    assert text == scripted_text(flattened, 3)
    assert session.turns == 2


async def test_session_fails_over_mid_answer_and_keeps_the_transcript(start_host, make_manager):
    """A session whose host drops mid-answer continues on another host; history and answer are exact."""
    flaky = await start_host(backend=ScriptedBackend(close_after=6))
    steady = await start_host()
    manager = make_manager([flaky.ws_url, steady.ws_url])
    session = await manager.sessions.create_session(host=flaky.ws_url)
    _, first = await turn(manager, session.id, "first question", max_tokens=4)
    assert first == scripted_text("first question", 4) and session.host.ws_url == flaky.ws_url
    second_stream, second = await turn(manager, session.id, "second question", max_tokens=10)
    assert second == scripted_text("second question", 10)
    assert session.host.ws_url == steady.ws_url
    assert [m["content"] for m in session.transcript] == ["first question", first, "second question", second]
    # The new host got the whole history plus the partial answer as messages.
    assert second_stream.usage.prompt_tokens >= len(("first question " + first + "second question").split())


async def test_oldest_turns_are_trimmed_before_the_context_overflows(start_host, make_manager):
    """With a 60-token window, a long conversation keeps going: old turns leave what is sent, not the transcript."""
    host = await start_host(backend=ScriptedBackend(context_window=60))
    manager = make_manager([host.ws_url])
    session = await manager.sessions.create_session()
    for i in range(8):
        prompt = f"question number {i} about the long history of rivers and seas"
        stream, text = await turn(manager, session.id, prompt, max_tokens=8)
        assert text == scripted_text(prompt, 8)
        assert stream.usage.prompt_tokens + 8 <= 60
    assert session.turns == 8 and len(session.transcript) == 16
    assert session.window_start > 0 and session.context_window == 60
    frame = manager.sessions.to_frame()
    assert list(frame["id"]) == [session.id]
    assert frame.loc[0, "turns"] == 8 and frame.loc[0, "trimmed_turns"] == session.window_start // 2
    assert frame.loc[0, "prompt_tokens"] == session.prompt_tokens > 0


async def test_without_trimming_the_same_conversation_overflows(start_host, make_manager):
    """The scripted host really refuses an over-long history (what trimming avoids)."""
    from fabstir_jupyter.errors import ContextOverflow

    host = await start_host(backend=ScriptedBackend(context_window=60))
    manager = make_manager([host.ws_url])
    long_history = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "reply " * 20}]
    with pytest.raises(ContextOverflow):
        async with manager.stream("and now?", max_tokens=8, messages=long_history) as stream:
            async for _ in stream:
                pass


@pytest.mark.parametrize("paid", [False, True])
async def test_a_session_init_answered_only_by_chatter_times_out(paid):
    """A host that answers session_init with an endless run of frames that are not its ack (pongs,
    unknown frames): the init fails with a timeout after `timeout` seconds in all, plaintext or bound to
    a paid job. (Each frame restarted the wait, so the request never ended.)"""
    import asyncio
    import json

    from websockets.asyncio.server import serve

    from fabstir_jupyter.connections import Channel
    from fabstir_jupyter.errors import InferenceTimeout
    from fabstir_jupyter.paid_connector import JobChannel
    from fabstir_jupyter.transport import WebSocketClient

    inits = []

    async def chatter(ws):
        await ws.send(json.dumps({"type": "connected"}))
        inits.append(json.loads(await ws.recv()))
        while True:
            await ws.send(json.dumps({"type": "heartbeat"}))
            await asyncio.sleep(0.02)

    async with (
        serve(chatter, "127.0.0.1", 0) as server,
        WebSocketClient(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/ws") as socket,
    ):
        channel = JobChannel(socket, bound_session="7", job_id=7, chain_id=1) if paid else Channel(socket)
        with pytest.raises(InferenceTimeout) as info:
            await asyncio.wait_for(channel.open_session("7", request_id=None, timeout=0.3), 10)
    assert "no session_init_ack within 0.3 s" in info.value.message
    assert inits[0]["type"] == "session_init" and (inits[0].get("job_id") == "7") is paid
