"""The openai backend: relay generation to an OpenAI-compatible server.

This is how a host scales out (vLLM, llama.cpp's ``llama-server``, ``llama_cpp.server``, Ollama):
the host keeps the wire protocol, limits and sessions; the upstream runs the model. Generation
streams ``POST {upstream}/chat/completions`` (server-sent events) and maps the upstream's
``usage`` into the host's. Each content delta counts as one token until the upstream reports its
own counts. Assistant prefill is not guaranteed upstream, so it is not advertised.

The event stream is read with ``httpx-sse``, which ends lines only at CR, LF or CRLF as the SSE
format says (``httpx``'s ``aiter_lines`` also breaks at U+2028, U+2029 and U+0085, which an
upstream may send raw inside its JSON). A UTF-16 surrogate pair that an upstream splits across
two deltas (``"\\ud83d"`` then ``"\\ude00"``) is joined before it reaches the wire.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from ..errors import FabstirError, HostError, ModelNotAvailable, RateLimitExceeded
from .backends import Backend, BackendUnavailable, GenerationParams, GenerationStats, ModelInfo, count_words

__all__ = ["OpenAIProxyBackend"]


class OpenAIProxyBackend(Backend):
    """Relay generations to an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        upstream_url: the API base, e.g. ``http://127.0.0.1:8000/v1``.
        upstream_model: the upstream's model name (default: the first of its ``GET /models``).
        model_id: the id this host serves it under (default: ``upstream_model``).
        context_window: the context size reported to clients.
        api_key: sent as a bearer token when given.
        timeout: seconds for connecting and between streamed bytes.

    Raises:
        BackendUnavailable: ``httpx-sse`` is not installed, or the URL is not http(s).
    """

    unsupported_features = frozenset({"assistant-prefill"})

    def __init__(
        self,
        *,
        upstream_url: str,
        upstream_model: str | None = None,
        model_id: str | None = None,
        context_window: int = 4096,
        api_key: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        if importlib.util.find_spec("httpx_sse") is None:
            raise BackendUnavailable("the openai backend needs httpx-sse: install fabstir-jupyter[host]")
        if not upstream_url.startswith(("http://", "https://")):
            raise BackendUnavailable(f"upstream url {upstream_url!r} is not an http(s) url")
        self.upstream_url = upstream_url.rstrip("/")
        self.upstream_model = upstream_model
        self._model_id = model_id
        self._context_window = context_window
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout))
        self._info: ModelInfo | None = None
        if upstream_model is not None:
            self._set_model(upstream_model)

    def _set_model(self, upstream_model: str) -> None:
        self.upstream_model = upstream_model
        served = self._model_id or upstream_model
        self._info = ModelInfo(served, served, self._context_window, aliases=(upstream_model,))

    @property
    def models(self) -> list[ModelInfo]:
        return [self._info] if self._info is not None else []

    async def start(self) -> None:
        """Ask the upstream for its first model when none was given.

        Raises:
            BackendUnavailable: the upstream cannot be reached or lists no model.
        """
        if self.upstream_model is not None:
            return
        try:
            response = await self._client.get(f"{self.upstream_url}/models")
            response.raise_for_status()
            names = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BackendUnavailable(f"upstream {self.upstream_url}: cannot list models: {exc}") from None
        if not names:
            raise BackendUnavailable(f"upstream {self.upstream_url} lists no models")
        self._set_model(str(names[0]))

    async def generate(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        from httpx_sse import EventSource, SSEError

        stats.prompt_tokens = sum(count_words(content) for _, content in params.messages)  # until usage arrives
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "messages": [{"role": role, "content": content} for role, content in params.messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)[:4]
        url = f"{self.upstream_url}/chat/completions"
        joiner = _SurrogateJoiner()
        try:
            async with self._client.stream("POST", url, json=body, headers={"Accept": "text/event-stream"}) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:500].decode("utf-8", "replace")
                    raise _upstream_error(response.status_code, detail)
                async for event in EventSource(response).aiter_sse():
                    if cancel.is_set():
                        return
                    data = event.data.strip()
                    if not data:  # an event with no data (a keep-alive, say)
                        continue
                    if data == "[DONE]":
                        break
                    for piece in _read_event(data, stats):
                        yield joiner.feed(piece)
            tail = joiner.flush()
            if tail:
                yield tail
        except FabstirError:
            raise
        except SSEError as exc:
            raise HostError(f"upstream {self.upstream_url}: not an event stream: {exc}") from None
        except httpx.HTTPError as exc:
            raise HostError(f"upstream {self.upstream_url}: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._client.aclose()


class _SurrogateJoiner:
    """Join UTF-16 surrogate halves that arrive in separate deltas; a half with no partner becomes U+FFFD.

    JSON escapes astral characters as two ``\\uXXXX`` halves, and an upstream may cut a delta
    between them. A lone surrogate cannot be sent as UTF-8, so it must never reach the socket.
    """

    def __init__(self) -> None:
        self._pending = ""  # a high surrogate waiting for its low half

    def feed(self, text: str) -> str:
        """Return ``text`` as valid Unicode, holding back a trailing high surrogate ("" if that is all)."""
        text, self._pending = self._pending + text, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._pending = text[:-1], text[-1]
        return _valid_unicode(text)

    def flush(self) -> str:
        """Return what is held back at the end of the stream (U+FFFD for a half with no partner)."""
        pending, self._pending = self._pending, ""
        return _valid_unicode(pending)


def _valid_unicode(text: str) -> str:
    if text.isascii():
        return text
    # Through UTF-16: pairs become one character, lone halves become U+FFFD.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _read_event(data: str, stats: GenerationStats) -> list[str]:
    try:
        event = json.loads(data)
    except ValueError:
        raise HostError("upstream sent an event that is not JSON") from None
    if not isinstance(event, dict):
        return []
    if isinstance(event.get("error"), dict):
        raise HostError(f"upstream error: {event['error'].get('message', 'unknown')}")
    usage = event.get("usage")
    if isinstance(usage, dict):
        stats.prompt_tokens = int(usage.get("prompt_tokens") or stats.prompt_tokens)
        stats.completion_tokens = int(usage.get("completion_tokens") or 0)
    pieces = []
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str) and content:
            pieces.append(content)
        finish = choice.get("finish_reason")
        if finish:
            stats.finish_reason = "length" if finish == "length" else "stop"
    return pieces


def _upstream_error(status: int, text: str) -> FabstirError:
    message = f"upstream answered {status}: {text.strip()}"
    if status == 429:
        return RateLimitExceeded(message)
    if status == 404:
        return ModelNotAvailable(message)
    return HostError(message)
