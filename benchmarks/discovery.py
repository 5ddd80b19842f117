"""Discovery of many registered hosts: batched (Multicall3) vs 1 + N sequential calls.

A local chain (py-evm in process, :class:`fabstir_jupyter.local.chain.LocalChain`) gets ``--hosts``
hosts registered (default 500) the production way (FAB approve, registerNode, stake,
setModelTokenPricing per model and token), each with its own account, stake, region, one or two
models and per-model prices. Then, with :class:`fabstir_jupyter.hosts.registry.ChainRegistrySource`:

* batched: ``discover()``: getAllActiveNodes, then every getNodeFullInfo, then getHostModelPrices
  per host in the native and the stable token and ModelRegistry getModel per model, through
  chunked ``aggregate3`` calls whose chunks share one JSON-RPC batch: three round trips whatever
  the host count;
* batched without prices: ``discover()`` with ``read_prices=False``: the same reads as the
  sequential run (full info, minimum prices) plus the model names, in three round trips;
* sequential: ``sequential_discover()``: getAllActiveNodes then one getNodeFullInfo per host, one
  round trip each (what the production TypeScript SDK does). It reads less than the first run
  (no per-model prices, no model names), so that comparison favours it.

Both run as they are, then again over a provider that sleeps ``--delay-ms`` (default 50 ms) per
request, a batch counting as one request (a public RPC endpoint's round trip). Each line counts
round trips, JSON-RPC requests ("eth_calls") and contract calls (each call inside an
``aggregate3`` counts: the work the node does).

Targets: at most 3 round trips for batched discovery whatever the host count; with ``--delay-ms``
per request (default 50: a public endpoint's round trip), batched discovery making the same reads
as 1 + N (no prices) at least 10x faster than 1 + N. Without added delay the speed-ups are printed
too, with no target: the local py-evm chain spends its time executing contract code (~4-5 ms a
``getNodeFullInfo``), which batching cannot save, so there it saves round trips only.

With ``--full`` it also times the batched run's exact reads made one call per round trip
(1 + N + 2 per host + 1 per model): the same information, unbatched.

Run:  python benchmarks/discovery.py [--hosts 500] [--delay-ms 50] [--chunk-size 256] [--full]
      (about 2.5 minutes with the defaults on 2 cores, registering ~0.2 s a host; --full adds
      about 1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from _common import print_header, print_load_after, verdict

from fabstir_jupyter.hosts.registry import ChainRegistrySource
from fabstir_jupyter.local.chain import LocalChain

MODELS = [
    ("CohereForAI/TinyVicuna-1B-32k-GGUF", "tiny-vicuna-1b.q4_k_m.gguf"),
    ("bartowski/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct-Q4_1.gguf"),
    ("TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q4_K_M.gguf"),
    ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf"),
]
REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "ap-southeast-1"]


AGGREGATE3_SELECTOR = "0x82ad56cb"  # aggregate3((address,bool,bytes)[])


def contract_calls(method: Any, params: Any) -> int:
    """The contract calls one JSON-RPC request makes: each call inside an ``aggregate3``, else 1."""
    if method != "eth_call" or not params or not isinstance(params[0], dict):
        return 0
    data = params[0].get("data") or params[0].get("input") or "0x"
    if not data.startswith(AGGREGATE3_SELECTOR):
        return 1
    from eth_abi import decode

    return len(decode(["(address,bool,bytes)[]"], bytes.fromhex(data[len(AGGREGATE3_SELECTOR):]))[0])


class DelayedProvider:
    """A provider that waits ``delay`` seconds before each request or batch (one round trip each).

    It also records each round trip's requests and the seconds the chain took to answer them, and
    counts the contract calls made (:func:`contract_calls`).
    """

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.trips: list[tuple[int, float]] = []
        self.calls = 0

    def _timed(self, count: int, fn: Any, *args: Any) -> Any:
        time.sleep(self.delay)
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.trips.append((count, time.perf_counter() - start))

    def make_request(self, method: Any, params: Any) -> Any:
        self.calls += contract_calls(method, params)
        return self._timed(1, self.inner.make_request, method, params)

    def make_batch_request(self, requests: Any) -> Any:
        self.calls += sum(contract_calls(method, params) for method, params in requests)
        return self._timed(len(requests), self.inner.make_batch_request, requests)


def register(chain: LocalChain, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        models = [MODELS[i % len(MODELS)]] + ([MODELS[(i + 1) % len(MODELS)]] if i % 2 else [])
        prices = {m: (1_000 + 10 * i + k, 2_000 + 10 * i + k) for k, m in enumerate(models)}
        chain.register_host(
            f"http://10.0.{i // 250}.{i % 250 + 1}:8080",
            models=models,
            stake=1_000 + i,
            prices=prices,
            region=REGIONS[i % len(REGIONS)],
            metadata={"hardware": {"gpu": "RTX 4090", "vram": 24, "ram": 64}, "maxConcurrent": 4, "version": "0.3.0"},
        )
        if (i + 1) % 100 == 0:
            print(f"  registered {i + 1}/{count}", flush=True)
    return time.perf_counter() - start


async def measure(
    source: ChainRegistrySource, provider: DelayedProvider, label: str, how: str
) -> tuple[float, int, int, int]:
    calls, requests, inner = source.rpc_calls, source.rpc_requests, provider.calls
    provider.trips.clear()
    start = time.perf_counter()
    if how == "batched":
        hosts = await source.discover()
    else:
        hosts = await source.sequential_discover(full=how == "full")
    elapsed = time.perf_counter() - start
    trips, reqs, contract = source.rpc_calls - calls, source.rpc_requests - requests, provider.calls - inner
    evm = sum(seconds for _count, seconds in provider.trips)
    print(f"  {label:<38} {elapsed:7.2f} s  {trips:5d} round trips  {reqs:4d} eth_calls"
          f"  {contract:5d} contract calls  {len(hosts)} hosts  (chain busy {evm:.2f} s)", flush=True)
    if how == "batched":
        steps = "; ".join(
            f"{count} eth_call{'s' if count > 1 else ''} in {seconds:.2f} s" for count, seconds in provider.trips
        )
        print(f"  {'':<38} round trips: {steps}")
    return elapsed, trips, reqs, len(hosts)


async def run(args: argparse.Namespace) -> int:
    chain = LocalChain(seed=7)
    print(f"registering {args.hosts} hosts on the local chain ...", flush=True)
    took = register(chain, args.hosts)
    print(f"  {took:.1f} s ({took / max(args.hosts, 1) * 1000:.0f} ms a host: fund, FAB mint + approve, "
          "registerNode, stake, setModelTokenPricing)")

    trips_met = speed_met = None
    for delay in ([0.0] + ([args.delay_ms / 1000] if args.delay_ms > 0 else [])):
        provider = DelayedProvider(chain.provider, delay)
        source = ChainRegistrySource(provider, chain.addresses, chunk_size=args.chunk_size)
        what = "no added delay" if delay == 0 else f"{delay * 1000:.0f} ms added per RPC request"
        print(f"\n{what}:")
        lean = ChainRegistrySource(provider, chain.addresses, chunk_size=args.chunk_size, read_prices=False)
        batched = await measure(source, provider, "batched, with per-model prices", "batched")
        minimal = await measure(lean, provider, "batched, 1 + N's reads (no prices)", "batched")
        sequential = await measure(source, provider, "sequential 1 + N (TypeScript SDK)", "naive")
        if not batched[3] == minimal[3] == sequential[3] == args.hosts:
            raise RuntimeError(f"expected {args.hosts} hosts from every run, got {batched[3]}, {minimal[3]} "
                               f"and {sequential[3]}")
        trips_ok = batched[1] <= 3 and minimal[1] <= 3
        trips_met = trips_ok if trips_met is None else trips_met and trips_ok
        same_reads = sequential[0] / minimal[0] if minimal[0] else float("inf")
        with_prices = sequential[0] / batched[0] if batched[0] else float("inf")
        print(f"  round trips {batched[1]} and {minimal[1]} vs {sequential[1]}: <= 3 {verdict(trips_ok)}")
        if delay == 0:
            print(f"  speed-up over 1 + N with the same reads: {same_reads:.1f}x; batched with prices: "
                  f"{with_prices:.1f}x (no target without RPC latency: see the docstring)")
        else:
            speed_met = same_reads >= 10
            print(f"  speed-up over 1 + N with the same reads: {same_reads:.1f}x (>= 10x {verdict(speed_met)}); "
                  f"batched with prices, which reads more: {with_prices:.1f}x")
        if args.full:
            full = await measure(source, provider, "sequential, same reads as batched", "full")
            print(f"  speed-up over the same reads one at a time: {full[0] / batched[0]:.1f}x")
    print()
    if speed_met is None:
        print("speed-up target: not judged (--delay-ms 0)")
    print("overall: " + verdict(bool(trips_met) and speed_met is not False))
    print_load_after()
    return 0  # a missed target is printed, not an exit status (see README.md)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=500, help="hosts to register (at most 2048)")
    parser.add_argument(
        "--delay-ms", type=float, default=50.0, help="simulated round trip per RPC request; 0 skips that run"
    )
    parser.add_argument("--chunk-size", type=int, default=256, help="calls per aggregate3")
    parser.add_argument("--full", action="store_true",
                        help="also time the batched reads made one call per round trip (1 + N + prices + models)")
    args = parser.parse_args()
    print_header(
        "discovery: batched vs sequential registry reads",
        f"{args.hosts} hosts on an in-process py-evm chain; ChainRegistrySource.discover() vs sequential_discover()",
        packages=("fabstir-jupyter", "web3", "eth-tester", "py-evm", "vyper"),
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
