"""Client memory over a long stream: RSS before and after 1 000 000 tokens, ours vs a raw reader.

A scripted ``fabstir-host`` child process streams ``--tokens`` tokens (default 1 000 000, about
7 MB of text) as fast as it can. Each client runs in a fresh child process of its own, so its
figures are not mixed with the other's (or with this parent's):

* ours: ``async with manager.stream(...) as s: async for piece in s: pass`` (pieces discarded by
  the caller; the stream object keeps ``s.text`` by design, and its size is reported);
* raw: a plain ``websockets`` reader, ``recv()`` + ``json.loads`` per frame, nothing kept.

Both use permessage-deflate (the client's default). Each child first runs a short untimed stream
(``--warmup`` tokens) so one-time costs (imports, the socket pool, the HTTP probe, the usage
ledger, zlib contexts) are in the "before" figure. Reported per client: RSS before, the peak
sampled during the stream, RSS after the stream ends (with ``s.text`` still held), RSS after
dropping the stream, and ``VmHWM``.

Target: ours, RSS after − RSS before < 50 MB.

Run:  python benchmarks/memory.py [--tokens 1000000] [--warmup 2000]
      (about 1 minute with the defaults on 2 cores; --tokens 200000 for a quick look)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time

import _common
from _common import verdict

TARGET_MB = 50.0
PROMPT = "Stream a very long answer."
MB = 1024 * 1024
SAMPLE_EVERY = 20_000  # tokens between RSS samples during a stream


# --------------------------------------------------------------------------- child side: one client


async def _ours(url: str, tokens: int, warmup: int) -> dict[str, float]:
    from fabstir_jupyter.config import InferenceConfig
    from fabstir_jupyter.host.scripted import DEFAULT_SCRIPTED_MODEL
    from fabstir_jupyter.inference import InferenceManager

    manager = InferenceManager([url], InferenceConfig(usage_db=":memory:", max_tokens_cap=max(tokens, warmup)))
    options = {"model": DEFAULT_SCRIPTED_MODEL, "temperature": 0.0}
    async with manager.stream(PROMPT, host=url, max_tokens=warmup, **options) as stream:
        async for _ in stream:
            pass
    del stream
    gc.collect()
    out: dict[str, float] = {"before": _common.rss_bytes()}
    peak = out["before"]
    received = 0
    started = time.perf_counter()
    async with manager.stream(PROMPT, host=url, max_tokens=tokens, **options) as stream:
        async for _ in stream:
            received += 1
            if received % SAMPLE_EVERY == 0:
                peak = max(peak, _common.rss_bytes())
    out["seconds"] = time.perf_counter() - started
    out["after"] = _common.rss_bytes()
    out["peak"] = max(peak, out["after"])
    text = stream.text
    out["text_chars"] = len(text)
    out["text_bytes"] = sys.getsizeof(text)
    out["after_text"] = _common.rss_bytes()  # reading .text joins the held pieces into one str
    del text, stream
    gc.collect()
    out["released"] = _common.rss_bytes()
    out["tokens"] = received
    out["hwm"] = _common.peak_rss_bytes()
    await manager.aclose()
    return out


async def _raw(url: str, tokens: int, warmup: int) -> dict[str, float]:
    from fabstir_jupyter.host.scripted import DEFAULT_SCRIPTED_MODEL

    def frame(n: int, rid: str) -> dict[str, object]:
        return _common.raw_inference_frame(PROMPT, model=DEFAULT_SCRIPTED_MODEL, max_tokens=n,
                                           temperature=0.0, request_id=rid)

    await _common.raw_stream(url, frame(warmup, "warm"), compression="deflate")
    gc.collect()
    out: dict[str, float] = {"before": _common.rss_bytes()}
    peak = [out["before"]]

    def sample(received: int) -> None:
        if received % SAMPLE_EVERY == 0:
            peak[0] = max(peak[0], _common.rss_bytes())

    started = time.perf_counter()
    result = await _common.raw_stream(url, frame(tokens, "main"), compression="deflate", progress=sample)
    out["seconds"] = time.perf_counter() - started
    out["after"] = _common.rss_bytes()
    out["peak"] = max(peak[0], out["after"])
    out["text_chars"] = 0
    out["text_bytes"] = 0
    out["after_text"] = out["after"]
    del result
    gc.collect()
    out["released"] = _common.rss_bytes()
    out["tokens"] = tokens
    out["hwm"] = _common.peak_rss_bytes()
    return out


def child_main(args: argparse.Namespace) -> int:
    run = _ours if args.child == "ours" else _raw
    print(json.dumps(asyncio.run(run(args.url, args.tokens, args.warmup))))
    return 0


# --------------------------------------------------------------------------- parent side


def measure(variant: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, "--url", url,
           "--tokens", str(args.tokens), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(label: str, r: dict[str, float]) -> None:
    print(f"{label}: {r['tokens']:,.0f} tokens in {r['seconds']:.1f} s ({r['tokens'] / r['seconds']:,.0f} tok/s)")
    print(f"  RSS before {r['before'] / MB:.1f} MB | peak during {r['peak'] / MB:.1f} MB | "
          f"after {r['after'] / MB:.1f} MB (+{(r['after'] - r['before']) / MB:.1f} MB) | "
          f"dropped {r['released'] / MB:.1f} MB | VmHWM {r['hwm'] / MB:.1f} MB")
    if r["text_chars"]:
        print(f"  kept text: {r['text_chars']:,.0f} chars, sys.getsizeof {r['text_bytes'] / MB:.1f} MB; "
              f"RSS after reading .text {r['after_text'] / MB:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens in the measured stream")
    parser.add_argument("--warmup", type=int, default=2_000, help="tokens in the untimed warm-up stream")
    parser.add_argument("--child", choices=("ours", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    _common.print_header("client memory", f"RSS of a client process over one {args.tokens:,}-token stream",
                         packages=("fabstir-jupyter", "websockets"))
    with _common.scripted_host(max(args.tokens, args.warmup)) as host:
        print(f"host: scripted fabstir-host (child process, token rate 0) at {host.url}", flush=True)
        raw = measure("raw", host.url, args)
        report("baseline raw websockets reader (keeps nothing)", raw)
        ours = measure("ours", host.url, args)
        report("ours: manager.stream (keeps .text)", ours)
    growth = (ours["after"] - ours["before"]) / MB
    raw_growth = (raw["after"] - raw["before"]) / MB
    print(f"RSS increase over the stream: baseline raw {raw_growth:+.1f} MB | ours {growth:+.1f} MB "
          f"(of which text {ours['text_bytes'] / MB:.1f} MB) | ours - raw {growth - raw_growth:+.1f} MB "
          f"(target < {TARGET_MB:.0f} MB: {verdict(growth < TARGET_MB)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
