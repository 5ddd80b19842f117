"""The host against the production TypeScript SDK's plaintext frames, in normal and legacy mode.

The frames below are written out exactly as the production SDK (Fabstir/fabstir-llm-sdk,
``packages/sdk-core``) sends them: field names, types and extra fields. ``SdkSocket`` also applies
the SDK's rule for when a request is answered (``WebSocketClient.sendMessage``), so each test
checks both the host's frames and that the SDK would not be left waiting. Legacy mode must answer
like the production node (Fabstir/fabstir-llm-node, ``src/api/server.rs``, ``handle_websocket``,
no encryption key); normal mode keeps its coded errors and ids but must never stall the SDK.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fabstir_jupyter.host import ScriptedBackend, scripted_text

from .conftest import TIMEOUT, Peer

CHAIN_ID = 84532  # Base Sepolia, as the SDK's ChainRegistry names it
JOB_ID = 1234
SESSION_ID = "1234"  # the SDK's session id is the job id, sent as a string
USER_ADDRESS = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
MODEL = "fabstir/scripted-GGUF:scripted-1"  # a "repo:file" name, as SessionState.model holds it
_ids = itertools.count(1)


def message_id() -> str:
    """An id shaped like WebSocketClient.generateMessageId's `${Date.now()}-${random base36}`."""
    return f"{1767225600000 + next(_ids)}-k3j9x"


# Each builder returns one frame exactly as the SDK puts it on the wire.
SDK_FRAMES = {
    # SessionManager.sendPlaintextInit, sent with WebSocketClient.sendMessage (which adds "id").
    "session_init": lambda: {
        "type": "session_init", "chain_id": CHAIN_ID, "session_id": SESSION_ID, "jobId": str(JOB_ID),
        "user_address": USER_ADDRESS, "id": message_id(),
    },
    # SessionManager.sendPromptStreaming, plaintext branch: the top-level web search fields
    # (resolveSearchQueries gives null when search is off) and the nested request; sendMessage adds "id".
    "prompt": lambda prompt="Tell me a story", max_tokens=4000: {
        "type": "prompt", "chain_id": CHAIN_ID, "jobId": str(JOB_ID), "prompt": prompt,
        "web_search": False, "max_searches": 0, "search_queries": None,
        "request": {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "stream": True},
        "id": message_id(),
    },
    # sendPromptStreaming's abort handler, sent with sendWithoutResponse (no "id").
    "stream_cancel": lambda: {"type": "stream_cancel", "session_id": SESSION_ID, "reason": "user_cancelled"},
    # WebSocketClient.startHeartbeat, every heartbeatInterval (30 s), also during a stream.
    "ping": lambda: {"type": "ping"},
    # SessionManager.sendEncryptedInit: the encrypted payload's nine fields, chain_id, session_id, job_id.
    "encrypted_session_init": lambda: {
        "type": "encrypted_session_init",
        "payload": {"ephPubHex": "02" + "11" * 32, "saltHex": "22" * 32, "nonceHex": "33" * 24,
                    "ciphertextHex": "44" * 48, "signatureHex": "55" * 65, "recid": 0,
                    "alg": "secp256k1-ecdh-hkdf-xchacha20poly1305", "info": "e2ee:session-init", "aadHex": ""},
        "chain_id": CHAIN_ID, "session_id": SESSION_ID, "job_id": str(JOB_ID),
    },
}


class SdkSocket:
    """A peer that sends SDK frames and judges replies with WebSocketClient.sendMessage's rule.

    sendMessage settles a request when a reply carries its id (rejected if it is an error),
    when a stream_end follows stream chunks, or on any session_init_ack; otherwise it waits
    30 s and fails with WS_TIMEOUT: the stall this host must never cause.
    """

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def send(self, frame: dict[str, Any]) -> None:
        await self.peer.send(frame)

    async def recv(self) -> dict[str, Any]:
        return await self.peer.recv()

    async def answer_to(self, frame: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """Read until sendMessage would settle ``frame``; return ("resolved"|"rejected", the replies).

        Fails the test when nothing settles it within the test timeout (the SDK would time out).
        """
        replies: list[dict[str, Any]] = []
        streaming = False
        while True:
            try:
                reply = await self.peer.recv(TIMEOUT)
            except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError from 3.11
                raise AssertionError(f"the SDK would wait for {frame['type']} until WS_TIMEOUT: {replies}") from exc
            replies.append(reply)
            if reply["type"] == "stream_chunk":  # the SDK waits on for stream_end
                streaming = True
                continue
            if (reply["type"] == "stream_end" and streaming) or reply["type"] == "session_init_ack":
                return "resolved", replies
            if reply.get("id") == frame["id"]:
                failed = reply["type"] == "error" or "error" in reply
                return ("rejected" if failed else "resolved"), replies


@pytest.fixture(params=["normal", "legacy"])
def mode(request) -> str:
    return request.param


@pytest.fixture
async def sdk(mode, start_host, make_peer) -> SdkSocket:
    """An SDK-shaped peer on a host in ``mode``, streaming 200 tokens a second."""
    server = await start_host(backend=ScriptedBackend(token_rate=200), legacy=mode == "legacy")
    return SdkSocket(await make_peer(server))


async def init(sdk: SdkSocket) -> dict[str, Any]:
    frame = SDK_FRAMES["session_init"]()
    await sdk.send(frame)
    outcome, replies = await sdk.answer_to(frame)
    assert outcome == "resolved" and len(replies) == 1
    return replies[0]


async def test_sdk_session_init_is_acknowledged_like_production(sdk, mode):
    """The ack echoes id and session, with job_id and chain_id as numbers."""
    frame = SDK_FRAMES["session_init"]()
    await sdk.send(frame)
    ack = await sdk.recv()
    assert ack["type"] == "session_init_ack" and ack["status"] == "success" and ack["id"] == frame["id"]
    assert (ack["session_id"], ack["job_id"], ack["chain_id"]) == (SESSION_ID, JOB_ID, CHAIN_ID)
    if mode == "legacy":
        assert ack["message"] == "Session initialized successfully"


async def test_sdk_prompts_stream_twice_on_one_socket(sdk, mode):
    """init, prompt, init, prompt (the SDK re-inits before every prompt): both answers stream and end."""
    for question in ("first question", "second question"):
        await init(sdk)
        frame = SDK_FRAMES["prompt"](question, max_tokens=5)
        await sdk.send(frame)
        outcome, replies = await sdk.answer_to(frame)
        assert outcome == "resolved"
        text = "".join(f["content"] for f in replies if f["type"] == "stream_chunk")
        assert text == scripted_text(question, 5)
        end = replies[-1]
        assert end["type"] == "stream_end" and end["reason"] == "complete" and end["id"] == frame["id"]
        assert all(f["id"] == frame["id"] for f in replies)
        if mode == "legacy":
            assert replies[-2] == {"type": "stream_chunk", "content": "", "tokens": 0, "id": frame["id"]}
            assert end == {"type": "stream_end", "reason": "complete", "tokens_used": 5, "id": frame["id"]}
        else:
            assert end["usage"]["completion_tokens"] == 5 and end["finish_reason"] == "length"


async def test_sdk_stop_then_send_is_served_in_order(sdk, mode):
    """stream_cancel, then at once session_init and prompt: the cancel ends, the init is acked, the prompt streams.

    The SDK's "stop, then send": nothing is answered HOST_BUSY and nothing is dropped.
    """
    await init(sdk)
    first = SDK_FRAMES["prompt"]("a long answer")
    await sdk.send(first)
    assert (await sdk.recv())["type"] == "stream_chunk"
    cancel, again = SDK_FRAMES["stream_cancel"](), SDK_FRAMES["session_init"]()
    second = SDK_FRAMES["prompt"]("next", max_tokens=3)
    for frame in (cancel, again, second):
        await sdk.send(frame)
    frames = []
    while not frames or not (frames[-1]["type"] == "stream_end" and frames[-1].get("id") == second["id"]):
        frames.append(await sdk.recv())
    assert not [f for f in frames if f["type"] == "error"]
    ends = [i for i, f in enumerate(frames) if f["type"] == "stream_end"]
    ack = next(i for i, f in enumerate(frames) if f["type"] == "session_init_ack")
    assert len(ends) == 2 and ends[0] < ack < ends[1]
    assert all(f["type"] == "stream_chunk" for f in frames[:ends[0]])
    cancelled = frames[ends[0]]
    assert frames[ack]["id"] == again["id"]
    assert "".join(f["content"] for f in frames[ack + 1:] if f["type"] == "stream_chunk") == scripted_text("next", 3)
    if mode == "legacy":
        assert cancelled == {"type": "stream_end", "reason": "cancelled", "tokens_used": cancelled["tokens_used"],
                             "finish_reason": "cancelled", "session_id": SESSION_ID}
        assert all(f["content"] for f in frames[:ends[0]])  # no empty terminal chunk before it
    else:
        assert cancelled["reason"] == "cancelled" and cancelled["finish_reason"] == "cancelled"
        assert cancelled["id"] == first["id"] and cancelled["usage"]["completion_tokens"] < 4000
    assert await sdk.peer.silent_for(0.1)


async def test_sdk_heartbeat_ping_never_disturbs_a_stream(sdk, mode):
    """A JSON ping during a stream: normal mode answers pong, legacy ignores it; the stream completes."""
    await init(sdk)
    frame = SDK_FRAMES["prompt"]("beat", max_tokens=20)
    await sdk.send(frame)
    await sdk.recv()
    await sdk.send(SDK_FRAMES["ping"]())
    outcome, replies = await sdk.answer_to(frame)
    assert outcome == "resolved" and replies[-1]["type"] == "stream_end" and replies[-1]["reason"] == "complete"
    pongs = [f for f in replies if f["type"] == "pong"]
    assert pongs == ([] if mode == "legacy" else [{"type": "pong"}])
    assert "".join(f.get("content", "") for f in replies) in scripted_text("beat", 20)


async def test_sdk_empty_prompt_is_answered(sdk, mode):
    """An empty prompt is refused with an answer the SDK settles on (legacy: production's text and stream_end)."""
    await init(sdk)
    frame = SDK_FRAMES["prompt"]("")
    await sdk.send(frame)
    outcome, replies = await sdk.answer_to(frame)
    assert outcome == "rejected"
    if mode == "legacy":
        assert [*replies, await sdk.recv()] == [
            {"type": "error", "error": "Validation error for prompt: Prompt cannot be empty", "id": frame["id"]},
            {"type": "stream_end", "reason": "error", "tokens_used": 0, "id": frame["id"]},
        ]
    else:
        assert replies[0]["code"] == "INVALID_PROMPT" and replies[0]["error"]["code"] == "INVALID_PROMPT"
    assert await sdk.peer.silent_for(0.05)


async def test_sdk_zero_max_tokens_is_answered(sdk, mode):
    """max_tokens 0: legacy sends production's uncoded validation error then stream_end(error)."""
    await init(sdk)
    frame = SDK_FRAMES["prompt"]("zero", max_tokens=0)
    await sdk.send(frame)
    outcome, replies = await sdk.answer_to(frame)
    assert outcome == "rejected"
    if mode == "legacy":
        assert [*replies, await sdk.recv()] == [
            {"type": "error", "error": "Validation error for max_tokens: max_tokens must be greater than 0",
             "id": frame["id"]},
            {"type": "stream_end", "reason": "error", "tokens_used": 0, "id": frame["id"]},
        ]
    else:
        assert replies[0]["code"] == "INVALID_OPTIONS" and replies[0]["id"] == frame["id"]


async def test_sdk_encrypted_init_is_refused_like_a_node_without_a_key(sdk, mode):
    """encrypted_session_init gets ENCRYPTION_NOT_SUPPORTED (legacy: production's exact frame)."""
    frame = SDK_FRAMES["encrypted_session_init"]()
    await sdk.send(frame)
    reply = await sdk.recv()
    assert reply["type"] == "error" and reply["code"] == "ENCRYPTION_NOT_SUPPORTED"
    if mode == "legacy":
        assert reply == {
            "type": "error", "code": "ENCRYPTION_NOT_SUPPORTED",
            "message": "Node does not have encryption key configured. "
                       "Please use plaintext session_init or configure HOST_PRIVATE_KEY.",
            "session_id": SESSION_ID,
        }
    await init(sdk)  # the SDK's fallback, plaintext, then works


async def test_sdk_request_without_max_tokens(sdk, mode):
    """A request lacking max_tokens: legacy drops it as production does; normal mode says which field."""
    await init(sdk)
    frame = SDK_FRAMES["prompt"]("no budget")
    del frame["request"]["max_tokens"]
    await sdk.send(frame)
    if mode == "legacy":
        assert await sdk.peer.silent_for(0.2)
    else:
        outcome, replies = await sdk.answer_to(frame)
        assert outcome == "rejected" and replies[0]["code"] == "INVALID_OPTIONS"
        assert "'max_tokens'" in replies[0]["message"]
    ok = SDK_FRAMES["prompt"]("then fine", max_tokens=2)
    await sdk.send(ok)
    assert (await sdk.answer_to(ok))[0] == "resolved"
