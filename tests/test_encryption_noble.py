"""Known-answer and exchange tests of spec §6 against @noble/curves, @noble/hashes and @noble/ciphers.

The production SDK encrypts with the @noble libraries. tests/noble_e2ee.mjs is an independent
implementation of §6 on them; these tests run it with Node and check both directions:

* byte for byte: the same keys and nonces give the same payloads on both sides;
* our client against a @noble host, and a @noble client (shaped like the SDK's frames) against our host;
* a @noble client shaped exactly like the production SDK (nine payload fields, no ``id`` on the
  init, a fresh init before every prompt on one socket, the web search fields) against a real
  ``fabstir-host`` over a real WebSocket (the ``ws`` package), in normal and legacy mode.

The packages are installed once with npm into a cache directory (~/.cache/fabstir-jupyter/). The
tests skip only when ``node`` or ``npm`` is missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.crypto import PrivateKey, hkdf_sha256
from fabstir_jupyter.encryption import (
    HKDF_INFO,
    HKDF_SALT,
    RESPONSE_AAD,
    EncryptedPrompt,
    EncryptedSession,
    EncryptedSessionInit,
    HostEncryption,
    SessionInitData,
    chunk_aad,
    message_aad,
    seal,
    seal_session_init,
    transcript_digest,
)
from fabstir_jupyter.host import HostConfig, HostServer, ScriptedBackend, scripted_text
from fabstir_jupyter.hosts import HostInfo
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.protocol import ResponseReader, encode, parse_host_frame
from fabstir_jupyter.transport import WebSocketClient
from fabstir_jupyter.usage import ListSink

NOBLE_PACKAGES = ("@noble/curves@1.9.7", "@noble/hashes@1.8.0", "@noble/ciphers@0.4.1", "ws@8.18.3")
SCRIPT = Path(__file__).with_name("noble_e2ee.mjs")

HOST = PrivateKey.from_hex("0x" + "a1" * 32)
CLIENT = PrivateKey.from_hex("0x" + "b2" * 32)
PROMPT = "Which river runs through Ljubljana? Answer privately."
REPLY = ["The ", "Ljubljanica", " — ", "naturally.", ""]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    tag = hashlib.sha256(" ".join(NOBLE_PACKAGES).encode()).hexdigest()[:12]
    return Path(base) / "fabstir-jupyter" / f"noble-{tag}"


def _installed(root: Path) -> bool:
    names = [spec.rpartition("@")[0] for spec in NOBLE_PACKAGES]
    return all((root / "node_modules" / name / "package.json").is_file() for name in names)


class Noble:
    """Runs one job through a copy of tests/noble_e2ee.mjs: ``noble(job)``, or ``await noble.run_async(job)``
    while this process must keep serving (the job talks to a host on this event loop)."""

    def __init__(self, node: str, script: Path) -> None:
        self.node = node
        self.script = script

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        done = subprocess.run([self.node, str(self.script)], input=json.dumps(job), capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, f"node failed on {job['op']}:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout)

    async def run_async(self, job: dict[str, Any]) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            self.node, str(self.script), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(job).encode()), 60)
        assert process.returncode == 0, f"node failed on {job['op']}:\n{stderr.decode()[-3000:]}"
        return json.loads(stdout)


@pytest.fixture(scope="module")
def noble() -> Iterator[Noble]:
    """Run jobs through tests/noble_e2ee.mjs with the npm packages installed (once) beside it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the @noble known-answer tests (CI has both)")
    root = _cache_root()
    if not _installed(root):
        staging = root.with_name(f"{root.name}.{uuid.uuid4().hex[:8]}.partial")
        staging.mkdir(parents=True)
        (staging / "package.json").write_text('{"private": true, "type": "module"}\n')
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-save", "--loglevel=error", *NOBLE_PACKAGES],
            cwd=staging, capture_output=True, text=True, timeout=300, check=False,
        )
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"npm install {' '.join(NOBLE_PACKAGES)} failed:\n{done.stderr[-2000:]}")
        try:
            staging.rename(root)  # atomic: a parallel run that got there first wins
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    # A per-run copy of the script next to node_modules, where Node resolves its imports.
    script = root / f"run-{uuid.uuid4().hex[:8]}.mjs"
    shutil.copyfile(SCRIPT, script)
    yield Noble(node, script)
    script.unlink(missing_ok=True)


# --------------------------------------------------------------------------- byte for byte


def test_python_and_noble_produce_the_same_bytes_from_the_same_inputs(noble):
    """Fixed keys and nonces: the init payload (ciphertext and RFC 6979 signature included), the
    message, the chunks and the response are identical, and so are the keys, addresses and digest."""
    eph, init_nonce = PrivateKey.from_hex("0x" + "c3" * 32), bytes(range(24))
    session_key = bytes(range(100, 132))
    body = {"prompt": PROMPT, "model": "tiny-vicuna", "max_tokens": 64, "temperature": 0.7, "stream": True}
    chunks = [(text, bytes([i + 1]) * 24) for i, text in enumerate(REPLY)]
    message_nonce, response_nonce = bytes([0xEE]) * 24, bytes([0xDD]) * 24
    init_data = SessionInitData(session_key=session_key, job_id="1234", model="tiny-vicuna", price_per_token=0)
    node = noble({
        "op": "kat",
        "hostPrivHex": "a1" * 32, "clientPrivHex": "b2" * 32, "ephPrivHex": "c3" * 32,
        "initNonceHex": init_nonce.hex(), "sessionKeyHex": session_key.hex(),
        "initData": json.loads(init_data.to_json()),
        "body": body, "messageIndex": 3, "messageNonceHex": message_nonce.hex(),
        "chunks": [{"text": text, "nonceHex": nonce.hex()} for text, nonce in chunks],
        "finishReason": "stop", "responseNonceHex": response_nonce.hex(),
    })
    assert node["hostPubHex"] == str(HOST.public_key)
    assert node["hostAddress"] == HOST.address.lower() and node["clientAddress"] == CLIENT.address.lower()
    assert node["initKeyHex"] == hkdf_sha256(eph.ecdh(HOST.public_key), salt=HKDF_SALT, info=HKDF_INFO).hex()
    digest = transcript_digest(eph.public_key.compressed, HOST.public_key.compressed, nonce=init_nonce)
    assert node["transcriptHex"] == digest.hex()
    assert node["init"] == seal_session_init(HOST.public_key, CLIENT, init_data, ephemeral=eph, nonce=init_nonce)
    body_bytes = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert node["message"] == seal(session_key, body_bytes, message_aad(3), nonce=message_nonce)
    assert node["chunks"] == [
        {**seal(session_key, text.encode(), chunk_aad(i), nonce=nonce), "index": i}
        for i, (text, nonce) in enumerate(chunks)
    ]
    assert node["response"] == seal(session_key, b"stop", RESPONSE_AAD, nonce=response_nonce)


# --------------------------------------------------------------------------- exchanges


def test_our_client_talks_to_a_noble_host(noble):
    """Our init and message open with @noble; the signer recovers over the E2EEv1 transcript; the
    @noble host's encrypted reply reads back through EncryptedSession and ResponseReader."""
    session = EncryptedSession(HOST.public_key, session_id="1234", job_id=1234, chain_id=84532, model="tiny-vicuna",
                               signer=CLIENT)
    init = session.init_frame()
    message = session.message_frame(PROMPT, model="tiny-vicuna", max_tokens=64, temperature=0.7, request_id="q-1")
    node = noble({"op": "host", "hostPrivHex": "a1" * 32, "init": init, "message": message, "reply": REPLY,
                  "finishReason": "length"})
    assert node["data"]["jobId"] == "1234" and node["data"]["modelName"] == "tiny-vicuna"
    assert node["data"]["pricePerToken"] == 0 and len(node["data"]["sessionKey"]) == 64
    assert node["transcriptSigner"] == CLIENT.address.lower()
    assert node["ciphertextSigner"] != CLIENT.address.lower()  # production nodes recover this one, and only echo it
    assert node["request"] == {"prompt": PROMPT, "model": "tiny-vicuna", "max_tokens": 64, "temperature": 0.7,
                               "stream": True}
    assert node["messageAad"] == "message_0"
    reader = ResponseReader(request_id="q-1", max_tokens=100, features=["usage-always"])
    text = ""
    for frame in node["frames"] + [{"type": "stream_end", "id": "q-1"}]:
        text += "".join(reader.receive(session.decrypt(parse_host_frame(encode(frame)))))
    assert (text, reader.finish_reason, reader.done) == ("".join(REPLY), "length", True)


def test_a_noble_client_talks_to_our_host(noble):
    """An SDK-shaped init (nine fields, no id) and message from @noble open on our host, which names the
    signer; our encrypted reply decrypts on the @noble side in order, with the finish reason."""
    node = noble({"op": "client_init", "hostPubHex": str(HOST.public_key), "clientPrivHex": "b2" * 32,
                  "sessionId": "77", "jobId": 77, "chainId": 84532, "model": "tiny-vicuna", "prompt": PROMPT,
                  "maxTokens": 48, "id": "m-1"})
    assert "id" not in node["init"] and len(node["init"]["payload"]) == 9
    host = HostEncryption(HOST)
    init = host.receive(encode(node["init"]), now=0.0)
    assert isinstance(init, EncryptedSessionInit)
    assert (init.session_id, init.job_id, init.model, init.chain_id) == ("77", "77", "tiny-vicuna", 84532)
    assert init.signer_addresses[0] == CLIENT.address
    prompt = host.receive(encode(node["message"]), now=1.0)
    assert isinstance(prompt, EncryptedPrompt) and prompt.id == "m-1" and prompt.message_index == 0
    assert (prompt.request.prompt, prompt.request.max_tokens, prompt.request.temperature) == (PROMPT, 48, 0.7)
    writer = host.reply_writer(prompt.session_id, request_id=prompt.id, now=2.0)
    frames = [writer.chunk(text) for text in REPLY[:-1]] + [writer.chunk("", tokens=0, final=True),
                                                            writer.response("stop")]
    read = noble({"op": "client_read", "sessionKeyHex": node["sessionKeyHex"], "frames": frames})
    assert read == {"pieces": [*REPLY[:-1], ""], "finishReason": "stop"}


def test_the_noble_side_refuses_frames_under_another_key(noble):
    """Control: the @noble reader really authenticates: under another session key our chunk fails."""
    host = HostEncryption(HOST)
    host.keys.put("x", bytes(32), now=0.0)
    frame = host.reply_writer("x", request_id=None, now=0.0).chunk("secret")
    with pytest.raises(AssertionError, match="invalid tag"):
        noble({"op": "client_read", "sessionKeyHex": "01" * 32, "frames": [frame]})


# --------------------------------------------------------------------------- the SDK's frames, on a real host

SDK_PROMPTS = ["Which river runs through Ljubljana? Answer privately.", "And which castle overlooks it?"]


@pytest.mark.parametrize("legacy", [False, True], ids=["normal", "legacy"])
async def test_an_sdk_shaped_noble_client_talks_to_a_real_fabstir_host(noble, legacy):
    """Two prompts on one `ws` socket, each after a fresh encrypted_session_init (nine payload fields, no
    id) and with web_search/max_searches/search_queries on the message: each init is acknowledged,
    each answer decrypts with @noble in order to the scripted text, with the finish reason, and ends
    with a stream_end carrying the message's id and the session. Normal mode also keeps the
    session's memory across the re-init (the second prompt's usage counts the first turn)."""
    async with HostServer(HostConfig(operator_key=HOST, legacy=legacy), ScriptedBackend()) as server:
        result = await noble.run_async({
            "op": "sdk_session", "url": server.ws_url, "hostPubHex": str(HOST.public_key),
            "clientPrivHex": "b2" * 32, "sessionId": "1234", "jobId": 1234, "chainId": 84532,
            "model": "scripted-1", "maxTokens": 5, "prompts": SDK_PROMPTS,
        })
    assert result["greeting"]["type"] == "connected"
    turns = result["turns"]
    assert len(turns) == 2
    for prompt, turn in zip(SDK_PROMPTS, turns, strict=True):
        ack = turn["ack"]
        assert (ack["type"], ack["status"], ack["session_id"], ack["job_id"]) == ("session_init_ack", "success",
                                                                                  "1234", 1234)
        assert "id" not in ack
        expected_signer = turn["ciphertextSigner"] if legacy else CLIENT.address.lower()
        assert ack["client_address"].lower() == expected_signer
        assert "".join(turn["pieces"]) == scripted_text(prompt, 5) and turn["pieces"][-1] == ""
        assert turn["finishReason"] == "length"
        frames = turn["frames"]
        assert [f["type"] for f in frames] == ["encrypted_chunk"] * 6 + ["encrypted_response", "stream_end"]
        assert frames[5]["final"] is True
        assert all(f["id"] == turn["id"] and f["session_id"] == "1234" for f in frames)
        joined = json.dumps(frames)
        assert prompt not in joined and scripted_text(prompt, 5).strip() not in joined
    if legacy:
        assert turns[1]["frames"][-1] == {"type": "stream_end", "id": turns[1]["id"], "session_id": "1234"}
    else:
        first, second = (t["frames"][-1]["usage"]["prompt_tokens"] for t in turns)
        assert first == len(SDK_PROMPTS[0].split())
        assert second == first + 5 + len(SDK_PROMPTS[1].split())


async def test_the_frames_our_inference_manager_sends_open_on_a_noble_host(noble, monkeypatch):
    """The whole client path (InferenceManager → PoolConnector → EncryptedChannel), not just the
    frame builders: the init and message it put on a real socket to a real keyed host open with
    @noble, signed by the manager's signer over the SDK's transcript, carrying the request."""
    sent: list[dict[str, Any]] = []
    original = WebSocketClient.send

    async def record(self: WebSocketClient, frame: Any) -> None:
        sent.append(json.loads(encode(frame)))
        await original(self, frame)

    monkeypatch.setattr(WebSocketClient, "send", record)
    server = HostServer(HostConfig(operator_key=HOST), ScriptedBackend())
    await server.start()
    host = HostInfo(api_url=server.http_url, address=HOST.address, metadata={"publicKey": str(HOST.public_key)})
    manager = InferenceManager([host], InferenceConfig(usage_db=":memory:"), usage=ListSink(), signer=CLIENT)
    try:
        result = await manager.ainfer(PROMPT, max_tokens=5, temperature=0.2)
    finally:
        await manager.aclose()
        await server.close()
    assert result.encrypted is True and result.text == scripted_text(PROMPT, 5)
    init, message = sent
    node = noble({"op": "host", "hostPrivHex": "a1" * 32, "init": init, "message": message, "reply": REPLY,
                  "finishReason": "stop"})
    assert node["transcriptSigner"] == CLIENT.address.lower()
    assert node["data"]["modelName"] == "scripted-1" and node["data"]["jobId"] == ""
    assert node["request"] == {"prompt": PROMPT, "model": "scripted-1", "max_tokens": 5, "temperature": 0.2,
                               "stream": True}
    assert node["messageAad"] == "message_0"
