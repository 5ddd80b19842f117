"""The wire protocol, sans I/O: build frames, parse frames into events, read a response.

Nothing here touches sockets, asyncio or the clock. Both sides live here, like the client and
server halves of a sans-I/O library:

* one request object, :class:`GenerationRequest`, serves both sides; :func:`request_frame` turns
  it into an ``inference`` or a session ``prompt`` frame, and :func:`shape_transcript` shapes its
  chat transcript for what a host supports;
* the client also builds :func:`session_init_frame`, :func:`cancel_frame` and :func:`ping_frame`;
  parses what a host sends with :func:`parse_host_frame`; checks the handshakes with
  :func:`read_greeting` and :func:`read_session_ack`; and turns the events of one request into
  tokens and a result with :class:`ResponseReader`, which absorbs the production-host quirks of
  spec/PROTOCOL.md §4;
* the reference host parses requests with :func:`parse_client_frame` and answers with
  :func:`chunk_frame`, :func:`end_frame`, :func:`error_frame` and friends.

Every parse either returns an event or raises a :class:`~fabstir_jupyter.errors.FabstirError`
(``PROTOCOL_ERROR`` for frames that cannot be interpreted, ``INVALID_PROMPT`` /
``INVALID_OPTIONS`` for requests with bad fields); nothing else escapes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .errors import (
    ContextOverflow,
    FabstirError,
    HostError,
    InvalidOptions,
    InvalidPrompt,
    ProtocolError,
    error_from_code,
)
from .urls import WS_PATH, http_url, ws_url

__all__ = [
    "WS_PATH",
    "FEATURES",
    "ws_url",
    "http_url",
    "encode",
    # requests, both sides
    "Message",
    "GenerationRequest",
    "request_body",
    "request_frame",
    "transcript",
    "flatten_messages",
    "shape_transcript",
    # client side
    "inference_frame",
    "session_init_frame",
    "prompt_frame",
    "cancel_frame",
    "ping_frame",
    "Usage",
    "Connected",
    "SessionInitAck",
    "Chunk",
    "StreamEnd",
    "ErrorEvent",
    "Pong",
    "UnknownFrame",
    "HostEvent",
    "parse_host_frame",
    "read_greeting",
    "read_session_ack",
    "StopMatcher",
    "ResponseReader",
    # host side
    "decode_frame",
    "InferenceRequest",
    "SessionInit",
    "PromptRequest",
    "StreamCancel",
    "Ping",
    "ClientEvent",
    "parse_client_frame",
    "connected_frame",
    "session_init_ack_frame",
    "chunk_frame",
    "end_frame",
    "error_frame",
    "pong_frame",
]

#: What the reference host guarantees (``GET /v1/version`` → ``features``; spec §3a).
FEATURES: tuple[str, ...] = (
    "coded-errors",
    "usage-always",
    "stop-sequences",
    "top-p",
    "seed",
    "chat-messages",
    "assistant-prefill",
    "plaintext-sessions",
    "pong",
)

CHAT_ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "cancelled", "error")


def encode(frame: Mapping[str, Any]) -> str:
    """Serialise a frame to the JSON text sent on the wire."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- requests (both sides)

#: One chat turn on the wire: ``(role, content)``.
Message = tuple[str, str]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """The generation parameters of one request, as both sides see them.

    The client builds one and turns it into a frame with :func:`request_frame`; the reference
    host gets one back from :func:`parse_client_frame` (validated for type only). It is hashable,
    so it also keys the client's response cache.

    ``model`` and ``max_tokens`` are ``None`` only for a ``prompt`` frame that had no ``request``
    and no such top-level field; ``prompt`` is ``""`` when it was empty or absent there.
    ``messages`` is the chat transcript as :data:`Message` pairs, oldest first.
    """

    prompt: str
    model: str | None
    max_tokens: int | None
    temperature: float | None
    stream: bool = True
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    messages: tuple[Message, ...] = ()

    @classmethod
    def build(cls, **fields: Any) -> GenerationRequest:
        """Build a request from loose field values: ``stop`` may be one string (one sequence, not its
        characters) or any iterable, ``messages`` a list of ``{role, content}`` mappings."""
        stop = fields.pop("stop", None)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        messages = tuple((m["role"], m["content"]) for m in fields.pop("messages", None) or ())
        return cls(stop=stops, messages=messages, **fields)


def request_body(request: GenerationRequest) -> dict[str, Any]:
    """Return the ``request`` object of an ``inference`` or ``prompt`` frame (or of an encrypted message).

    ``prompt``, ``model`` and ``max_tokens`` are always present, even when empty: production hosts
    drop a request without them silently. Optional fields appear only when set.
    """
    body: dict[str, Any] = {"prompt": request.prompt, "model": request.model, "max_tokens": request.max_tokens}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    body["stream"] = request.stream
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.messages:
        body["messages"] = [{"role": role, "content": content} for role, content in request.messages]
    return body


def _request_body(**fields: Any) -> dict[str, Any]:
    # The keyword form of request_body, kept for encryption.py until it takes a GenerationRequest.
    return request_body(GenerationRequest.build(**fields))


def _frame(kind: str, request: GenerationRequest, session_id: str | None, request_id: str | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": kind}
    if kind == "prompt":
        frame["prompt"] = request.prompt
    frame["request"] = request_body(request)
    if session_id is not None:
        frame["session_id"] = str(session_id)
    return _with_id(frame, request_id)


def request_frame(
    request: GenerationRequest, *, session_id: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """Build the frame that carries ``request``: this is the one place requests become frames.

    Without ``session_id`` it is a stateless ``inference`` (spec §2); with one, a session ``prompt``
    that repeats the prompt beside a complete ``request`` (production hosts need all of it).
    """
    return _frame("inference" if session_id is None else "prompt", request, session_id, request_id)


def inference_frame(*, request_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """Build a stateless ``inference`` from :class:`GenerationRequest` fields given as keywords
    (see :meth:`GenerationRequest.build`); :func:`request_frame` takes the request object."""
    return _frame("inference", GenerationRequest.build(**fields), None, request_id)


def prompt_frame(
    prompt: str, *, session_id: str | None, request_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    """Build a session ``prompt`` from the prompt and :class:`GenerationRequest` fields as keywords;
    ``session_id=None`` leaves the field out."""
    return _frame("prompt", GenerationRequest.build(prompt=prompt, **fields), session_id, request_id)


def session_init_frame(
    session_id: str, *, job_id: int | str | None = None, chain_id: int | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """Build a plaintext ``session_init``; ``session_id`` is always sent as a string."""
    frame: dict[str, Any] = {"type": "session_init", "session_id": str(session_id)}
    if job_id is not None:
        frame["job_id"] = job_id
    if chain_id is not None:
        frame["chain_id"] = chain_id
    return _with_id(frame, request_id)


def cancel_frame(session_id: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Build a ``stream_cancel``; the host answers ``stream_end(reason="cancelled")``."""
    frame: dict[str, Any] = {"type": "stream_cancel"}
    if session_id is not None:
        frame["session_id"] = str(session_id)
    if reason is not None:
        frame["reason"] = reason
    return frame


def ping_frame() -> dict[str, Any]:
    """Build a JSON ping (answered by the reference host only; production hosts ignore it)."""
    return {"type": "ping"}


# --------------------------------------------------------------------------- chat transcripts


def transcript(prompt: str, history: Iterable[Message] = (), system_prompt: str | None = None) -> tuple[Message, ...]:
    """Return the chat transcript of a request: the system prompt, the earlier turns, then ``prompt``
    as the user's turn."""
    system: tuple[Message, ...] = (("system", system_prompt),) if system_prompt else ()
    return (*system, *history, ("user", prompt))


def flatten_messages(messages: Sequence[Message]) -> str:
    """Flatten a chat transcript into one prompt, for hosts without the ``chat-messages`` feature.

    A final assistant message is left open (no newline after it) so the host continues that text.
    """
    lines = [f"{role.capitalize()}: {content}" for role, content in messages]
    if messages and messages[-1][0] == "assistant":
        return "\n".join(lines)
    return "\n".join([*lines, "Assistant:"])


def shape_transcript(
    messages: Sequence[Message], features: Iterable[str], prefill: str | None = None
) -> tuple[str, tuple[Message, ...]]:
    """Shape a transcript for a host: the ``(prompt, messages)`` of the request to send.

    With ``prefill`` (the partial answer a failed host left), an assistant message is appended so
    the host continues that text. Hosts with the ``chat-messages`` (and, for a prefill,
    ``assistant-prefill``) features get the messages; others get them flattened into the prompt,
    which then ends inside the open assistant turn.
    """
    features = frozenset(features)
    if prefill:
        messages = (*messages, ("assistant", prefill))
    supported = "chat-messages" in features and (not prefill or "assistant-prefill" in features)
    if supported:
        last_user = next((content for role, content in reversed(messages) if role == "user"), "")
        return last_user, tuple(messages)
    return flatten_messages(messages), ()


# --------------------------------------------------------------------------- host → client events


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts a host reports at the end of a stream."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    context_window_size: int | None = None

    def to_dict(self) -> dict[str, int]:
        data = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.context_window_size is not None:
            data["context_window_size"] = self.context_window_size
        return data


@dataclass(frozen=True, slots=True)
class Connected:
    """The host's greeting, sent right after the WebSocket upgrade."""

    message: str = ""


@dataclass(frozen=True, slots=True)
class SessionInitAck:
    """The host accepted a ``session_init``."""

    session_id: str | None = None
    status: str | None = None
    message: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text; ``tokens`` is how many tokens it holds (0 for the empty terminal chunk)."""

    content: str
    tokens: int = 1
    finish_reason: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The end of a stream; ``usage`` and ``finish_reason`` are optional on production hosts."""

    reason: str = "complete"
    tokens_used: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An ``error`` frame in any of its three shapes, normalised; ``error`` is the matching exception."""

    code: str
    message: str
    id: str | None = None
    retry_after: float | None = None

    @property
    def error(self) -> FabstirError:
        return error_from_code(self.code, self.message, retry_after=self.retry_after)


@dataclass(frozen=True, slots=True)
class Pong:
    """The reference host's answer to a JSON ping."""


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A well-formed frame of a type this client does not know; ignored by readers."""

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)


HostEvent: TypeAlias = Connected | SessionInitAck | Chunk | StreamEnd | ErrorEvent | Pong | UnknownFrame


#: Deepest nesting of JSON arrays/objects accepted in a frame. The C JSON decoder recurses on the C
#: stack and only the interpreter's recursion limit stops it: py-evm and py_ecc raise that limit to
#: 12 288 and 100 000 when imported, and then a frame of 100 000 "[" crashes the process.
MAX_JSON_DEPTH = 64


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (brackets in strings ignored)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def decode_frame(data: str | bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode one text frame into its JSON object, refusing nesting deeper than :data:`MAX_JSON_DEPTH`.

    The only JSON decoder a reader of untrusted frames should use: the depth check runs before the
    C decoder, which could otherwise overflow the C stack where the recursion limit was raised.

    Raises:
        ProtocolError: binary, too deeply nested, not JSON, not an object, or no string ``type``.
    """
    return _load_object(data)


_DECODER = json.JSONDecoder()


def _load_object(data: str | bytes | bytearray | memoryview) -> dict[str, Any]:
    if not isinstance(data, str):
        raise ProtocolError("binary frame where a JSON text frame was expected")
    # Counting brackets is cheap (C speed); only frames with many of them get the exact depth scan.
    if data.count("[") + data.count("{") > MAX_JSON_DEPTH and _nesting_exceeds(data, MAX_JSON_DEPTH):
        raise ProtocolError(f"frame nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a JSON {type(obj).__name__}, not an object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("frame has no string 'type'")
    return obj


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ProtocolError(f"'{key}' is a {type(value).__name__}, not a string")


def _count(obj: Mapping[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"'{key}' is a {type(value).__name__}, not a count")
    if isinstance(value, float):
        if not value.is_integer():
            raise ProtocolError(f"'{key}' is not a whole number")
        value = int(value)
    if value < 0:
        raise ProtocolError(f"'{key}' is negative")
    return value


def _parse_usage(value: Any) -> Usage | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"'usage' is a {type(value).__name__}, not an object")
    window = value.get("context_window_size")
    return Usage(
        prompt_tokens=_count(value, "prompt_tokens", 0),
        completion_tokens=_count(value, "completion_tokens", 0),
        total_tokens=_count(value, "total_tokens", 0),
        context_window_size=None if window is None else _count(value, "context_window_size", 0),
    )


#: Codes of newer production nodes that mean one of ours.
_CODE_ALIASES = {"TOKEN_LIMIT_EXCEEDED": "CONTEXT_OVERFLOW"}
# An uncoded production refusal: {"error": "Rate limit exceeded, retry after 60 seconds"}.
_RATE_LIMIT_TEXT = re.compile(r"rate limit exceeded", re.IGNORECASE)
_RETRY_AFTER_TEXT = re.compile(r"retry after (\d+(?:\.\d+)?) ?s(?:ec(?:ond)?s?)?\b", re.IGNORECASE)


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _parse_error(obj: Mapping[str, Any]) -> ErrorEvent:
    # Three shapes (spec §3): {code, message}, {error: "text"}, {error: {code, message}}.
    request_id = _opt_str(obj, "id")
    nested = obj.get("error")
    code = obj.get("code")
    message = obj.get("message")
    if isinstance(nested, dict):
        code = nested.get("code", code)
        message = nested.get("message", message)
    elif isinstance(nested, str) and message is None:
        message = nested
    message_text = message if isinstance(message, str) else ("" if message is None else str(message))
    retry_after = None
    if isinstance(code, str) and code:
        code_text = _CODE_ALIASES.get(code, code)
    elif _RATE_LIMIT_TEXT.search(message_text):
        code_text = "RATE_LIMIT_EXCEEDED"
    else:
        code_text = "HOST_ERROR"
    if code_text == "RATE_LIMIT_EXCEEDED":
        wait = _RETRY_AFTER_TEXT.search(message_text)
        retry_after = float(wait.group(1)) if wait else None
    if code == "TOKEN_LIMIT_EXCEEDED":
        prompt_tokens, window = _whole(obj.get("prompt_tokens")), _whole(obj.get("context_window_size"))
        if prompt_tokens is not None and window is not None:
            message_text = f"{message_text or 'prompt exceeds the context window'} " \
                           f"({prompt_tokens} prompt tokens, context window {window})"
    return ErrorEvent(code=code_text, message=message_text or "host reported an error", id=request_id,
                      retry_after=retry_after)


def parse_host_frame(data: str | bytes | bytearray | memoryview) -> HostEvent:
    """Parse one frame sent by a host into an event.

    Raises:
        ProtocolError: the frame is binary, not JSON, not an object, has no ``type``, or a known
            type has fields of the wrong type.
    """
    obj = _load_object(data)
    kind = obj["type"]
    if kind == "stream_chunk":
        content = obj.get("content", "")
        if not isinstance(content, str):
            raise ProtocolError(f"'content' is a {type(content).__name__}, not a string")
        return Chunk(
            content=content,
            tokens=_count(obj, "tokens", 1 if content else 0),
            finish_reason=_opt_str(obj, "finish_reason"),
            id=_opt_str(obj, "id"),
        )
    if kind == "stream_end":
        return StreamEnd(
            reason=_opt_str(obj, "reason") or "complete",
            tokens_used=_count(obj, "tokens_used", 0),
            finish_reason=_opt_str(obj, "finish_reason"),
            usage=_parse_usage(obj.get("usage")),
            id=_opt_str(obj, "id"),
        )
    if kind == "error":
        return _parse_error(obj)
    if kind == "connected":
        return Connected(message=_opt_str(obj, "message") or "")
    if kind == "session_init_ack":
        return SessionInitAck(
            session_id=_opt_str(obj, "session_id"),
            status=_opt_str(obj, "status"),
            message=_opt_str(obj, "message"),
            id=_opt_str(obj, "id"),
        )
    if kind == "pong":
        return Pong()
    return UnknownFrame(type=kind, data=obj)


# --------------------------------------------------------------------------- handshakes


def read_greeting(event: HostEvent) -> Connected:
    """Check the first event of a connection: the host's ``connected`` greeting.

    Raises:
        FabstirError: the host opened with an ``error`` frame (its own code, e.g. ``HOST_BUSY``).
        ProtocolError: the first frame is anything else.
    """
    if isinstance(event, Connected):
        return event
    if isinstance(event, ErrorEvent):
        raise event.error
    raise ProtocolError(f"expected a 'connected' greeting, got {type(event).__name__}")


def read_session_ack(event: HostEvent) -> SessionInitAck | None:
    """Apply one event read while waiting for the answer to a ``session_init``.

    Returns the ``session_init_ack``, or ``None`` for a frame to skip (a late greeting, a pong,
    an unknown frame): read the next one.

    Raises:
        FabstirError: the host refused the session with an ``error`` frame.
        ProtocolError: any other frame.
    """
    if isinstance(event, SessionInitAck):
        return event
    if isinstance(event, ErrorEvent):
        raise event.error
    if isinstance(event, (Connected, Pong, UnknownFrame)):
        return None
    raise ProtocolError(f"expected session_init_ack, got {type(event).__name__}")


# --------------------------------------------------------------------------- reading one response


class StopMatcher:
    """Cut a stream of text at the first stop sequence, also across chunk boundaries.

    :meth:`feed` returns the text that can safely be shown: it holds back the tail that could still
    start a stop sequence. Once a stop sequence matched, ``matched`` is true and the stop text and
    everything after it are dropped.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in stops if s)
        self.matched: str | None = None
        self._held = ""

    def feed(self, text: str) -> str:
        """Add text; return what is now safe to emit."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut, matched = self._first_match(buf)
        # A longer stop may start before that match and run past the end of what we have: wait.
        limit = len(buf) if cut == -1 else cut
        pending = self._pending_start(buf, limit)
        if pending != -1:
            self._held = buf[pending:]
            return buf[:pending]
        self._held = ""
        if cut != -1:
            self.matched = matched
            return buf[:cut]
        return buf

    def flush(self) -> str:
        """Return the held-back text at the end of the stream, cut at a stop it holds, if any."""
        text, self._held = self._held, ""
        if self.matched is not None:
            return ""
        cut, matched = self._first_match(text)
        if cut != -1:
            self.matched = matched
            return text[:cut]
        return text

    def _first_match(self, buf: str) -> tuple[int, str | None]:
        cut, matched = -1, None
        for stop in self.stops:
            at = buf.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, matched = at, stop
        return cut, matched

    def _pending_start(self, buf: str, limit: int) -> int:
        # The earliest position before ``limit`` where buf's tail is a proper prefix of a stop.
        longest = max(len(stop) for stop in self.stops)
        for start in range(max(0, len(buf) - longest + 1), limit):
            tail = buf[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return start
        return -1


class ResponseReader:
    """Turn the host events of one request into tokens and a result.

    Feed every event with :meth:`receive`; it returns the text pieces to deliver now and raises the
    matching :class:`FabstirError` for an error. When :attr:`done` turns true the response is over;
    if :attr:`cancel_needed` is also true the client stopped it (stop sequence or its own
    ``max_tokens``) and should send ``stream_cancel``, then may drain until ``stream_end``.

    Quirks absorbed for hosts that do not declare the matching feature (spec §4): empty terminal
    chunks, mid-stream ``"Error: "`` chunks, empty streams meaning context overflow, and
    ``stream_end`` without ``usage`` or ``finish_reason``.

    Args:
        request_id: the ``id`` sent with the request; events carrying another id are a protocol error.
        features: the host's ``/v1/version`` features.
        stop_sequences: enforced here whatever the host does.
        max_tokens: the client's own bound on received tokens.
        prompt_nonempty: whether an empty answer can mean context overflow.
    """

    def __init__(
        self,
        *,
        request_id: str | None = None,
        features: Iterable[str] = (),
        stop_sequences: Iterable[str] = (),
        max_tokens: int,
        prompt_nonempty: bool = True,
    ) -> None:
        self.request_id = request_id
        self.features = frozenset(features)
        self.max_tokens = max_tokens
        self.prompt_nonempty = prompt_nonempty
        self._stops = StopMatcher(stop_sequences)
        self.done = False
        self.cancel_needed = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.host_tokens = 0  # what the host says it generated (it bills this)
        self.received_tokens = 0  # tokens whose text reached the caller (or was cut by a stop)
        self.received_chars = 0
        self.end_seen = False
        self._error_chunks = "coded-errors" not in self.features  # "Error: " chunks are errors (spec §4)

    def _check_id(self, event_id: str | None) -> None:
        if self.request_id is not None and event_id is not None and event_id != self.request_id:
            raise ProtocolError(f"frame for request {event_id!r} while reading request {self.request_id!r}")

    def _stop_client_side(self, reason: str) -> list[str]:
        self.done = True
        self.cancel_needed = True
        # Text held back for a possible stop match can no longer become one: deliver it, cut at
        # a stop it completes.
        tail = self._stops.flush()
        self.received_chars += len(tail)
        self.finish_reason = "stop" if self._stops.matched is not None else reason
        return [tail] if tail else []

    def receive_text(self, data: str | bytes, out: list[str]) -> bool:
        """Apply one frame as it came off the wire if it is a plain text chunk; return whether it was.

        The fast path of :meth:`receive` for the frame a stream is made of: a JSON ``stream_chunk``
        with text, a whole ``tokens`` count or none, no ``finish_reason``, and this request's ``id``
        or none, read while the response runs and within ``max_tokens``. Its text (cut at a stop
        sequence, which may end the response) is appended to ``out``, and the counters move exactly
        as ``receive(parse_host_frame(data))`` would move them, without building the event. Any
        other frame (other types, other shapes, errors, quirks, a chunk that reaches
        ``max_tokens``) returns ``False`` and changes nothing: parse it and pass the event to
        :meth:`receive`. Never raises.
        """
        # This runs once per token: what _load_object and _take_text do, inline.
        if self.done or type(data) is not str or data.count("[") + data.count("{") > MAX_JSON_DEPTH:
            return False
        try:
            # The documented decoder without json.loads' wrapping (half its time); a frame with
            # whitespace or anything else around its object is left to the general parser.
            frame, end = _DECODER.raw_decode(data)
        except (ValueError, RecursionError):
            return False
        if end != len(data) or type(frame) is not dict or frame.get("type") != "stream_chunk":
            return False
        content = frame.get("content")
        tokens = frame.get("tokens", 1)
        if type(content) is not str or not content or type(tokens) is not int or tokens < 0:
            return False
        if frame.get("finish_reason") is not None:
            return False
        request_id = frame.get("id")
        if request_id is not None and request_id != self.request_id:
            return False
        if self._error_chunks and content.startswith("Error: "):
            return False
        counted = tokens or 1
        if self.received_tokens + counted > self.max_tokens:
            return False
        self.host_tokens += tokens
        self.received_tokens += counted
        if self._stops.stops:
            self._take_text(content, out)
        else:
            self.received_chars += len(content)
            out.append(content)
        return True

    def receive(self, event: HostEvent) -> list[str]:
        """Apply one host event; return the text to deliver now (possibly empty).

        Raises:
            FabstirError: the host reported an error, or broke the protocol.
        """
        if isinstance(event, (Connected, Pong, UnknownFrame, SessionInitAck)):
            return []
        if self.done:
            if isinstance(event, StreamEnd):
                self.end_seen = True
                self._take_end_usage(event)
            # Anything after our own stop (or after stream_end) is discarded, never delivered.
            return []
        if isinstance(event, ErrorEvent):
            self._check_id(event.id)
            self.done = True
            raise event.error
        if isinstance(event, Chunk):
            return self._receive_chunk(event)
        if isinstance(event, StreamEnd):
            return self._receive_end(event)
        raise ProtocolError(f"unexpected event {type(event).__name__}")  # pragma: no cover - exhaustive

    def _receive_chunk(self, chunk: Chunk) -> list[str]:
        self._check_id(chunk.id)
        if not chunk.content:
            # The production terminal chunk (content "", tokens 0): never yielded.
            if chunk.finish_reason in FINISH_REASONS:
                self.finish_reason = chunk.finish_reason
            return []
        if self._error_chunks and chunk.content.startswith("Error: "):
            self.done = True
            raise HostError(chunk.content[len("Error: "):] or "host reported an error")
        self.host_tokens += chunk.tokens
        if self.received_tokens + max(chunk.tokens, 1) > self.max_tokens:
            return self._stop_client_side("length")
        self.received_tokens += max(chunk.tokens, 1)
        out: list[str] = []
        self._take_text(chunk.content, out)
        if not self.done and chunk.finish_reason in FINISH_REASONS:
            self.finish_reason = chunk.finish_reason
        return out

    def _take_text(self, content: str, out: list[str]) -> None:
        # The text of a counted chunk: held back while it may start a stop sequence, cut at one.
        if not self._stops.stops:
            self.received_chars += len(content)
            out.append(content)
            return
        text = self._stops.feed(content)
        self.received_chars += len(text)
        if text:
            out.append(text)
        if self._stops.matched is not None:
            self._stop_client_side("stop")

    def _take_end_usage(self, end: StreamEnd) -> None:
        if end.usage is not None:
            self.usage = end.usage
        self.host_tokens = max(self.host_tokens, end.tokens_used)

    def _receive_end(self, end: StreamEnd) -> list[str]:
        self._check_id(end.id)
        self.done = True
        self.end_seen = True
        self._take_end_usage(end)
        if end.reason == "error":
            raise HostError("stream ended with an error and no error frame")
        if (
            end.reason == "complete"
            and self.received_tokens == 0
            and end.tokens_used == 0
            and end.usage is None
            and self.prompt_nonempty
            and "usage-always" not in self.features
        ):
            raise ContextOverflow("host returned an empty answer: the prompt probably exceeds its context window")
        if end.reason == "cancelled":
            self.finish_reason = "cancelled"
        elif end.finish_reason in FINISH_REASONS:  # another value from a host is not ours to report
            self.finish_reason = end.finish_reason
        elif self.finish_reason is None:
            self.finish_reason = "length" if self.host_tokens >= self.max_tokens else "stop"
        tail = self._stops.flush()
        self.received_chars += len(tail)
        if self._stops.matched is not None and end.reason != "cancelled":
            self.finish_reason = "stop"
        return [tail] if tail else []


# --------------------------------------------------------------------------- host side: parse requests


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A stateless ``inference`` request."""

    request: GenerationRequest
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionInit:
    """A plaintext ``session_init``."""

    session_id: str
    job_id: str | None = None
    chain_id: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class PromptRequest:
    """A ``prompt`` inside a session."""

    request: GenerationRequest
    session_id: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamCancel:
    """A ``stream_cancel``."""

    session_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """A JSON ``ping``."""


ClientEvent: TypeAlias = InferenceRequest | SessionInit | PromptRequest | StreamCancel | Ping


def _field(obj: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in obj:
            return obj[name]
    return None


def _opt_ident(obj: Mapping[str, Any], *names: str) -> str | None:
    # session_id / job_id: a string or an integer on the wire, always a string here.
    value = _field(obj, *names)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidOptions(f"'{names[0]}' must be a string, not {type(value).__name__}", field=names[0])
    return str(value)


def _opt_number(obj: Mapping[str, Any], key: str, *, integer: bool) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptions(f"'{key}' must be a number, not {type(value).__name__}", field=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidOptions(f"'{key}' must be finite", field=key)
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidOptions(f"'{key}' must be a whole number", field=key)
            value = int(value)
        return value
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float range, e.g. 10**400
        raise InvalidOptions(f"'{key}' is out of range", field=key) from None


def _parse_messages(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidOptions("'messages' must be a list", field="messages")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidOptions(f"messages[{i}] must be an object", field="messages")
        role, content = item.get("role"), item.get("content")
        if role not in CHAT_ROLES:
            raise InvalidOptions(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", field="messages")
        if not isinstance(content, str):
            raise InvalidOptions(f"messages[{i}].content must be a string", field="messages")
        out.append((role, content))
    return tuple(out)


#: The fields production hosts need in a ``request`` object; without one of them they drop it silently.
_REQUIRED_REQUEST_FIELDS = ("model", "prompt", "max_tokens")
#: The fields a ``prompt`` frame without ``request`` may carry at its top level (production reads them there).
_TOP_LEVEL_REQUEST_FIELDS = ("prompt", "model", "max_tokens", "temperature", "stream")


def _parse_generation(body: Any, *, complete: bool) -> GenerationRequest:
    """Check the types of a request body; with ``complete``, also that model, prompt and max_tokens are there.

    Emptiness (an empty prompt, an empty model) is the host's to judge: production hosts answer it
    with an error, while a missing field gets no answer at all from them.
    """
    if not isinstance(body, dict):
        raise InvalidOptions("'request' must be an object", field="request")
    prompt = body.get("prompt")
    messages = _parse_messages(body.get("messages"))
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidPrompt("'prompt' must be a string", field="prompt")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidOptions("'model' must be a string", field="model")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidOptions("'stream' must be a boolean", field="stream")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str) and stop:
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidOptions("'stop' must be a list of non-empty strings", field="stop")
    max_tokens = _opt_number(body, "max_tokens", integer=True)
    temperature = _opt_number(body, "temperature", integer=False)
    top_p = _opt_number(body, "top_p", integer=False)
    seed = _opt_number(body, "seed", integer=True)
    if complete:
        for name in _REQUIRED_REQUEST_FIELDS:
            if body.get(name) is None:
                raise InvalidOptions(
                    f"request has no '{name}' (production hosts drop such a request without an answer)",
                    field=name,
                )
    return GenerationRequest(
        prompt=prompt or "",
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        stream=stream,
        top_p=top_p,
        stop=tuple(stop),
        seed=seed,
        messages=messages,
    )


def parse_client_frame(data: str | bytes | bytearray | memoryview | Mapping[str, Any]) -> ClientEvent:
    """Parse one frame sent by a client (the reference host's reader).

    ``data`` is the frame's text, or the object :func:`decode_frame` already made of it.

    Only structure and types are checked here; values (an empty prompt, sizes, caps) are the
    host's policy. A ``request`` object must hold ``model``, ``prompt`` and ``max_tokens``:
    production hosts drop one without them silently, so a client must learn it here. A ``prompt``
    frame without ``request`` is read from its top-level fields, as production does; its missing
    fields stay ``None`` for the host's defaults.

    Raises:
        ProtocolError: binary, not JSON, not an object, no ``type``, or an unknown ``type``.
        InvalidPrompt, InvalidOptions: a field is missing or has the wrong type; ``field`` names it.
    """
    obj = _load_object(data) if not isinstance(data, Mapping) else data
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("frame has no string 'type'")
    request_id = obj.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        raise InvalidOptions("'id' must be a string", field="id")
    rid = None if request_id is None else str(request_id)
    if kind == "inference":
        if obj.get("request") is None:
            raise InvalidOptions(
                "inference has no 'request' (production hosts drop it without an answer)", field="request"
            )
        return InferenceRequest(request=_parse_generation(obj["request"], complete=True), id=rid)
    if kind == "prompt":
        session_id = _opt_ident(obj, "session_id", "sessionId")
        if "request" in obj:  # production reads a present request verbatim (null included)
            request = _parse_generation(obj["request"], complete=True)
        else:  # production builds one from the top-level fields and fills in its defaults
            request = _parse_generation({k: obj[k] for k in _TOP_LEVEL_REQUEST_FIELDS if k in obj}, complete=False)
        return PromptRequest(request=request, session_id=session_id, id=rid)
    if kind == "session_init":
        session_id = _opt_ident(obj, "session_id", "sessionId")
        if not session_id:
            raise InvalidOptions("'session_id' must be a non-empty string", field="session_id")
        job_id = _opt_ident(obj, "job_id", "jobId")
        chain_id = _field(obj, "chain_id", "chainId")
        if chain_id is not None and (isinstance(chain_id, bool) or not isinstance(chain_id, int)):
            raise InvalidOptions("'chain_id' must be an integer", field="chain_id")
        return SessionInit(session_id=session_id, job_id=job_id, chain_id=chain_id, id=rid)
    if kind == "stream_cancel":
        session_id = _opt_ident(obj, "session_id", "sessionId")
        reason = obj.get("reason")
        return StreamCancel(session_id=session_id, reason=reason if isinstance(reason, str) else None)
    if kind == "ping":
        return Ping()
    raise ProtocolError(f"unknown message type {kind[:64]!r}")


# --------------------------------------------------------------------------- host side: build replies


def _with_id(frame: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    if request_id is not None:
        frame["id"] = request_id
    return frame


def connected_frame(message: str = "connected to fabstir-host") -> dict[str, Any]:
    """Build the greeting sent right after the upgrade."""
    return {"type": "connected", "message": message}


def session_init_ack_frame(
    session_id: str,
    *,
    job_id: int | str | None = None,
    chain_id: int | None = None,
    request_id: str | None = None,
    message: str = "session initialised",
) -> dict[str, Any]:
    """Build a ``session_init_ack``; pass ``job_id`` as a number where it is one (production does)."""
    return _with_id(
        {
            "type": "session_init_ack",
            "status": "success",
            "session_id": session_id,
            "job_id": job_id,
            "chain_id": chain_id,
            "message": message,
        },
        request_id,
    )


def chunk_frame(content: str, *, tokens: int = 1, request_id: str | None = None) -> dict[str, Any]:
    """Build a ``stream_chunk``."""
    return _with_id({"type": "stream_chunk", "content": content, "tokens": tokens}, request_id)


def end_frame(
    *,
    reason: str,
    finish_reason: str,
    usage: Usage,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Build a ``stream_end`` that always carries ``usage`` and ``finish_reason``."""
    return _with_id(
        {
            "type": "stream_end",
            "reason": reason,
            "finish_reason": finish_reason,
            "tokens_used": usage.completion_tokens,
            "usage": usage.to_dict(),
        },
        request_id,
    )


def error_frame(code: str, message: str, *, request_id: str | None = None) -> dict[str, Any]:
    """Build an ``error`` that every reader understands: flat and nested code/message."""
    return _with_id(
        {"type": "error", "code": code, "message": message, "error": {"code": code, "message": message}},
        request_id,
    )


def pong_frame() -> dict[str, Any]:
    """Build the answer to a JSON ping."""
    return {"type": "pong"}
