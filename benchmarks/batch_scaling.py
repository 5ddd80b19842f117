"""Batch scaling: a batch over 4 hosts against the same batch on 1 host, and the attempts refused.

Four scripted ``fabstir-host`` child processes, each paced at ``--token-rate`` tokens/s (default
100) per stream and running at most ``--limit`` streams at once (default 4; one more gets
``HOST_BUSY``), so the work is host-bound: an answer of ``--max-tokens`` tokens (default 32) takes
max_tokens / token_rate seconds whatever the client does. This process runs
``InferenceManager.batch`` over ``--prompts`` prompts (default 48):

* baseline: on 1 host (a manager that knows host 0 only);
* ours: on the 4 hosts (a manager that knows all four);
* no target, for information: on the 4 hosts with the per-host limit overstated
  (``per_host_concurrency`` = 2 x limit, as from a registry entry that advertises more than the
  host runs), which only the batch's ``HOST_BUSY`` windows keep in check.

Each manager is made once and warmed with one untimed batch; then the three batches alternate
for ``--rounds`` rounds (default 5; the order turns every round), with new prompts each round;
figures are medians. The managers read each host's limit from its ``/v1/version``, as every
batch does. Per batch: wall time, attempts (usage records), ``HOST_BUSY`` attempts, and this
process's CPU time over the wall time (the client must stay far from one full core, or it, not
the hosts, would set the pace); at the end the hosts' CPU and the load average. Every row's text
is checked against the scripted answer.

Targets: speed-up (1-host median wall / 4-host median wall) >= 3.3, and ``HOST_BUSY`` <= 1 % of
the attempts of the 1-host and 4-host batches (all rounds together). The ideal speed-up is 4:
the batch runs in whole waves of hosts x limit prompts.

Run:  python benchmarks/batch_scaling.py [--prompts 48] [--max-tokens 32] [--token-rate 100]
      [--limit 4] [--rounds 5]   (about 40 s with the defaults on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
from dataclasses import dataclass

import _common
from _common import Meter, median, verdict

from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.local.process import HostProcess
from fabstir_jupyter.usage import ListSink

HOSTS = 4
TARGET_SPEEDUP = 3.3
TARGET_BUSY_SHARE = 0.01


@dataclass
class BatchRun:
    """One timed batch."""

    wall: float
    cpu: float  # this (client) process
    attempts: int
    busy: int  # attempts answered HOST_BUSY

    @property
    def client_busy(self) -> float:
        return self.cpu / self.wall


class Side:
    """A manager over some of the hosts, and the batches it ran."""

    def __init__(self, label: str, urls: list[str], per_host: int | None) -> None:
        self.label = label
        self.per_host = per_host
        self.manager = InferenceManager(urls, InferenceConfig(usage_db=":memory:"), usage=ListSink())
        self.runs: list[BatchRun] = []

    async def batch(self, prompts: list[str], max_tokens: int) -> BatchRun:
        records = self.manager.usage.records  # type: ignore[attr-defined]
        records.clear()
        with Meter() as meter:
            frame = await self.manager.batch(prompts, max_tokens=max_tokens, temperature=0.0,
                                             per_host_concurrency=self.per_host)
        failed = [e for e in frame["error"] if e is not None]
        if failed or list(frame["text"]) != [scripted_text(p, max_tokens) for p in prompts]:
            raise RuntimeError(f"{self.label}: wrong rows ({len(failed)} errors: {sorted(set(failed))})")
        return BatchRun(meter.wall, meter.cpu, len(records), sum(r.error_code == "HOST_BUSY" for r in records))

    def summary(self) -> str:
        runs = self.runs
        attempts, busy = sum(r.attempts for r in runs), sum(r.busy for r in runs)
        return (f"{self.label}: median {median(r.wall for r in runs):.2f} s (min {min(r.wall for r in runs):.2f}, "
                f"max {max(r.wall for r in runs):.2f}); {attempts} attempts, {busy} HOST_BUSY "
                f"({busy / attempts:.1%}); client CPU {median(r.client_busy for r in runs):.0%} of a core")


def start_hosts(stack: contextlib.ExitStack, args: argparse.Namespace) -> list[HostProcess]:
    flags = ["--token-rate", f"{args.token_rate:g}", "--max-concurrent-streams", str(args.limit),
             "--max-tokens-cap", str(max(args.max_tokens, 256))]
    hosts = [HostProcess("scripted", flags, start_timeout=60) for _ in range(HOSTS)]
    for host in hosts:
        stack.callback(host.stop)
        host.launch()  # they boot in parallel
    for host in hosts:
        host.wait_ready()
    return hosts


async def main_async(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        hosts = start_hosts(stack, args)
        urls = [h.url for h in hosts if h.url is not None]
        answer_s = args.max_tokens / args.token_rate
        print(f"hosts: {HOSTS} scripted fabstir-host child processes, {args.token_rate:g} tokens/s per stream, "
              f"at most {args.limit} streams each")
        print(f"batch: {args.prompts} prompts x {args.max_tokens} tokens ({answer_s:.2f} s per answer); "
              f"ideal walls {math.ceil(args.prompts / args.limit) * answer_s:.2f} s on 1 host, "
              f"{math.ceil(args.prompts / (HOSTS * args.limit)) * answer_s:.2f} s on {HOSTS}; "
              f"{args.rounds} rounds, alternating, medians")
        sides = [Side("baseline, 1 host", urls[:1], None), Side(f"ours, {HOSTS} hosts", urls, None),
                 Side(f"{HOSTS} hosts, limit overstated to {2 * args.limit}", urls, 2 * args.limit)]
        try:
            for side in sides:  # untimed warm-up: probes, sockets, imports
                await side.batch([f"warm-up {i}" for i in range(args.prompts)], args.max_tokens)
            host_cpu0 = sum(_common.process_cpu_seconds(h.pid) for h in hosts if h.pid is not None)
            timed = 0.0
            for round_ in range(args.rounds):
                order = sides if round_ % 2 == 0 else sides[::-1]
                for side in order:
                    run = await side.batch([f"round {round_} prompt {i}" for i in range(args.prompts)],
                                           args.max_tokens)
                    side.runs.append(run)
                    timed += run.wall
                print(f"  round {round_ + 1}: " + " | ".join(
                    f"{s.label.split(',')[0] if i < 2 else 'overstated'} {s.runs[-1].wall:.2f} s, "
                    f"{s.runs[-1].attempts} attempts, {s.runs[-1].busy} busy"
                    for i, s in enumerate(sides)), flush=True)
            host_cpu = sum(_common.process_cpu_seconds(h.pid) for h in hosts if h.pid is not None) - host_cpu0
        finally:
            for side in sides:
                await side.manager.aclose()

    for side in sides:
        print(side.summary())
    one, four, over = sides
    speedup = median(r.wall for r in one.runs) / median(r.wall for r in four.runs)
    attempts = sum(r.attempts for s in (one, four) for r in s.runs)
    busy = sum(r.busy for s in (one, four) for r in s.runs)
    share = busy / attempts
    print(f"hosts' CPU: {host_cpu:.1f} s over {timed:.1f} s of batches ({host_cpu / timed / HOSTS:.0%} of a core "
          f"per host)")
    if hasattr(os, "getloadavg"):
        print("load average after the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"speed-up {HOSTS} hosts over 1: {speedup:.2f}x (ideal "
          f"{math.ceil(args.prompts / args.limit) / math.ceil(args.prompts / (HOSTS * args.limit)):.2f}x; "
          f"target >= {TARGET_SPEEDUP}: {verdict(speedup >= TARGET_SPEEDUP)})")
    print(f"HOST_BUSY: {busy} of {attempts} attempts ({share:.2%}) over the 1- and {HOSTS}-host batches "
          f"(target <= {TARGET_BUSY_SHARE:.0%}: {verdict(share <= TARGET_BUSY_SHARE)})")
    over_busy = sum(r.busy for r in over.runs)
    over_attempts = sum(r.attempts for r in over.runs)
    print(f"limit overstated (no target): {over_busy} of {over_attempts} attempts HOST_BUSY "
          f"({over_busy / over_attempts:.1%}), {over_busy / len(over.runs):.1f} per batch of {args.prompts}; "
          f"speed-up {median(r.wall for r in one.runs) / median(r.wall for r in over.runs):.2f}x")
    print("overall: " + verdict(speedup >= TARGET_SPEEDUP and share <= TARGET_BUSY_SHARE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="prompts per batch (default 48)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default 32)")
    parser.add_argument("--token-rate", type=float, default=100.0, help="tokens/s per stream (default 100)")
    parser.add_argument("--limit", type=int, default=4, help="streams per host at once (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    args = parser.parse_args()
    if min(args.prompts, args.max_tokens, args.limit, args.rounds) < 1 or args.token_rate <= 0:
        parser.error("every option must be positive")
    _common.print_header("batch scaling",
                         f"InferenceManager.batch on 1 host vs {HOSTS} hosts (host-bound scripted hosts), "
                         "and the attempts refused with HOST_BUSY", packages=("fabstir-jupyter", "websockets"))
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
