"""Tests for fabstir_jupyter.protocol: URLs, frame builders, both parsers, StopMatcher, ResponseReader."""

from __future__ import annotations

import ast
import itertools
import json
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fabstir_jupyter import protocol
from fabstir_jupyter.errors import (
    ContextOverflow,
    FabstirError,
    HostBusy,
    HostError,
    InvalidInput,
    InvalidOptions,
    ModelNotAvailable,
    ProtocolError,
    RateLimitExceeded,
)
from fabstir_jupyter.protocol import (
    Chunk,
    Connected,
    ErrorEvent,
    GenerationRequest,
    InferenceRequest,
    Ping,
    Pong,
    PromptRequest,
    ResponseReader,
    SessionInit,
    SessionInitAck,
    StopMatcher,
    StreamCancel,
    StreamEnd,
    UnknownFrame,
    Usage,
    cancel_frame,
    chunk_frame,
    connected_frame,
    encode,
    end_frame,
    error_frame,
    flatten_messages,
    http_url,
    inference_frame,
    parse_client_frame,
    parse_host_frame,
    ping_frame,
    pong_frame,
    prompt_frame,
    read_greeting,
    read_session_ack,
    request_frame,
    session_init_ack_frame,
    session_init_frame,
    shape_transcript,
    transcript,
    ws_url,
)

HOST_EVENT_TYPES = typing.get_args(protocol.HostEvent)
CLIENT_EVENT_TYPES = typing.get_args(protocol.ClientEvent)


def host(**frame: Any) -> str:
    """Encode a host frame given as keyword fields."""
    return json.dumps(frame)


def feed_all(reader: ResponseReader, events: list[Any]) -> str:
    """Feed events to a reader and return the text it delivered."""
    return "".join(piece for event in events for piece in reader.receive(event))


# --------------------------------------------------------------------------- purity


def test_protocol_module_imports_no_io() -> None:
    """protocol.py stays sans-I/O: it imports only pure standard modules, .errors and .urls."""
    tree = ast.parse(Path(protocol.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "collections.abc", "json", "math", "re", "ipaddress", "dataclasses", "typing",
                        "urllib.parse", ".errors", ".urls"}


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://h:1", "ws://h:1/v1/ws"),
        ("http://h:1/", "ws://h:1/v1/ws"),
        ("https://h:1", "wss://h:1/v1/ws"),
        ("https://example.org", "wss://example.org/v1/ws"),
        ("HTTPS://example.org", "wss://example.org/v1/ws"),
        ("https://example.org/api", "wss://example.org/api/v1/ws"),
        ("http://h:1/v1/ws", "ws://h:1/v1/ws"),
        ("http://h:1?x=1", "ws://h:1/v1/ws?x=1"),
        ("http://[::1]:8080", "ws://[::1]:8080/v1/ws"),
        ("ws://h:1", "ws://h:1/v1/ws"),
        ("ws://h:1/", "ws://h:1/v1/ws"),
        ("wss://h", "wss://h/v1/ws"),
        ("ws://h:1/v1/ws", "ws://h:1/v1/ws"),
        ("ws://h:1/custom/path", "ws://h:1/custom/path"),
        ("h:1", "ws://h:1/v1/ws"),
        ("localhost:8080", "ws://localhost:8080/v1/ws"),
        ("127.0.0.1:9000", "ws://127.0.0.1:9000/v1/ws"),
        ("  http://h:1  ", "ws://h:1/v1/ws"),
        ("http://my_host-2.example.:1", "ws://my_host-2.example.:1/v1/ws"),
        ("http://[fe80::1%25eth0]:1", "ws://[fe80::1%25eth0]:1/v1/ws"),
    ],
)
def test_client_derives_ws_url(url: str, expected: str) -> None:
    """ws_url maps http→ws, https→wss, adds /v1/ws, keeps a ws URL's own path, takes a bare host:port."""
    assert ws_url(url) == expected


@pytest.mark.parametrize(
    "url, expected",
    [
        ("ws://h:1/v1/ws", "http://h:1"),
        ("wss://h/v1/ws", "https://h"),
        ("https://h:2/api", "https://h:2"),
        ("http://h:1", "http://h:1"),
        ("h:1", "http://h:1"),
    ],
)
def test_client_derives_http_url(url: str, expected: str) -> None:
    """http_url gives the scheme and authority only, https for wss."""
    assert http_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["ftp://h:1", "file:///tmp/x", "unix://sock", "gopher://h", "", "   ", "http://", "ws://:1", "h:abc",
     "http://h:99999", None, 123, "url!!", "http://url!!:1", "http://not a url", "ws://h$:1", "http://[::zz]:1",
     "http://[::1"],
)
def test_client_rejects_bad_host_urls(url: Any) -> None:
    """A URL with another scheme, no host or a bad port is InvalidOptions, for both helpers."""
    with pytest.raises(InvalidOptions) as info:
        ws_url(url)
    assert info.value.code == "INVALID_OPTIONS"
    assert info.value.field == "host_url"
    with pytest.raises(InvalidOptions):
        http_url(url)


# --------------------------------------------------------------------------- frame builders


def test_client_inference_frame_has_required_fields_only() -> None:
    """A minimal inference request carries prompt, model, max_tokens, temperature, stream and nothing else."""
    frame = inference_frame(prompt="hi", model="m", max_tokens=8, temperature=0.5)
    assert frame == {
        "type": "inference",
        "request": {"prompt": "hi", "model": "m", "max_tokens": 8, "temperature": 0.5, "stream": True},
    }


def test_client_inference_frame_adds_optional_fields_when_given() -> None:
    """top_p, stop, seed, messages and id appear only when given."""
    messages = [{"role": "user", "content": "hi"}]
    frame = inference_frame(prompt="hi", model="m", max_tokens=8, temperature=0.0, stream=False, top_p=0.5,
                            stop=["\n", "END"], seed=7, messages=messages, request_id="r1")
    assert frame["id"] == "r1"
    assert frame["request"] == {"prompt": "hi", "model": "m", "max_tokens": 8, "temperature": 0.0, "stream": False,
                                "top_p": 0.5, "stop": ["\n", "END"], "seed": 7, "messages": messages}
    assert frame["request"]["messages"][0] is not messages[0]  # copied, not aliased


def test_client_inference_frame_keeps_required_fields_when_empty() -> None:
    """model, prompt and max_tokens are sent even when empty or zero (production hosts drop requests without them)."""
    frame = inference_frame(prompt="", model="", max_tokens=0, temperature=0.0, seed=0, top_p=0.0,
                            messages=[{"role": "user", "content": "x"}])
    request = frame["request"]
    assert request["prompt"] == "" and request["model"] == "" and request["max_tokens"] == 0
    assert request["seed"] == 0 and request["top_p"] == 0.0


def test_client_single_stop_string_is_one_sequence() -> None:
    """stop="END" is sent as ["END"], not split into its characters."""
    frame = inference_frame(prompt="hi", model="m", max_tokens=8, temperature=0.5, stop="END")
    assert frame["request"]["stop"] == ["END"]


def test_client_prompt_frame_carries_full_request() -> None:
    """A session prompt repeats the prompt inside a complete request, session_id as a string."""
    frame = prompt_frame("hi", session_id=42, model="m", max_tokens=4, temperature=1.0, request_id="r2")  # type: ignore[arg-type]
    assert frame == {
        "type": "prompt",
        "prompt": "hi",
        "request": {"prompt": "hi", "model": "m", "max_tokens": 4, "temperature": 1.0, "stream": True},
        "session_id": "42",
        "id": "r2",
    }


def test_client_prompt_frame_without_session_omits_it() -> None:
    """session_id=None leaves the field out."""
    frame = prompt_frame("hi", session_id=None, model="m", max_tokens=4, temperature=1.0)
    assert "session_id" not in frame and "id" not in frame


@pytest.mark.parametrize("session_id", ["s1", 123, 0])
def test_client_session_init_sends_session_id_as_string(session_id: Any) -> None:
    """session_init's session_id is always a JSON string, never a number."""
    frame = session_init_frame(session_id)
    assert frame == {"type": "session_init", "session_id": str(session_id)}
    assert isinstance(json.loads(encode(frame))["session_id"], str)


def test_client_session_init_optional_fields() -> None:
    """job_id, chain_id and id appear only when given."""
    frame = session_init_frame("s", job_id=42, chain_id=84532, request_id="r")
    assert frame == {"type": "session_init", "session_id": "s", "job_id": 42, "chain_id": 84532, "id": "r"}


def test_client_cancel_and_ping_frames() -> None:
    """stream_cancel carries session_id (as a string) and reason only when given; ping is bare."""
    assert cancel_frame() == {"type": "stream_cancel"}
    assert cancel_frame(7, "stop sequence") == {"type": "stream_cancel", "session_id": "7", "reason": "stop sequence"}  # type: ignore[arg-type]
    assert ping_frame() == {"type": "ping"}


def test_encode_is_compact_utf8_json() -> None:
    """encode writes compact JSON and keeps non-ASCII text as is."""
    text = encode({"type": "prompt", "prompt": "héllo 世界"})
    assert text == '{"type":"prompt","prompt":"héllo 世界"}'


def test_client_transcript_puts_system_first_and_flattening_ends_open() -> None:
    """The transcript puts the system prompt first and the prompt last; flattening ends open."""
    messages = transcript("and now?", [("user", "hi"), ("assistant", "hello")], "be brief")
    assert [role for role, _ in messages] == ["system", "user", "assistant", "user"]
    flat = flatten_messages(messages)
    assert flat.startswith("System: be brief\n") and flat.endswith("User: and now?\nAssistant:")
    prefill = flatten_messages((*messages, ("assistant", "Well")))
    assert prefill.endswith("Assistant: Well")


def test_client_shapes_the_transcript_for_what_the_host_supports() -> None:
    """chat-messages hosts get the messages and the last user turn as the prompt; others get it
    flattened; a prefill needs assistant-prefill too, else it is flattened into an open turn."""
    messages = transcript("next?", [("user", "hi"), ("assistant", "hello")])
    assert shape_transcript(messages, {"chat-messages"}) == ("next?", messages)
    assert shape_transcript(messages, ()) == (flatten_messages(messages), ())
    prompt, sent = shape_transcript(messages, {"chat-messages"}, prefill="Part")
    assert sent == () and prompt.endswith("User: next?\nAssistant: Part")
    prompt, sent = shape_transcript(messages, {"chat-messages", "assistant-prefill"}, prefill="Part")
    assert prompt == "next?" and sent[-1] == ("assistant", "Part")


def test_client_request_object_becomes_either_frame_in_one_place() -> None:
    """request_frame makes an inference without a session id and a prompt with one, from the same
    request object; both parse back to that object on the host."""
    request = GenerationRequest(prompt="hi", model="m", max_tokens=4, temperature=0.5, stop=("END",),
                                messages=(("user", "hi"),))
    inference = parse_client_frame(encode(request_frame(request, request_id="r1")))
    prompt = parse_client_frame(encode(request_frame(request, session_id="s", request_id="r2")))
    assert inference == InferenceRequest(request=request, id="r1")
    assert prompt == PromptRequest(request=request, session_id="s", id="r2")
    assert request_frame(request, session_id="s")["prompt"] == "hi"


def test_client_frames_parse_back_on_the_host() -> None:
    """What the client builds, the host parser reads back field for field."""
    frame = inference_frame(prompt="hi", model="m", max_tokens=8, temperature=0.5, top_p=0.9, stop=["END"], seed=3,
                            messages=[{"role": "system", "content": "be brief"}], request_id="r1")
    event = parse_client_frame(encode(frame))
    assert event == InferenceRequest(
        request=GenerationRequest(prompt="hi", model="m", max_tokens=8, temperature=0.5, stream=True, top_p=0.9,
                                  stop=("END",), seed=3, messages=(("system", "be brief"),)),
        id="r1",
    )
    prompt = parse_client_frame(encode(prompt_frame("yo", session_id="s", model="m", max_tokens=2, temperature=0)))
    assert isinstance(prompt, PromptRequest) and prompt.session_id == "s" and prompt.request.prompt == "yo"
    assert parse_client_frame(encode(session_init_frame(5, job_id="9"))) == SessionInit(session_id="5", job_id="9")
    assert parse_client_frame(encode(cancel_frame("s", "user"))) == StreamCancel(session_id="s", reason="user")
    assert parse_client_frame(encode(ping_frame())) == Ping()


def test_host_frames_parse_back_on_the_client() -> None:
    """What the reference host builds, the client parser reads back."""
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, context_window_size=2048)
    assert parse_host_frame(encode(connected_frame("hello"))) == Connected(message="hello")
    assert parse_host_frame(encode(session_init_ack_frame("s", job_id="1", chain_id=2, request_id="r"))) == \
        SessionInitAck(session_id="s", status="success", message="session initialised", id="r")
    assert parse_host_frame(encode(chunk_frame("hi", tokens=1, request_id="r"))) == Chunk("hi", 1, id="r")
    assert parse_host_frame(encode(end_frame(reason="complete", finish_reason="stop", usage=usage, request_id="r"))) \
        == StreamEnd(reason="complete", tokens_used=2, finish_reason="stop", usage=usage, id="r")
    assert parse_host_frame(encode(error_frame("HOST_BUSY", "busy", request_id="r"))) == \
        ErrorEvent(code="HOST_BUSY", message="busy", id="r")
    assert parse_host_frame(encode(pong_frame())) == Pong()


# --------------------------------------------------------------------------- parse_host_frame


def test_client_parses_connected() -> None:
    """connected gives its message."""
    assert parse_host_frame(host(type="connected", message="welcome")) == Connected(message="welcome")
    assert parse_host_frame(host(type="connected")) == Connected(message="")


def test_client_parses_session_init_ack() -> None:
    """session_init_ack gives session id, status, message and id (numbers become strings)."""
    event = parse_host_frame(host(type="session_init_ack", status="success", session_id=12, job_id=1, chain_id=2,
                                  message="ok", id="r"))
    assert event == SessionInitAck(session_id="12", status="success", message="ok", id="r")


def test_client_parses_stream_chunk() -> None:
    """stream_chunk gives content, tokens, finish_reason and id."""
    event = parse_host_frame(host(type="stream_chunk", content="Hel", tokens=1, finish_reason="stop", id="r"))
    assert event == Chunk(content="Hel", tokens=1, finish_reason="stop", id="r")


def test_client_parses_production_terminal_chunk() -> None:
    """The production terminal chunk (content "", tokens 0) parses to an empty Chunk."""
    assert parse_host_frame(host(type="stream_chunk", content="", tokens=0)) == Chunk(content="", tokens=0)


def test_client_defaults_chunk_token_count() -> None:
    """A chunk without tokens counts 1 if it has text, 0 if empty; an integral float count is accepted."""
    assert parse_host_frame(host(type="stream_chunk", content="x")).tokens == 1  # type: ignore[union-attr]
    assert parse_host_frame(host(type="stream_chunk")).tokens == 0  # type: ignore[union-attr]
    assert parse_host_frame(host(type="stream_chunk", content="x", tokens=2.0)).tokens == 2  # type: ignore[union-attr]


def test_client_parses_stream_end_with_usage() -> None:
    """stream_end gives reason, tokens_used, finish_reason and usage."""
    event = parse_host_frame(host(type="stream_end", reason="complete", tokens_used=5, finish_reason="length",
                                  usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                                         "context_window_size": 2048}, id="r"))
    assert event == StreamEnd(reason="complete", tokens_used=5, finish_reason="length",
                              usage=Usage(3, 5, 8, 2048), id="r")


def test_client_parses_stream_end_without_usage() -> None:
    """A production stream_end without usage or finish_reason leaves both None."""
    event = parse_host_frame(host(type="stream_end", reason="complete", tokens_used=0))
    assert event == StreamEnd(reason="complete", tokens_used=0, finish_reason=None, usage=None)
    assert parse_host_frame(host(type="stream_end")) == StreamEnd()


@pytest.mark.parametrize(
    "frame, expected",
    [
        ({"type": "error", "code": "RATE_LIMIT_EXCEEDED", "message": "slow down", "id": "r"},
         ErrorEvent("RATE_LIMIT_EXCEEDED", "slow down", "r")),
        ({"type": "error", "error": "model crashed"}, ErrorEvent("HOST_ERROR", "model crashed")),
        ({"type": "error", "error": {"code": "MODEL_NOT_AVAILABLE", "message": "no such model"}},
         ErrorEvent("MODEL_NOT_AVAILABLE", "no such model")),
        (error_frame("HOST_BUSY", "busy", request_id="r"), ErrorEvent("HOST_BUSY", "busy", "r")),
        ({"type": "error", "error": {"code": "HOST_BUSY"}, "message": "outer text"},
         ErrorEvent("HOST_BUSY", "outer text")),
        ({"type": "error", "code": 500, "message": "oops"}, ErrorEvent("HOST_ERROR", "oops")),
        ({"type": "error", "code": "X", "message": 42}, ErrorEvent("X", "42")),
    ],
    ids=["coded", "bare", "nested", "reference", "nested-code-flat-message", "numeric-code", "numeric-message"],
)
def test_client_normalises_every_error_shape(frame: dict[str, Any], expected: ErrorEvent) -> None:
    """Coded, bare and nested error frames all become a coded ErrorEvent."""
    assert parse_host_frame(json.dumps(frame)) == expected


def test_client_error_without_text_still_has_a_message() -> None:
    """An error frame with nothing in it gets HOST_ERROR and a non-empty message."""
    event = parse_host_frame(host(type="error"))
    assert isinstance(event, ErrorEvent)
    assert event.code == "HOST_ERROR" and event.message


@pytest.mark.parametrize(
    "frame, cls",
    [
        ({"type": "error", "code": "RATE_LIMIT_EXCEEDED", "message": "m"}, RateLimitExceeded),
        ({"type": "error", "error": {"code": "MODEL_NOT_AVAILABLE", "message": "m"}}, ModelNotAvailable),
        ({"type": "error", "error": "m"}, HostError),
        (error_frame("HOST_BUSY", "m"), HostBusy),
        ({"type": "error", "code": "CONTEXT_OVERFLOW", "message": "m"}, ContextOverflow),
    ],
)
def test_client_error_event_builds_mapped_exception(frame: dict[str, Any], cls: type[FabstirError]) -> None:
    """ErrorEvent.error is the class ERROR_CODES maps the code to."""
    event = parse_host_frame(json.dumps(frame))
    assert isinstance(event, ErrorEvent)
    assert type(event.error) is cls and event.error.message == "m"


def test_client_maps_the_production_token_limit_error_to_context_overflow() -> None:
    """A newer production node's TOKEN_LIMIT_EXCEEDED (with prompt_tokens and context_window_size)
    is CONTEXT_OVERFLOW, and the message keeps both numbers."""
    frame = {"type": "error", "code": "TOKEN_LIMIT_EXCEEDED", "message": "Prompt exceeds context window",
             "prompt_tokens": 33500, "context_window_size": 32768}
    event = parse_host_frame(json.dumps(frame))
    assert isinstance(event, ErrorEvent) and event.code == "CONTEXT_OVERFLOW"
    error = event.error
    assert type(error) is ContextOverflow and not error.retryable
    assert error.message == "Prompt exceeds context window (33500 prompt tokens, context window 32768)"


@pytest.mark.parametrize("text, retry_after", [
    ("Rate limit exceeded, retry after 60 seconds", 60.0),
    ("rate limit exceeded, retry after 2.5s", 2.5),
    ("Rate limit exceeded", None),
])
def test_client_reads_the_uncoded_production_rate_limit(text: str, retry_after: float | None) -> None:
    """The production node's uncoded {"error": "Rate limit exceeded, retry after 60 seconds"} is
    RATE_LIMIT_EXCEEDED with its retry_after, so backoff waits as asked."""
    event = parse_host_frame(json.dumps({"type": "error", "error": text}))
    assert isinstance(event, ErrorEvent) and event.code == "RATE_LIMIT_EXCEEDED"
    error = event.error
    assert type(error) is RateLimitExceeded and error.retry_after == retry_after and error.message == text


def test_client_reads_the_greeting_and_the_session_ack() -> None:
    """read_greeting takes only 'connected' (an error frame raises its own code); read_session_ack
    skips late greetings, pongs and unknown frames, returns the ack, and raises on anything else."""
    assert read_greeting(Connected("hi")) == Connected("hi")
    with pytest.raises(HostBusy):
        read_greeting(ErrorEvent("HOST_BUSY", "full"))
    with pytest.raises(ProtocolError, match="expected a 'connected' greeting, got Chunk"):
        read_greeting(Chunk("x"))
    assert [read_session_ack(e) for e in (Connected(), Pong(), UnknownFrame("x"))] == [None, None, None]
    assert read_session_ack(SessionInitAck(session_id="s")) == SessionInitAck(session_id="s")
    with pytest.raises(HostError):
        read_session_ack(ErrorEvent("HOST_ERROR", "no sessions here"))
    with pytest.raises(ProtocolError, match="expected session_init_ack, got StreamEnd"):
        read_session_ack(StreamEnd())


def test_client_parses_pong() -> None:
    """pong parses to Pong."""
    assert parse_host_frame(host(type="pong")) == Pong()


def test_client_keeps_unknown_types_as_unknown_frame() -> None:
    """A well-formed frame of an unknown type is an UnknownFrame carrying its data."""
    event = parse_host_frame(host(type="encrypted_chunk", payload={"x": 1}))
    assert event == UnknownFrame(type="encrypted_chunk", data={"type": "encrypted_chunk", "payload": {"x": 1}})


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "stream_chunk", "content": 5},
        {"type": "stream_chunk", "content": None},
        {"type": "stream_chunk", "content": ["a"]},
        {"type": "stream_chunk", "content": "a", "tokens": "1"},
        {"type": "stream_chunk", "content": "a", "tokens": True},
        {"type": "stream_chunk", "content": "a", "tokens": -1},
        {"type": "stream_chunk", "content": "a", "tokens": 1.5},
        {"type": "stream_chunk", "content": "a", "id": ["r"]},
        {"type": "stream_chunk", "content": "a", "finish_reason": {"x": 1}},
        {"type": "stream_end", "tokens_used": "5"},
        {"type": "stream_end", "tokens_used": float("inf")},
        {"type": "stream_end", "tokens_used": float("nan")},
        {"type": "stream_end", "reason": ["complete"]},
        {"type": "stream_end", "usage": [1, 2, 3]},
        {"type": "stream_end", "usage": "none"},
        {"type": "stream_end", "usage": {"prompt_tokens": "3"}},
        {"type": "stream_end", "usage": {"completion_tokens": -1}},
        {"type": "stream_end", "usage": {"context_window_size": False}},
        {"type": "connected", "message": ["hi"]},
        {"type": "session_init_ack", "session_id": {"s": 1}},
        {"type": "error", "code": "X", "id": {"r": 1}},
    ],
)
def test_client_rejects_wrong_field_types(frame: dict[str, Any]) -> None:
    """A known frame type with a field of the wrong type is a ProtocolError."""
    with pytest.raises(ProtocolError) as info:
        parse_host_frame(json.dumps(frame))
    assert info.value.code == "PROTOCOL_ERROR"


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"pong"}',
        bytearray(b'{"type":"pong"}'),
        memoryview(b'{"type":"pong"}'),
        "",
        "not json",
        '{"type":"pong"',
        "[]",
        "1",
        '"pong"',
        "null",
        "{}",
        '{"type":5}',
        '{"type":null}',
        '{"type":["pong"]}',
        "[" * 100_000 + "]" * 100_000,
        '{"type":"stream_chunk","content":' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"type":"stream_end","tokens_used":' + "9" * 5000 + "}",
    ],
    ids=lambda d: repr(d)[:30],
)
def test_client_rejects_frames_it_cannot_interpret(data: Any) -> None:
    """Binary, non-JSON, non-object, typeless, too deep or oversized-number frames are ProtocolErrors."""
    with pytest.raises(ProtocolError):
        parse_host_frame(data)


# --------------------------------------------------------------------------- StopMatcher


def test_stop_matcher_cuts_within_one_chunk() -> None:
    """A stop inside one chunk cuts the text before it; the stop and the rest are dropped."""
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello END world") == "hello "
    assert matcher.matched == "END"
    assert matcher.feed("more") == ""
    assert matcher.flush() == ""


def test_stop_matcher_earliest_of_several_stops_wins() -> None:
    """With several stops, the one that occurs first in the text cuts it."""
    matcher = StopMatcher(["zzz", "\n", "END"])
    assert matcher.feed("a END b\nc") == "a "
    assert matcher.matched == "END"


def test_stop_matcher_match_spans_two_chunks() -> None:
    """A stop split over two chunks is held back, then cut."""
    matcher = StopMatcher(["END"])
    assert matcher.feed("Hello EN") == "Hello "
    assert matcher.matched is None
    assert matcher.feed("D tail") == ""
    assert matcher.matched == "END"


def test_stop_matcher_match_spans_three_chunks() -> None:
    """A stop split over three chunks is held back across all of them."""
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("abc<|") == "abc"
    assert matcher.feed("en") == ""
    assert matcher.feed("d|>xyz") == ""
    assert matcher.matched == "<|end|>"
    assert matcher.flush() == ""


def test_stop_matcher_stop_at_very_start() -> None:
    """A stop at the start of the stream yields nothing at all."""
    matcher = StopMatcher(["END"])
    assert matcher.feed("END and more") == ""
    assert matcher.matched == "END"


def test_stop_matcher_releases_a_prefix_that_does_not_match() -> None:
    """Held-back text that turns out not to start a stop is released with the next chunk."""
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == "abc"
    assert matcher.feed("Nx") == "ENx"
    assert matcher.matched is None


def test_stop_matcher_flush_returns_held_text() -> None:
    """At the end of the stream, flush returns what was held back."""
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == "the "
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_stop_matcher_without_stops_passes_text_through() -> None:
    """No stops (or only empty ones) means every chunk passes through at once."""
    matcher = StopMatcher(["", ""])
    assert matcher.stops == ()
    assert matcher.feed("abc") == "abc"
    assert matcher.flush() == ""


def test_stop_matcher_waits_for_a_longer_stop_that_starts_earlier() -> None:
    """A short stop's match does not cut while a longer stop starting before it may still complete."""
    matcher = StopMatcher(["abc", "b"])
    assert matcher.feed("xab") == "x"
    assert matcher.feed("c") == ""
    assert matcher.matched == "abc"
    other = StopMatcher(["abc", "b"])
    assert other.feed("xab") == "x"
    assert other.feed("d") == "a"
    assert other.matched == "b"


def test_stop_matcher_flush_cuts_at_a_stop_in_held_text() -> None:
    """Held text that holds a complete stop is cut at it on flush."""
    matcher = StopMatcher(["abc", "b"])
    assert matcher.feed("ab") == ""
    assert matcher.flush() == "a"
    assert matcher.matched == "b"


def _expected_cut(text: str, stops: list[str]) -> int | None:
    """Where the text is cut: the first occurrence of the earliest stop, or None."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


@st.composite
def _split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


_STOP_ALPHABET = "ab\n"
_texts = st.one_of(st.text(alphabet=_STOP_ALPHABET, max_size=40), st.text(max_size=40))


@settings(max_examples=1500, deadline=None)
@given(data=st.data(), text=_texts, stops=st.lists(st.text(alphabet=_STOP_ALPHABET, max_size=5), max_size=4))
def test_stop_matcher_output_equals_text_cut_at_earliest_stop(data: st.DataObject, text: str,
                                                              stops: list[str]) -> None:
    """For any text, split and stop list, the fed-out text is the text cut before the earliest stop."""
    chunks = data.draw(_split(text))
    matcher = StopMatcher(stops)
    longest = max((len(s) for s in stops), default=0)
    out, consumed = "", 0
    for chunk in chunks:
        out += matcher.feed(chunk)
        consumed += len(chunk)
        if matcher.matched is None:
            # Never holds back more than len(longest stop) - 1 characters.
            assert consumed - len(out) <= max(longest - 1, 0)
    out += matcher.flush()
    cut = _expected_cut(text, stops)
    if cut is None:
        assert out == text
        assert matcher.matched is None
    else:
        assert out == text[:cut]
        assert matcher.matched is not None and text[cut:].startswith(matcher.matched)


# --------------------------------------------------------------------------- ResponseReader


def test_reader_streams_a_normal_answer() -> None:
    """Chunks are delivered in order; stream_end's usage and finish_reason are taken."""
    reader = ResponseReader(request_id="r", max_tokens=10)
    usage = Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6)
    text = feed_all(reader, [Connected("hi"), Chunk("Hel", 1, id="r"), Chunk("lo", 1, id="r"), Chunk("", 0, id="r"),
                             StreamEnd("complete", 2, "stop", usage, id="r")])
    assert text == "Hello"
    assert reader.done and reader.end_seen and not reader.cancel_needed
    assert reader.finish_reason == "stop"
    assert reader.usage == usage
    assert (reader.received_tokens, reader.host_tokens, reader.received_chars) == (2, 2, 5)


def test_reader_does_not_yield_the_terminal_empty_chunk() -> None:
    """The production terminal chunk delivers nothing and does not end the response."""
    reader = ResponseReader(max_tokens=10)
    assert reader.receive(Chunk("", 0)) == []
    assert not reader.done
    assert reader.received_tokens == 0


def test_reader_takes_finish_reason_from_terminal_chunk() -> None:
    """A finish_reason on the terminal chunk is kept when stream_end has none."""
    reader = ResponseReader(max_tokens=10)
    feed_all(reader, [Chunk("a", 1), Chunk("", 0, finish_reason="length"), StreamEnd("complete", 1)])
    assert reader.finish_reason == "length"


def test_reader_ignores_control_events() -> None:
    """connected, pong, session_init_ack and unknown frames deliver nothing and change nothing."""
    reader = ResponseReader(max_tokens=10)
    for event in (Connected("x"), Pong(), SessionInitAck("s"), UnknownFrame("encrypted_chunk", {})):
        assert reader.receive(event) == []
    assert not reader.done


def test_reader_turns_error_chunk_into_host_error() -> None:
    """For a host without coded-errors, a chunk starting "Error: " raises HostError with the host's text."""
    reader = ResponseReader(max_tokens=10)
    assert reader.receive(Chunk("ok ", 1)) == ["ok "]
    with pytest.raises(HostError) as info:
        reader.receive(Chunk("Error: CUDA out of memory", 1))
    assert info.value.message == "CUDA out of memory"
    assert reader.done
    assert reader.receive(StreamEnd("complete", 2)) == []  # the following stream_end is absorbed


def test_reader_keeps_error_text_as_text_for_coded_error_hosts() -> None:
    """For a host declaring coded-errors, an answer starting "Error: " is plain text."""
    reader = ResponseReader(features=["coded-errors", "usage-always"], max_tokens=10)
    frames = [Chunk("Error: ", 1), Chunk("is a word", 1), StreamEnd("complete", 2, "stop", Usage(1, 2, 3))]
    text = feed_all(reader, frames)
    assert text == "Error: is a word"
    assert reader.finish_reason == "stop"


def test_reader_reports_empty_stream_as_context_overflow() -> None:
    """0 tokens and no usage after a non-empty prompt is a probable context overflow."""
    reader = ResponseReader(max_tokens=10)
    assert reader.receive(Chunk("", 0)) == []
    with pytest.raises(ContextOverflow):
        reader.receive(StreamEnd("complete", 0))
    assert reader.done and reader.end_seen


@pytest.mark.parametrize(
    "kwargs, end",
    [
        ({"features": ["usage-always"]}, StreamEnd("complete", 0)),
        ({"prompt_nonempty": False}, StreamEnd("complete", 0)),
        ({}, StreamEnd("complete", 0, "stop", Usage(5, 0, 5))),
        ({}, StreamEnd("cancelled", 0)),
    ],
    ids=["usage-always", "empty-prompt", "usage-given", "cancelled"],
)
def test_reader_does_not_guess_overflow_otherwise(kwargs: dict[str, Any], end: StreamEnd) -> None:
    """No ContextOverflow for usage-always hosts, empty prompts, a stream_end with usage, or a cancel."""
    reader = ResponseReader(max_tokens=10, **kwargs)
    assert reader.receive(end) == []
    assert reader.done
    assert reader.finish_reason in ("stop", "cancelled")


@pytest.mark.parametrize("chunks, expected", [(3, "stop"), (5, "length"), (6, "length")])
def test_reader_infers_finish_reason_without_usage(chunks: int, expected: str) -> None:
    """Without finish_reason, the end is "length" if the host used max_tokens, else "stop"."""
    reader = ResponseReader(max_tokens=5)
    feed_all(reader, [Chunk("x", 1) for _ in range(min(chunks, 5))])
    reader.receive(StreamEnd("complete", chunks))
    assert reader.finish_reason == expected
    assert reader.usage is None


def test_reader_reports_cancelled_end() -> None:
    """stream_end(reason="cancelled") finishes with "cancelled"."""
    reader = ResponseReader(max_tokens=5)
    feed_all(reader, [Chunk("x", 1), StreamEnd("cancelled", 1, "stop")])
    assert reader.finish_reason == "cancelled"


def test_reader_raises_on_error_end_without_error_frame() -> None:
    """stream_end(reason="error") with no error frame before it raises HostError."""
    reader = ResponseReader(max_tokens=5)
    with pytest.raises(HostError):
        reader.receive(StreamEnd("error", 0))


@pytest.mark.parametrize(
    "frame, cls, code",
    [
        ({"type": "error", "code": "RATE_LIMIT_EXCEEDED", "message": "slow"}, RateLimitExceeded, "RATE_LIMIT_EXCEEDED"),
        ({"type": "error", "error": "model crashed"}, HostError, "HOST_ERROR"),
        ({"type": "error", "error": {"code": "MODEL_NOT_AVAILABLE", "message": "no"}}, ModelNotAvailable,
         "MODEL_NOT_AVAILABLE"),
        (error_frame("HOST_BUSY", "busy", request_id="r"), HostBusy, "HOST_BUSY"),
        ({"type": "error", "code": "GPU_ON_FIRE", "message": "hot"}, HostError, "GPU_ON_FIRE"),
    ],
    ids=["coded", "bare", "nested", "reference", "unknown-code"],
)
def test_reader_raises_mapped_error_for_error_events(frame: dict[str, Any], cls: type[FabstirError],
                                                     code: str) -> None:
    """An error event in any shape raises its mapped class, and the later stream_end is absorbed."""
    reader = ResponseReader(request_id="r", max_tokens=5)
    reader.receive(Chunk("a", 1, id="r"))
    with pytest.raises(cls) as info:
        reader.receive(parse_host_frame(json.dumps(frame)))
    assert info.value.code == code
    assert reader.done
    assert reader.receive(StreamEnd("error", 1, id="r")) == []


@pytest.mark.parametrize(
    "event",
    [Chunk("a", 1, id="other"), StreamEnd("complete", 1, id="other"), ErrorEvent("HOST_BUSY", "busy", id="other")],
    ids=["chunk", "stream_end", "error"],
)
def test_reader_rejects_events_for_another_request(event: Any) -> None:
    """An event whose id is not the request's is a ProtocolError."""
    reader = ResponseReader(request_id="mine", max_tokens=5)
    with pytest.raises(ProtocolError):
        reader.receive(event)


def test_reader_accepts_events_without_id() -> None:
    """Production hosts may leave id out: events without one are taken."""
    reader = ResponseReader(request_id="mine", max_tokens=5)
    assert feed_all(reader, [Chunk("a", 1), StreamEnd("complete", 1, "stop", Usage(1, 1, 2))]) == "a"


def test_reader_enforces_client_max_tokens() -> None:
    """Past the client's max_tokens the reader stops: done, cancel needed, "length", extra chunk dropped."""
    reader = ResponseReader(max_tokens=2)
    assert reader.receive(Chunk("a", 1)) == ["a"]
    assert reader.receive(Chunk("b", 1)) == ["b"]
    assert not reader.done
    assert reader.receive(Chunk("c", 1)) == []
    assert reader.done and reader.cancel_needed and not reader.end_seen
    assert reader.finish_reason == "length"
    assert reader.receive(Chunk("d", 1)) == []
    assert reader.receive(StreamEnd("cancelled", 4, "cancelled")) == []
    assert reader.end_seen
    assert reader.finish_reason == "length"
    assert (reader.received_tokens, reader.host_tokens) == (2, 4)


def test_reader_delivers_held_text_when_max_tokens_stops_it() -> None:
    """Text held back for a possible stop is delivered when max_tokens ends the answer."""
    reader = ResponseReader(stop_sequences=["XYZ"], max_tokens=2)
    assert reader.receive(Chunk("ab", 1)) == ["ab"]
    assert reader.receive(Chunk("cX", 1)) == ["c"]
    assert reader.receive(Chunk("YZ", 1)) == ["X"]
    assert reader.finish_reason == "length" and reader.cancel_needed
    assert reader.received_chars == 4


def test_reader_cuts_at_stop_across_chunks() -> None:
    """A stop spanning chunks cuts the text, asks for a cancel and reports "stop"."""
    reader = ResponseReader(stop_sequences=["\n\n", "END"], max_tokens=50)
    text = feed_all(reader, [Chunk("Hello E", 1), Chunk("N", 1), Chunk("D world", 1)])
    assert text == "Hello "
    assert reader.done and reader.cancel_needed
    assert reader.finish_reason == "stop"


def test_reader_flushes_held_text_at_stream_end() -> None:
    """Text held back for a stop that never completes is delivered at stream_end."""
    reader = ResponseReader(stop_sequences=["END"], max_tokens=50)
    assert feed_all(reader, [Chunk("the E", 1)]) == "the "
    assert reader.receive(StreamEnd("complete", 1, "stop", Usage(1, 1, 2))) == ["E"]
    assert reader.finish_reason == "stop" and not reader.cancel_needed


def test_reader_cuts_tail_that_completes_a_stop_at_stream_end() -> None:
    """Held text that holds a shorter stop is cut at it when the stream ends, and the finish is "stop"."""
    reader = ResponseReader(stop_sequences=["abc", "b"], max_tokens=50)
    assert reader.receive(Chunk("xab", 1)) == ["x"]
    assert reader.receive(StreamEnd("complete", 1, "length", Usage(1, 1, 2))) == ["a"]
    assert reader.finish_reason == "stop" and not reader.cancel_needed


def test_reader_discards_events_after_done() -> None:
    """After the reader stopped, chunks and errors are discarded; stream_end still records usage."""
    reader = ResponseReader(stop_sequences=["."], max_tokens=50)
    assert feed_all(reader, [Chunk("One.", 1)]) == "One"
    assert reader.done
    assert reader.receive(Chunk(" Two.", 1)) == []
    assert reader.receive(ErrorEvent("HOST_ERROR", "late")) == []
    usage = Usage(3, 9, 12)
    assert reader.receive(StreamEnd("cancelled", 9, "cancelled", usage)) == []
    assert reader.usage == usage and reader.finish_reason == "stop"


def test_reader_keeps_host_and_received_tokens_apart() -> None:
    """received_tokens counts what the caller got; host_tokens what the host generated (and bills)."""
    reader = ResponseReader(stop_sequences=["STOP"], max_tokens=100)
    feed_all(reader, [Chunk("a", 1), Chunk("bSTOP", 2), Chunk("c", 1), Chunk("d", 1)])
    assert reader.received_tokens == 3
    reader.receive(StreamEnd("cancelled", 10, "cancelled", Usage(5, 10, 15)))
    assert reader.host_tokens == 10
    assert reader.received_tokens == 3
    assert reader.usage is not None and reader.usage.completion_tokens == 10


# --------------------------------------------------------------------------- parse_client_frame


def test_host_parses_inference() -> None:
    """inference gives a typed GenerationRequest; a numeric id becomes a string."""
    event = parse_client_frame(json.dumps({
        "type": "inference", "id": 7,
        "request": {"prompt": "hi", "model": "m", "max_tokens": 8.0, "temperature": 1, "stream": False,
                    "top_p": 0.5, "stop": "END", "seed": 3},
    }))
    assert event == InferenceRequest(
        request=GenerationRequest(prompt="hi", model="m", max_tokens=8, temperature=1.0, stream=False, top_p=0.5,
                                  stop=("END",), seed=3),
        id="7",
    )
    assert isinstance(event.request.max_tokens, int) and isinstance(event.request.temperature, float)


def test_host_parses_inference_with_messages_and_empty_prompt() -> None:
    """A request with messages may have an empty prompt (the messages replace it)."""
    event = parse_client_frame(json.dumps({
        "type": "inference",
        "request": {"model": "m", "prompt": "", "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "He"}]},
    }))
    assert isinstance(event, InferenceRequest)
    assert event.request.prompt == ""
    assert event.request.messages == (("user", "hi"), ("assistant", "He"))


@pytest.mark.parametrize("missing", ["model", "prompt", "max_tokens"])
@pytest.mark.parametrize("kind", ["inference", "prompt"])
def test_host_rejects_request_without_a_field_production_needs(kind: str, missing: str) -> None:
    """A request without model, prompt or max_tokens (or with null) is INVALID_OPTIONS naming the field."""
    body = {"model": "m", "prompt": "hi", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for absent in (None, "null"):
        request = {k: v for k, v in body.items() if k != missing}
        if absent == "null":
            request[missing] = None
        with pytest.raises(InvalidOptions) as info:
            parse_client_frame(json.dumps({"type": kind, "prompt": "outer", "request": request}))
        assert info.value.field == missing and f"'{missing}'" in info.value.message


def test_host_keeps_empty_prompt_and_model_for_the_host_to_judge() -> None:
    """An empty prompt or model parses: the host answers it (production does too, with an error)."""
    event = parse_client_frame(_inference(prompt="", model=""))
    assert isinstance(event, InferenceRequest)
    assert event.request.prompt == "" and event.request.model == ""


def test_host_reads_a_prompt_frame_without_request_from_its_top_level() -> None:
    """Without request, prompt/model/max_tokens/temperature/stream come from the frame, as production reads them."""
    event = parse_client_frame(json.dumps({"type": "prompt", "prompt": "p", "model": "m", "max_tokens": 3,
                                           "temperature": 0.5, "stream": False, "top_p": 0.1}))
    assert isinstance(event, PromptRequest)
    assert event.request == GenerationRequest(prompt="p", model="m", max_tokens=3, temperature=0.5, stream=False)
    bare = parse_client_frame(json.dumps({"type": "prompt", "session_id": "s"}))
    assert isinstance(bare, PromptRequest) and bare.request.prompt == "" and bare.request.model is None


def test_host_parses_prompt_with_camel_case_session_id() -> None:
    """prompt takes sessionId as session_id, and the top-level prompt when there is no request."""
    event = parse_client_frame(json.dumps({"type": "prompt", "prompt": "hi", "sessionId": 12}))
    assert event == PromptRequest(request=GenerationRequest(prompt="hi", model=None, max_tokens=None,
                                                            temperature=None), session_id="12")


def test_host_prefers_request_prompt_in_prompt_frame() -> None:
    """The request's prompt wins over the top-level one; snake_case wins over camelCase."""
    event = parse_client_frame(json.dumps({"type": "prompt", "prompt": "outer", "session_id": "a", "sessionId": "b",
                                           "request": {"prompt": "inner", "model": "m", "max_tokens": 2}}))
    assert isinstance(event, PromptRequest)
    assert event.request.prompt == "inner" and event.session_id == "a"


def test_host_parses_session_init_with_camel_case_aliases() -> None:
    """session_init accepts sessionId, jobId and chainId; ids become strings."""
    event = parse_client_frame(json.dumps({"type": "session_init", "sessionId": 5, "jobId": 42, "chainId": 84532,
                                           "id": "r"}))
    assert event == SessionInit(session_id="5", job_id="42", chain_id=84532, id="r")
    snake = parse_client_frame(json.dumps({"type": "session_init", "session_id": "s", "job_id": "42", "chain_id": 1}))
    assert snake == SessionInit(session_id="s", job_id="42", chain_id=1)


def test_host_parses_stream_cancel() -> None:
    """stream_cancel takes session_id or sessionId; a non-string reason is dropped."""
    assert parse_client_frame(json.dumps({"type": "stream_cancel", "sessionId": "s", "reason": "user"})) == \
        StreamCancel(session_id="s", reason="user")
    assert parse_client_frame(json.dumps({"type": "stream_cancel", "reason": 5})) == StreamCancel()


def test_host_parses_ping() -> None:
    """ping parses to Ping, extra fields ignored."""
    assert parse_client_frame(json.dumps({"type": "ping", "x": 1})) == Ping()


def _inference(**request: Any) -> str:
    return json.dumps({"type": "inference", "request": {"prompt": "hi", "model": "m", "max_tokens": 4, **request}})


def _nested(depth: int) -> str:
    return '{"type":"inference","request":' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize(
    "data, code",
    [
        (b'{"type":"ping"}', "PROTOCOL_ERROR"),
        (bytearray(b'{"type":"ping"}'), "PROTOCOL_ERROR"),
        ("not json", "PROTOCOL_ERROR"),
        ('{"type":"ping"', "PROTOCOL_ERROR"),
        ("[1, 2]", "PROTOCOL_ERROR"),
        ('"inference"', "PROTOCOL_ERROR"),
        ("null", "PROTOCOL_ERROR"),
        ('{"prompt":"hi"}', "PROTOCOL_ERROR"),
        ('{"type":42}', "PROTOCOL_ERROR"),
        ('{"type":"launch_missiles"}', "PROTOCOL_ERROR"),
        ('{"type":"stream_chunk","content":"x"}', "PROTOCOL_ERROR"),
        (_nested(100_000), "PROTOCOL_ERROR"),
        ('{"type":"inference","request":{"prompt":"hi","max_tokens":' + "1" * 5000 + "}}", "PROTOCOL_ERROR"),
        ('{"type":"inference"}', "INVALID_OPTIONS"),
        ('{"type":"inference","request":null}', "INVALID_OPTIONS"),
        ('{"type":"prompt","prompt":"hi","request":null}', "INVALID_OPTIONS"),
        ('{"type":"inference","request":{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}}',
         "INVALID_OPTIONS"),
        (_inference(prompt=5), "INVALID_PROMPT"),
        (_inference(prompt=["hi"]), "INVALID_PROMPT"),
        ('{"type":"prompt","prompt":7}', "INVALID_PROMPT"),
        ('{"type":"inference","request":"hi"}', "INVALID_OPTIONS"),
        (_inference(model=5), "INVALID_OPTIONS"),
        (_inference(max_tokens="4"), "INVALID_OPTIONS"),
        (_inference(max_tokens=4.5), "INVALID_OPTIONS"),
        (_inference(max_tokens=True), "INVALID_OPTIONS"),
        (_inference(max_tokens=1e400), "INVALID_OPTIONS"),
        (_inference(temperature="hot"), "INVALID_OPTIONS"),
        (_inference(temperature=float("nan")), "INVALID_OPTIONS"),
        (_inference(top_p=float("inf")), "INVALID_OPTIONS"),
        (_inference(seed=1.5), "INVALID_OPTIONS"),
        (_inference(stream="yes"), "INVALID_OPTIONS"),
        (_inference(stop=5), "INVALID_OPTIONS"),
        (_inference(stop=[1]), "INVALID_OPTIONS"),
        (_inference(stop=[""]), "INVALID_OPTIONS"),
        (_inference(messages="hi"), "INVALID_OPTIONS"),
        (_inference(messages=["hi"]), "INVALID_OPTIONS"),
        (_inference(messages=[{"role": "robot", "content": "hi"}]), "INVALID_OPTIONS"),
        (_inference(messages=[{"role": "user", "content": 5}]), "INVALID_OPTIONS"),
        (_inference(messages=[{"content": "hi"}]), "INVALID_OPTIONS"),
        ('{"type":"inference","id":[1],"request":{"prompt":"hi"}}', "INVALID_OPTIONS"),
        ('{"type":"inference","id":true,"request":{"prompt":"hi"}}', "INVALID_OPTIONS"),
        ('{"type":"ping","id":1.5}', "INVALID_OPTIONS"),
        ('{"type":"session_init"}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":""}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":true}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":["s"]}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":"s","chain_id":"1"}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":"s","chainId":1.5}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":"s","job_id":{"n":1}}', "INVALID_OPTIONS"),
        ('{"type":"session_init","session_id":"s","jobId":false}', "INVALID_OPTIONS"),
        ('{"type":"prompt","prompt":"hi","session_id":{"a":1}}', "INVALID_OPTIONS"),
        ('{"type":"stream_cancel","sessionId":[1]}', "INVALID_OPTIONS"),
    ],
    ids=lambda v: repr(v)[:60] if not isinstance(v, str) or not v.isupper() else v,
)
def test_host_rejects_bad_client_frames(data: Any, code: str) -> None:
    """Each bad client frame raises the FabstirError its spec code names (request errors are ValueErrors)."""
    with pytest.raises(FabstirError) as info:
        parse_client_frame(data)
    assert info.value.code == code
    if code == "PROTOCOL_ERROR":
        assert type(info.value) is ProtocolError
    else:
        assert isinstance(info.value, (InvalidInput, ValueError))
        assert info.value.field


# --------------------------------------------------------------------------- fuzzing both parsers

HOST_TYPES = ["connected", "session_init_ack", "stream_chunk", "stream_end", "error", "pong", "encrypted_chunk"]
CLIENT_TYPES = ["inference", "session_init", "prompt", "stream_cancel", "ping", "encrypted_message"]
FIELD_NAMES = [
    "type", "id", "content", "tokens", "finish_reason", "reason", "tokens_used", "usage", "prompt_tokens",
    "completion_tokens", "total_tokens", "context_window_size", "code", "message", "error", "status",
    "session_id", "sessionId", "job_id", "jobId", "chain_id", "chainId", "request", "prompt", "model",
    "max_tokens", "temperature", "stream", "top_p", "stop", "seed", "messages", "role",
]

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     st.sampled_from(["", "Error: x", "user", "assistant", "HOST_BUSY", "complete", "cancelled"]))
_keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6))
_json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=6)),
    max_leaves=24,
)


def _with_type(fields: dict[str, Any], kind: Any) -> dict[str, Any]:
    return fields if kind is _NO_TYPE else {**fields, "type": kind}


_NO_TYPE = object()
_frames = st.builds(
    _with_type,
    st.dictionaries(_keys, _json_values, max_size=8),
    st.one_of(st.sampled_from(HOST_TYPES + CLIENT_TYPES), st.sampled_from(HOST_TYPES + CLIENT_TYPES),
              st.just(_NO_TYPE), _json_values),
)
_json_texts = st.one_of(_frames, _json_values).map(json.dumps)

_valid_client_frames = st.sampled_from([
    inference_frame(prompt="hi", model="m", max_tokens=4, temperature=0.5, top_p=0.9, stop=["x"], seed=1,
                    messages=[{"role": "user", "content": "hi"}], request_id="r"),
    prompt_frame("hi", session_id="s", model="m", max_tokens=4, temperature=0.5),
    session_init_frame("s", job_id=1, chain_id=2, request_id="r"),
    cancel_frame("s", "user"),
    ping_frame(),
])


@st.composite
def _mutated_client_frames(draw: st.DrawFn) -> str:
    """A valid client frame with one field (top level or inside request) replaced by an arbitrary value."""
    frame = json.loads(json.dumps(draw(_valid_client_frames)))
    target = frame["request"] if "request" in frame and draw(st.booleans()) else frame
    target[draw(_keys)] = draw(_json_values)
    return json.dumps(frame)


def _check_host_parse(data: Any) -> Any:
    try:
        event = parse_host_frame(data)
    except FabstirError as exc:
        assert type(exc) is ProtocolError and exc.code == "PROTOCOL_ERROR"
        return None
    assert isinstance(event, HOST_EVENT_TYPES)
    return event



def _check_client_parse(data: Any) -> None:
    try:
        event = parse_client_frame(data)
    except FabstirError as exc:
        assert exc.code in ("PROTOCOL_ERROR", "INVALID_PROMPT", "INVALID_OPTIONS")
        return
    assert isinstance(event, CLIENT_EVENT_TYPES)


_FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.one_of(st.text(), st.text(alphabet='{}[]":,0123456789.-eEtrufalsn ', max_size=60)))
def test_fuzz_parsers_on_arbitrary_text(data: str) -> None:
    """Any text frame either parses to an event or raises a FabstirError of the allowed codes."""
    _check_host_parse(data)
    _check_client_parse(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(), st.binary().map(bytearray), st.binary().map(memoryview)))
def test_fuzz_parsers_reject_all_binary(data: Any) -> None:
    """A binary frame is always a ProtocolError for both parsers."""
    with pytest.raises(ProtocolError):
        parse_host_frame(data)
    with pytest.raises(ProtocolError):
        parse_client_frame(data)


@_FUZZ
@given(st.one_of(_json_texts, _mutated_client_frames()))
def test_fuzz_parsers_on_json_like_values(data: str) -> None:
    """Any JSON value, typed or not, parses to an event or raises only the allowed FabstirErrors."""
    _check_host_parse(data)
    _check_client_parse(data)


_ids = st.sampled_from([None, None, "r", "other"])
_small_text = st.text(alphabet="ab.E r:o\n", max_size=8)
_realistic_host_frames = st.one_of(
    st.builds(lambda c, t, f, i: {"type": "stream_chunk", "content": c, "tokens": t, "finish_reason": f, "id": i},
              _small_text, st.integers(0, 3), st.sampled_from([None, "stop", "length"]), _ids),
    st.builds(lambda r, t, f, u, i: {"type": "stream_end", "reason": r, "tokens_used": t, "finish_reason": f,
                                     "usage": u, "id": i},
              st.sampled_from(["complete", "cancelled", "error"]), st.integers(0, 20),
              st.sampled_from([None, "stop", "length", "cancelled"]),
              st.one_of(st.none(), st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9),
                                                          "completion_tokens": st.integers(0, 9),
                                                          "total_tokens": st.integers(0, 9)})),
              _ids),
    st.builds(lambda c, m, i: {"type": "error", "code": c, "message": m, "id": i},
              st.sampled_from(["HOST_BUSY", "RATE_LIMIT_EXCEEDED", "CONTEXT_OVERFLOW", "INVALID_PROMPT", "WEIRD", ""]),
              st.text(max_size=5), _ids),
    st.just({"type": "stream_chunk", "content": "", "tokens": 0}),
    st.just({"type": "stream_chunk", "content": "Error: boom", "tokens": 1}),
    st.sampled_from([{"type": "connected"}, {"type": "pong"}, {"type": "session_init_ack"}, {"type": "nope"}]),
)


@_FUZZ
@given(
    frames=st.lists(st.one_of(_realistic_host_frames, _realistic_host_frames, _frames), max_size=12),
    features=st.lists(st.sampled_from(["coded-errors", "usage-always", "stop-sequences"]), max_size=3),
    stops=st.lists(st.text(alphabet="ab.\n", min_size=0, max_size=3), max_size=3),
    max_tokens=st.integers(0, 6),
    request_id=st.sampled_from([None, "r"]),
    prompt_nonempty=st.booleans(),
)
def test_fuzz_reader_raises_only_fabstir_errors(frames: list[dict[str, Any]], features: list[str], stops: list[str],
                                                max_tokens: int, request_id: str | None,
                                                prompt_nonempty: bool) -> None:
    """Any sequence of parsed host events makes a reader deliver text or raise FabstirError, nothing else."""
    reader = ResponseReader(request_id=request_id, features=features, stop_sequences=stops, max_tokens=max_tokens,
                            prompt_nonempty=prompt_nonempty)
    delivered = ""
    for frame in frames:
        event = _check_host_parse(json.dumps(frame))
        if event is None:
            continue
        was_done = reader.done
        try:
            pieces = reader.receive(event)
        except FabstirError:
            assert reader.done or isinstance(event, (Chunk, StreamEnd, ErrorEvent))
            continue
        assert all(isinstance(piece, str) and piece for piece in pieces)
        if was_done:
            assert pieces == []
        delivered += "".join(pieces)
    assert reader.received_tokens <= max(reader.max_tokens, 0)
    assert len(delivered) == reader.received_chars
    for stop in stops:
        if stop:
            assert stop not in delivered


@pytest.mark.parametrize("parse", [parse_host_frame, parse_client_frame])
def test_deep_nesting_is_refused_even_with_a_raised_recursion_limit(parse) -> None:
    """With the recursion limit raised (py-evm and py_ecc do it on import), deep JSON is a
    PROTOCOL_ERROR, not a crash of the C decoder on the C stack."""
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 100_000))
    try:
        with pytest.raises(ProtocolError):
            parse("[" * 200_000 + "]" * 200_000)
        with pytest.raises(ProtocolError):
            parse('{"type":"stream_chunk","content":"x","a":' + "{\"b\":" * 100_000 + "1" + "}" * 100_001)
    finally:
        sys.setrecursionlimit(old)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Code with many brackets in a chunk's text is ordinary content."""
    content = "[" * 500 + "{" * 500 + '\\"' + "]" * 10
    event = parse_host_frame(json.dumps({"type": "stream_chunk", "content": content}))
    assert event.content == content


# --------------------------------------------------------------------------- the reader's fast path


def _reader_state(reader: ResponseReader) -> tuple[Any, ...]:
    return (reader.done, reader.cancel_needed, reader.finish_reason, reader.usage, reader.host_tokens,
            reader.received_tokens, reader.received_chars, reader.end_seen, reader._stops._held,
            reader._stops.matched)


def _read_general(reader: ResponseReader, data: str) -> tuple[list[str], Any]:
    """The general path: parse, then receive; returns (pieces, (error type, code, message) or None)."""
    try:
        return reader.receive(parse_host_frame(data)), None
    except FabstirError as exc:
        return [], (type(exc), exc.code, exc.message)


def _read_fast_first(reader: ResponseReader, data: str) -> tuple[list[str], Any]:
    """What the client's read loop does: the fast path, else the general one."""
    before = _reader_state(reader)
    out: list[str] = []
    if reader.receive_text(data, out):
        assert all(isinstance(piece, str) and piece for piece in out)
        return out, None
    assert out == [] and _reader_state(reader) == before  # a refused frame changes nothing
    return _read_general(reader, data)


def _both_readers(**kwargs: Any) -> tuple[ResponseReader, ResponseReader]:
    return ResponseReader(**kwargs), ResponseReader(**kwargs)


def test_reader_fast_path_takes_a_plain_chunk() -> None:
    """A plain stream_chunk is applied without an event: text out, counters moved, True."""
    reader = ResponseReader(request_id="r", max_tokens=10)
    out: list[str] = []
    assert reader.receive_text('{"type":"stream_chunk","content":"Hel","tokens":2,"id":"r"}', out)
    assert reader.receive_text('{"type":"stream_chunk","content":"lo"}', out)
    assert out == ["Hel", "lo"]
    assert (reader.received_tokens, reader.host_tokens, reader.received_chars) == (3, 3, 5)


@pytest.mark.parametrize("frame", [
    {"type": "stream_chunk", "content": "", "tokens": 0},  # the production terminal chunk
    {"type": "stream_chunk", "content": "a", "finish_reason": "stop"},
    {"type": "stream_chunk", "content": "a", "id": "other"},
    {"type": "stream_chunk", "content": "a", "id": 7},
    {"type": "stream_chunk", "content": "a", "tokens": 1.0},
    {"type": "stream_chunk", "content": "a", "tokens": True},
    {"type": "stream_chunk", "content": "a", "tokens": None},
    {"type": "stream_chunk", "content": "a", "tokens": -1},
    {"type": "stream_chunk", "content": "Error: boom"},  # a production error chunk (no coded-errors)
    {"type": "stream_chunk", "content": ["a"]},
    {"type": "stream_chunk", "content": "a", "tokens": 3},  # past max_tokens: the general path stops
    {"type": "stream_end", "reason": "complete"},
    {"type": "error", "code": "HOST_BUSY", "message": "busy"},
    {"type": "pong"},
])
def test_reader_fast_path_leaves_every_other_frame_to_the_general_path(frame: dict[str, Any]) -> None:
    """Quirks, errors, ends, other ids and the chunk that reaches max_tokens are refused, unchanged."""
    reader = ResponseReader(request_id="r", max_tokens=2)
    before = _reader_state(reader)
    out: list[str] = []
    assert not reader.receive_text(json.dumps(frame), out)
    assert out == [] and _reader_state(reader) == before


@pytest.mark.parametrize("data", ["not json", "[1]", '{"content":"a"}', "[" * 200, b'{"type":"stream_chunk"}'])
def test_reader_fast_path_refuses_junk_without_raising(data: Any) -> None:
    """Frames the parser rejects are refused by the fast path (the general path raises for them)."""
    reader = ResponseReader(max_tokens=5)
    assert not reader.receive_text(data, [])


def test_reader_fast_path_refuses_after_the_reader_is_done() -> None:
    """Once done, every frame goes to the general path, which discards it."""
    reader = ResponseReader(stop_sequences=["."], max_tokens=5)
    out: list[str] = []
    assert reader.receive_text('{"type":"stream_chunk","content":"One. Two"}', out)
    assert out == ["One"] and reader.done and reader.cancel_needed and reader.finish_reason == "stop"
    assert not reader.receive_text('{"type":"stream_chunk","content":"more"}', out)


@_FUZZ
@given(
    frames=st.lists(st.one_of(_realistic_host_frames, _realistic_host_frames, _frames), max_size=14),
    features=st.lists(st.sampled_from(["coded-errors", "usage-always", "stop-sequences"]), max_size=3),
    stops=st.lists(st.text(alphabet="ab.\n", min_size=0, max_size=3), max_size=3),
    max_tokens=st.integers(0, 8),
    request_id=st.sampled_from([None, "r"]),
)
def test_fuzz_reader_fast_path_matches_the_general_path(frames: list[dict[str, Any]], features: list[str],
                                                         stops: list[str], max_tokens: int,
                                                         request_id: str | None) -> None:
    """The same frames through the fast path (falling back) and through parse + receive give the same
    pieces, the same errors and the same reader state, frame by frame."""
    fast, general = _both_readers(request_id=request_id, features=features, stop_sequences=stops,
                                  max_tokens=max_tokens)
    for frame in frames:
        data = json.dumps(frame)
        assert _read_fast_first(fast, data) == _read_general(general, data), frame
        assert _reader_state(fast) == _reader_state(general), frame
