"""End-to-end encryption on a real ``fabstir-host`` (spec §6): our client half against the server.

Every test runs a real :class:`HostServer` with an operator key on loopback and speaks to it with
:class:`~fabstir_jupyter.encryption.EncryptedSession` (the client half) over a real WebSocket.
The production SDK's own frame shapes, from @noble, are in ``tests/test_encryption_noble.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from _timing import wait_until
from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.encryption import EncryptedSession, message_aad, seal
from fabstir_jupyter.host import ScriptedBackend, scripted_text
from fabstir_jupyter.protocol import (
    ResponseReader,
    cancel_frame,
    parse_host_frame,
    prompt_frame,
    session_init_frame,
)

from .conftest import Peer, get_json

HOST_KEY = PrivateKey.from_hex("0x" + "4c" * 32)
CLIENT = PrivateKey.from_hex("0x" + "5d" * 32)
STRANGER = PrivateKey.from_hex("0x" + "6e" * 32)
PROMPT = "What is the secret ingredient of grandmother's plum chutney?"
CHAIN_ID = 84532


def client(session_id: str = "1234", signer: PrivateKey = CLIENT) -> EncryptedSession:
    return EncryptedSession(HOST_KEY.public_key, session_id=session_id, job_id=session_id, chain_id=CHAIN_ID,
                            model="scripted-1", signer=signer)


def words(text: str) -> int:
    return len(text.split())


class Answer:
    """One encrypted answer: its raw frames, the decrypted text and the reader's verdict."""

    def __init__(self, frames: list[dict[str, Any]], text: str, reader: ResponseReader) -> None:
        self.frames = frames
        self.text = text
        self.finish_reason = reader.finish_reason
        self.end = frames[-1]


async def init(peer: Peer, session: EncryptedSession) -> dict[str, Any]:
    """Send a fresh encrypted_session_init (a new key, as the SDK does before every prompt); return the reply."""
    await peer.send(session.init_frame())
    return await peer.recv()


async def read_answer(peer: Peer, session: EncryptedSession, rid: str) -> Answer:
    """Read frames up to stream_end, decrypting each through the client half into a ResponseReader."""
    reader = ResponseReader(request_id=rid, max_tokens=100, features=[])  # a legacy host declares none
    frames, text = [], ""
    while not reader.done:
        frame = await peer.recv()
        frames.append(frame)
        text += "".join(reader.receive(session.decrypt(parse_host_frame(json.dumps(frame)))))
    return Answer(frames, text, reader)


async def ask(peer: Peer, session: EncryptedSession, prompt: str = PROMPT, rid: str = "r1",
              max_tokens: int = 6) -> Answer:
    """Re-init, then send one encrypted prompt and read its answer."""
    ack = await init(peer, session)
    assert ack["type"] == "session_init_ack", ack
    await peer.send(session.message_frame(prompt, model="scripted-1", max_tokens=max_tokens, temperature=0.0,
                                          request_id=rid))
    return await read_answer(peer, session, rid)


@pytest.fixture
async def e2ee_host(start_host):
    return await start_host(operator_key=HOST_KEY)


@pytest.fixture
async def e2ee(e2ee_host, make_peer) -> Peer:
    return await make_peer(e2ee_host)


def only_connection(server):
    (conn,) = server._connections
    return conn


# --------------------------------------------------------------------------- our client half, served


async def test_encrypted_init_is_acknowledged_like_production(e2ee):
    """session_init_ack: success, the session, a numeric job id, the chain, the signer; no id (none was sent)."""
    ack = await init(e2ee, client())
    assert ack == {"type": "session_init_ack", "status": "success", "session_id": "1234", "job_id": 1234,
                   "chain_id": CHAIN_ID, "message": "encrypted session initialised",
                   "client_address": CLIENT.address}


async def test_two_prompts_with_a_reinit_each_on_one_socket(e2ee):
    """Both answers decrypt to the scripted text; the second turn sees the first (the session's memory);
    the reply frames have production's shapes: chunk indexes from 0, a final empty chunk, then
    encrypted_response and a plaintext stream_end with usage and session_id."""
    session = client()
    first = await ask(e2ee, session, PROMPT, "r1")
    second = await ask(e2ee, session, "And the second secret?", "r2")
    assert (first.text, first.finish_reason) == (scripted_text(PROMPT, 6), "length")
    assert (second.text, second.finish_reason) == (scripted_text("And the second secret?", 6), "length")
    assert first.end["usage"]["prompt_tokens"] == words(PROMPT)
    assert second.end["usage"]["prompt_tokens"] == words(PROMPT) + 6 + words("And the second secret?")
    types = [f["type"] for f in second.frames]
    assert types == ["encrypted_chunk"] * 7 + ["encrypted_response", "stream_end"]
    chunks = second.frames[:7]
    assert [c["payload"]["index"] for c in chunks] == list(range(7))
    assert all(set(c) == {"type", "tokens", "session_id", "id", "payload"} for c in chunks[:6])
    assert chunks[6]["final"] is True and chunks[6]["tokens"] == 0
    assert all(f["id"] == "r2" and f["session_id"] == "1234" for f in second.frames)
    assert second.end["reason"] == "complete" and second.end["tokens_used"] == 6


async def test_a_cancel_mid_stream_then_the_next_prompt(start_host, make_peer):
    """Stop, then send: stream_cancel, a re-init and the next prompt back to back. The cancelled stream
    ends with a plaintext stream_end(cancelled), then the ack, then the next answer, in order."""
    server = await start_host(backend=ScriptedBackend(token_rate=200), operator_key=HOST_KEY)
    peer = await make_peer(server)
    session = client()
    await init(peer, session)
    await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=2000, temperature=0.0,
                                          request_id="long"))
    first = await peer.recv()
    assert first["type"] == "encrypted_chunk" and first["id"] == "long"
    await peer.send(cancel_frame(session_id="1234"))
    await peer.send(session.init_frame())  # a new key: the cancelled stream's frames no longer decrypt
    await peer.send(session.message_frame("next", model="scripted-1", max_tokens=3, temperature=0.0,
                                          request_id="next"))
    frames = await peer.until_end()
    assert all(f["type"] == "encrypted_chunk" and f["id"] == "long" for f in frames[:-1])
    end = frames[-1]
    assert (end["reason"], end["finish_reason"], end["id"], end["session_id"]) == (
        "cancelled", "cancelled", "long", "1234")
    assert 1 <= end["tokens_used"] < 2000
    assert (await peer.recv())["type"] == "session_init_ack"
    answer = await read_answer(peer, session, "next")
    assert answer.text == scripted_text("next", 3) and answer.end["reason"] == "complete"
    assert server.active_streams == 0


async def test_reinit_on_a_new_socket_keeps_the_memory_and_wipes_the_old_keys(e2ee_host, make_peer):
    """Failover-like: the first socket closes (its keys are zeroed), the same signer re-inits the same
    session on a new socket, and its prompt is served on the session's memory."""
    session = client()
    first_peer = await make_peer(e2ee_host)
    await ask(first_peer, session, PROMPT, "a")
    conn = only_connection(e2ee_host)
    entry = conn.encryption.keys.get("1234", now=0.0)
    assert entry is not None and any(entry.key)
    await first_peer.ws.close()
    await wait_until(lambda: not e2ee_host._connections)
    assert len(conn.encryption.keys) == 0 and entry.key == bytearray(32) and not conn.memories
    second_peer = await make_peer(e2ee_host)
    answer = await ask(second_peer, session, "again", "b")
    assert answer.text == scripted_text("again", 6)
    assert answer.end["usage"]["prompt_tokens"] == words(PROMPT) + 6 + 1


async def test_another_signer_with_the_same_session_id_gets_no_memory(e2ee_host, make_peer):
    """An id alone opens no conversation: a stranger's init of the same session starts it afresh, and the
    owner's connection then runs without memory instead of reading the stranger's turns."""
    owner, stranger = client(), client(signer=STRANGER)
    owner_peer, stranger_peer = await make_peer(e2ee_host), await make_peer(e2ee_host)
    await ask(owner_peer, owner, PROMPT, "o1")
    intruded = await ask(stranger_peer, stranger, "what did they ask?", "s1")
    assert intruded.end["usage"]["prompt_tokens"] == words("what did they ask?")
    await owner_peer.send(owner.message_frame("more", model="scripted-1", max_tokens=2, temperature=0.0,
                                              request_id="o2"))  # on the owner's key, no re-init
    after = await read_answer(owner_peer, owner, "o2")
    assert after.end["usage"]["prompt_tokens"] == 1


async def test_a_plaintext_prompt_cannot_read_an_encrypted_session(e2ee):
    """A plaintext prompt naming an encrypted session's id is SESSION_NOT_FOUND: its transcript never leaks."""
    await ask(e2ee, client(), PROMPT, "r1")
    await e2ee.send(prompt_frame("repeat the conversation", session_id="1234", model="scripted-1", max_tokens=3,
                                 temperature=0, request_id="p"))
    error = await e2ee.recv()
    assert (error["type"], error["code"], error["id"]) == ("error", "SESSION_NOT_FOUND", "p")


async def test_plaintext_sessions_still_work_beside_encrypted_ones(e2ee):
    """The same socket serves a plaintext session after an encrypted one."""
    await ask(e2ee, client(), PROMPT, "r1")
    await e2ee.send(session_init_frame("plain", request_id="i"))
    assert (await e2ee.recv())["type"] == "session_init_ack"
    await e2ee.send(prompt_frame("hello", session_id="plain", model="scripted-1", max_tokens=3, temperature=0,
                                 request_id="p"))
    frames = await e2ee.until_end()
    assert "".join(f["content"] for f in frames if f["type"] == "stream_chunk") == scripted_text("hello", 3)


async def test_encrypted_requests_share_the_plaintext_limits(start_host, make_peer):
    """Admission is the plaintext path's: max_tokens over the cap is INVALID_OPTIONS, with the id."""
    peer = await make_peer(await start_host(operator_key=HOST_KEY, max_tokens_cap=10))
    session = client()
    await init(peer, session)
    await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=11, temperature=0.0,
                                          request_id="big"))
    error = await peer.recv()
    assert (error["type"], error["code"], error["id"]) == ("error", "INVALID_OPTIONS", "big")
    answer = await ask(peer, session, PROMPT, "ok", max_tokens=10)
    assert answer.text == scripted_text(PROMPT, 10)


async def test_an_encrypted_frame_on_a_busy_connection_is_host_busy(start_host, make_peer):
    """As for plaintext frames: HOST_BUSY with the id, and the running stream goes on."""
    peer = await make_peer(await start_host(backend=ScriptedBackend(token_rate=200), operator_key=HOST_KEY))
    session = client()
    await init(peer, session)
    await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=2000, temperature=0.0,
                                          request_id="long"))
    await peer.recv()
    frame = session.message_frame("x", model="scripted-1", max_tokens=2, temperature=0.0, request_id="second")
    await peer.send(frame)
    while (reply := await peer.recv())["type"] == "encrypted_chunk":
        pass
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "HOST_BUSY", "second")


async def test_version_lists_e2ee_only_with_a_key(e2ee_host, host, start_host):
    """The e2ee feature is declared by a host with a key; not without one, and never in legacy mode."""
    assert "e2ee" in (await get_json(e2ee_host, "/v1/version"))[1]["features"]
    assert "e2ee" not in (await get_json(host, "/v1/version"))[1]["features"]
    legacy = await start_host(operator_key=HOST_KEY, legacy=True)
    assert (await get_json(legacy, "/v1/version"))[1]["features"] == []


async def test_the_key_lifetime_reaches_the_connection(start_host, make_peer):
    """session_key_lifetime and max_session_keys bound each connection's key store."""
    server = await start_host(operator_key=HOST_KEY, session_key_lifetime=42.0, max_session_keys=3)
    await make_peer(server)
    keys = only_connection(server).encryption.keys
    assert (keys.lifetime, keys.max_keys) == (42.0, 3)


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
async def test_a_keyless_host_refuses_encrypted_frames(start_host, make_peer, legacy):
    """Without a key: ENCRYPTION_NOT_SUPPORTED for an init (both modes), and the host keeps serving."""
    peer = await make_peer(await start_host(legacy=legacy))
    await peer.send(client().init_frame())
    error = await peer.recv()
    assert (error["type"], error["code"]) == ("error", "ENCRYPTION_NOT_SUPPORTED")
    result = await peer.infer("still here", max_tokens=2)
    assert result.text == scripted_text("still here", 2)


# --------------------------------------------------------------------------- the legacy host with a key


async def test_legacy_host_answers_the_encrypted_path_as_production(start_host, make_peer):
    """Legacy mode with a key: production's ack (client_address: the signer over SHA-256(ciphertext)),
    chunks with a final empty one, encrypted_response, and stream_end with only id and session_id."""
    peer = await make_peer(await start_host(operator_key=HOST_KEY, legacy=True))
    session = client()
    frame = session.init_frame()
    await peer.send(frame)
    ack = await peer.recv()
    from fabstir_jupyter.encryption import open_session_init

    signers = open_session_init(frame["payload"], HOST_KEY)[1]
    assert ack == {"type": "session_init_ack", "status": "success", "session_id": "1234", "job_id": 1234,
                   "chain_id": CHAIN_ID, "client_address": signers[-1],
                   "message": "Encrypted session initialized successfully"}
    await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=4, temperature=0.0,
                                          request_id="L"))
    answer = await read_answer(peer, session, "L")
    assert answer.text == scripted_text(PROMPT, 4)
    assert [f["type"] for f in answer.frames] == ["encrypted_chunk"] * 5 + ["encrypted_response", "stream_end"]
    assert answer.frames[4]["final"] is True
    assert answer.end == {"type": "stream_end", "id": "L", "session_id": "1234"}


# --------------------------------------------------------------------------- malformed frames, each code


def _init_with(change) -> dict[str, Any]:
    frame = client().init_frame()
    change(frame)
    return frame


def _set(name, value):
    return lambda f: f["payload"].__setitem__(name, value)


def _drop(name):
    return lambda f: f["payload"].pop(name)


def _flip(name):
    def change(frame):
        text = frame["payload"][name]
        frame["payload"][name] = ("1" if text[0] != "1" else "2") + text[1:]
    return change


# case: (change to a valid init, normal-mode code, legacy-mode code)
BAD_INITS = {
    "no payload": (lambda f: f.pop("payload"), "MISSING_PAYLOAD", "MISSING_PAYLOAD"),
    "null payload": (lambda f: f.update(payload=None), "MISSING_PAYLOAD", "INVALID_PAYLOAD"),
    "string payload": (lambda f: f.update(payload="x"), "INVALID_PAYLOAD", "INVALID_PAYLOAD"),
    "no signatureHex": (_drop("signatureHex"), "INVALID_PAYLOAD", "INVALID_PAYLOAD"),
    "non-hex ephPubHex": (_set("ephPubHex", "zz"), "INVALID_HEX_ENCODING", "INVALID_HEX_ENCODING"),
    "12-byte nonce": (_set("nonceHex", "00" * 12), "INVALID_NONCE_SIZE", "INVALID_NONCE_SIZE"),
    "tampered ciphertext": (_flip("ciphertextHex"), "DECRYPTION_FAILED", "DECRYPTION_FAILED"),
    "ephemeral not a point": (_set("ephPubHex", "02" + "ff" * 32), "DECRYPTION_FAILED", "DECRYPTION_FAILED"),
}


def _message_payload(session: EncryptedSession, change) -> dict[str, Any]:
    frame = session.message_frame(PROMPT, model="scripted-1", max_tokens=3, temperature=0.0, request_id="bad")
    change(frame)
    return frame


BAD_MESSAGES = {
    "unknown session": (lambda f: f.update(session_id="nope"), "SESSION_KEY_NOT_FOUND", "SESSION_KEY_NOT_FOUND"),
    "no payload": (lambda f: f.pop("payload"), "MISSING_PAYLOAD", "MISSING_PAYLOAD"),
    "null payload": (lambda f: f.update(payload=None), "MISSING_PAYLOAD", "MISSING_PAYLOAD_FIELDS"),
    "no aadHex": (_drop("aadHex"), "INVALID_PAYLOAD", "MISSING_PAYLOAD_FIELDS"),
    "non-hex ciphertext": (_set("ciphertextHex", "xyz0"), "INVALID_HEX_ENCODING", "INVALID_HEX_ENCODING"),
    "16-byte nonce": (_set("nonceHex", "00" * 16), "INVALID_NONCE_SIZE", "INVALID_NONCE_SIZE"),
    "tampered ciphertext": (_flip("ciphertextHex"), "DECRYPTION_FAILED", "DECRYPTION_FAILED"),
    "other aad": (_set("aadHex", message_aad(7).hex()), "DECRYPTION_FAILED", "DECRYPTION_FAILED"),
}


async def _served_after(peer: Peer, session: EncryptedSession) -> None:
    answer = await ask(peer, session, "still served", "good", max_tokens=3)
    assert answer.text == scripted_text("still served", 3)


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
@pytest.mark.parametrize("case", list(BAD_INITS))
async def test_every_malformed_init_gets_its_code_and_the_host_keeps_serving(start_host, make_peer, case, legacy):
    """A coded error naming the session (no id: the init had none); then a good exchange is served."""
    change, code, legacy_code = BAD_INITS[case]
    server = await start_host(operator_key=HOST_KEY, legacy=legacy)
    peer = await make_peer(server)
    await peer.send(_init_with(change))
    error = await peer.recv()
    assert error["type"] == "error" and error["code"] == (legacy_code if legacy else code)
    assert error["session_id"] == "1234" and "id" not in error
    assert ("error" in error) is not legacy  # normal mode also nests {code, message}; production does not
    assert len(only_connection(server).encryption.keys) == 0
    await _served_after(peer, client())


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
@pytest.mark.parametrize("case", list(BAD_MESSAGES))
async def test_every_malformed_message_gets_its_code_and_the_host_keeps_serving(start_host, make_peer, case, legacy):
    """A coded error echoing the message's id; then a good exchange is served on the same socket."""
    change, code, legacy_code = BAD_MESSAGES[case]
    peer = await make_peer(await start_host(operator_key=HOST_KEY, legacy=legacy))
    session = client()
    await init(peer, session)
    await peer.send(_message_payload(session, change))
    error = await peer.recv()
    assert (error["type"], error["code"], error["id"]) == ("error", legacy_code if legacy else code, "bad")
    await _served_after(peer, session)


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
async def test_message_before_any_init_replay_and_bad_utf8(start_host, make_peer, legacy):
    """The rest of the codes: no key yet (SESSION_KEY_NOT_FOUND; production: MISSING_SESSION_ID when the
    message names no session either), a replayed message (INVALID_PAYLOAD in both modes: a prompt
    runs once), and plaintext that is not UTF-8 (INVALID_PAYLOAD; production: INVALID_UTF8)."""
    peer = await make_peer(await start_host(operator_key=HOST_KEY, legacy=legacy))
    session = client()
    session.init_frame()  # a key the host never saw
    await peer.send(session.message_frame(PROMPT, model="scripted-1", max_tokens=3, temperature=0.0,
                                          request_id="early"))
    assert (await peer.recv())["code"] == "SESSION_KEY_NOT_FOUND"
    anonymous = session.message_frame(PROMPT, model="scripted-1", max_tokens=3, temperature=0.0, request_id="anon")
    del anonymous["session_id"]
    await peer.send(anonymous)
    assert (await peer.recv())["code"] == ("MISSING_SESSION_ID" if legacy else "SESSION_KEY_NOT_FOUND")

    key_holder = client()
    await init(peer, key_holder)
    message = key_holder.message_frame(PROMPT, model="scripted-1", max_tokens=2, temperature=0.0, request_id="once")
    await peer.send(message)
    await read_answer(peer, key_holder, "once")
    await peer.send(message)
    replay = await peer.recv()
    assert (replay["code"], replay["id"]) == ("INVALID_PAYLOAD", "once")

    await peer.send({"type": "encrypted_message", "session_id": "1234", "id": "bin",
                     "payload": seal(key_holder._key, b"\xff\xfe", message_aad(5))})
    error = await peer.recv()
    assert (error["code"], error["id"]) == ("INVALID_UTF8" if legacy else "INVALID_PAYLOAD", "bin")
    await _served_after(peer, key_holder)


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
async def test_a_bad_decrypted_request_is_refused_with_its_id(start_host, make_peer, legacy):
    """A decrypted body with a wrongly typed field: INVALID_OPTIONS (normal); production's uncoded refusal
    and a bare stream_end (legacy). The socket then serves."""
    peer = await make_peer(await start_host(operator_key=HOST_KEY, legacy=legacy))
    session = client()
    await init(peer, session)
    key = session._key  # the client's session key, to encrypt a body our client would never build
    await peer.send({"type": "encrypted_message", "session_id": "1234", "id": "typed",
                     "payload": seal(key, b'{"prompt":"x","max_tokens":"many"}', message_aad(0))})
    if legacy:
        assert (await peer.recv())["error"].startswith("'max_tokens'")
        assert await peer.recv() == {"type": "stream_end", "id": "typed"}
    else:
        error = await peer.recv()
        assert (error["code"], error["id"]) == ("INVALID_OPTIONS", "typed")
    await _served_after(peer, session)


# --------------------------------------------------------------------------- nothing in clear on the wire


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
async def test_no_prompt_or_answer_on_the_wire(start_host, make_peer, legacy):
    """Every frame of two encrypted exchanges and a cancelled one, both directions, captured: neither a
    prompt nor an answer (nor any answer word, nor their hex) appears."""
    server = await start_host(backend=ScriptedBackend(token_rate=500), operator_key=HOST_KEY, legacy=legacy)
    peer = await make_peer(server)
    wire: list[str] = []
    send, recv = peer.ws.send, peer.ws.recv

    async def recording_send(message, *args, **kwargs):
        wire.append(message)
        await send(message, *args, **kwargs)

    async def recording_recv(*args, **kwargs):
        message = await recv(*args, **kwargs)
        wire.append(message)
        return message

    peer.ws.send, peer.ws.recv = recording_send, recording_recv
    session = client()
    prompts = [PROMPT, "Tell nobody about the treasure under the old oak"]
    answers = [(await ask(peer, session, prompt, f"r{i}", max_tokens=12)).text for i, prompt in enumerate(prompts)]
    await init(peer, session)
    await peer.send(session.message_frame("a third private question", model="scripted-1", max_tokens=2000,
                                          temperature=0.0, request_id="c"))
    await peer.recv()
    await peer.send(cancel_frame(session_id="1234"))
    await peer.until_end()
    assert answers == [scripted_text(p, 12) for p in prompts]
    joined = "\n".join(m if isinstance(m, str) else m.decode("latin-1") for m in wire)
    assert len(wire) > 30 and "encrypted_chunk" in joined
    secrets = [*prompts, "a third private question", *answers, *{w for a in answers for w in a.split()}]
    for secret in secrets:
        assert secret not in joined, secret
        assert secret.encode().hex() not in joined.lower(), secret
