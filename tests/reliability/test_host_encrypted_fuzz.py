"""Hypothesis fuzz of encrypted frames sent to a running ``fabstir-host`` with an operator key.

Each example starts a host on loopback, opens one connection, makes a real encrypted session, sends
a sequence of fuzzed ``encrypted_session_init`` / ``encrypted_message`` frames (valid frames with
one field replaced, deleted or one hex digit changed, and arbitrary payloads), and checks that each
one gets exactly one answer: a coded error of spec §6/§7, an ack, or a whole stream. A good
exchange then still works on the same connection, and once the host is closed no task is left.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, event as note, given, settings, strategies as st
from websockets.asyncio.client import connect

from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.encryption import EncryptedSession
from fabstir_jupyter.host import HostConfig, HostServer, ScriptedBackend, scripted_text
from fabstir_jupyter.protocol import encode, parse_host_frame

HOST_KEY = PrivateKey.from_hex("0x" + "7a" * 32)
CLIENT = PrivateKey.from_hex("0x" + "8b" * 32)
TIMEOUT = 5.0
CODES = {"MISSING_PAYLOAD", "INVALID_PAYLOAD", "INVALID_HEX_ENCODING", "INVALID_NONCE_SIZE", "DECRYPTION_FAILED",
         "SESSION_KEY_NOT_FOUND", "PROTOCOL_ERROR", "INVALID_PROMPT", "INVALID_OPTIONS", "MODEL_NOT_AVAILABLE"}

_hexish = st.one_of(st.text(alphabet="0123456789abcdefABCDEFx ", max_size=80), st.sampled_from(["", "0x", "00" * 24]))
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _hexish, st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
_PAYLOAD_KEYS = ["ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex", "saltHex", "recid", "index"]
_OUTER_KEYS = ["session_id", "sessionId", "id", "chain_id", "job_id", "payload", "web_search", "max_searches",
               "search_queries", "model", "max_tokens", "temperature", "stream"]

# One edit of a genuine frame: ("init"|"message", "outer"|"payload", action, field index, digit, value).
_edits = st.tuples(
    st.sampled_from(["init", "message"]), st.sampled_from(["outer", "payload"]),
    st.sampled_from(["replace", "delete", "digit"]), st.integers(0, 20), st.sampled_from("0f7Z "), _values,
)
_arbitrary = st.builds(
    lambda outer, kind, payload: {**outer, "type": kind, "payload": payload},
    st.dictionaries(st.sampled_from(_OUTER_KEYS), _values, max_size=4),
    st.sampled_from(["encrypted_session_init", "encrypted_message"]),
    st.one_of(_values, st.dictionaries(st.sampled_from(_PAYLOAD_KEYS), st.one_of(_hexish, _values), max_size=6)),
)


def _edited(session: EncryptedSession, edit: tuple[Any, ...]) -> dict[str, Any]:
    which, where, action, at, digit, value = edit
    if which == "init":
        frame = session.init_frame()
    else:
        frame = session.message_frame("fuzz me", model="scripted-1", max_tokens=3, temperature=0.0, request_id="m")
    target = frame["payload"] if where == "payload" else frame
    names = sorted(k for k in target if k != "type")
    name = names[at % len(names)]
    if action == "delete":
        del target[name]
    elif action == "digit" and isinstance(target[name], str) and target[name]:
        text = target[name]
        i = at % len(text)
        target[name] = text[:i] + digit + text[i + 1:]
    else:
        target[name] = value
    return frame


async def _answer(ws) -> list[dict[str, Any]]:
    """Read the answer to one frame: an error, an ack, or frames up to stream_end."""
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        frames.append(frame)
        if frame["type"] in ("error", "session_init_ack") and not any(f["type"] == "encrypted_chunk" for f in frames):
            return frames
        if frame["type"] == "stream_end":
            return frames


async def _fuzz_once(items: list[Any]) -> None:
    server = HostServer(HostConfig(operator_key=HOST_KEY), ScriptedBackend())
    await server.start()
    try:
        async with connect(server.ws_url, open_timeout=TIMEOUT) as ws:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
            session = EncryptedSession(HOST_KEY.public_key, session_id="9", job_id="9", chain_id=1,
                                       model="scripted-1", signer=CLIENT)
            await ws.send(encode(session.init_frame()))
            assert (await _answer(ws))[0]["type"] == "session_init_ack"
            for item in items:
                frame = _edited(session, item) if isinstance(item, tuple) else item
                await ws.send(json.dumps(frame))
                answer = await _answer(ws)
                last = answer[-1]
                note(f"answer: {last.get('code', last['type'])}")  # --hypothesis-show-statistics
                if last["type"] == "error":
                    assert last["code"] in CODES, last
                    assert isinstance(last["message"], str) and last["message"]
                else:
                    assert last["type"] in ("session_init_ack", "stream_end"), answer
            # The connection is still usable: a fresh init and a prompt are served.
            await ws.send(encode(session.init_frame()))
            assert (await _answer(ws))[-1]["type"] == "session_init_ack"
            await ws.send(encode(session.message_frame("after the fuzz", model="scripted-1", max_tokens=3,
                                                       temperature=0.0, request_id="after")))
            text = ""
            for frame in await _answer(ws):
                event = session.decrypt(parse_host_frame(json.dumps(frame)))
                text += getattr(event, "content", "") or ""
            assert text == scripted_text("after the fuzz", 3)
        for _ in range(500):  # the server notices the close on its own schedule
            if not server._connections:
                break
            await asyncio.sleep(0.01)
        assert not server._connections and server.active_streams == 0
    finally:
        await server.close()
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leftover, leftover


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(st.one_of(_edits, _arbitrary), min_size=1, max_size=6))
def test_fuzzed_encrypted_frames_get_one_coded_answer_each_and_leave_the_host_usable(items):
    """Every fuzzed frame: a §6/§7 coded error, an ack or a whole stream; then a good exchange; no leaks."""
    asyncio.run(_fuzz_once(items))
