"""End-to-end encryption's cost through our client: encrypted vs plaintext, same host, same run.

One scripted ``fabstir-host`` child process runs with an operator key (``--key-file``); one
``InferenceManager`` in this process knows the host's published key. Each round runs the same
request twice on the same warm pooled socket, once with ``encryption="auto"`` (spec §6: a fresh
``encrypted_session_init`` and the ``encrypted_message`` sent back to back, every chunk decrypted)
and once with ``encryption=False``; the order alternates between rounds, and every figure is the
median over rounds.

* **Throughput** (``--tokens`` per request, host paced at ``--rate`` tokens/s so that it is not
  the bottleneck): tokens/s after the first token as the client delivers them, the host's CPU
  share (from ``/proc``, to show it was not saturated), and the client's CPU per token, whose
  inverse is what the client alone could sustain. Target: encrypted >= 0.85 x plaintext tokens/s.
* **Unthrottled**, for information: the same with the host streaming as fast as it can; the rate
  is then set by the work per frame on both sides (hex and AEAD on each chunk, frames about four
  times larger), far above what any model generates.
* **Time to first token** (``--ttft-rounds`` short requests): the caller's wait from the stream's
  start to its first text. Target: encryption adds at most 5 ms.

The time-to-first-token section also prints each side's CPU per request, so the added time can be
split into the client's work (a fresh init: ephemeral key, ECDH, HKDF, signature, two AEAD seals),
the host's (ECDH, two signature recoveries, its ack) and waiting.

Run: ``python benchmarks/encryption.py`` (``--rounds 7 --tokens 2000 --rate 4000 --ttft-rounds 61``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, print_header, process_cpu_seconds, verdict

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.hosts import HostInfo
from fabstir_jupyter.local.process import HostProcess
from fabstir_jupyter.usage import ListSink

PROMPT = "Tell me a long story about a river that runs through three countries."
TOKENS_RATIO_TARGET = 0.85
TTFT_ADDED_TARGET_MS = 5.0


@dataclass
class Run:
    """One request: the client's delivery rate, its wait for the first text, and CPU used."""

    tokens: int
    rate: float  # tokens/s after the first token
    ttft: float  # seconds, the caller's wait
    client_cpu: float  # seconds of this process's CPU
    host_cpu: float  # seconds of the host process's CPU
    wall: float
    encrypted: bool | None


async def one_request(manager: InferenceManager, host_pid: int, *, max_tokens: int, encrypted: bool) -> Run:
    cpu0, host0, wall0 = time.process_time(), process_cpu_seconds(host_pid), time.perf_counter()
    first = last = None
    async with manager.stream(PROMPT, max_tokens=max_tokens, temperature=0.0,
                              encryption="auto" if encrypted else False) as stream:
        async for _ in stream:
            now = time.perf_counter()
            first = first or now
            last = now
    wall = time.perf_counter() - wall0
    cpu, host_cpu = time.process_time() - cpu0, process_cpu_seconds(host_pid) - host0
    if stream.encrypted is not encrypted:
        raise SystemExit(f"expected encrypted={encrypted}, the stream says {stream.encrypted}")
    assert first is not None and last is not None and stream.ttft is not None and stream.usage is not None
    # A piece holds several tokens when frames queued up in the socket: count the tokens, not the
    # pieces (the first piece holds one token while the client keeps up with the host).
    tokens = stream.usage.received_tokens
    rate = (tokens - 1) / (last - first) if last > first else float("nan")
    return Run(tokens, rate, stream.ttft, cpu, host_cpu, wall, stream.encrypted)


async def interleaved(manager: InferenceManager, pid: int, rounds: int, max_tokens: int) -> dict[bool, list[Run]]:
    runs: dict[bool, list[Run]] = {True: [], False: []}
    for i in range(rounds):
        for encrypted in ((True, False) if i % 2 == 0 else (False, True)):
            runs[encrypted].append(await one_request(manager, pid, max_tokens=max_tokens, encrypted=encrypted))
    return runs


def report_throughput(title: str, runs: dict[bool, list[Run]]) -> float:
    print(f"\n-- {title}")
    rates = {}
    for encrypted in (False, True):
        rs = runs[encrypted]
        rate = median(r.rate for r in rs)
        rates[encrypted] = rate
        host_share = median(r.host_cpu / r.wall for r in rs)
        client_us = median(r.client_cpu / r.tokens for r in rs) * 1e6
        print(f"{'encrypted' if encrypted else 'plaintext':9}: {rate:9,.0f} tokens/s   "
              f"host CPU {host_share:5.0%} of one core   client CPU {client_us:6.1f} us/token "
              f"(alone it could take {1e6 / client_us:,.0f} tokens/s)")
    ratio = rates[True] / rates[False]
    return ratio


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved pairs of throughput requests")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per throughput request")
    parser.add_argument("--rate", type=float, default=4000, help="host pace in tokens/s for the throughput line")
    parser.add_argument("--ttft-rounds", type=int, default=61, help="interleaved pairs of short requests")
    parser.add_argument("--skip-unthrottled", action="store_true", help="leave out the unthrottled line")
    args = parser.parse_args()

    print_header("end-to-end encryption through the client",
                 "encryption='auto' vs encryption=False: the same scripted host (its own process), the same "
                 "warm socket, interleaved", packages=("fabstir-jupyter", "websockets", "coincurve", "PyNaCl"))
    secret = os.urandom(32)  # the host's operator key for this run only
    key = PrivateKey.from_bytes(secret)
    with tempfile.TemporaryDirectory() as directory:
        key_file = os.path.join(directory, "host.key")
        # a 66-byte file written once, before anything runs on the loop: no need to leave the loop for it
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:  # noqa: ASYNC230
            f.write("0x" + secret.hex())
        cap = max(args.tokens, 64)
        lines = []
        for label, rate in (("paced", args.rate),) + ((("unthrottled", 0.0),) if not args.skip_unthrottled else ()):
            host = HostProcess("scripted", ["--max-tokens-cap", str(cap), "--token-rate", f"{rate:g}",
                                            "--key-file", key_file], start_timeout=60)
            with host:
                assert host.url is not None and host.pid is not None
                info = HostInfo(api_url=host.url, address=key.address,
                                metadata={"publicKey": key.public_key.compressed.hex()})
                config = InferenceConfig(usage_db=":memory:", max_tokens_cap=cap, first_token_timeout=30,
                                         idle_timeout=30)
                async with InferenceManager([info], config, usage=ListSink()) as manager:
                    await interleaved(manager, host.pid, 2, 64)  # warm-up: imports, keys, the pooled socket
                    if label == "paced":
                        ttft = await interleaved(manager, host.pid, args.ttft_rounds, 4)
                    runs = await interleaved(manager, host.pid, args.rounds, args.tokens)
                    title = (f"throughput, host paced at {rate:,.0f} tokens/s, {args.tokens} tokens x {args.rounds} "
                             "rounds" if rate else f"throughput, unthrottled host, {args.tokens} tokens x "
                             f"{args.rounds} rounds (information, no target: each side's work per frame sets the rate)")
                    lines.append((label, report_throughput(title, runs)))
    if hasattr(os, "getloadavg"):
        print("\nload average after the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    plain_ttft = median(r.ttft for r in ttft[False]) * 1000
    sealed_ttft = median(r.ttft for r in ttft[True]) * 1000
    added = sealed_ttft - plain_ttft
    print(f"\n-- time to first token, {args.ttft_rounds} rounds of 4-token requests (the caller's wait, median)")
    print(f"plaintext: {plain_ttft:6.2f} ms   encrypted: {sealed_ttft:6.2f} ms   added: {added:+.2f} ms")
    for encrypted in (False, True):
        rs = ttft[encrypted]
        # means: /proc counts the host's CPU in 10 ms ticks, far coarser than one short request
        client_ms = sum(r.client_cpu for r in rs) / len(rs) * 1000
        host_ms = sum(r.host_cpu for r in rs) / len(rs) * 1000
        print(f"{'encrypted' if encrypted else 'plaintext':9}: CPU per request (mean, whole 4-token request): "
              f"client {client_ms:.2f} ms, host {host_ms:.2f} ms")
    print("\n== verdicts")
    for label, ratio in lines:
        if label == "paced":
            print(f"tokens/s encrypted / plaintext: {ratio:.3f} (target >= {TOKENS_RATIO_TARGET}): "
                  f"{verdict(ratio >= TOKENS_RATIO_TARGET)}")
        else:
            print(f"unthrottled tokens/s encrypted / plaintext: {ratio:.3f} (information, no target)")
    print(f"time to first token added: {added:+.2f} ms (target <= +{TTFT_ADDED_TARGET_MS:g} ms): "
          f"{verdict(added <= TTFT_ADDED_TARGET_MS)}")


if __name__ == "__main__":
    asyncio.run(main())
