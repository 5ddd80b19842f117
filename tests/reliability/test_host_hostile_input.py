"""Issue 5 / hostile input against the reference host (scripted backend, in-process, loopback).

Every attack gets a coded ``error`` frame or a clean close, and a well-behaved client on another
connection is served correctly while / after each attack. Prompt text never reaches the
``fabstir_jupyter.host`` logs unless ``log_prompts`` is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text

T = 5.0  # seconds any single frame may take
CODED = {"PROTOCOL_ERROR", "INVALID_OPTIONS", "INVALID_PROMPT"}
SECRET_PROMPT = "zebra-quokka-7731 confidential prompt text"


async def _open(server, **kw):
    ws = await connect(server.ws_url, open_timeout=T, **kw)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), T))
    assert greeting["type"] == "connected"
    return ws


async def _recv(ws, timeout: float = T) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def _inference(prompt: str = "tell me a story", rid: str | None = "good", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "model": "scripted-1", "max_tokens": 5, "temperature": 0.0}
    body.update(over)
    frame: dict[str, Any] = {"type": "inference", "request": body}
    if rid is not None:
        frame["id"] = rid
    return frame


async def _infer(ws, prompt: str = "tell me a story", rid: str = "good", **over: Any) -> tuple[str, list[dict]]:
    await ws.send(json.dumps(_inference(prompt, rid, **over)))
    frames = []
    while True:
        frame = await _recv(ws)
        frames.append(frame)
        if frame["type"] in ("stream_end", "error") and (frame["type"] == "stream_end" or not frames[:-1]):
            if frame["type"] == "error":
                return "", frames
            return "".join(f["content"] for f in frames if f["type"] == "stream_chunk"), frames


async def _assert_serves(server, prompt: str = "a well-behaved client") -> None:
    """A fresh, well-behaved client gets the exact scripted answer."""
    ws = await _open(server)
    try:
        text, frames = await _infer(ws, prompt, max_tokens=5)
        assert text == scripted_text(prompt, 5), frames
        assert frames[-1]["type"] == "stream_end" and frames[-1]["reason"] == "complete"
    finally:
        await ws.close()


async def _wait(predicate, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _idle(server) -> None:
    await _wait(lambda: server.active_streams == 0 and len(server._connections) == 0)


# ---------------------------------------------------------------------------- frames


async def test_oversize_frame_closes_1009_and_host_keeps_serving(start_host):
    """A text frame larger than max_frame_bytes (4 KiB here; 8 KiB and 1 MiB sent) → close 1009."""
    server = await start_host(max_frame_bytes=4096)
    for size in (8192, 1 << 20):
        ws = await _open(server, max_size=None)
        await ws.send(json.dumps(_inference("x" * size)))
        with pytest.raises(ConnectionClosed) as info:
            await _recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        await _assert_serves(server)
    await _idle(server)


async def test_binary_frames_get_protocol_error(start_host):
    """Binary frames (empty, JSON bytes, random bytes) → PROTOCOL_ERROR each; the connection stays usable."""
    server = await start_host()
    ws = await _open(server)
    for data in (b"", json.dumps(_inference()).encode(), bytes(range(256)) * 4):
        await ws.send(data)
        frame = await _recv(ws)
        assert frame["type"] == "error" and frame["code"] == "PROTOCOL_ERROR", frame
    text, _ = await _infer(ws, "after binary")
    assert text == scripted_text("after binary", 5)
    await ws.close()
    await _assert_serves(server)


MALFORMED = [
    "", "{", "}", "nul", "[]", "[1,2]", '"str"', "42", "null", "true", "{}", '{"type": 5}', '{"type": null}',
    '{"type": "no_such_type"}', '{"type": "inference"', "\x00\x01\x02", "{" * 10_000 + "}" * 10_000,
    "[" * 5000, '{"type":"inference","request":{"prompt":"hi","max_tokens":' + "9" * 5000 + "}}",
    '{"type": "inference", "request": {"prompt": "hi", "temperature": NaN}}',
    '{"type": "inference", "request": {"prompt": "hi", "max_tokens": Infinity}}',
    '{"type": "inference", "request": {"prompt": "\\ud800"}, "id": "lone-surrogate"}',
]


async def test_malformed_json_gets_coded_errors(start_host):
    """Each of 22 malformed texts → one coded error frame; the same connection then serves normally."""
    server = await start_host()
    ws = await _open(server)
    for text in MALFORMED:
        await ws.send(text)
        frame = await _recv(ws)
        if frame["type"] == "stream_chunk":  # a lone surrogate is a legal JSON string: it may be served
            while frame["type"] != "stream_end":
                frame = await _recv(ws)
            continue
        assert frame["type"] == "error" and frame["code"] in CODED, (text[:60], frame)
    text, _ = await _infer(ws, "after malformed")
    assert text == scripted_text("after malformed", 5)
    await ws.close()
    await _assert_serves(server)


# ---------------------------------------------------------------------------- wrong types, every field

WRONG_TYPES: list[tuple[str, Any]] = []
for _field, _values in {
    "prompt": [None, 1, 1.5, True, [], {}, ["hi"]],
    "model": [1, True, [], {}],
    "max_tokens": ["5", True, 1.5, [], {}, -1, 0],
    "temperature": ["0.5", True, [], {}, -0.1, 2.5, 1e308],
    "stream": ["yes", 1, 0, [], {}],
    "top_p": ["1", True, [], {}, 0, 1.5],
    "stop": [1, True, [1], [""], [None], ["x" * 1000], ["s"] * 100],
    "seed": ["1", True, 1.5, [], {}],
    "messages": ["hi", 1, {}, [1], [{"role": 1, "content": "x"}], [{"role": "user", "content": 1}], [{}]],
}.items():
    WRONG_TYPES += [(_field, _v) for _v in _values]
WRONG_TYPE_PARAMS = [pytest.param(f, v, id=f"{f}={json.dumps(v)[:20]}") for f, v in WRONG_TYPES] + [
    pytest.param("stop", v, id=f"stop={json.dumps(v)}") for v in ({}, 0, False, "")
]
# top-level fields
TOP_LEVEL: list[tuple[str, Any]] = [
    ("id", 1.5), ("id", True), ("id", []), ("id", {}),
    ("request", "hi"), ("request", 1), ("request", []), ("request", True),
    ("type", 1), ("type", None), ("type", []), ("type", "INFERENCE"),
]


@pytest.fixture
async def shared_host(start_host):
    return await start_host()


@pytest.mark.parametrize(("field", "value"), WRONG_TYPE_PARAMS)
async def test_wrong_type_in_request_field_gets_coded_error(shared_host, field, value):
    """A wrong type or out-of-range value in each request field → a coded error echoing the id."""
    ws = await _open(shared_host)
    frame = _inference("wrong types", rid="bad")
    frame["request"][field] = value
    await ws.send(json.dumps(frame))
    reply = await _recv(ws)
    assert reply["type"] == "error" and reply["code"] in CODED, reply
    assert reply.get("id") == "bad"
    text, _ = await _infer(ws, "after wrong type")  # same connection still serves
    assert text == scripted_text("after wrong type", 5)
    await ws.close()


@pytest.mark.parametrize(("field", "value"), TOP_LEVEL, ids=[f"{f}={json.dumps(v)}" for f, v in TOP_LEVEL])
async def test_wrong_type_in_top_level_field_gets_coded_error(shared_host, field, value):
    ws = await _open(shared_host)
    frame = _inference("wrong types")
    frame[field] = value
    await ws.send(json.dumps(frame))
    reply = await _recv(ws)
    assert reply["type"] == "error" and reply["code"] in CODED, reply
    text, _ = await _infer(ws, "after wrong type")
    assert text == scripted_text("after wrong type", 5)
    await ws.close()


@pytest.mark.parametrize("field", ["temperature", "top_p"])
async def test_float_field_overflowing_int_gets_invalid_options(shared_host, field):
    """A JSON integer beyond float range (10**400) in a float field is INVALID_OPTIONS, not a 1011 close."""
    ws = await _open(shared_host)
    frame = _inference("overflow", rid="ovf")
    frame["request"][field] = 10**400
    await ws.send(json.dumps(frame))
    reply = await _recv(ws)
    assert reply["type"] == "error" and reply["code"] == "INVALID_OPTIONS", reply
    await ws.close()


async def test_float_field_overflow_does_not_stop_the_host(shared_host):
    """Whatever happens to the attacking connection, the host serves others afterwards."""
    ws = await _open(shared_host)
    frame = _inference("overflow", rid="ovf")
    frame["request"]["temperature"] = 10**400
    await ws.send(json.dumps(frame))
    try:
        reply = await _recv(ws)
        assert reply["type"] == "error"
    except ConnectionClosed:
        pass
    await ws.close()
    await _assert_serves(shared_host)


@pytest.mark.parametrize("max_tokens", [4097, 10**6, 2**63, 10**100, 1e300, -(10**100)])
async def test_huge_max_tokens_gets_invalid_options(shared_host, max_tokens):
    ws = await _open(shared_host)
    _text, frames = await _infer(ws, "huge", rid="huge", max_tokens=max_tokens)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "INVALID_OPTIONS", frames
    await ws.close()
    await _assert_serves(shared_host)


async def test_prompt_at_and_over_the_size_limit(start_host):
    """Exactly max_prompt_chars is served; one more (prompt or messages) → INVALID_PROMPT."""
    server = await start_host(max_prompt_chars=1000)
    ws = await _open(server)
    at = "word " * 200
    assert len(at) == 1000
    text, frames = await _infer(ws, at, rid="at")
    assert text == scripted_text(at, 5), frames
    for over in (at + "x", at * 50):
        _, frames = await _infer(ws, over, rid="over")
        assert frames[-1]["code"] == "INVALID_PROMPT", frames
    messages = [{"role": "user", "content": "y" * 600}, {"role": "user", "content": "z" * 401}]
    _, frames = await _infer(ws, "", rid="msgs", messages=messages)
    assert frames[-1]["code"] == "INVALID_PROMPT", frames
    await ws.close()
    await _assert_serves(server)


# ---------------------------------------------------------------------------- floods


async def test_websocket_ping_flood(start_host):
    """2 000 WebSocket pings on one connection are all answered; another client is served meanwhile."""
    server = await start_host()
    ws = await _open(server)
    waiters = [await ws.ping() for _ in range(2000)]
    await _assert_serves(server, "during ping flood")
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    text, _ = await _infer(ws, "after ping flood")
    assert text == scripted_text("after ping flood", 5)
    await ws.close()


async def test_json_ping_flood(start_host):
    """2 000 JSON pings → 2 000 pongs, in order, while other clients are served."""
    server = await start_host()
    ws = await _open(server)
    ping = json.dumps({"type": "ping"})

    async def reader() -> int:
        n = 0
        while n < 2000:
            frame = await _recv(ws, 10)
            assert frame["type"] == "pong", frame
            n += 1
        return n

    read = asyncio.create_task(reader())
    for _ in range(2000):
        await ws.send(ping)
    await _assert_serves(server, "during json ping flood")
    assert await asyncio.wait_for(read, 15) == 2000
    await ws.close()
    await _assert_serves(server)


async def test_request_flood_on_one_connection_is_rate_limited(start_host):
    """300 requests back-to-back on one connection (limit 60/min) → busy/rate-limit codes, no hang."""
    server = await start_host(rate_limit_per_connection=60)
    ws = await _open(server)
    for i in range(300):
        await ws.send(json.dumps(_inference(f"flood {i}", rid=f"f{i}")))
    codes: dict[str, int] = {}
    ends = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            frame = await _recv(ws, 1.0)
        except asyncio.TimeoutError:
            break
        if frame["type"] == "error":
            codes[frame["code"]] = codes.get(frame["code"], 0) + 1
        elif frame["type"] == "stream_end":
            ends += 1
    assert set(codes) <= {"HOST_BUSY", "RATE_LIMIT_EXCEEDED"}, codes
    assert ends + sum(codes.values()) == 300, (ends, codes)
    await ws.close()
    await _assert_serves(server)


# ---------------------------------------------------------------------------- slow loris, vanishing clients


async def test_slow_loris_tcp_never_sends_is_closed_by_handshake_timeout(start_host):
    """20 raw TCP connections that never send: others are served; the host closes them (open_timeout)."""
    server = await start_host()
    conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
    await _assert_serves(server, "during slow loris")

    async def closed_by_host(reader: asyncio.StreamReader) -> bytes:
        return await reader.read()  # EOF when the host gives up on the handshake

    results = await asyncio.wait_for(asyncio.gather(*(closed_by_host(r) for r, _ in conns)), 20)
    assert all(r == b"" for r in results)
    for _, writer in conns:
        writer.close()
    await _assert_serves(server)


async def test_slow_loris_upgraded_never_sends(start_host):
    """50 upgraded connections that never send: another client is served; max_connections refuses
    the excess with HTTP 503 HOST_BUSY (a coded refusal), and capacity returns when they leave."""
    server = await start_host(max_connections=51)
    idle = [await _open(server) for _ in range(50)]
    await _assert_serves(server, "while 50 idle connections")  # the 51st slot
    # fill the last slot, then one more is refused with a code
    extra = await _open(server)
    with pytest.raises(InvalidStatus) as info:
        await connect(server.ws_url, open_timeout=T)
    assert info.value.response.status_code == 503
    assert json.loads(info.value.response.body)["error"]["code"] == "HOST_BUSY"
    for ws in [*idle, extra]:
        await ws.close()
    await _idle(server)
    await _assert_serves(server)


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_client_vanishes_mid_stream(start_host, how):
    """10 clients each read 2 chunks of a long stream and vanish (TCP abort or close frame): the host
    frees every stream and connection, and serves others."""
    server = await start_host(backend=ScriptedBackend(token_rate=200.0), max_concurrent_streams=16)
    for i in range(10):
        ws = await _open(server)
        await ws.send(json.dumps(_inference(f"long {i}", rid=f"v{i}", max_tokens=4000)))
        for _ in range(2):
            assert (await _recv(ws))["type"] == "stream_chunk"
        if how == "abort":
            ws.transport.abort()
        else:
            await ws.close()
    await _assert_serves(server, "after vanishing clients")
    await _idle(server)


async def test_a_client_that_stops_reading_is_dropped_after_send_timeout(start_host, caplog):
    """A client that stops reading mid-stream fills the host's write buffer: after send_timeout the host
    aborts that connection and frees its stream, and serves other clients meanwhile and after."""
    caplog.set_level(logging.WARNING, logger="fabstir_jupyter.host")
    server = await start_host(send_timeout=0.3, max_tokens_cap=10_000_000)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill the path to the client quickly
    sock.connect(("127.0.0.1", server.port))
    ws = await _open(server, sock=sock)
    try:
        await ws.send(json.dumps(_inference("nobody reads this", rid="stuck", max_tokens=10_000_000)))
        assert (await _recv(ws))["type"] == "stream_chunk"
        ws.transport.pause_reading()
        await _wait(lambda: "stopped reading" in caplog.text, timeout=60)  # safety net, not a speed bound
        await _wait(lambda: server.active_streams == 0)
        await _assert_serves(server, "after a client stopped reading")
    finally:
        ws.transport.abort()
    await _idle(server)


# ---------------------------------------------------------------------------- prompt privacy in logs


async def _attack_with_secret(server, secret: str = SECRET_PROMPT) -> None:
    SECRET_PROMPT = secret
    ws = await _open(server)
    await _infer(ws, SECRET_PROMPT, rid="s1")                                   # served
    await _infer(ws, SECRET_PROMPT + "x" * 2000, rid="s2")                      # INVALID_PROMPT
    await _infer(ws, SECRET_PROMPT, rid="s3", max_tokens=10**9)                 # INVALID_OPTIONS
    await _infer(ws, SECRET_PROMPT, rid="s4", model="no-such-model")            # MODEL_NOT_AVAILABLE
    await ws.send('{"type":"inference","request":{"prompt":"' + SECRET_PROMPT + '"')  # malformed
    await _recv(ws)
    await ws.send(json.dumps(_inference(SECRET_PROMPT)).encode())              # binary
    await _recv(ws)
    await ws.send(json.dumps(_inference(SECRET_PROMPT, rid="s5", max_tokens=4000)))
    await _recv(ws)
    ws.transport.abort()                                                        # vanish mid-stream
    await _wait(lambda: server.active_streams == 0)


async def test_prompts_not_logged_at_info(start_host, caplog):
    """INFO (what fabstir-host --log-level info shows): no prompt text, for served and refused requests."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    server = await start_host(max_prompt_chars=1000, backend=ScriptedBackend(token_rate=500.0))
    await _attack_with_secret(server)
    await _attack_with_secret(server, "zq7731")  # short enough to survive any truncation
    assert caplog.records, "the host logged nothing at INFO: the test would prove nothing"
    assert SECRET_PROMPT not in caplog.text and "zq7731" not in caplog.text


async def test_prompts_not_logged_at_debug(start_host, caplog):
    """Even at DEBUG, websockets' frame lines (which carry prompts) are dropped unless log_prompts."""
    caplog.set_level(logging.DEBUG, logger="fabstir_jupyter.host")
    server = await start_host(max_prompt_chars=1000, backend=ScriptedBackend(token_rate=500.0))
    await _attack_with_secret(server, "zq7731")
    assert "zq7731" not in caplog.text


async def test_prompts_logged_when_log_prompts(start_host, caplog):
    """The operator opt-in works: with log_prompts the prompt appears in the INFO log."""
    caplog.set_level(logging.INFO, logger="fabstir_jupyter.host")
    server = await start_host(max_prompt_chars=1000, log_prompts=True)
    ws = await _open(server)
    await _infer(ws, SECRET_PROMPT, rid="s1")
    await ws.close()
    assert SECRET_PROMPT in caplog.text
