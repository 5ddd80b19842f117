"""fabstir_jupyter.encryption: the encrypted frames of spec §6, both halves, fuzzed, and a real exchange."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fabstir_jupyter.crypto import PrivateKey, recover_public_key
from fabstir_jupyter.encryption import (
    ALG,
    RESPONSE_AAD,
    EncryptedPrompt,
    EncryptedSession,
    EncryptedSessionInit,
    HostEncryption,
    SessionInitData,
    SessionKeys,
    chunk_aad,
    host_public_key,
    message_aad,
    open_session_init,
    seal,
    seal_session_init,
    transcript_digest,
)
from fabstir_jupyter.errors import EncryptionError, FabstirError, ProtocolError
from fabstir_jupyter.protocol import (
    Chunk,
    ErrorEvent,
    ResponseReader,
    StreamEnd,
    Usage,
    encode,
    end_frame,
    error_frame,
    parse_host_frame,
    session_init_ack_frame,
)

HOST = PrivateKey.from_hex("0x" + "11" * 32)
CLIENT = PrivateKey.from_hex("0x" + "22" * 32)
PROMPT = "Tell me the secret recipe of zucchini bread"
ANSWER = ["Mix ", "flour, ", "sugar ", "and zucchini."]

ENCRYPTION_CODES = {"MISSING_PAYLOAD", "INVALID_PAYLOAD", "INVALID_HEX_ENCODING", "INVALID_NONCE_SIZE",
                    "DECRYPTION_FAILED", "SESSION_KEY_NOT_FOUND"}
HOST_CODES = ENCRYPTION_CODES | {"PROTOCOL_ERROR", "INVALID_PROMPT", "INVALID_OPTIONS"}


def _session(**overrides: Any) -> EncryptedSession:
    options: dict[str, Any] = {"session_id": "42", "job_id": 42, "chain_id": 84532, "model": "tiny-vicuna",
                               "signer": CLIENT}
    options.update(overrides)
    return EncryptedSession(HOST.public_key, **options)


def _message(session: EncryptedSession, prompt: str = PROMPT, request_id: str = "r1", **options: Any) -> dict[str, Any]:
    options = {"model": "tiny-vicuna", "max_tokens": 32, "temperature": 0.7, **options}
    return session.message_frame(prompt, request_id=request_id, **options)


def _host_with_init() -> tuple[HostEncryption, EncryptedSession]:
    host, session = HostEncryption(HOST), _session()
    host.receive(encode(session.init_frame()), now=0.0)
    return host, session


def _reply(host: HostEncryption, pieces: list[str] = ANSWER, finish: str = "stop", request_id: str = "r1",
           session_id: str | None = "42") -> list[dict[str, Any]]:
    writer = host.reply_writer(session_id, request_id=request_id, now=1.0)
    frames = [writer.chunk(piece) for piece in pieces]
    frames.append(writer.chunk("", tokens=0, final=True))
    frames.append(writer.response(finish))
    return frames


def _read(session: EncryptedSession, frames: list[dict[str, Any]], request_id: str = "r1") -> tuple[str, str | None]:
    reader = ResponseReader(request_id=request_id, max_tokens=100, features=["usage-always"])
    text = ""
    for frame in frames:
        for piece in reader.receive(session.decrypt(parse_host_frame(encode(frame)))):
            text += piece
    return text, reader.finish_reason


# --------------------------------------------------------------------------- key schedule and payloads


def test_aads_are_the_production_strings():
    """message_<n>, chunk_<i> and encrypted_response_final, as ASCII bytes."""
    assert message_aad(0) == b"message_0" and message_aad(12) == b"message_12"
    assert chunk_aad(3) == b"chunk_3" and RESPONSE_AAD == b"encrypted_response_final"


def test_transcript_is_sha256_over_the_raw_e2eev1_bytes():
    """The signed digest covers the raw keys, the zero salt, the nonce and the empty info."""
    eph, host, nonce = b"\x02" + bytes(range(32)), HOST.public_key.compressed, bytes(range(24))
    raw = b"E2EEv1|" + eph + b"|" + host + b"|" + bytes(32) + b"|" + nonce + b"|"
    assert transcript_digest(eph, host, nonce=nonce) == hashlib.sha256(raw).digest()
    assert transcript_digest(eph, host, nonce=nonce, aad=b"x") == hashlib.sha256(raw + b"|x").digest()


def test_session_init_plaintext_is_the_sdk_json():
    """camelCase keys in the SDK's order, jobId a string, the price a number, no spaces; no key in repr."""
    data = SessionInitData(session_key=bytes(range(32)), job_id="42", model="tiny-vicuna")
    assert data.to_json() == (
        b'{"sessionKey":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","jobId":"42",'
        b'"modelName":"tiny-vicuna","pricePerToken":0}'
    )
    assert "0001020304" not in repr(data)
    assert SessionInitData.from_json(data.to_json()) == data


def test_session_init_plaintext_accepts_what_production_accepts():
    """0x-prefixed sessionKey, a numeric jobId, extra keys; pricePerToken may be absent."""
    text = json.dumps({"sessionKey": "0x" + "AB" * 32, "jobId": 7, "modelName": "m", "vectorDatabase": {},
                       "recoveryPublicKey": "0x02" + "00" * 32}).encode()
    data = SessionInitData.from_json(text)
    assert (data.session_key, data.job_id, data.price_per_token) == (b"\xab" * 32, "7", 0)
    assert data.recovery_public_key == "0x02" + "00" * 32


@pytest.mark.parametrize("text", [
    b"not json", b"\xff\xfe", b"[]", b'"s"',
    b'{"jobId":"1","modelName":"m","pricePerToken":0}',
    b'{"sessionKey":"abcd","jobId":"1","modelName":"m","pricePerToken":0}',
    b'{"sessionKey":"' + b"zz" * 32 + b'","jobId":"1","modelName":"m"}',
    b'{"sessionKey":"' + b"00" * 32 + b'","jobId":true,"modelName":"m"}',
    b'{"sessionKey":"' + b"00" * 32 + b'","jobId":["1"],"modelName":"m"}',
    b'{"sessionKey":"' + b"00" * 32 + b'","jobId":"1"}',
    b'{"sessionKey":"' + b"00" * 32 + b'","jobId":"1","modelName":"m","pricePerToken":-1}',
    b'{"sessionKey":"' + b"00" * 32 + b'","jobId":"1","modelName":"m","pricePerToken":"5"}',
    b'{"sessionKey":"' + b"00" * 32 + b'","jobId":"1","modelName":"m","recoveryPublicKey":5}',
])
def test_bad_session_init_plaintext_is_decryption_failed(text):
    """Every failure after the hex fields decoded is DECRYPTION_FAILED, as on a production node."""
    with pytest.raises(EncryptionError) as info:
        SessionInitData.from_json(text)
    assert info.value.code == "DECRYPTION_FAILED"


def test_client_seals_the_nine_field_payload_and_the_host_opens_it():
    """Nine fields of the SDK's types; the host gets the plaintext and the signer over the transcript."""
    data = SessionInitData(session_key=bytes(32), job_id="9", model="m")
    payload = seal_session_init(HOST.public_key, CLIENT, data)
    assert list(payload) == ["ephPubHex", "saltHex", "nonceHex", "ciphertextHex", "signatureHex", "recid", "alg",
                             "info", "aadHex"]
    assert len(payload["ephPubHex"]) == 66 and payload["saltHex"] == "00" * 32 and len(payload["nonceHex"]) == 48
    assert len(payload["signatureHex"]) == 130 and payload["recid"] == int(payload["signatureHex"][-2:], 16) in (0, 1)
    assert (payload["alg"], payload["info"], payload["aadHex"]) == (ALG, "", "")
    assert all(value == value.lower() for value in payload.values() if isinstance(value, str) and value != ALG)
    opened, signers = open_session_init(payload, HOST)
    assert opened == data
    ciphertext = bytes.fromhex(payload["ciphertextHex"])
    signature = bytes.fromhex(payload["signatureHex"])
    assert signers == (CLIENT.address, recover_public_key(signature, hashlib.sha256(ciphertext).digest()).address)
    assert signers[1] != CLIENT.address


def test_host_also_recovers_a_signature_over_the_ciphertext_digest():
    """A client that signs SHA-256(ciphertext) (what the production node recovers) is named second."""
    payload = seal_session_init(HOST.public_key, CLIENT, SessionInitData(session_key=bytes(32), job_id="9", model="m"))
    payload["signatureHex"] = CLIENT.sign_digest(hashlib.sha256(bytes.fromhex(payload["ciphertextHex"])).digest()).hex()
    _, signers = open_session_init(payload, HOST)
    assert signers[1] == CLIENT.address and signers[0] != CLIENT.address


def test_seal_session_init_is_deterministic_given_the_ephemeral_key_and_nonce():
    """Fixed inputs give fixed bytes (what the known-answer tests rely on)."""
    data = SessionInitData(session_key=bytes(32), job_id="9", model="m")
    eph, nonce = PrivateKey.from_hex("0x" + "33" * 32), bytes(range(24))
    first = seal_session_init(HOST.public_key, CLIENT, data, ephemeral=eph, nonce=nonce)
    assert seal_session_init(HOST.public_key, CLIENT, data, ephemeral=eph, nonce=nonce) == first
    assert first["ephPubHex"] == str(eph.public_key) and first["nonceHex"] == nonce.hex()


# --------------------------------------------------------------------------- client side


def test_client_accepts_a_published_key_that_derives_the_host_address():
    """The registry's 66-hex publicKey (with or without 0x) is the host's key when its address matches."""
    assert host_public_key(str(HOST.public_key), HOST.address) == HOST.public_key
    assert host_public_key("0x" + str(HOST.public_key), HOST.address.lower()) == HOST.public_key


@pytest.mark.parametrize("published", [None, "", "02zz", "02" + "ff" * 32, str(CLIENT.public_key), 5])
def test_client_refuses_a_missing_malformed_or_foreign_host_key(published):
    """ENCRYPTION_NOT_SUPPORTED, retryable (another host may serve), for any key it cannot trust."""
    with pytest.raises(EncryptionError) as info:
        host_public_key(published, HOST.address)
    assert info.value.code == "ENCRYPTION_NOT_SUPPORTED" and info.value.retryable
    assert HOST.address in info.value.message


def test_client_init_frame_has_the_sdk_shape():
    """type, string session_id and job_id, numeric chain_id, a payload; no id."""
    frame = _session().init_frame()
    assert set(frame) == {"type", "session_id", "chain_id", "job_id", "payload"}
    assert (frame["type"], frame["session_id"], frame["chain_id"], frame["job_id"]) == (
        "encrypted_session_init", "42", 84532, "42")


def test_client_rekeys_on_every_init_and_restarts_the_message_count():
    """Two inits carry two different session keys; message AADs start again at message_0."""
    session = _session()
    keys = []
    for _ in range(2):
        data, _ = open_session_init(session.init_frame()["payload"], HOST)
        keys.append(data.session_key)
        assert [bytes.fromhex(_message(session)["payload"]["aadHex"]) for _ in range(2)] == [b"message_0", b"message_1"]
    assert keys[0] != keys[1]


def test_client_message_frame_has_the_sdk_shape():
    """session_id, id, a three-field payload and the web_search fields; the prompt is not in it."""
    session = _session()
    session.init_frame()
    frame = _message(session, request_id="r7")
    assert frame == {"type": "encrypted_message", "session_id": "42", "id": "r7", "payload": frame["payload"],
                     "web_search": False, "max_searches": 0, "search_queries": None}
    assert set(frame["payload"]) == {"ciphertextHex", "nonceHex", "aadHex"}
    assert PROMPT not in encode(frame)


def test_client_needs_an_init_before_a_message():
    """A message without a session key is a programming error."""
    with pytest.raises(RuntimeError):
        _message(_session())


def test_client_reads_a_reply_into_text_and_finish_reason():
    """Chunks decrypt in order; the empty final chunk is not delivered; the finish reason arrives."""
    host, session = _host_with_init()
    host.receive(encode(_message(session)), now=0.5)
    text, finish = _read(session, _reply(host))
    assert (text, finish) == ("".join(ANSWER), "stop")


def _reply_variants() -> dict[str, Any]:
    def swap(frames):
        frames[0], frames[1] = frames[1], frames[0]
        return frames

    def duplicate(frames):
        return [frames[0], frames[0], *frames[1:]]

    def tamper(frames):
        hex_text = frames[1]["payload"]["ciphertextHex"]
        frames[1]["payload"]["ciphertextHex"] = ("1" if hex_text[0] != "1" else "2") + hex_text[1:]
        return frames

    def relabel(frames):
        frames[1]["payload"]["index"] = 5
        return frames

    def foreign_key(frames):
        frames[0]["payload"] = seal(bytes(32), b"injected", chunk_aad(0))
        frames[0]["payload"]["index"] = 0
        return frames

    def plaintext(frames):
        return [{"type": "stream_chunk", "content": "injected", "tokens": 1, "id": "r1"}, *frames]

    def other_session(frames):
        frames[0]["session_id"] = "43"
        return frames

    def response_as_chunk(frames):
        frames[-1]["type"] = "encrypted_chunk"
        return frames

    def chunk_as_response(frames):
        frames[0]["type"] = "encrypted_response"
        return frames

    def no_payload(frames):
        del frames[0]["payload"]
        return frames

    def chunk_after_response(frames):
        return [*frames, frames[0]]

    return {f.__name__: f for f in (swap, duplicate, tamper, relabel, foreign_key, plaintext, other_session,
                                     response_as_chunk, chunk_as_response, no_payload, chunk_after_response)}


@pytest.mark.parametrize("variant", list(_reply_variants()))
def test_client_refuses_a_reply_it_cannot_authenticate(variant):
    """Reordered, replayed, tampered, foreign or plaintext frames are a ProtocolError and never text."""
    host, session = _host_with_init()
    host.receive(encode(_message(session)), now=0.5)
    frames = _reply_variants()[variant](_reply(host))
    delivered = []
    with pytest.raises(ProtocolError) as info:
        for frame in frames:
            event = session.decrypt(parse_host_frame(encode(frame)))
            if isinstance(event, Chunk):
                delivered.append(event.content)
    assert info.value.code == "PROTOCOL_ERROR" and info.value.retryable
    assert "injected" not in delivered and "".join(delivered) in "".join(ANSWER)


def test_client_refuses_reply_frames_outside_a_request():
    """An encrypted_chunk before any message (or before the init) is a ProtocolError."""
    host, session = _host_with_init()
    frame = host.reply_writer("42", request_id="r1", now=0.1).chunk("early")
    with pytest.raises(ProtocolError):
        session.decrypt(parse_host_frame(encode(frame)))
    with pytest.raises(ProtocolError):
        _session().decrypt(parse_host_frame(encode(frame)))


def test_client_passes_plaintext_control_frames_through():
    """error and stream_end stay plaintext and reach the reader unchanged."""
    _, session = _host_with_init()
    for frame in (error_frame("HOST_BUSY", "busy", request_id="r1"),
                  end_frame(reason="complete", finish_reason="stop", usage=Usage(1, 2, 3))):
        event = parse_host_frame(encode(frame))
        assert session.decrypt(event) is event and isinstance(event, (ErrorEvent, StreamEnd))


# --------------------------------------------------------------------------- host side


def _valid_init() -> dict[str, Any]:
    return _session().init_frame()


def _init_with(change) -> str:
    frame = _valid_init()
    change(frame)
    return encode(frame)


def _payload_set(name, value):
    def change(frame):
        frame["payload"][name] = value
    return change


def _payload_del(name):
    def change(frame):
        del frame["payload"][name]
    return change


def _payload_hex(name, transform):
    def change(frame):
        frame["payload"][name] = transform(frame["payload"][name])
    return change


def _flip_first(hex_text: str) -> str:
    return ("1" if hex_text[0] != "1" else "2") + hex_text[1:]


BAD_INITS = {
    "no payload": (lambda f: f.pop("payload"), "MISSING_PAYLOAD"),
    "null payload": (lambda f: f.update(payload=None), "MISSING_PAYLOAD"),
    "string payload": (lambda f: f.update(payload="x"), "INVALID_PAYLOAD"),
    "list payload": (lambda f: f.update(payload=[]), "INVALID_PAYLOAD"),
    **{f"no {name}": (_payload_del(name), "INVALID_PAYLOAD")
       for name in ("ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex")},
    "numeric nonce": (_payload_set("nonceHex", 5), "INVALID_PAYLOAD"),
    **{f"non-hex {name}": (_payload_hex(name, lambda h: "zz" + h), "INVALID_HEX_ENCODING")
       for name in ("ephPubHex", "ciphertextHex", "nonceHex", "signatureHex")},
    "odd-length aad": (_payload_set("aadHex", "0"), "INVALID_HEX_ENCODING"),
    "spaced hex": (_payload_hex("ciphertextHex", lambda h: h[:4] + " " + h[4:]), "INVALID_HEX_ENCODING"),
    "12-byte nonce": (_payload_hex("nonceHex", lambda h: h[:24]), "INVALID_NONCE_SIZE"),
    "empty nonce": (_payload_set("nonceHex", ""), "INVALID_NONCE_SIZE"),
    "ephemeral not a point": (_payload_set("ephPubHex", "02" + "ff" * 32), "DECRYPTION_FAILED"),
    "empty ephemeral": (_payload_set("ephPubHex", ""), "DECRYPTION_FAILED"),
    "tampered ciphertext": (_payload_hex("ciphertextHex", _flip_first), "DECRYPTION_FAILED"),
    "empty ciphertext": (_payload_set("ciphertextHex", ""), "DECRYPTION_FAILED"),
    "short signature": (_payload_hex("signatureHex", lambda h: h[:128]), "DECRYPTION_FAILED"),
    "other aad": (_payload_set("aadHex", "00"), "DECRYPTION_FAILED"),
    "bad chain_id": (lambda f: f.update(chain_id="84532"), "INVALID_OPTIONS"),
    "bad session_id": (lambda f: f.update(session_id=[1]), "INVALID_OPTIONS"),
    "bad id": (lambda f: f.update(id={"a": 1}), "INVALID_OPTIONS"),
}


@pytest.mark.parametrize("case", list(BAD_INITS))
def test_host_answers_every_malformed_init_with_the_production_code(case):
    """Each malformed encrypted_session_init raises the code a production node sends; nothing is stored."""
    change, code = BAD_INITS[case]
    host = HostEncryption(HOST)
    with pytest.raises(FabstirError) as info:
        host.receive(_init_with(change), now=0.0)
    assert info.value.code == code
    assert len(host.keys) == 0


def test_host_ignores_the_four_informative_payload_fields():
    """saltHex, info, recid and alg may hold anything: the key schedule is fixed (as on production nodes)."""
    frame = _valid_init()
    frame["payload"].update(saltHex="zz", info={"x": 1}, recid="nine", alg=5)
    frame["payload"]["nonceHex"] = "0x" + frame["payload"]["nonceHex"].upper()
    event = HostEncryption(HOST).receive(encode(frame), now=0.0)
    assert isinstance(event, EncryptedSessionInit) and event.job_id == "42" and event.model == "tiny-vicuna"


def test_host_init_event_carries_no_key_and_names_the_signer():
    """The event names the job, model, chain and signer; the session key stays in the store only."""
    host = HostEncryption(HOST)
    event = host.receive(encode(_session().init_frame()), now=0.0)
    assert event == EncryptedSessionInit(session_id="42", job_id="42", model="tiny-vicuna", price_per_token=0,
                                         signer_addresses=event.signer_addresses, chain_id=84532)
    assert event.signer_addresses[0] == CLIENT.address and len(host.keys) == 1


def _message_with(change, session: EncryptedSession) -> str:
    frame = _message(session)
    change(frame)
    return encode(frame)


BAD_MESSAGES = {
    "unknown session": (lambda f: f.update(session_id="nope"), "SESSION_KEY_NOT_FOUND"),
    "no payload": (lambda f: f.pop("payload"), "MISSING_PAYLOAD"),
    "numeric payload": (lambda f: f.update(payload=3), "INVALID_PAYLOAD"),
    **{f"no {name}": (_payload_del(name), "INVALID_PAYLOAD") for name in ("ciphertextHex", "nonceHex", "aadHex")},
    "non-hex ciphertext": (_payload_hex("ciphertextHex", lambda h: h + "x"), "INVALID_HEX_ENCODING"),
    "16-byte nonce": (_payload_hex("nonceHex", lambda h: h[:32]), "INVALID_NONCE_SIZE"),
    "tampered ciphertext": (_payload_hex("ciphertextHex", _flip_first), "DECRYPTION_FAILED"),
    "other aad": (_payload_set("aadHex", message_aad(1).hex()), "DECRYPTION_FAILED"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_host_answers_every_malformed_message_with_the_production_code_and_keeps_serving(case):
    """Each malformed encrypted_message raises its §6 code; the next good message still works."""
    change, code = BAD_MESSAGES[case]
    host, session = _host_with_init()
    with pytest.raises(EncryptionError) as info:
        host.receive(_message_with(change, session), now=1.0)
    assert info.value.code == code
    event = host.receive(encode(_message(session)), now=2.0)
    assert isinstance(event, EncryptedPrompt) and event.request.prompt == PROMPT


def test_host_needs_an_init_before_a_message():
    """A message on a connection with no key is SESSION_KEY_NOT_FOUND."""
    session = _session()
    session.init_frame()
    with pytest.raises(EncryptionError) as info:
        HostEncryption(HOST).receive(encode(_message(session)), now=0.0)
    assert info.value.code == "SESSION_KEY_NOT_FOUND"


def test_host_decrypts_the_request_with_the_sdk_extras():
    """The inner JSON becomes a validated request; web_search and friends are read and ignored."""
    host, session = _host_with_init()
    event = host.receive(encode(_message(session, max_tokens=9, temperature=0.2, stop=["\n"], seed=3)), now=1.0)
    assert event.request.prompt == PROMPT and event.request.model == "tiny-vicuna"
    assert (event.request.max_tokens, event.request.temperature, event.request.stop, event.request.seed) == (
        9, 0.2, ("\n",), 3)
    assert (event.session_id, event.id, event.message_index, event.web_search) == ("42", "r1", 0, False)


def test_host_validates_the_decrypted_request_like_a_plaintext_one():
    """After decryption the inner request is type-checked by the plaintext parser: a bad max_tokens is
    INVALID_OPTIONS; an empty prompt parses (the host server judges emptiness, as for plaintext)."""
    host, session = _host_with_init()
    assert host.receive(encode(_message(session, prompt="")), now=1.0).request.prompt == ""
    with pytest.raises(FabstirError) as info:
        host.receive(encode(_message(session, max_tokens="many")), now=1.0)
    assert info.value.code == "INVALID_OPTIONS"


def _raw_message(key: bytes, plaintext: bytes, index: int, **outer: Any) -> str:
    return encode({"type": "encrypted_message", "session_id": "42", "id": "m",
                   "payload": seal(key, plaintext, message_aad(index)), **outer})


def test_host_reads_older_and_minimal_message_bodies():
    """A bare prompt (older SDKs) and a body lacking fields the outer frame carries, as production does."""
    host, data = HostEncryption(HOST), SessionInitData(session_key=bytes(range(32)), job_id="1", model="m")
    host.receive(encode({"type": "encrypted_session_init", "session_id": "42",
                         "payload": seal_session_init(HOST.public_key, CLIENT, data)}), now=0.0)
    event = host.receive(_raw_message(data.session_key, PROMPT.encode(), 0), now=1.0)
    assert event.request.prompt == PROMPT and event.request.model is None
    event = host.receive(_raw_message(data.session_key, b'{"prompt":"hi"}', 1, model="m2", max_tokens=4,
                                      web_search=True), now=1.0)
    assert (event.request.prompt, event.request.model, event.request.max_tokens, event.web_search) == (
        "hi", "m2", 4, True)
    with pytest.raises(EncryptionError) as info:
        host.receive(_raw_message(data.session_key, b"\xff\xfe", 2), now=1.0)
    assert info.value.code == "INVALID_PAYLOAD"


def test_host_refuses_a_replayed_message():
    """The same encrypted_message twice (or an older index) is INVALID_PAYLOAD: a prompt runs once."""
    host, session = _host_with_init()
    first = encode(_message(session))
    host.receive(first, now=1.0)
    host.receive(encode(_message(session)), now=1.0)
    with pytest.raises(EncryptionError) as info:
        host.receive(first, now=1.0)
    assert info.value.code == "INVALID_PAYLOAD" and "replayed" in info.value.message


def test_host_accepts_a_new_init_before_every_prompt_on_one_socket():
    """The production SDK re-inits per prompt: the new key replaces the old one, message_0 is fresh."""
    host, session = _host_with_init()
    old = _message(session)
    host.receive(encode(old), now=1.0)
    host.receive(encode(session.init_frame()), now=2.0)
    event = host.receive(encode(_message(session)), now=3.0)
    assert event.message_index == 0 and len(host.keys) == 1
    stale = dict(old, payload=dict(old["payload"]))
    with pytest.raises(EncryptionError) as info:
        host.receive(encode(stale), now=3.0)
    assert info.value.code == "DECRYPTION_FAILED"


def test_host_uses_the_latest_key_for_a_message_naming_no_session():
    """As production: a message without session_id uses the connection's latest session."""
    host, session = _host_with_init()
    frame = _message(session)
    del frame["session_id"]
    assert host.receive(encode(frame), now=1.0).request.prompt == PROMPT


def test_host_reply_frames_have_the_production_shape():
    """encrypted_chunk: tokens, session_id, id, payload with index; the last one final; then encrypted_response."""
    host, _ = _host_with_init()
    frames = _reply(host, ["a"])
    assert set(frames[0]) == {"type", "tokens", "session_id", "id", "payload"}
    assert frames[0]["payload"]["index"] == 0 and bytes.fromhex(frames[0]["payload"]["aadHex"]) == b"chunk_0"
    assert frames[1]["final"] is True and frames[1]["tokens"] == 0 and frames[1]["payload"]["index"] == 1
    assert frames[2]["type"] == "encrypted_response" and bytes.fromhex(frames[2]["payload"]["aadHex"]) == RESPONSE_AAD
    with pytest.raises(EncryptionError) as info:
        host.reply_writer("nope", request_id=None, now=1.0)
    assert info.value.code == "SESSION_KEY_NOT_FOUND"


# --------------------------------------------------------------------------- the host's key store


def test_session_keys_expire_after_their_lifetime_without_use():
    """A key unused for longer than lifetime is gone (and zeroed); use refreshes it."""
    keys = SessionKeys(lifetime=10.0)
    keys.put("a", b"\x01" * 32, now=0.0)
    entry = keys.get("a", now=9.0)
    assert entry is not None and keys.get("a", now=18.0) is entry
    stored = entry.key
    assert keys.get("a", now=28.5) is None and len(keys) == 0
    assert stored == bytearray(32)


def test_session_keys_are_bounded_and_evict_the_least_recently_used():
    """max_keys sessions at most; the one unused longest goes first."""
    keys = SessionKeys(max_keys=2)
    keys.put("a", b"a" * 32, now=0.0)
    keys.put("b", b"b" * 32, now=1.0)
    keys.get("a", now=2.0)
    keys.put("c", b"c" * 32, now=3.0)
    assert keys.get("b", now=3.0) is None and keys.get("a", now=3.0) is not None and len(keys) == 2


def test_host_wipes_every_key_on_close():
    """wipe() zeroes and drops the keys; later messages find none; reprs never show a key."""
    host, session = _host_with_init()
    entry = host.keys.get("42", now=0.5)
    key_hex = bytes(entry.key).hex()
    for shown in (repr(host), repr(host.keys), repr(entry)):
        assert key_hex not in shown and repr(bytes(entry.key)) not in shown and "key=" not in shown
    host.wipe()
    assert len(host.keys) == 0 and entry.key == bytearray(32)
    with pytest.raises(EncryptionError) as info:
        host.receive(encode(_message(session)), now=1.0)
    assert info.value.code == "SESSION_KEY_NOT_FOUND"


def test_host_forgets_one_session():
    """forget() drops one session's key and leaves the others."""
    host = HostEncryption(HOST)
    for sid in ("a", "b"):
        host.receive(encode(_session(session_id=sid).init_frame()), now=0.0)
    host.forget("a")
    assert host.keys.get("a", now=0.0) is None and host.keys.get("b", now=0.0) is not None


# --------------------------------------------------------------------------- nothing in clear


def test_a_full_exchange_shows_neither_prompt_nor_answer_on_the_wire():
    """Init, message, chunks and response: the prompt, the answer and their hex never appear."""
    host, session = HostEncryption(HOST), _session()
    wire = [encode(session.init_frame()), encode(_message(session))]
    for text in wire:
        host.receive(text, now=0.0)
    wire += [encode(frame) for frame in _reply(host)]
    joined = "\n".join(wire)
    secrets = [PROMPT, "zucchini", "".join(ANSWER), *[piece.strip() for piece in ANSWER]]
    for secret in secrets:
        assert secret not in joined and secret.encode().hex() not in joined
    assert _read(session, [json.loads(text) for text in wire[2:]])[0] == "".join(ANSWER)


# --------------------------------------------------------------------------- fuzzing both halves

_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_hexish = st.one_of(st.text(alphabet="0123456789abcdefABCDEFx ", max_size=80), st.sampled_from(["", "0x", "00" * 24]))
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _hexish, st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
PAYLOAD_KEYS = ["ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex", "saltHex", "recid", "index"]
OUTER_KEYS = ["type", "session_id", "sessionId", "id", "chain_id", "job_id", "payload", "tokens", "final",
              "web_search", "model", "max_tokens"]
_payloads = st.one_of(_values, st.dictionaries(st.sampled_from(PAYLOAD_KEYS), st.one_of(_hexish, _values), max_size=6))
_frames = st.builds(
    lambda outer, kind, payload: {**outer, "type": kind, "payload": payload},
    st.dictionaries(st.sampled_from(OUTER_KEYS), _values, max_size=5),
    st.sampled_from(["encrypted_session_init", "encrypted_message", "encrypted_chunk", "encrypted_response",
                     "stream_chunk"]),
    _payloads,
)

_GOOD_SESSION = _session()
_GOOD_INIT = _GOOD_SESSION.init_frame()
_GOOD_MESSAGE = _message(_GOOD_SESSION)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    """A valid init or message with one outer or payload field replaced, deleted or one hex digit changed."""
    frame = json.loads(json.dumps(draw(st.sampled_from([_GOOD_INIT, _GOOD_MESSAGE]))))
    target = frame["payload"] if draw(st.booleans()) else frame
    name = draw(st.sampled_from(sorted(target)))
    action = draw(st.sampled_from(["replace", "delete", "digit"]))
    if action == "delete":
        del target[name]
    elif action == "digit" and isinstance(target[name], str) and target[name]:
        at = draw(st.integers(0, len(target[name]) - 1))
        target[name] = target[name][:at] + draw(st.sampled_from("0f7Z ")) + target[name][at + 1:]
    else:
        target[name] = draw(_values)
    return encode(frame)


def _check_host(data: Any) -> None:
    host = HostEncryption(HOST)
    host.receive(encode(_GOOD_INIT), now=0.0)
    try:
        event = host.receive(data, now=1.0)
    except FabstirError as exc:
        assert exc.code in HOST_CODES, exc
        return
    assert isinstance(event, (EncryptedSessionInit, EncryptedPrompt))


@_FUZZ
@given(st.one_of(_frames.map(encode), _mutated(), st.text(max_size=40), st.binary(max_size=40)))
def test_fuzz_host_parser_raises_only_coded_errors(data: Any) -> None:
    """Any frame reaching the host's encrypted parser yields an event or a FabstirError of §6/§7 codes."""
    _check_host(data)


@_FUZZ
@given(st.lists(st.one_of(_frames, st.integers(0, 5)), max_size=6))
def test_fuzz_client_decryptor_raises_only_protocol_errors(items: list[Any]) -> None:
    """Any mix of host frames and genuine reply frames through EncryptedSession.decrypt is an event or a
    ProtocolError; text is only ever what the host encrypted."""
    host, session = _host_with_init()
    host.receive(encode(_message(session)), now=0.5)
    reply = _reply(host)
    for item in items:
        frame = reply[item] if isinstance(item, int) else item
        try:
            event = session.decrypt(parse_host_frame(encode(frame)))
        except ProtocolError:
            continue
        if isinstance(event, Chunk) and event.content:
            assert event.content in ANSWER


# --------------------------------------------------------------------------- a real exchange on loopback


async def test_both_halves_interoperate_over_a_real_websocket():
    """A client and a host, each using only its half, hold an encrypted conversation on a loopback socket;
    the host wipes the session keys when the connection closes, and no plaintext crosses the wire."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    wire: list[str] = []
    hosts: list[HostEncryption] = []
    seen: list[Any] = []

    async def handler(ws):
        host = HostEncryption(HOST, key_lifetime=60.0)
        hosts.append(host)
        try:
            async for text in ws:
                wire.append(text)
                try:
                    event = host.receive(text, now=time.monotonic())
                except FabstirError as exc:
                    await ws.send(encode(error_frame(exc.code, exc.message)))
                    continue
                seen.append(event)
                if isinstance(event, EncryptedSessionInit):
                    await ws.send(encode(session_init_ack_frame(event.session_id, job_id=event.job_id,
                                                                chain_id=event.chain_id)))
                    continue
                writer = host.reply_writer(event.session_id, request_id=event.id, now=time.monotonic())
                words = [f"{word} " for word in event.request.prompt.split()][::-1]  # the "model"
                for word in words:
                    await ws.send(encode(writer.chunk(word)))
                await ws.send(encode(writer.chunk("", tokens=0, final=True)))
                await ws.send(encode(writer.response("stop")))
                await ws.send(encode(end_frame(reason="complete", finish_reason="stop",
                                               usage=Usage(len(words), len(words), 2 * len(words)),
                                               request_id=event.id)))
        finally:
            host.wipe()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        session = EncryptedSession(host_public_key(str(HOST.public_key), HOST.address), session_id="s-1",
                                   job_id="7", chain_id=31337, model="m", signer=CLIENT)
        answers = []
        async with connect(f"ws://127.0.0.1:{port}/v1/ws") as ws:
            for turn, prompt in enumerate([PROMPT, "and a second secret question"]):
                await ws.send(encode(session.init_frame()))  # re-key per prompt, as the SDK does
                ack = parse_host_frame(await asyncio.wait_for(ws.recv(), 5))
                assert ack.session_id == "s-1"
                await ws.send(encode(_message(session, prompt=prompt, request_id=f"r{turn}")))
                reader = ResponseReader(request_id=f"r{turn}", max_tokens=100, features=["usage-always"])
                text = ""
                while not reader.done:
                    raw = await asyncio.wait_for(ws.recv(), 5)
                    wire.append(raw)
                    text += "".join(reader.receive(session.decrypt(parse_host_frame(raw))))
                answers.append((text, reader.finish_reason))
        for _ in range(100):
            if hosts and len(hosts[0].keys) == 0:
                break
            await asyncio.sleep(0.01)
    assert answers == [(" ".join(PROMPT.split()[::-1]) + " ", "stop"),
                       ("question secret second a and ", "stop")]
    assert [type(e).__name__ for e in seen] == ["EncryptedSessionInit", "EncryptedPrompt"] * 2
    assert all(e.signer_addresses[0] == CLIENT.address for e in seen if isinstance(e, EncryptedSessionInit))
    assert len(hosts) == 1 and len(hosts[0].keys) == 0
    joined = "\n".join(wire)
    for secret in ("zucchini", "recipe", "second secret question"):
        assert secret not in joined


def test_every_error_code_on_the_encrypted_path_is_tested_here():
    """The six host codes of §6 each have a case above (ENCRYPTION_NOT_SUPPORTED is the host server's)."""
    codes = {code for _, code in itertools.chain(BAD_INITS.values(), BAD_MESSAGES.values())}
    assert codes >= ENCRYPTION_CODES
