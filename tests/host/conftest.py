"""Fixtures for the reference host tests: real WebSocket peers of the hosts that ``start_host`` starts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from fabstir_jupyter.host import HostServer

TIMEOUT = 5.0  # seconds any single frame may take to arrive


class Peer:
    """A client speaking the protocol with the ``websockets`` client, as a test sees it."""

    def __init__(self, ws: ClientConnection, greeting: dict[str, Any]) -> None:
        self.ws = ws
        self.greeting = greeting

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def silent_for(self, seconds: float) -> bool:
        """Return whether nothing arrives for ``seconds``."""
        try:
            await asyncio.wait_for(self.ws.recv(), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    async def until_end(self, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Read frames up to and including the next ``stream_end``."""
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if frame["type"] == "stream_end":
                return frames

    async def infer(self, prompt: str = "tell me a story", *, rid: str | None = None, **request: Any) -> Result:
        """Send an ``inference`` and read its whole answer."""
        body = {"prompt": prompt, "model": "scripted-1", "max_tokens": 8, "temperature": 0.0, "stream": True}
        body.update(request)
        frame: dict[str, Any] = {"type": "inference", "request": body}
        if rid is not None:
            frame["id"] = rid
        await self.send(frame)
        return Result(await self.until_end())


class Result:
    """The frames of one answer, with the text and the end pulled out."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = frames
        self.chunks = [f for f in frames if f["type"] == "stream_chunk"]
        self.errors = [f for f in frames if f["type"] == "error"]
        self.end = frames[-1]
        self.text = "".join(c["content"] for c in self.chunks)


@pytest.fixture
async def host(start_host) -> HostServer:
    """A host with the default config and an unthrottled scripted backend."""
    return await start_host()


@pytest.fixture
async def make_peer():
    """Connect peers: ``await make_peer(server, **connect kwargs)``; the greeting is already read."""
    peers: list[ClientConnection] = []

    async def make(server: HostServer, **kwargs: Any) -> Peer:
        ws = await connect(server.ws_url, open_timeout=TIMEOUT, **kwargs)
        peers.append(ws)
        greeting = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        return Peer(ws, greeting)

    yield make
    for ws in peers:
        await ws.close()


@pytest.fixture
async def peer(host, make_peer) -> Peer:
    """A peer connected to ``host``."""
    return await make_peer(host)


async def get_json(server: HostServer, path: str) -> tuple[int, Any]:
    """GET ``path`` on the host; return the status and the decoded body."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        response = await client.get(server.http_url + path)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text
