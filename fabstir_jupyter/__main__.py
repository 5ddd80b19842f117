"""``python -m fabstir_jupyter demo [PROMPT]``: stream an answer from a local embedded host.

Starts a ``fabstir-host`` with the embedded SmolLM2 model on a free loopback port, streams the
answer to the terminal, prints usage, and stops the host. ``--backend scripted`` runs without the
model.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .config import InferenceConfig
from .errors import FabstirError
from .inference import InferenceManager
from .local import HostProcess

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


async def _stream(url: str, prompt: str, max_tokens: int, seed: int | None) -> None:
    config = InferenceConfig(usage_db=":memory:")
    async with InferenceManager([url], config) as manager:
        async with manager.stream(prompt, max_tokens=max_tokens, seed=seed, temperature=0.7) as stream:
            async for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        usage = stream.usage
        print("\n")
        if usage is not None:
            tps = usage.tokens_per_second
            print(f"[{stream.model} on {stream.host.api_url if stream.host else '?'}] "
                  f"{usage.received_tokens} tokens, finish={stream.finish_reason}, "
                  f"first token {stream.ttft * 1000 if stream.ttft else 0:.0f} ms"
                  + (f", {tps:.1f} tokens/s" if tps else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabstir_jupyter")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream an answer from a local embedded host")
    demo.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    demo.add_argument("--backend", default="llama-cpp", choices=["llama-cpp", "scripted"])
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    print(f"starting a local fabstir-host ({args.backend}) ...", file=sys.stderr)
    try:
        with HostProcess(args.backend) as host:
            assert host.url is not None
            print(f"host ready at {host.url}\n", file=sys.stderr)
            print(f">>> {args.prompt}\n")
            asyncio.run(_stream(host.url, args.prompt, args.max_tokens, args.seed))
    except FabstirError as exc:
        print(f"error: {exc}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
