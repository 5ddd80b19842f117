"""The client encrypting end to end (spec §6) against real ``fabstir-host`` servers with operator keys.

Every host here is a real :class:`HostServer` on loopback. Where a test looks at the wire, the client
talks to the host through :class:`WireTap`, a real WebSocket relay that records every frame both
ways (and, for one test, alters one frame on its way to the client); it also forwards the host's
HTTP endpoints, so the client describes the host through it as usual.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.errors import EncryptionError, EncryptionUnavailable
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text
from fabstir_jupyter.host.server import HostServer
from fabstir_jupyter.hosts import HostInfo, HostKeys
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.usage import ListSink

KEY_A = PrivateKey.from_hex("0x" + "a1" * 32)
KEY_B = PrivateKey.from_hex("0x" + "b2" * 32)
KEY_C = PrivateKey.from_hex("0x" + "c3" * 32)
USER = PrivateKey.from_hex("0x" + "d4" * 32)
PROMPT = "Which river carries the most water into the sea"
SECOND = "And which one is the longest"


def keyed(url: str, key: PrivateKey, *, published: PrivateKey | None = None, **fields: Any) -> HostInfo:
    """A host as a registry describes it: its address, and the public key it publishes (its own by default)."""
    shown = published or key
    return HostInfo(api_url=url, address=key.address,
                    metadata={"publicKey": shown.public_key.compressed.hex(), **fields.pop("metadata", {})}, **fields)


def secrets_of(*texts: str) -> list[str]:
    """What must never cross the wire: each text, its hex, and a few of its words in JSON-escaped form."""
    found = []
    for text in texts:
        found += [text, text.encode().hex(), json.dumps(text)[1:-1]]
        found += [word for word in text.split() if len(word) > 5]
    return found


class WireTap:
    """A WebSocket relay in front of a real host: records every message both ways, forwards HTTP.

    Probes open sockets too (and send nothing): :meth:`sockets_used` counts the sockets that
    carried a client frame.

    Args:
        upstream: the host.
        alter: ``alter(frame) -> frame`` applied to host→client JSON frames (a tampering host).
        alter_up: the same for client→host frames (tampering on the way to the host).
    """

    def __init__(self, upstream: HostServer, alter: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 alter_up: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.upstream = upstream
        self.alter = alter
        self.alter_up = alter_up
        self.frames: list[tuple[str, str]] = []  # ("client" | "host", message text)
        self.connections = 0
        self._carried: set[int] = set()  # connections that carried a client frame
        self._server: Any = None

    async def start(self) -> WireTap:
        self._server = await serve(self._relay, "127.0.0.1", 0, process_request=self._http)
        return self

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def sent(self, kind: str) -> list[dict[str, Any]]:
        """The client's frames of one ``type``, parsed."""
        return [f for f in map(json.loads, (t for d, t in self.frames if d == "client")) if f.get("type") == kind]

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(t) for d, t in self.frames if d == "host"]

    def client_frames(self) -> list[str]:
        return [t for d, t in self.frames if d == "client"]

    def sockets_used(self) -> int:
        return len(self._carried)

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        async with httpx.AsyncClient() as client:
            answer = await client.get(self.upstream.http_url + request.path)
        headers = Headers({"Content-Type": answer.headers.get("content-type", "application/json"),
                           "Content-Length": str(len(answer.content))})
        return Response(answer.status_code, answer.reason_phrase, headers, answer.content)

    async def _relay(self, client: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        async with connect(self.upstream.ws_url, compression=None) as host:
            async def down() -> None:
                async for message in host:
                    if self.alter is not None and isinstance(message, str):
                        message = json.dumps(self.alter(json.loads(message)))
                    self.frames.append(("host", message))
                    await client.send(message)

            async def up() -> None:
                async for message in client:
                    if self.alter_up is not None and isinstance(message, str):
                        message = json.dumps(self.alter_up(json.loads(message)))
                    self.frames.append(("client", message))
                    self._carried.add(number)
                    await host.send(message)

            tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if tasks[0] in done:
            client.transport.abort()  # the host went away: so does the relay, without a close frame

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def tap():
    taps: list[WireTap] = []

    async def make(upstream: HostServer, **kwargs: Any) -> WireTap:
        taps.append(await WireTap(upstream, **kwargs).start())
        return taps[-1]

    yield make
    for wire in taps:
        await wire.close()


@pytest.fixture
async def keyed_manager(fast_config):
    """``keyed_manager(hosts, **config_changes)``: a manager over HostInfo hosts, usage into a list."""
    managers: list[InferenceManager] = []

    def make(hosts: list[HostInfo], signer: PrivateKey | None = None, **changes: Any) -> InferenceManager:
        config = fast_config.replace(**changes) if changes else fast_config
        manager = InferenceManager(hosts, config, usage=ListSink(), signer=signer)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.aclose()


async def read(stream_cm: Any) -> Any:
    async with stream_cm as stream:
        async for _ in stream:
            pass
    return stream


async def prefer(manager: InferenceManager, first: str) -> None:
    """Discover, then make the host at ``first`` the best choice (lowest latency)."""
    for info in await manager.host_manager.discover_all_active_hosts():
        info.latency_ms = 1.0 if info.api_url == first else 500.0


# --------------------------------------------------------------------------- stateless


async def test_a_keyed_host_gets_the_request_encrypted_and_nothing_readable_crosses_the_wire(
        start_host, tap, keyed_manager):
    """encryption="auto" with a published, checked key: the answer is right, the stream and every usage
    record say encrypted, and no frame either way holds the prompt, the answer, their hex or their words."""
    host = await start_host(operator_key=KEY_A)
    wire = await tap(host)
    manager = keyed_manager([keyed(wire.http_url, KEY_A)])
    stream = await read(manager.stream(PROMPT, max_tokens=12, temperature=0.0))
    answer = scripted_text(PROMPT, 12)
    assert stream.text == answer and stream.finish_reason == "length"
    assert stream.encrypted is True and stream.result().encrypted is True
    assert stream.usage.encrypted is True and [r.encrypted for r in manager.usage.records] == [True]
    assert stream.usage.prompt_tokens == len(PROMPT.split())
    kinds = [json.loads(t)["type"] for d, t in wire.frames if d == "client"]
    assert kinds == ["encrypted_session_init", "encrypted_message"]
    assert {f["type"] for f in wire.received()} == {"connected", "session_init_ack", "encrypted_chunk",
                                                   "encrypted_response", "stream_end"}
    everything = "\n".join(text for _, text in wire.frames)
    for secret in secrets_of(PROMPT, answer):
        assert secret not in everything, secret


async def test_requests_on_one_socket_each_get_a_fresh_init_and_session(start_host, tap, keyed_manager):
    """Two requests reuse the pooled socket; each sends its own init (a new ephemeral key, so a new
    session key) and its own session id, and both answers decrypt."""
    host = await start_host(operator_key=KEY_A)
    wire = await tap(host)
    manager = keyed_manager([keyed(wire.http_url, KEY_A)])
    first = await read(manager.stream(PROMPT, max_tokens=4))
    second = await read(manager.stream(SECOND, max_tokens=4))
    assert (first.text, second.text) == (scripted_text(PROMPT, 4), scripted_text(SECOND, 4))
    assert wire.sockets_used() == 1
    inits = wire.sent("encrypted_session_init")
    assert len(inits) == 2
    assert inits[0]["payload"]["ephPubHex"] != inits[1]["payload"]["ephPubHex"]
    assert inits[0]["session_id"] != inits[1]["session_id"]
    messages = wire.sent("encrypted_message")
    assert [bytes.fromhex(m["payload"]["aadHex"]) for m in messages] == [b"message_0", b"message_0"]


async def test_encryption_false_speaks_plaintext_to_a_keyed_host(start_host, tap, keyed_manager):
    """encryption=False (per request, or in the config) sends a plaintext inference and says so."""
    host = await start_host(operator_key=KEY_A)
    wire = await tap(host)
    manager = keyed_manager([keyed(wire.http_url, KEY_A)])
    stream = await read(manager.stream(PROMPT, max_tokens=3, encryption=False))
    assert stream.text == scripted_text(PROMPT, 3) and stream.encrypted is False
    assert stream.usage.encrypted is False
    assert [f["request"]["prompt"] for f in wire.sent("inference")] == [PROMPT]
    off = keyed_manager([keyed(wire.http_url, KEY_A)], encryption="off")
    assert (await read(off.stream(PROMPT, max_tokens=3))).encrypted is False
    assert not wire.sent("encrypted_session_init")


async def test_a_host_without_a_key_gets_plaintext_in_auto_and_the_stream_says_so(start_host, keyed_manager):
    """A host that publishes no key (a static URL, or metadata without publicKey) is plaintext in auto."""
    host = await start_host(operator_key=KEY_A)
    manager = keyed_manager([HostInfo(api_url=host.http_url, address=KEY_A.address, metadata={})])
    stream = await read(manager.stream(PROMPT, max_tokens=3))
    assert stream.text == scripted_text(PROMPT, 3)
    assert stream.encrypted is False and stream.usage.encrypted is False
    (info,) = manager.host_manager.hosts
    assert info.encryption_key is not None and not info.encryption_key.usable
    assert "publishes no publicKey" in info.encryption_key.problem


async def test_required_refuses_a_keyless_host_before_sending_it_anything(start_host, tap, keyed_manager):
    """encryption="required" with only a keyless host: ENCRYPTION_NOT_SUPPORTED, not retried, and the
    host got no frame (discovery's probe only opened a socket); the failure is recorded once."""
    host = await start_host()
    wire = await tap(host)
    manager = keyed_manager([wire.http_url], encryption="required")
    with pytest.raises(EncryptionUnavailable) as info:
        await read(manager.stream(PROMPT, max_tokens=3))
    assert info.value.code == "ENCRYPTION_NOT_SUPPORTED" and not info.value.retryable
    assert "encryption='required'" in str(info.value) and wire.http_url in str(info.value)
    assert wire.client_frames() == []
    assert [r.error_code for r in manager.usage.records] == ["ENCRYPTION_NOT_SUPPORTED"]
    assert manager.usage.records[0].encrypted is None


async def test_required_uses_the_keyed_host_when_the_preferred_one_has_no_key(start_host, tap, keyed_manager):
    """The refused host is skipped without backoff or a failed attempt; the keyed host answers encrypted."""
    keyless = await start_host()
    sealed = await start_host(operator_key=KEY_B)
    keyless_wire = await tap(keyless)
    manager = keyed_manager([keyless_wire.http_url, keyed(sealed.http_url, KEY_B)], encryption="required")
    await prefer(manager, keyless_wire.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=5))
    assert stream.text == scripted_text(PROMPT, 5) and stream.encrypted is True
    assert stream.attempts == 1 and stream.host.api_url == sealed.http_url
    assert keyless_wire.client_frames() == []
    assert [r.error_code for r in manager.usage.records] == [None]


async def test_a_host_whose_published_key_is_not_its_own_is_refused_in_auto(start_host, tap, keyed_manager):
    """A published key that derives another address is suspicious: refused in auto (another host
    answers; alone, ENCRYPTION_NOT_SUPPORTED naming the key's owner), used in clear only with encryption=False."""
    liar = await start_host(operator_key=KEY_A)
    honest = await start_host(operator_key=KEY_B)
    liar_wire = await tap(liar)
    lying = keyed(liar_wire.http_url, KEY_A, published=KEY_C)
    manager = keyed_manager([lying, keyed(honest.http_url, KEY_B)])
    await prefer(manager, liar_wire.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=4))
    assert stream.host.api_url == honest.http_url and stream.encrypted is True
    assert liar_wire.client_frames() == []
    assert lying.encryption_key.suspicious

    alone = keyed_manager([keyed(liar_wire.http_url, KEY_A, published=KEY_C)])
    with pytest.raises(EncryptionUnavailable) as info:
        await read(alone.stream(PROMPT, max_tokens=4))
    assert KEY_C.address in str(info.value) and liar_wire.client_frames() == []
    clear = await read(alone.stream(PROMPT, max_tokens=4, encryption=False))
    assert clear.text == scripted_text(PROMPT, 4) and clear.encrypted is False


async def test_invalid_encryption_options_are_refused_before_any_io(keyed_manager):
    """An unknown mode is INVALID_OPTIONS naming the field, in the config and per request."""
    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.errors import InvalidOptions

    for bad in (True, "yes", 1, ""):
        with pytest.raises(InvalidOptions) as info:
            InferenceConfig(encryption=bad)
        assert info.value.field == "encryption"
    manager = keyed_manager([])
    with pytest.raises(InvalidOptions):
        manager.stream(PROMPT, encryption="sometimes")
    assert InferenceConfig(encryption="OFF").encryption is False
    assert InferenceConfig(encryption=" Required ").encryption == "required"


# --------------------------------------------------------------------------- failures of an encrypted attempt


def _tamper_chunk(index: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    done = []

    def alter(frame: dict[str, Any]) -> dict[str, Any]:
        payload = frame.get("payload")
        if frame.get("type") == "encrypted_chunk" and not done and payload.get("index") == index:
            done.append(True)
            cipher = payload["ciphertextHex"]
            payload["ciphertextHex"] = ("0" if cipher[0] != "0" else "1") + cipher[1:]
        return frame

    return alter


async def test_a_chunk_that_fails_authentication_fails_the_attempt_and_the_answer_continues_elsewhere(
        start_host, tap, keyed_manager):
    """A host whose third chunk is altered: PROTOCOL_ERROR for that attempt after two good chunks, the
    stream continues on the other host (a fresh init there) and the text is exactly the right one."""
    tampering = await start_host(operator_key=KEY_A)
    honest = await start_host(operator_key=KEY_B)
    wire = await tap(tampering, alter=_tamper_chunk(2))
    manager = keyed_manager([keyed(wire.http_url, KEY_A), keyed(honest.http_url, KEY_B)])
    await prefer(manager, wire.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=10, seed=3))
    assert stream.text == scripted_text(PROMPT, 10, seed=3)
    first, second = manager.usage.records
    assert (first.host, first.error_code, first.received_tokens, first.encrypted) == (
        wire.http_url, "PROTOCOL_ERROR", 2, True)
    assert (second.host, second.error_code, second.received_tokens, second.encrypted) == (
        honest.http_url, None, 8, True)
    assert stream.encrypted is True


async def test_a_tampered_chunk_on_the_only_host_never_becomes_text(start_host, tap, keyed_manager):
    """With no other host and no retries, the stream ends with PROTOCOL_ERROR and only the authentic text."""
    host = await start_host(operator_key=KEY_A)
    wire = await tap(host, alter=_tamper_chunk(1))
    manager = keyed_manager([keyed(wire.http_url, KEY_A)], max_retries=0)
    from fabstir_jupyter.errors import ProtocolError

    async with manager.stream(PROMPT, max_tokens=6) as stream:
        with pytest.raises(ProtocolError) as info:
            async for _ in stream:
                pass
    assert "failed authentication" in str(info.value)
    assert stream.text == scripted_text(PROMPT, 1)


async def test_failover_mid_stream_between_two_keyed_hosts_inits_again_on_the_new_host(
        start_host, tap, keyed_manager):
    """The serving host drops after 4 tokens; the continuation goes to the other keyed host with its own
    init (its own key, message_0) and the partial answer as an encrypted prefill: no gap, no repeat."""
    failing = await start_host(operator_key=KEY_A, backend=ScriptedBackend(close_after=4))
    healthy = await start_host(operator_key=KEY_B)
    failing_wire, healthy_wire = await tap(failing), await tap(healthy)
    manager = keyed_manager([keyed(failing_wire.http_url, KEY_A), keyed(healthy_wire.http_url, KEY_B)])
    await prefer(manager, failing_wire.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=20, seed=5))
    answer = scripted_text(PROMPT, 20, seed=5)
    assert stream.text == answer and stream.encrypted is True
    assert [(r.received_tokens, r.encrypted) for r in manager.usage.records] == [(4, True), (16, True)]
    (init,) = healthy_wire.sent("encrypted_session_init")
    assert init["payload"]["ephPubHex"] != failing_wire.sent("encrypted_session_init")[0]["payload"]["ephPubHex"]
    everything = "\n".join(t for _, t in failing_wire.frames + healthy_wire.frames)
    for secret in secrets_of(PROMPT, answer):
        assert secret not in everything


async def test_a_host_that_refuses_the_init_fails_over_even_though_the_message_was_already_sent(
        start_host, tap, keyed_manager):
    """The client sends init and message back to back; a host running with another key than the one it
    publishes refuses the init (DECRYPTION_FAILED) after both were sent: the attempt fails retryably
    and the request is served by the next host; the refusing host's socket is not reused."""
    wrong = await start_host(operator_key=KEY_C)  # publishes KEY_A, runs with KEY_C
    good = await start_host(operator_key=KEY_B)
    wire = await tap(wrong)
    manager = keyed_manager([keyed(wire.http_url, KEY_A), keyed(good.http_url, KEY_B)])
    await prefer(manager, wire.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=4))
    assert stream.text == scripted_text(PROMPT, 4) and stream.host.api_url == good.http_url
    first = manager.usage.records[0]
    assert (first.error_code, first.encrypted) == ("DECRYPTION_FAILED", True)
    replies = [f for f in wire.received() if f["type"] != "connected"]
    assert replies[0]["type"] == "error" and replies[0]["code"] == "DECRYPTION_FAILED"
    assert manager.pool.stats()["in_use"] == 0

    alone = keyed_manager([keyed(wire.http_url, KEY_A)], max_retries=1)
    with pytest.raises(EncryptionError) as info:
        await read(alone.stream(PROMPT, max_tokens=4))
    assert info.value.code == "DECRYPTION_FAILED" and "refused the encrypted session init" in str(info.value)
    assert len(alone.usage.records) == 2


def _flip_messages(frame: dict[str, Any]) -> dict[str, Any]:
    if frame.get("type") == "encrypted_message":
        cipher = frame["payload"]["ciphertextHex"]
        frame["payload"]["ciphertextHex"] = ("0" if cipher[0] != "0" else "1") + cipher[1:]
    return frame


async def test_a_message_the_host_cannot_open_fails_that_attempt_after_the_ack(start_host, tap, keyed_manager):
    """The message is altered on its way to the host: the init is acknowledged, then the host answers
    DECRYPTION_FAILED for the message; that attempt fails (retryably) and the other host serves."""
    altered = await start_host(operator_key=KEY_A)
    good = await start_host(operator_key=KEY_B)
    wire = await tap(altered, alter_up=_flip_messages)
    manager = keyed_manager([keyed(wire.http_url, KEY_A), keyed(good.http_url, KEY_B)])
    await prefer(manager, wire.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=3))
    assert stream.text == scripted_text(PROMPT, 3) and stream.host.api_url == good.http_url
    replies = [f["type"] for f in wire.received() if f["type"] != "connected"]
    assert replies[:2] == ["session_init_ack", "error"]
    first = manager.usage.records[0]
    assert (first.error_code, first.host, first.encrypted) == ("DECRYPTION_FAILED", wire.http_url, True)


async def test_a_keyless_host_that_publishes_a_key_answers_not_supported_and_the_request_moves_on(
        start_host, keyed_manager):
    """A host that publishes its key but runs without it answers ENCRYPTION_NOT_SUPPORTED to the init:
    retryable for that attempt, another host serves."""
    keyless = await start_host()
    good = await start_host(operator_key=KEY_B)
    manager = keyed_manager([keyed(keyless.http_url, KEY_A), keyed(good.http_url, KEY_B)])
    await prefer(manager, keyless.http_url)
    stream = await read(manager.stream(PROMPT, max_tokens=3))
    assert stream.host.api_url == good.http_url and stream.encrypted is True
    assert manager.usage.records[0].error_code == "ENCRYPTION_NOT_SUPPORTED"


# --------------------------------------------------------------------------- cancel, sessions, batches


async def test_breaking_out_of_an_encrypted_stream_cancels_in_plaintext_and_the_socket_serves_the_next(
        start_host, tap, keyed_manager):
    """stream_cancel (plaintext, naming the encrypted session) stops the host; the drained socket
    carries the next encrypted request (stop, then send)."""
    host = await start_host(operator_key=KEY_A, backend=ScriptedBackend(token_rate=200))
    wire = await tap(host)
    manager = keyed_manager([keyed(wire.http_url, KEY_A)])
    async with manager.stream(PROMPT, max_tokens=1000) as stream:
        async for _ in stream:
            if len(stream.text.split()) >= 3:
                break
    assert stream.finish_reason == "cancelled" and stream.encrypted is True
    assert host.active_streams == 0
    (cancel,) = wire.sent("stream_cancel")
    assert cancel["session_id"] == wire.sent("encrypted_session_init")[0]["session_id"]
    follow = await read(manager.stream(SECOND, max_tokens=4))
    assert follow.text == scripted_text(SECOND, 4) and follow.encrypted is True
    assert wire.sockets_used() == 1


async def test_an_encrypted_session_keeps_its_conversation_across_turns_and_a_cancelled_turn(
        start_host, tap, keyed_manager):
    """A session's turns run on its pinned socket, each with a fresh init under the session's id; the
    host's memory holds the conversation (the second turn's prompt counts the first turn); a turn
    cut short by the caller is cancelled and the next turn still works on the same socket."""
    host = await start_host(operator_key=KEY_A, backend=ScriptedBackend(token_rate=400))
    wire = await tap(host)
    manager = keyed_manager([keyed(wire.http_url, KEY_A)], signer=USER)
    session = await manager.sessions.create_session()
    first = await read(manager.sessions.stream(session.id, PROMPT, max_tokens=6))
    second = await read(manager.sessions.stream(session.id, SECOND, max_tokens=6))
    assert (first.text, second.text) == (scripted_text(PROMPT, 6), scripted_text(SECOND, 6))
    assert first.encrypted is second.encrypted is True
    assert second.usage.prompt_tokens == len(PROMPT.split()) + 6 + len(SECOND.split())
    async with manager.sessions.stream(session.id, "Tell me a very long story", max_tokens=500) as third:
        async for _ in third:
            if len(third.text.split()) >= 2:
                break
    fourth = await read(manager.sessions.stream(session.id, "Thanks", max_tokens=3))
    assert fourth.text == scripted_text("Thanks", 3)
    assert session.turns == 3 and session.cancelled_turns == 1
    inits = wire.sent("encrypted_session_init")
    assert len(inits) == 4 and {i["session_id"] for i in inits} == {session.id}
    assert wire.sockets_used() == 1 and not wire.sent("session_init")
    acks = [f for f in wire.received() if f["type"] == "session_init_ack"]
    assert {a["client_address"] for a in acks} == {USER.address}  # signed by the user's key
    everything = "\n".join(t for _, t in wire.frames)
    for secret in secrets_of(PROMPT, SECOND):
        assert secret not in everything


async def test_a_session_switching_between_plaintext_and_encryption_resends_its_transcript(
        start_host, keyed_manager):
    """A host keeps plaintext and encrypted memories apart (and the encrypted one per signer): a turn
    that changes encryption, or the signer, on the session's pinned socket resends the transcript,
    so the host always sees the whole conversation."""
    host = await start_host(operator_key=KEY_A)
    manager = keyed_manager([keyed(host.http_url, KEY_A)])
    session = await manager.sessions.create_session()
    first = await read(manager.sessions.stream(session.id, PROMPT, max_tokens=4, encryption=False))
    second = await read(manager.sessions.stream(session.id, SECOND, max_tokens=4))
    assert (first.encrypted, second.encrypted) == (False, True)
    assert second.usage.prompt_tokens == len(PROMPT.split()) + 4 + len(SECOND.split())
    manager.use_signer(USER)
    third = await read(manager.sessions.stream(session.id, "And the widest", max_tokens=4))
    assert third.usage.prompt_tokens == second.usage.prompt_tokens + 4 + 3
    fourth = await read(manager.sessions.stream(session.id, "Thanks", max_tokens=2, encryption=False))
    assert fourth.encrypted is False and fourth.usage.prompt_tokens == third.usage.prompt_tokens + 4 + 1
    assert manager.sessions.pinned_socket(session.id) is not None and manager.pool.stats()["in_use"] == 1


async def test_a_session_that_fails_over_replays_its_transcript_encrypted_on_the_new_host(
        start_host, tap, keyed_manager):
    """When the session's host dies, the next turn goes to the other keyed host over a fresh socket,
    inits there and resends the transcript inside the encrypted message."""
    first_host = await start_host(operator_key=KEY_A)
    other = await start_host(operator_key=KEY_B)
    other_wire = await tap(other)
    manager = keyed_manager([keyed(first_host.http_url, KEY_A), keyed(other_wire.http_url, KEY_B)])
    await prefer(manager, first_host.http_url)
    session = await manager.sessions.create_session()
    await read(manager.sessions.stream(session.id, PROMPT, max_tokens=5))
    await first_host.close()
    turn = await read(manager.sessions.stream(session.id, SECOND, max_tokens=5))
    assert turn.text == scripted_text(SECOND, 5) and turn.encrypted is True
    assert turn.host.api_url == other_wire.http_url
    assert turn.usage.prompt_tokens == len(PROMPT.split()) + 5 + len(SECOND.split())
    assert other_wire.sent("encrypted_session_init")[0]["session_id"] == session.id
    assert not other_wire.sent("prompt") and not other_wire.sent("inference")


async def test_a_batch_runs_encrypted_across_keyed_hosts(start_host, keyed_manager):
    """Every prompt of a batch is answered encrypted; the ledger says so for each attempt."""
    hosts = [await start_host(operator_key=KEY_A), await start_host(operator_key=KEY_B)]
    manager = keyed_manager([keyed(hosts[0].http_url, KEY_A), keyed(hosts[1].http_url, KEY_B)])
    prompts = [f"Describe river number {i}" for i in range(6)]
    frame = await manager.batch(prompts, max_tokens=4)
    assert frame["text"].tolist() == [scripted_text(p, 4) for p in prompts]
    assert frame["error"].isna().all()
    assert len(manager.usage.records) == 6 and all(r.encrypted for r in manager.usage.records)


async def test_required_in_a_batch_refuses_only_the_keyless_host(start_host, tap, keyed_manager):
    """A batch under encryption="required" spreads over the keyed host only; the keyless one sees nothing."""
    keyless = await start_host()
    sealed = await start_host(operator_key=KEY_A)
    keyless_wire = await tap(keyless)
    manager = keyed_manager([keyless_wire.http_url, keyed(sealed.http_url, KEY_A)], encryption="required")
    frame = await manager.batch([f"Prompt {i}" for i in range(4)], max_tokens=2)
    assert frame["error"].isna().all() and set(frame["host"]) == {sealed.http_url}
    assert keyless_wire.client_frames() == []


# --------------------------------------------------------------------------- keys


async def test_the_signer_is_the_managers_own_key_unless_one_is_given(start_host, keyed_manager):
    """Without a signer the manager signs every init with one fresh key of its own (so a host keeps
    a conversation's memory across re-inits); use_signer switches to the user's key."""
    host = await start_host(operator_key=KEY_A)
    manager = keyed_manager([keyed(host.http_url, KEY_A)])
    await read(manager.stream(PROMPT, max_tokens=2))
    own = manager.connector.signer
    assert own is not None and own.address != USER.address
    await read(manager.stream(PROMPT, max_tokens=2))
    assert manager.connector.signer is own
    manager.use_signer(USER)
    assert manager.connector.signer is USER
    assert USER.address not in repr(manager.connector) and "d4d4" not in repr(manager)


async def test_concurrent_requests_look_a_key_up_once(start_host, keyed_manager):
    """Many streams starting together check a host's key once and cache it on the HostInfo."""
    host = await start_host(operator_key=KEY_A)
    info = keyed(host.http_url, KEY_A)
    manager = keyed_manager([info])
    streams = await asyncio.gather(*(read(manager.stream(f"{PROMPT} {i}", max_tokens=2)) for i in range(5)))
    assert all(s.encrypted for s in streams)
    assert info.encryption_key.source == "metadata" and info.encryption_key.public_key == KEY_A.public_key


async def test_a_key_recovery_that_hangs_is_bounded_and_leaves_the_host_plaintext(start_host, keyed_manager):
    """A source whose recovery never answers costs at most the timeout; auto then speaks plaintext, and
    the failure is remembered (not retried on every request) until retry_after passes."""
    host = await start_host(operator_key=KEY_A)
    calls = []

    class Silent:
        async def discover(self) -> list[HostInfo]:
            return []

        async def recover_public_key(self, address: str, *, deadline: float | None = None) -> Any:
            calls.append(address)
            await asyncio.Event().wait()

    manager = keyed_manager([HostInfo(api_url=host.http_url, address=KEY_A.address)])
    manager.host_manager.add_source(Silent())
    manager.host_manager.keys.timeout = 0.05
    first = await read(manager.stream(PROMPT, max_tokens=2))
    second = await read(manager.stream(PROMPT, max_tokens=2))
    assert first.encrypted is second.encrypted is False
    assert calls == [KEY_A.address]
    (info,) = manager.host_manager.hosts
    assert "took longer than 0.05 s" in info.encryption_key.problem


async def test_host_keys_try_a_failed_recovery_again_after_retry_after():
    """A negative answer is cached for retry_after seconds of the (fake) clock, a key for good."""
    now = [100.0]
    answers: list[Any] = [EncryptionError("no transaction", code="ENCRYPTION_NOT_SUPPORTED"), KEY_A.public_key]

    class Source:
        async def recover_public_key(self, address: str, *, deadline: float | None = None) -> Any:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    keys = HostKeys([Source()], timeout=1.0, retry_after=60.0, clock=lambda: now[0])
    host = HostInfo(api_url="http://127.0.0.1:9", address=KEY_A.address)
    assert not (await keys.find(host)).usable
    now[0] += 59
    assert not (await keys.find(host)).usable and len(answers) == 1
    now[0] += 2
    found = await keys.find(host)
    assert found.usable and found.source == "registration"
    now[0] += 10_000
    assert (await keys.find(host)) is found and not answers

