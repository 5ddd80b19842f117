"""The backend interface of the reference host: what generates the tokens.

A backend turns validated generation parameters into a stream of token texts. The server
(:mod:`fabstir_jupyter.host.server`) owns everything on the wire: limits, stop sequences, usage
frames, cancellation replies. A backend owns the model: its ids, token counting, the queue in front
of it and the generation itself.

Three backends ship with the host:

* :class:`~fabstir_jupyter.host.scripted.ScriptedBackend`: deterministic text, fault injection;
* :class:`~fabstir_jupyter.host.llama.LlamaCppBackend`: the embedded SmolLM2 model (the default);
* :class:`~fabstir_jupyter.host.openai_proxy.OpenAIProxyBackend`: an OpenAI-compatible upstream.

Contract of :meth:`Backend.generate`: yield exactly one item per generated token (an empty string
for a token whose bytes do not complete a character yet), set ``stats.prompt_tokens`` before the
first item, return when ``cancel`` is set (within about 100 ms, also while waiting), stop by itself
at ``params.max_tokens`` or at the model's end of turn, and raise a
:class:`~fabstir_jupyter.errors.FabstirError` for failures the client should see with a code.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ModelInfo",
    "GenerationParams",
    "GenerationStats",
    "Backend",
    "AbortConnection",
    "BackendUnavailable",
    "acquire_unless_cancelled",
    "sleep_unless_cancelled",
    "count_words",
]


class AbortConnection(Exception):
    """Raised by a backend to make the server drop the TCP connection without a close frame.

    Fault injection only (``ScriptedBackend(close_after=N)``): it imitates a host that crashes.
    """


class BackendUnavailable(RuntimeError):
    """Raised when a backend cannot be built: a missing package, model file or upstream setting."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model a backend serves, as ``GET /v1/models`` lists it.

    Attributes:
        id: the id clients send in ``request.model``.
        name: a human-readable name.
        context_window: the context size in tokens (prompt and completion together).
        aliases: other names the host also answers to (a file name, say); never listed.
    """

    id: str
    name: str
    context_window: int
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "context_window": self.context_window}

    def answers_to(self, name: str) -> bool:
        """Return whether ``name`` designates this model (its id, name or an alias; case-insensitive).

        ``repo/file`` and ``repo:file`` forms match on their last part.
        """
        wanted = name.strip().lower()
        known = {self.id.lower(), self.name.lower(), *(a.lower() for a in self.aliases)}
        if wanted in known:
            return True
        return any(sep in wanted and wanted.rsplit(sep, 1)[1] in known for sep in ("/", ":"))


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What to generate: validated and resolved by the server.

    Attributes:
        messages: the chat input, never empty; roles ``system``, ``user``, ``assistant``. A last
            ``assistant`` message is a prefill: the backend continues that text.
        model: the id of the model (one of :attr:`Backend.models`).
        max_tokens: the most tokens to generate (1 or more).
        temperature: 0.0 to 2.0; 0 means greedy.
        top_p: nucleus sampling in (0, 1], or None for the backend's default.
        seed: the sampling seed, or None for a random one.
        stop: the stop sequences; the server enforces them, backends may use them as a hint.
    """

    messages: tuple[tuple[str, str], ...]
    model: str
    max_tokens: int
    temperature: float = 0.7
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def prefill(self) -> str | None:
        """The assistant text to continue, or None when the last message is not an assistant one."""
        role, content = self.messages[-1]
        return content if role == "assistant" else None

    @property
    def last_user(self) -> str:
        """The content of the last ``user`` message ("" if there is none)."""
        for role, content in reversed(self.messages):
            if role == "user":
                return content
        return ""


@dataclass(slots=True)
class GenerationStats:
    """Counts a backend reports while it generates; the server reads them for ``usage``.

    Attributes:
        prompt_tokens: the real prompt size in tokens, set before the first token.
        completion_tokens: set only by backends that learn an exact count elsewhere (an upstream's
            ``usage``); 0 means "count the items yielded".
        finish_reason: ``"stop"`` when the model ended its turn, ``"length"`` at ``max_tokens``, or
            None when the backend does not know.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class Backend(abc.ABC):
    """Base class of host backends; see the module docstring for the :meth:`generate` contract."""

    #: Entries of ``protocol.FEATURES`` this backend cannot guarantee (dropped from /v1/version).
    unsupported_features: frozenset[str] = frozenset()

    @property
    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """The models served; the first one is the default."""

    @property
    def loaded(self) -> bool:
        """Whether the model is ready (``/health`` says ``loading`` until it is)."""
        return True

    @property
    def load_error(self) -> str | None:
        """Why loading failed, if it did."""
        return None

    @property
    def queue_depth(self) -> int:
        """How many generations wait for the model right now."""
        return 0

    def resolve_model(self, name: str | None) -> ModelInfo | None:
        """Return the model ``name`` designates, the default for None, or None when not served."""
        models = self.models
        if name is None:
            return models[0] if models else None
        for info in models:
            if info.answers_to(name):
                return info
        return None

    def context_window(self, model: str) -> int:
        """Return the context size in tokens of the model with id ``model``."""
        info = self.resolve_model(model)
        return info.context_window if info is not None else 0

    def count_tokens(self, text: str) -> int:
        """Return an estimate of the tokens in ``text`` (whitespace words unless overridden)."""
        return count_words(text)

    async def start(self) -> None:  # noqa: B027  # an optional hook: by default there is nothing to prepare
        """Prepare the backend (start loading the model); called by ``HostServer.start``."""

    @abc.abstractmethod
    def generate(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        """Generate tokens for ``params``: an async generator of token texts, one item per token.

        The server closes it (``aclose``) as soon as the stream ends, however it ends, so its
        ``finally`` blocks run at once: write it as an ``async def`` with ``yield``.

        Args:
            params: what to generate.
            cancel: set by the server when the client cancels or goes away; return promptly.
            stats: filled with the real counts as generation goes.

        Raises:
            FabstirError: a failure to report to the client with its code (``HOST_ERROR``,
                ``CONTEXT_OVERFLOW``…); the server sends ``error`` then ``stream_end``.
            AbortConnection: fault injection: drop the connection.
        """

    async def close(self) -> None:  # noqa: B027  # an optional hook: by default there is nothing to release
        """Release the model and any threads or connections; called by ``HostServer.close``."""


def count_words(text: str) -> int:
    """Return the number of whitespace-separated words in ``text``."""
    return len(text.split())


async def sleep_unless_cancelled(delay: float, cancel: asyncio.Event) -> bool:
    """Sleep ``delay`` seconds or until ``cancel`` is set; return whether it was set."""
    if cancel.is_set():
        return True
    if delay <= 0:
        return False
    try:
        await asyncio.wait_for(cancel.wait(), delay)
    except asyncio.TimeoutError:
        return False
    return True


async def acquire_unless_cancelled(slot: asyncio.Semaphore, cancel: asyncio.Event) -> bool:
    """Acquire ``slot`` unless ``cancel`` is set first; return whether the slot is now held.

    The caller releases the slot when it returned True. If the awaiting task is cancelled, the
    slot is not held afterwards.
    """
    if cancel.is_set():
        return False
    if not slot.locked():
        await slot.acquire()
        return True
    acquire = asyncio.ensure_future(slot.acquire())
    cancelled = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait((acquire, cancelled), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        cancelled.cancel()
        if _acquired(acquire):
            slot.release()
        else:
            acquire.cancel()
        raise
    cancelled.cancel()
    if _acquired(acquire):
        if cancel.is_set():
            slot.release()
            return False
        return True
    acquire.cancel()
    return False


def _acquired(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
