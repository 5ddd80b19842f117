"""The scripted backend: predictable text and injected faults, for tests and benchmarks.

Token ``i`` of an answer is a word from :data:`VOCABULARY` (with a trailing space), picked by a
SHA-256 hash of the last user message, the seed and ``i``. So a test can predict every answer with
:func:`scripted_token` / :func:`scripted_text`, and a continuation is exact: given an assistant
prefill of ``k`` words, the backend continues at position ``k``, and
``prefill + answer == scripted_text(prompt, k + n, seed=seed)`` when the prefill was the first
``k`` scripted tokens.

Faults (each off by default): a first-token delay, a failure after N tokens (``HOST_ERROR``), an
abrupt TCP drop after N tokens, a fixed error code for every request, and never answering.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator

from ..errors import ContextOverflow, HostError, InvalidOptions, error_from_code
from .backends import (
    AbortConnection,
    Backend,
    GenerationParams,
    GenerationStats,
    ModelInfo,
    acquire_unless_cancelled,
    count_words,
    sleep_unless_cancelled,
)

__all__ = ["VOCABULARY", "DEFAULT_SCRIPTED_MODEL", "scripted_token", "scripted_text", "ScriptedBackend"]

DEFAULT_SCRIPTED_MODEL = "scripted-1"

#: The words scripted answers are made of (64 distinct lower-case ASCII words).
VOCABULARY: tuple[str, ...] = (
    "alpha", "amber", "anchor", "apple", "arrow", "autumn", "badge", "basil",
    "beacon", "birch", "blossom", "breeze", "brook", "cabin", "canyon", "cedar",
    "cinder", "clover", "comet", "copper", "coral", "crystal", "dawn", "delta",
    "desert", "dune", "ember", "falcon", "fern", "flint", "forest", "garnet",
    "glacier", "granite", "harbor", "hazel", "horizon", "island", "ivory", "jasper",
    "juniper", "lagoon", "lantern", "maple", "meadow", "meteor", "mist", "nectar",
    "ocean", "orchid", "pebble", "pine", "prairie", "quartz", "raven", "ridge",
    "river", "saffron", "shadow", "summit", "thistle", "timber", "valley", "willow",
)


def _prompt_key(prompt: str, seed: int | None) -> bytes:
    seed_text = "-" if seed is None else str(int(seed))
    return hashlib.sha256(f"{seed_text}\x1f{prompt}".encode("utf-8", "surrogatepass")).digest()


def _token_at(key: bytes, position: int) -> str:
    digest = hashlib.sha256(key + position.to_bytes(8, "big", signed=True)).digest()
    return VOCABULARY[int.from_bytes(digest[:4], "big") % len(VOCABULARY)] + " "


def scripted_token(prompt: str, position: int, seed: int | None = None) -> str:
    """Return the scripted token at ``position`` (0-based) of the answer to ``prompt``.

    The token is a vocabulary word followed by one space. ``prompt`` is the content of the last
    user message (or the plain prompt); ``seed=None`` and ``seed=0`` give different answers.
    """
    return _token_at(_prompt_key(prompt, seed), position)


def scripted_text(prompt: str, n: int, start: int = 0, seed: int | None = None) -> str:
    """Return the ``n`` scripted tokens from ``start`` of the answer to ``prompt``, joined."""
    key = _prompt_key(prompt, seed)
    return "".join(_token_at(key, i) for i in range(start, start + n))


class ScriptedBackend(Backend):
    """A backend whose answers are a pure function of (last user message, seed, position).

    Prompt tokens are counted as whitespace words over all messages. Without a token rate it
    generates as fast as the loop allows, yielding to other tasks every 32 tokens.

    Args:
        model_id: the one model id served.
        context_window: a prompt of this many words or more is ``CONTEXT_OVERFLOW``.
        token_rate: tokens per second (0 = as fast as possible).
        max_concurrency: generations running at once (0 = unlimited); others wait in a queue.
        answer_tokens: the natural answer length; generation ends there with finish ``stop``
            (None = the answer goes on until ``max_tokens``, finish ``length``).
        first_token_delay: seconds to wait before the first token.
        fail_after: after this many tokens, fail with ``HOST_ERROR``.
        close_after: after this many tokens, drop the TCP connection (no close frame).
        error_code: answer every request with an error of this code.
        never_answer: accept requests and send nothing until cancelled.

    Raises:
        InvalidOptions: an option is negative or ``error_code`` is empty.
    """

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_SCRIPTED_MODEL,
        context_window: int = 8192,
        token_rate: float = 0.0,
        max_concurrency: int = 0,
        answer_tokens: int | None = None,
        first_token_delay: float = 0.0,
        fail_after: int | None = None,
        close_after: int | None = None,
        error_code: str | None = None,
        never_answer: bool = False,
    ) -> None:
        for name, value in (
            ("context_window", context_window), ("token_rate", token_rate), ("max_concurrency", max_concurrency),
            ("answer_tokens", answer_tokens), ("first_token_delay", first_token_delay),
            ("fail_after", fail_after), ("close_after", close_after),
        ):
            if value is not None and value < 0:
                raise InvalidOptions(f"scripted backend: {name} must not be negative", field=name)
        if error_code is not None and not error_code:
            raise InvalidOptions("scripted backend: error_code must not be empty", field="error_code")
        self.model_id = model_id
        self.token_rate = float(token_rate)
        self.answer_tokens = answer_tokens
        self.first_token_delay = float(first_token_delay)
        self.fail_after = fail_after
        self.close_after = close_after
        self.error_code = error_code
        self.never_answer = never_answer
        self._models = [ModelInfo(id=model_id, name=f"scripted model {model_id}", context_window=context_window)]
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._waiting = 0

    @property
    def models(self) -> list[ModelInfo]:
        return list(self._models)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def generate(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        stats.prompt_tokens = sum(count_words(content) for _, content in params.messages)
        if self.error_code is not None:
            raise error_from_code(self.error_code, f"scripted error {self.error_code}")
        if stats.prompt_tokens >= self._models[0].context_window:
            raise ContextOverflow(
                f"prompt is {stats.prompt_tokens} tokens; the context window is {self._models[0].context_window}"
            )
        if self.never_answer:
            await cancel.wait()
            return
        held = False
        if self._slots is not None:
            self._waiting += 1
            try:
                held = await acquire_unless_cancelled(self._slots, cancel)
            finally:
                self._waiting -= 1
            if not held:
                return
        try:
            async for token in self._tokens(params, cancel, stats):
                yield token
        finally:
            if held:
                assert self._slots is not None
                self._slots.release()

    async def _tokens(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncIterator[str]:
        if await sleep_unless_cancelled(self.first_token_delay, cancel):
            return
        prefill = params.prefill
        start = count_words(prefill) if prefill is not None else 0
        count = params.max_tokens
        natural_end = False
        if self.answer_tokens is not None and self.answer_tokens - start <= count:
            count, natural_end = max(0, self.answer_tokens - start), True
        key = _prompt_key(params.last_user, params.seed)
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.token_rate if self.token_rate > 0 else 0.0
        due = loop.time()
        for i in range(count):
            if cancel.is_set():
                return
            if self.fail_after is not None and i >= self.fail_after:
                raise HostError(f"scripted failure after {i} tokens")
            if self.close_after is not None and i >= self.close_after:
                raise AbortConnection(f"scripted connection drop after {i} tokens")
            if interval:
                due += interval
                if await sleep_unless_cancelled(due - loop.time(), cancel):
                    return
            if i % 32 == 31:
                await asyncio.sleep(0)
            yield _token_at(key, start + i)
        stats.finish_reason = "stop" if natural_end else "length"
