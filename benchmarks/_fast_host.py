"""A WebSocket host for the relay benchmark that is faster than any client (not a benchmark itself).

``relay_overhead.py`` compares clients by the tokens per second they take in; that says something
about a client only if the host sends faster than the client reads. ``fabstir-host --backend
scripted`` cannot: it builds, encodes and sends one frame per token through ``websockets`` and is
busy 98-100 % of a core while any client keeps up. This host speaks the same protocol as far as a
stateless request needs (``connected``, ``inference`` → ``stream_chunk`` × N → ``stream_end`` with
``usage``; ``GET /v1/version`` and ``/v1/models`` like ``fabstir-host``) but writes the chunks as
pre-built WebSocket frames, hundreds per ``transport.write``:

* ``websockets.serve`` does the opening handshake and negotiates permessage-deflate with exactly
  the settings ``fabstir-host`` uses (``compression="deflate"``: context takeover, 12-bit windows);
* once the request is read, the 64 distinct chunk frames of the answer (one per word of
  :data:`~fabstir_jupyter.host.scripted.VOCABULARY`, carrying the request's ``id`` as
  ``fabstir-host`` does) are built once; the answer cycles through them with a period of 64
  frames, so without deflate a batch of frames is a slice of one repeated byte string: no
  Python work per frame;
* with deflate the frames must be compressed in order (context takeover: each depends on the
  ones before), with the connection's own compressor, so that ``websockets`` can still send the
  ``stream_end`` after them: about 3.5 µs of zlib per frame, against 20-45 µs a client spends
  reading one;
* ``stream_end`` goes through ``websockets`` as usual.

It prints ``fast-host listening on ws://127.0.0.1:PORT/v1/ws`` once it listens and exits when its
stdin reaches end of file (its parent went away) or on SIGTERM. The benchmark reads its CPU time
from ``/proc`` to show that it is not the bottleneck.

Run:  python benchmarks/_fast_host.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import os
import signal
import sys
import threading
import zlib
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.http11 import Request, Response

from fabstir_jupyter.host.scripted import DEFAULT_SCRIPTED_MODEL, VOCABULARY
from fabstir_jupyter.protocol import FEATURES, WS_PATH, Usage, connected_frame, encode, end_frame

READY_PREFIX = "fast-host listening on "
CONTEXT_WINDOW = 1 << 30
BATCH_FRAMES = 512  # frames per transport.write (about 40 KB uncompressed)
_STRIDE = 37  # token i is VOCABULARY[i * 37 % 64]: every word once per 64 tokens, in a mixed order
_PERIOD = len(VOCABULARY)


def token_text(position: int) -> str:
    """The text of token ``position`` of every answer (a vocabulary word and a space)."""
    return VOCABULARY[position * _STRIDE % _PERIOD] + " "


def frame_header(length: int, *, compressed: bool) -> bytes:
    """The header of an unmasked, final text frame (RSV1 set when the payload is compressed)."""
    first = 0xC1 if compressed else 0x81
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def chunk_bodies(request_id: str | None) -> list[bytes]:
    """The JSON texts of the answer's first 64 chunks, in order (the answer repeats them)."""
    bodies = []
    for position in range(_PERIOD):
        frame: dict[str, Any] = {"type": "stream_chunk", "content": token_text(position), "tokens": 1}
        if request_id is not None:
            frame["id"] = request_id
        bodies.append(encode(frame).encode())
    return bodies


def _deflater(ws: ServerConnection) -> Any:
    """The compressor of the connection's permessage-deflate extension, or None without one."""
    for extension in ws.protocol.extensions:
        if isinstance(extension, PerMessageDeflate):
            if extension.local_no_context_takeover:  # not what fabstir-host negotiates
                raise RuntimeError("fast host: server_no_context_takeover is not supported")
            return extension.encoder
    return None


async def stream_answer(ws: ServerConnection, tokens: int, request_id: str | None) -> None:
    """Write ``tokens`` chunk frames to ``ws``, ``BATCH_FRAMES`` per write, waiting on flow control."""
    bodies = chunk_bodies(request_id)
    encoder = _deflater(ws)
    if encoder is None:
        period = b"".join(frame_header(len(b), compressed=False) + b for b in bodies)
        frame_bytes = [len(frame_header(len(b), compressed=False)) + len(b) for b in bodies]
        batch = period * (BATCH_FRAMES // _PERIOD)
        sent = 0
        while sent < tokens:
            count = min(BATCH_FRAMES, tokens - sent)
            if count == BATCH_FRAMES:
                ws.transport.write(batch)
            else:  # the last, short batch: whole periods, then the first frames of one more
                whole, rest = divmod(count, _PERIOD)
                ws.transport.write(period * whole + period[: sum(frame_bytes[:rest])])
            sent += count
            await ws.drain()
        return
    sent = 0
    flush = zlib.Z_SYNC_FLUSH
    while sent < tokens:
        count = min(BATCH_FRAMES, tokens - sent)
        parts = []
        for position in range(sent, sent + count):
            data = encoder.compress(bodies[position % _PERIOD]) + encoder.flush(flush)
            data = data[:-4]  # RFC 7692: drop the 00 00 ff ff that ends a sync flush
            parts.append(frame_header(len(data), compressed=True))
            parts.append(data)
        ws.transport.write(b"".join(parts))
        sent += count
        await ws.drain()


async def handle(ws: ServerConnection) -> None:
    await ws.send(encode(connected_frame()))
    async for message in ws:
        frame = json.loads(message)
        if frame.get("type") != "inference":
            await ws.send(encode({"type": "error", "code": "INVALID_OPTIONS",
                                  "message": f"fast host: cannot answer {frame.get('type')!r}"}))
            continue
        request = frame.get("request") or {}
        tokens = int(request.get("max_tokens") or 1)
        request_id = frame.get("id")
        await stream_answer(ws, tokens, request_id)
        prompt_tokens = len(str(request.get("prompt", "")).split())
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens,
                      context_window_size=CONTEXT_WINDOW)
        await ws.send(encode(end_frame(reason="complete", finish_reason="length", usage=usage,
                                       request_id=request_id)))


def _json_response(status: int, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


def process_request(connection: ServerConnection, request: Request) -> Response | None:
    """Answer the HTTP reads a client makes before streaming, as ``fabstir-host`` does."""
    path = request.path.split("?", 1)[0]
    if path == WS_PATH:
        return None
    if path == "/v1/version":
        return _json_response(200, {"version": "fast-host", "features": list(FEATURES)})
    if path == "/v1/models":
        return _json_response(200, {"models": [{"id": DEFAULT_SCRIPTED_MODEL, "name": DEFAULT_SCRIPTED_MODEL,
                                                "context_window": CONTEXT_WINDOW}]})
    return _json_response(404, {"error": {"code": "NOT_FOUND", "message": f"no route for {path[:200]}"}})


async def main_async(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        try:
            while os.read(sys.stdin.fileno(), 65536):
                pass
        except (OSError, ValueError):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    # The socket settings of fabstir-host's HostServer.start, except keepalive pings: a client far
    # behind (under valgrind, say) reads a ping only after the frames sent before it, too late.
    async with serve(handle, "127.0.0.1", port, process_request=process_request, compression="deflate",
                     max_size=1 << 20, max_queue=16, write_limit=1 << 16, ping_interval=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"{READY_PREFIX}ws://127.0.0.1:{bound}{WS_PATH}", flush=True)
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    asyncio.run(main_async(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
