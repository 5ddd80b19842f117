"""``python -m fabstir_jupyter demo [PROMPT]``: stream an answer from the embedded default network.

Starts what ``FabstirSDK()`` starts with no configuration (a local chain with the registry deployed
and a ``fabstir-host`` with the embedded SmolLM2 model registered on it), discovers the host on
that chain, streams the answer to the terminal (paid from the local test account), prints usage and the
job's settlement as the chain recorded it, and stops everything.
``--backend scripted`` runs without the model.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .config import InferenceConfig
from .errors import FabstirError

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _demo(prompt: str, backend: str, max_tokens: int, seed: int | None) -> None:
    from .sdk import FabstirSDK

    started = time.perf_counter()
    _say(f"starting the embedded local network (a local chain and one {backend} host) ...")
    async with FabstirSDK(network="local", local_backend=backend, config=InferenceConfig(usage_db=":memory:")) as sdk:
        manager = sdk.get_inference_manager()
        hosts = await manager.host_manager.discover_all_active_hosts()
        _say(f"network ready in {time.perf_counter() - started:.1f} s; "
             f"{len(hosts)} host(s) found on the local chain: {', '.join(h.api_url for h in hosts)}\n")
        print(f">>> {prompt}\n")
        async with manager.stream(prompt, max_tokens=max_tokens, seed=seed, temperature=0.7) as stream:
            async for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        print("\n")
        usage = stream.usage
        if usage is not None:
            tps = usage.tokens_per_second
            cost = f", cost {usage.cost:.8f} {usage.cost_unit}" if usage.cost is not None else ""
            print(f"[{stream.model} on {stream.host.api_url if stream.host else '?'}] "
                  f"{usage.received_tokens} tokens, finish={stream.finish_reason}, "
                  f"first token {stream.ttft * 1000 if stream.ttft else 0:.0f} ms"
                  + (f", {tps:.1f} tokens/s" if tps else "") + cost)
        payments = manager.payments
        if payments is not None:
            _say(f"settling: the answer was paid from {payments.address} (the local test account) ...")
    if payments is not None:  # closing the SDK settled its jobs on the chain
        for settled in payments.settlements:
            why = f" ({settled.reason})" if settled.reason else ""
            print(f"job {settled.job_id} settled on the chain: {settled.tokens_billed} tokens billed for "
                  f"{settled.streamed_tokens} streamed{why}; {settled.amount(settled.cost):.6f} {settled.unit} "
                  f"paid (host {settled.amount(settled.host_earnings):.6f}, treasury "
                  f"{settled.amount(settled.treasury_fee):.6f}), {settled.amount(settled.refund):.6f} refunded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabstir_jupyter")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream an answer from the embedded default network")
    demo.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)")
    demo.add_argument("--backend", default="llama-cpp", choices=["llama-cpp", "scripted"],
                      help="the local host's backend: the embedded model or scripted text (default: %(default)s)")
    demo.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=None, help="sampling seed, for a reproducible answer")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_demo(args.prompt, args.backend, args.max_tokens, args.seed))
    except FabstirError as exc:
        _say(f"error: {exc}" + (f" (hint: {exc.hint})" if exc.hint else ""))
        return 1
    except KeyboardInterrupt:
        _say("\ncancelled")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
