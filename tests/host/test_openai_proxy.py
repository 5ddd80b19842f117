"""The openai backend against a minimal OpenAI-compatible upstream on loopback (canned SSE)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect

from fabstir_jupyter.host import HostConfig, HostServer
from fabstir_jupyter.host.backends import BackendUnavailable
from fabstir_jupyter.host.openai_proxy import OpenAIProxyBackend
from fabstir_jupyter.protocol import inference_frame

from .conftest import Result, get_json


class Upstream:
    """A tiny HTTP/1.1 server answering ``GET /v1/models`` and streaming ``POST /v1/chat/completions``."""

    def __init__(
        self,
        pieces: list[str],
        *,
        status: int = 200,
        usage: dict[str, int] | None = None,
        raw_events: list[bytes] | None = None,
    ) -> None:
        self.pieces = pieces
        self.status = status
        self.usage = usage
        self.raw_events = raw_events  # sent as they are instead of the events made from ``pieces``
        self.bodies: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if request_line.startswith("GET /v1/models"):
            payload = json.dumps({"data": [{"id": "upstream-llm"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        elif self.status != 200:
            payload = b'{"error": "slow down"}'
            head = f"HTTP/1.1 {self.status} Error\r\nConnection: close\r\nContent-Length: {len(payload)}\r\n\r\n"
            writer.write(head.encode() + payload)
        else:
            self.bodies.append(json.loads(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for raw in self.raw_events or ():
                writer.write(raw)
                await writer.drain()
            for piece in self.pieces:
                event = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                writer.write(f"data: {json.dumps(event)}\n\n".encode())
            final: dict[str, Any] = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            writer.write(f"data: {json.dumps(final)}\n\n".encode())
            if self.usage is not None:
                writer.write(f"data: {json.dumps({'choices': [], 'usage': self.usage})}\n\n".encode())
            writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()


async def test_openai_backend_relays_stream_and_usage(start_host, make_peer):
    """Deltas become chunks; the upstream's usage becomes the host's usage."""
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    async with Upstream(["Hel", "lo", " there"], usage=usage) as upstream:
        backend = OpenAIProxyBackend(upstream_url=upstream.url, upstream_model="upstream-llm", model_id="proxied")
        server = await start_host(backend=backend)
        peer = await make_peer(server)
        await peer.send(inference_frame(prompt="hi", model="proxied", max_tokens=20, temperature=0.3, top_p=0.9,
                                        seed=4, request_id="o"))
        result = Result(await peer.until_end())
    assert result.text == "Hello there"
    assert result.end["usage"] == {**usage, "context_window_size": 4096}
    assert result.end["finish_reason"] == "stop"
    sent = upstream.bodies[0]
    assert sent["model"] == "upstream-llm" and sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["seed"]) == (20, 0.3, 0.9, 4)


async def test_openai_backend_discovers_model_and_drops_prefill_feature(start_host):
    """Without --upstream-model the first upstream model is served; prefill is not advertised."""
    async with Upstream(["x"]) as upstream:
        server = await start_host(backend=OpenAIProxyBackend(upstream_url=upstream.url))
        models = (await get_json(server, "/v1/models"))[1]["models"]
        features = (await get_json(server, "/v1/version"))[1]["features"]
    assert [m["id"] for m in models] == ["upstream-llm"]
    assert "assistant-prefill" not in features and "chat-messages" in features


async def test_openai_backend_maps_upstream_429(start_host, make_peer):
    """An upstream 429 becomes RATE_LIMIT_EXCEEDED, then stream_end(error)."""
    async with Upstream([], status=429) as upstream:
        server = await start_host(backend=OpenAIProxyBackend(upstream_url=upstream.url, upstream_model="m"))
        peer = await make_peer(server)
        await peer.send(inference_frame(prompt="hi", model="m", max_tokens=5, temperature=0))
        result = Result(await peer.until_end())
    assert [e["code"] for e in result.errors] == ["RATE_LIMIT_EXCEEDED"]
    assert result.end["reason"] == "error"


async def test_openai_backend_reports_unreachable_upstream(start_host, make_peer):
    """A dead upstream is HOST_ERROR for the request."""
    server = await start_host(backend=OpenAIProxyBackend(upstream_url="http://127.0.0.1:9/v1", upstream_model="m"))
    peer = await make_peer(server)
    await peer.send(inference_frame(prompt="hi", model="m", max_tokens=5, temperature=0))
    result = Result(await peer.until_end())
    assert [e["code"] for e in result.errors] == ["HOST_ERROR"]


def delta_event(content_json: str, *, newline: bytes = b"\n") -> bytes:
    """One SSE event whose delta content is ``content_json`` (JSON string text), as raw UTF-8 bytes."""
    data = '{"choices":[{"index":0,"delta":{"content":' + content_json + '},"finish_reason":null}]}'
    return b"data: " + data.encode("utf-8") + newline + newline


async def relay(raw_events: list[bytes], *prompts: str) -> list[Result]:
    """Serve ``raw_events`` from an upstream; return the host's answer to each prompt, on one socket."""
    results = []
    async with Upstream([], raw_events=raw_events) as upstream:
        backend = OpenAIProxyBackend(upstream_url=upstream.url, upstream_model="m")
        async with HostServer(HostConfig(), backend) as server, connect(server.ws_url, open_timeout=5) as ws:
                await asyncio.wait_for(ws.recv(), 5)  # connected
                for prompt in prompts:
                    await ws.send(json.dumps(inference_frame(prompt=prompt, model="m", max_tokens=50, temperature=0)))
                    frames = []
                    while not frames or frames[-1]["type"] != "stream_end":
                        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
                    results.append(Result(frames))
    return results


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_openai_backend_keeps_unicode_line_breaks_inside_event_data(newline):
    """U+2028, U+2029 and U+0085 sent raw inside the JSON stay text: SSE lines end only at CR, LF or CRLF."""
    pieces = ["a\u2028b", "c\u2029d", "e\u0085f", "\x1c\x1d\x1e"]
    events = [delta_event(json.dumps(p, ensure_ascii=False), newline=newline) for p in pieces]
    (result,) = await relay(events, "hi")
    assert result.errors == [] and result.end["reason"] == "complete"
    assert result.text == "".join(pieces)


async def test_openai_backend_joins_a_surrogate_pair_split_across_deltas():
    """A pair escaped as \\ud83d in one delta and \\ude00 in the next is one emoji; the socket lives on."""
    events = [delta_event('"x\\ud83d"'), delta_event('"\\ude00y"'), delta_event('"\\ud83d"'), delta_event('"z"')]
    first, second = await relay(events, "one", "two")
    assert first.errors == [] and first.end["reason"] == "complete"
    assert first.text == "x\U0001f600y\ufffdz"  # a half with no partner is U+FFFD, never a lone surrogate
    assert second.text == first.text


def test_openai_backend_needs_an_http_url():
    """A non-http upstream URL is refused at construction."""
    with pytest.raises(BackendUnavailable):
        OpenAIProxyBackend(upstream_url="ws://x")
