"""Option objects and their validation: everything checked before any I/O.

* :class:`InferenceConfig`: client-wide settings (timeouts, retries, buffers, limits).
* :class:`InferenceOptions`: one request's parameters. Every method that takes options accepts an
  ``InferenceOptions`` or the same names as keyword arguments (:func:`resolve_options`).
* :class:`HostRequirements`: what host selection must satisfy.

Validation raises :class:`~fabstir_jupyter.errors.InvalidPrompt` or
:class:`~fabstir_jupyter.errors.InvalidOptions`, whose ``field`` names the culprit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidOptions, InvalidPrompt
from .urls import http_url

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "InferenceConfig",
    "InferenceOptions",
    "HostRequirements",
    "SELECTION_MODES",
    "ENCRYPTION_MODES",
    "ContentFilter",
    "resolve_options",
    "validate_mode",
    "validate_encryption",
    "validate_prompt",
    "validate_usage_db",
    "validate_request",
]

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 200

#: Host selection modes (spec/PROTOCOL.md §9); a specific host is asked for with ``host_address``.
SELECTION_MODES = ("auto", "cheapest", "fastest", "reliable")

#: End-to-end encryption settings (spec/PROTOCOL.md §6): ``"auto"`` encrypts to every host whose key is
#: known and checked, ``"required"`` refuses the others, ``False`` sends plaintext. ``"off"`` is read as
#: ``False``.
ENCRYPTION_MODES = ("auto", "required", False)

#: ``filter(text) -> text``: runs on the prompt before sending and on the final answer; raise
#: :class:`~fabstir_jupyter.errors.InvalidPrompt` to refuse.
ContentFilter = Callable[[str], str]

# NUL and the C0 controls except tab, newline and carriage return; DEL is allowed.
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _positive(name: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and math.isnan(value)):
        kind_name = "integer" if integer else "number"
        raise InvalidOptions(f"{name} must be a positive {kind_name}, not {value!r}", field=name)
    if value <= 0:
        raise InvalidOptions(f"{name} must be positive, not {value!r}", field=name)


def _check_token(name: str, token: object) -> None:
    # The message never echoes the token.
    if token is None:
        return
    if not isinstance(token, str) or not token or any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise InvalidOptions(f"{name}: a token must be non-empty printable ASCII without spaces", field=name)


@dataclass(frozen=True)
class InferenceConfig:
    """Client-wide inference settings. Times are in seconds.

    Args:
        default_model: model used when a request names none (else the host's first model).
        max_retries: retries after the first attempt (default 3: at most 4 attempts), before the
            first token only, with exponential backoff and jitter, on another host where one exists.
        connection_timeout: WebSocket open (TCP + TLS + upgrade + ``connected``) timeout.
        stream_buffer_size: bound of the queue between the socket reader and the consumer.
        compression_enabled: offer permessage-deflate.
        first_token_timeout: time from sending a request to the first frame of its answer.
        idle_timeout: longest gap between two frames of a stream, measured at the socket reader.
        deadline: opt-in overall bound on one request; ``None`` (default) means none.
        default_max_tokens: ``max_tokens`` when a request gives none.
        max_tokens_cap: largest ``max_tokens`` a request may ask for.
        max_prompt_chars: largest prompt (plus messages) accepted, in characters.
        max_frame_bytes: largest frame accepted from a host.
        backoff_initial, backoff_max: exponential backoff bounds between attempts.
        rate_limit: client-side requests per second per host (token bucket); ``None`` = off.
        rate_burst: bucket size for ``rate_limit``.
        cache_responses: opt-in cache of deterministic answers (temperature 0 or a seed).
        cache_size: entries kept by that cache.
        content_filter: see :data:`ContentFilter`.
        verify_tls: ``True`` (system CAs), ``False`` (explicit opt-out), a CA bundle path, or an
            ``ssl.SSLContext``.
        pool_max_per_host: open sockets per host at most; a further stream waits for one.
        pool_idle_timeout: idle sockets are closed after this long.
        network: ``"local"``, ``"static"`` or ``"base-sepolia"``; on ``base-sepolia`` inference is
            refused until paid sessions exist (spec/PROTOCOL.md §10).
        usage_db: the usage ledger's SQLite file; ``None`` = the user's data dir, ``":memory:"`` allowed;
            an empty path is refused.
        trace: log every frame sent and received at DEBUG on ``fabstir_jupyter.wire``.
        auth_token: a bearer token sent to every host (``Authorization: Bearer ...``); never shown.
        auth_tokens: bearer tokens per host, keyed by any host URL form (``http://h:1``,
            ``wss://h:1/v1/ws``, ``h:1``); wins over ``auth_token``. Never shown.
        encryption: end-to-end encryption (spec/PROTOCOL.md §6), one of :data:`ENCRYPTION_MODES`:
            ``"auto"`` (default) encrypts to a host whose key is known and checked against its
            registered address (published in its registry metadata, or recovered from its
            registration transaction) and speaks plaintext to a host without one; ``"required"``
            refuses such a host (``ENCRYPTION_NOT_SUPPORTED``) before sending it anything;
            ``False`` (or ``"off"``) never encrypts. A host whose published key is not its own is
            refused unless encryption is off. A request may override it (``InferenceOptions``).
    """

    default_model: str | None = None
    max_retries: int = 3
    connection_timeout: float = 30.0
    stream_buffer_size: int = 100
    compression_enabled: bool = True
    first_token_timeout: float = 60.0
    idle_timeout: float = 30.0
    deadline: float | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_cap: int = 8192
    max_prompt_chars: int = 200_000
    max_frame_bytes: int = 4 * 1024 * 1024
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    rate_limit: float | None = None
    rate_burst: int = 5
    cache_responses: bool = False
    cache_size: int = 256
    content_filter: ContentFilter | None = field(default=None, repr=False, compare=False)
    verify_tls: bool | str | ssl.SSLContext = field(default=True, compare=False)
    pool_max_per_host: int = 8
    pool_idle_timeout: float = 60.0
    network: str = "local"
    usage_db: str | None = None
    trace: bool = False
    auth_token: str | None = field(default=None, repr=False, compare=False)
    auth_tokens: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    encryption: str | bool = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "encryption", validate_encryption(self.encryption))
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidOptions(f"max_retries must be an integer >= 0, not {self.max_retries!r}", field="max_retries")
        for name in ("connection_timeout", "first_token_timeout", "idle_timeout", "backoff_max",
                     "pool_idle_timeout"):
            _positive(name, getattr(self, name))
        _positive("deadline", self.deadline, allow_none=True)
        _positive("rate_limit", self.rate_limit, allow_none=True)
        if not isinstance(self.backoff_initial, (int, float)) or self.backoff_initial < 0:
            raise InvalidOptions("backoff_initial must be >= 0", field="backoff_initial")
        for name in ("stream_buffer_size", "default_max_tokens", "max_tokens_cap", "max_prompt_chars",
                     "max_frame_bytes", "rate_burst", "cache_size", "pool_max_per_host"):
            _positive(name, getattr(self, name), integer=True)
        if self.default_max_tokens > self.max_tokens_cap:
            raise InvalidOptions("default_max_tokens is above max_tokens_cap", field="default_max_tokens")
        validate_usage_db(self.usage_db, "InferenceConfig(usage_db=...)")
        _check_token("auth_token", self.auth_token)
        if self.auth_tokens is not None:
            if not isinstance(self.auth_tokens, Mapping):
                raise InvalidOptions("auth_tokens must map host urls to tokens", field="auth_tokens")
            keyed: dict[str, str] = {}
            for url, token in self.auth_tokens.items():
                _check_token("auth_tokens", token)
                keyed[http_url(url)] = token  # raises InvalidOptions naming the bad url
            object.__setattr__(self, "_tokens_by_host", keyed)

    def auth_headers(self, url: str) -> dict[str, str] | None:
        """Return the ``Authorization`` header for a host URL, or ``None`` when it has no token."""
        token = self.auth_token
        keyed: dict[str, str] | None = getattr(self, "_tokens_by_host", None)
        if keyed:
            token = keyed.get(http_url(url), token)
        return {"Authorization": f"Bearer {token}"} if token is not None else None

    def replace(self, **changes: Any) -> InferenceConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class InferenceOptions:
    """Parameters of one request. ``None`` means "use the configured default".

    Args:
        model: model name (host id, ``repo/file``, ``repo:file`` or registry id).
        max_tokens: most tokens to generate (default ``InferenceConfig.default_max_tokens``).
        temperature: 0.0-2.0 (default 0.7).
        top_p: in (0, 1].
        stream: ``False`` yields the whole text once, at the end.
        stop_sequences: generation stops before the first of these; the stop text is not returned.
        host_address: a specific host (URL or registry address) to use.
        seed: sampling seed, for reproducible answers.
        messages: prior chat turns ``[{"role": ..., "content": ...}]``; the prompt is the next user turn.
        system_prompt: a system message placed first.
        mode: host selection mode, one of :data:`SELECTION_MODES` (default ``"auto"``); ignored
            when ``host_address`` names a host.
        encryption: this request's end-to-end encryption, one of :data:`ENCRYPTION_MODES`
            (default: ``InferenceConfig.encryption``).
    """

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = True
    stop_sequences: tuple[str, ...] = ()
    host_address: str | None = None
    seed: int | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    system_prompt: str | None = None
    mode: str | None = None
    encryption: str | bool | None = None

    def replace(self, **changes: Any) -> InferenceOptions:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def is_deterministic(self) -> bool:
        """Whether the same request should give the same answer (temperature 0 or a seed)."""
        return self.temperature == 0 or self.seed is not None


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(InferenceOptions))
# The brief's camelCase spellings, accepted as aliases.
_ALIASES = {
    "maxTokens": "max_tokens",
    "topP": "top_p",
    "stopSequences": "stop_sequences",
    "stop": "stop_sequences",
    "hostAddress": "host_address",
    "systemPrompt": "system_prompt",
}


@dataclass(frozen=True)
class HostRequirements:
    """What a selected host must offer. ``min_stake`` is in whole tokens; ``max_latency`` in ms;
    ``region`` is a preference, not a filter."""

    model: str | None = None
    min_stake: float | None = None
    max_latency: float | None = None
    region: str | None = None


def validate_mode(mode: Any) -> str:
    """Return the selection mode named by ``mode`` (lower-cased; ``None`` means ``"auto"``).

    Raises:
        InvalidOptions: not one of :data:`SELECTION_MODES`; ``field`` is ``"mode"``.
    """
    if mode is None:
        return "auto"
    if isinstance(mode, str) and mode.strip().lower() in SELECTION_MODES:
        return mode.strip().lower()
    raise InvalidOptions(
        f"mode must be one of {', '.join(SELECTION_MODES)}, not {mode!r} (a specific host is host_address)",
        field="mode",
    )


def validate_encryption(value: Any) -> str | bool:
    """Return the encryption setting named by ``value``: ``"auto"``, ``"required"`` or ``False``.

    Strings are read case-insensitively, and ``"off"`` means ``False``.

    Raises:
        InvalidOptions: anything else (``True`` too: say ``"auto"`` or ``"required"``); ``field``
            is ``"encryption"``.
    """
    if value is False:
        return False
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "off":
            return False
        if text in ("auto", "required"):
            return text
    raise InvalidOptions(
        f"encryption must be 'auto', 'required' or False ('off'), not {value!r}", field="encryption",
        hint="'auto' encrypts where the host's key is known, 'required' refuses hosts without one",
    )


def validate_usage_db(value: Any, source: str) -> Any:
    """Check a usage ledger location; return it unchanged (``None`` means the default ledger).

    Args:
        value: a file path (``str`` or path-like), ``":memory:"`` or ``None``.
        source: where the value came from, for the message (``"%config"``, ``"$FABSTIR_USAGE_DB"``...).

    Raises:
        InvalidOptions: an empty or blank path, or not a path at all; ``field`` is ``"usage_db"``.
    """
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip():
        raise InvalidOptions(
            f"usage_db from {source} must be a file path or ':memory:', not {value!r}", field="usage_db",
            hint="leave it unset for the default ledger in the user's data directory",
        )
    return value


def validate_prompt(prompt: Any, *, max_chars: int, field_name: str = "prompt") -> str:
    """Check one piece of prompt text; return it unchanged.

    Raises:
        InvalidPrompt: not a string, empty or blank, over ``max_chars``, or holding NUL / C0 control
            characters (tab, newline and carriage return are fine) or lone surrogates.
    """
    if not isinstance(prompt, str):
        raise InvalidPrompt(f"{field_name} must be a string, not {type(prompt).__name__}", field=field_name)
    if not prompt.strip():
        raise InvalidPrompt(f"{field_name} is empty", field=field_name)
    if len(prompt) > max_chars:
        raise InvalidPrompt(f"{field_name} has {len(prompt)} characters, more than the limit of {max_chars}",
                            field=field_name)
    bad = _BAD_CONTROL.search(prompt)
    if bad:
        raise InvalidPrompt(
            f"{field_name} holds control character U+{ord(bad.group()):04X} at index {bad.start()}", field=field_name
        )
    lone = _LONE_SURROGATE.search(prompt)
    if lone:
        raise InvalidPrompt(f"{field_name} holds a lone surrogate at index {lone.start()}", field=field_name)
    return prompt


def _validate_messages(messages: Any, max_chars: int) -> tuple[dict[str, str], ...]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidOptions("messages must be a list of {role, content} dicts", field="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) - {"role", "content"}:
            raise InvalidOptions(f"messages[{i}] must be a dict with 'role' and 'content' only", field="messages")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise InvalidOptions(f"messages[{i}].role must be system, user or assistant, not {role!r}",
                                 field="messages")
        content = validate_prompt(message.get("content"), max_chars=max_chars, field_name=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return tuple(out)


def _validate_stops(stops: Any) -> tuple[str, ...]:
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = (stops,)
    if not isinstance(stops, Sequence):
        raise InvalidOptions("stop_sequences must be a list of strings", field="stop_sequences")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidOptions(f"stop_sequences has {len(stops)} entries, more than {MAX_STOP_SEQUENCES}",
                             field="stop_sequences")
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise InvalidOptions(f"stop_sequences entries must be non-empty strings, not {stop!r}",
                                 field="stop_sequences")
        if len(stop) > MAX_STOP_LENGTH:
            raise InvalidOptions(f"stop_sequences entry longer than {MAX_STOP_LENGTH} characters",
                                 field="stop_sequences")
        if _BAD_CONTROL.search(stop) or _LONE_SURROGATE.search(stop):
            raise InvalidOptions("stop_sequences must not hold control characters or lone surrogates",
                                 field="stop_sequences")
    return tuple(dict.fromkeys(stops))


def resolve_options(
    options: InferenceOptions | Mapping[str, Any] | None,
    overrides: Mapping[str, Any],
    config: InferenceConfig,
) -> InferenceOptions:
    """Merge ``options`` and keyword ``overrides``, fill defaults from ``config``, and validate.

    Keyword names are those of :class:`InferenceOptions` (the brief's camelCase spellings also work).

    Raises:
        InvalidOptions: an unknown name or a bad value; ``field`` names it.
    """
    merged: dict[str, Any] = {}
    if options is None:
        pass
    elif isinstance(options, InferenceOptions):
        merged.update({f.name: getattr(options, f.name) for f in dataclasses.fields(InferenceOptions)})
    elif isinstance(options, Mapping):
        merged.update(options)
    else:
        raise InvalidOptions(f"options must be InferenceOptions or a dict, not {type(options).__name__}",
                             field="options")
    merged.update(overrides)
    normalised: dict[str, Any] = {}
    for name, value in merged.items():
        key = _ALIASES.get(name, name)
        if key not in _OPTION_NAMES:
            raise InvalidOptions(f"unknown option {name!r}; known: {', '.join(sorted(_OPTION_NAMES))}", field=name)
        normalised[key] = value

    model = normalised.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidOptions(f"model must be a non-empty string, not {model!r}", field="model")

    max_tokens = normalised.get("max_tokens")
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidOptions(f"max_tokens must be an integer, not {max_tokens!r}", field="max_tokens")
    if not 1 <= max_tokens <= config.max_tokens_cap:
        raise InvalidOptions(f"max_tokens must be between 1 and {config.max_tokens_cap}, not {max_tokens}",
                             field="max_tokens")

    temperature = normalised.get("temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
        raise InvalidOptions(f"temperature must be a number from 0.0 to 2.0, not {temperature!r}", field="temperature")

    top_p = normalised.get("top_p")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
    ):
        raise InvalidOptions(f"top_p must be a number in (0, 1], not {top_p!r}", field="top_p")

    stream = normalised.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidOptions(f"stream must be True or False, not {stream!r}", field="stream")

    seed = normalised.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidOptions(f"seed must be a non-negative integer, not {seed!r}", field="seed")

    host_address = normalised.get("host_address")
    if host_address is not None and (not isinstance(host_address, str) or not host_address.strip()):
        raise InvalidOptions(f"host_address must be a non-empty string, not {host_address!r}", field="host_address")

    messages = normalised.get("messages")
    if messages is not None:
        messages = _validate_messages(messages, config.max_prompt_chars)
    system_prompt = normalised.get("system_prompt")
    if system_prompt is not None:
        validate_prompt(system_prompt, max_chars=config.max_prompt_chars, field_name="system_prompt")

    mode = normalised.get("mode")
    if mode is not None:
        mode = validate_mode(mode)

    encryption = normalised.get("encryption")
    encryption = config.encryption if encryption is None else validate_encryption(encryption)

    return InferenceOptions(
        model=model,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=None if top_p is None else float(top_p),
        stream=stream,
        stop_sequences=_validate_stops(normalised.get("stop_sequences")),
        host_address=host_address,
        seed=seed,
        messages=messages,
        system_prompt=system_prompt,
        mode=mode,
        encryption=encryption,
    )


def validate_request(prompt: Any, options: InferenceOptions, config: InferenceConfig) -> str:
    """Check a request's text before any I/O; return the prompt to send.

    The prompt is checked like any text (:func:`validate_prompt`), then the whole transcript
    (prompt, ``messages`` and ``system_prompt``, each already checked by :func:`resolve_options`)
    against ``config.max_prompt_chars``; the content filter runs last and its answer is checked too.

    Raises:
        InvalidPrompt: see :func:`validate_prompt`, or the transcript is too long; ``field`` is
            ``"prompt"``.
    """
    limit = config.max_prompt_chars
    validate_prompt(prompt, max_chars=limit)
    total = len(prompt) + sum(len(m["content"]) for m in options.messages or ()) + len(options.system_prompt or "")
    if total > limit:
        raise InvalidPrompt(f"prompt, messages and system prompt have {total} characters, more than the limit "
                            f"of {limit}", field="prompt")
    if config.content_filter is not None:
        prompt = validate_prompt(config.content_filter(prompt), max_chars=limit)
    return prompt  # type: ignore[no-any-return]
