"""Relay overhead: tokens/s our client receives, against a raw ``websockets`` reader of the same host.

A scripted ``fabstir-host`` in a child process (token rate 0: as fast as it can, ``max_tokens``
cap raised) streams ``--tokens`` tokens (default 100 000), one frame per token. This process reads
them

* raw (baseline): ``websockets.connect``, the ``connected`` greeting, the same ``inference``
  frame, then one ``recv()`` + ``json.loads`` per frame until ``stream_end`` (text discarded);
* ours: ``InferenceManager.direct_inference(prompt, url, ...)`` with a fresh manager per run
  (usage ledger in memory; the run includes its ``/v1/version`` probe and socket opening),
  counting the pieces it yields.

Runs alternate (raw, ours, raw, ours, ...) after one untimed warm-up of each; medians of
``--runs`` runs each (default 5). Twice: permessage-deflate off on both sides, then on on both.
Also reported: this process's CPU time per token (``time.process_time``, all threads) and how
busy the host process was (its CPU time over the run's wall time: near 100 % means the host,
not the client, sets the pace).

Because the unthrottled host is usually the bottleneck, a last line paces a second host at
``--paced-rate`` tokens/s (default 20 000, below what either client can take) and compares the
client CPU per token alone: the cleanest figure of what our client costs over a raw reader.

Target: ours / raw tokens/s >= 0.90 on both unthrottled lines.

Run:  python benchmarks/relay_overhead.py [--tokens 100000] [--runs 5] [--paced-rate 20000]
      (about 2 minutes with the defaults on 2 cores; --tokens 20000 --runs 3 for a quick look;
      --paced-rate 0 skips the paced line)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import _common
from _common import Meter, fmt_rate, median, verdict

from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.host.scripted import DEFAULT_SCRIPTED_MODEL
from fabstir_jupyter.inference import InferenceManager

TARGET_RATIO = 0.90
PROMPT = "Stream as many words as you can."


@dataclass
class Run:
    tokens: int
    wall: float
    cpu: float  # this (client) process
    host_cpu: float  # the host process

    @property
    def rate(self) -> float:
        return self.tokens / self.wall

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu / self.tokens * 1e6

    @property
    def host_busy(self) -> float:
        return self.host_cpu / self.wall


class Bench:
    """One host, one compression setting: run either client against it."""

    def __init__(self, host: object, tokens: int, compression: bool) -> None:
        self.url: str = host.url  # type: ignore[attr-defined]
        self.pid: int = host.pid  # type: ignore[attr-defined]
        self.tokens = tokens
        self.compression = compression
        self.count = 0

    async def raw(self) -> Run:
        self.count += 1
        frame = _common.raw_inference_frame(PROMPT, model=DEFAULT_SCRIPTED_MODEL, max_tokens=self.tokens,
                                            temperature=0.0, request_id=f"raw-{self.count}")
        host0 = _common.process_cpu_seconds(self.pid)
        with Meter() as meter:
            result = await _common.raw_stream(self.url, frame, compression="deflate" if self.compression else None)
        return Run(result.tokens, meter.wall, meter.cpu, _common.process_cpu_seconds(self.pid) - host0)

    async def ours(self) -> Run:
        config = InferenceConfig(compression_enabled=self.compression, usage_db=":memory:",
                                 max_tokens_cap=self.tokens)
        manager = InferenceManager([self.url], config)
        try:
            received = 0
            host0 = _common.process_cpu_seconds(self.pid)
            with Meter() as meter:
                async for _ in manager.direct_inference(PROMPT, self.url, model=DEFAULT_SCRIPTED_MODEL,
                                                        max_tokens=self.tokens, temperature=0.0):
                    received += 1
            host_cpu = _common.process_cpu_seconds(self.pid) - host0
        finally:
            await manager.aclose()
        return Run(received, meter.wall, meter.cpu, host_cpu)

    async def alternate(self, runs: int, label: str) -> tuple[list[Run], list[Run]]:
        await self.raw()  # untimed warm-ups: imports, allocator, the host's first request
        await self.ours()
        raw: list[Run] = []
        ours: list[Run] = []
        for i in range(runs):
            raw.append(await self.raw())
            ours.append(await self.ours())
            print(f"  {label} run {i + 1}: raw {fmt_rate(raw[-1].rate)} tok/s ({raw[-1].cpu_us_per_token:.1f} us/tok), "
                  f"ours {fmt_rate(ours[-1].rate)} tok/s ({ours[-1].cpu_us_per_token:.1f} us/tok)", flush=True)
        for side, results in (("raw", raw), ("ours", ours)):
            wrong = [r.tokens for r in results if r.tokens != self.tokens]
            if wrong:
                raise RuntimeError(f"{side}: expected {self.tokens} tokens per run, got {wrong}")
        return raw, ours


async def unthrottled(host: object, args: argparse.Namespace, compression: bool) -> bool:
    label = "deflate on " if compression else "deflate off"
    raw, ours = await Bench(host, args.tokens, compression).alternate(args.runs, label)
    raw_rate, our_rate = median(r.rate for r in raw), median(r.rate for r in ours)
    ratio = our_rate / raw_rate
    raw_cpu, our_cpu = median(r.cpu_us_per_token for r in raw), median(r.cpu_us_per_token for r in ours)
    met = ratio >= TARGET_RATIO
    print(f"{label}: baseline raw websockets {fmt_rate(raw_rate)} tok/s | ours direct_inference "
          f"{fmt_rate(our_rate)} tok/s | ratio {ratio:.3f} (target >= {TARGET_RATIO:.2f}: {verdict(met)})")
    print(f"{label}: client CPU per token: raw {raw_cpu:.1f} us | ours {our_cpu:.1f} us | ours/raw "
          f"{our_cpu / raw_cpu:.2f}x; host busy {median(r.host_busy for r in raw):.0%} (raw) / "
          f"{median(r.host_busy for r in ours):.0%} (ours)", flush=True)
    return met


async def paced(args: argparse.Namespace) -> None:
    tokens = max(1000, int(args.paced_rate * 2))  # about 2 s per run
    with _common.scripted_host(tokens, token_rate=args.paced_rate) as host:
        raw, ours = await Bench(host, tokens, False).alternate(args.runs, "paced")
    raw_cpu, our_cpu = median(r.cpu_us_per_token for r in raw), median(r.cpu_us_per_token for r in ours)
    print(f"paced at {fmt_rate(args.paced_rate)} tok/s, deflate off, {tokens:,} tokens: client CPU per token: "
          f"baseline raw {raw_cpu:.1f} us | ours {our_cpu:.1f} us | ours/raw {our_cpu / raw_cpu:.2f}x "
          f"(+{our_cpu - raw_cpu:.1f} us per token; received raw {fmt_rate(median(r.rate for r in raw))}, "
          f"ours {fmt_rate(median(r.rate for r in ours))} tok/s)", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    with _common.scripted_host(args.tokens) as host:
        print(f"host: scripted fabstir-host (child process, token rate 0) at {host.url}")
        print(f"{args.tokens:,} tokens per run, {args.runs} runs each side, alternating, medians")
        results = [await unthrottled(host, args, compression) for compression in (False, True)]
    if args.paced_rate > 0:
        await paced(args)
    print("overall: " + verdict(all(results)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens per stream (default 100000)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side and line (default 5)")
    parser.add_argument("--paced-rate", type=float, default=20_000,
                        help="tokens/s of the paced host (default 20000; 0 skips that line)")
    args = parser.parse_args()
    if args.runs < 1 or args.tokens < 1 or args.paced_rate < 0:
        parser.error("--runs and --tokens must be positive, --paced-rate not negative")
    _common.print_header("relay overhead",
                         "tokens/s through our client vs a raw websockets reader of the same scripted host")
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
