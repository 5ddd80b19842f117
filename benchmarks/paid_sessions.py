"""What paying costs in time: a paid session beside an unpaid one, on the local network, same run.

Two embedded local networks run in this process, one with paid hosts (``LocalNetwork(paid=True)``:
the JobMarketplace on the local chain, served over JSON-RPC on loopback, as a wallet reaches Base
Sepolia) and one with free hosts, each one scripted ``fabstir-host`` child process. One
``InferenceManager`` per network; the paid one pays from the network's funded test account, in
USDC. Each round, in alternating order:

* **session, to the first token**: ``create_session(host=...)`` then the first turn (8 tokens),
  timed from the call to the first text. Paid, ``create_session`` opens the job (read the host's
  price, ``createSessionJobForModel...`` mined, its receipt read) and the turn first sends a
  ``session_init``-equivalent encrypted init carrying the job id; unpaid it does no I/O.
* **settlement**: ``end_session``. Paid: close the socket, wait for the host's last proof of the
  turn, ``completeSessionJob`` as the depositor, read the job and its events back. Unpaid: close.
* **stateless, cold and warm**: the first ``infer`` of a fresh manager (paid: it opens the host's
  tab job) and the next one (the tab's job is reused: no chain call).

Every figure is a median over rounds; the RPC requests per paid session (the client's job and
settlement, the host's proof and reads) are counted at the local RPC server. There is no target:
the figures say what a paid session adds on this machine's local chain, where a transaction is
mined at once; on Base Sepolia each transaction adds a block's wait (about 2 s) instead.

Run: ``python benchmarks/paid_sessions.py`` (``--rounds 9``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, print_header

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.hosts import HostManager
from fabstir_jupyter.local.network import LocalNetwork
from fabstir_jupyter.networks import ADDRESS_KEYS, NetworkPreset
from fabstir_jupyter.payments import PaymentConfig, Payments
from fabstir_jupyter.usage import ListSink
from fabstir_jupyter.wallet import Wallet

PROMPT = "Tell me about the sea in one sentence."


def _manager(network: LocalNetwork) -> InferenceManager:
    config = InferenceConfig(usage_db=":memory:")
    hosts = HostManager([], sources=[network.source()], config=config)
    usage = ListSink()
    if not network.paid:
        return InferenceManager(hosts, config, usage=usage)
    addresses = {k: v for k, v in network.addresses.items() if k in ADDRESS_KEYS}
    preset = NetworkPreset(name="local", chain_id=network.chain_id, addresses=addresses, rpc_url=network.rpc_url)
    wallet = Wallet(network.user_key, "the local network's test account")
    payments = Payments(wallet, preset, PaymentConfig(budget=1000), usage=usage, local=True)
    return InferenceManager(hosts, config, usage=usage, payments=payments, signer=wallet._key)


async def _host(manager: InferenceManager, network: LocalNetwork):
    await manager.host_manager.discover_all_active_hosts()
    return manager.host_for(network.hosts[0].address)


async def _session_round(manager: InferenceManager, host) -> tuple[float, float, float]:
    """(create_session s, first token after the call s, end_session s)."""
    started = time.perf_counter()
    session = await manager.sessions.create_session(host=host)
    created = time.perf_counter()
    first = None
    async with manager.sessions.stream(session.id, PROMPT, max_tokens=8) as stream:
        async for _ in stream:
            if first is None:
                first = time.perf_counter()
    ending = time.perf_counter()
    await manager.sessions.end_session(session.id)
    ended = time.perf_counter()
    assert first is not None
    return created - started, first - started, ended - ending


async def _stateless_round(network: LocalNetwork) -> tuple[float, float]:
    """(ttft of a fresh manager's first infer, of its second), each the caller's wait."""
    manager = _manager(network)
    async with manager:
        host = await _host(manager, network)
        await manager.host_manager.describe(host)
        cold = await manager.ainfer(PROMPT, max_tokens=8, host=host)
        warm = await manager.ainfer(PROMPT + " Again.", max_tokens=8, host=host)
    return cold.ttft or 0.0, warm.ttft or 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved paid/unpaid rounds")
    args = parser.parse_args()
    print_header("paid sessions: the time paying adds",
                 "a session's time to first token and its settlement, paid vs unpaid, local network, same run",
                 packages=("fabstir-jupyter", "web3", "eth-tester", "py-evm", "websockets"))
    with LocalNetwork(1, "scripted", paid=True) as paid, LocalNetwork(1, "scripted", paid=False) as free:
        managers = {"paid": _manager(paid), "unpaid": _manager(free)}
        hosts = {"paid": await _host(managers["paid"], paid), "unpaid": await _host(managers["unpaid"], free)}
        for name, manager in managers.items():  # warm-up: describe the host, open and settle one session
            await _session_round(manager, hosts[name])
        sessions: dict[str, list[tuple[float, float, float]]] = {"paid": [], "unpaid": []}
        stateless: dict[str, list[tuple[float, float]]] = {"paid": [], "unpaid": []}
        rpc_before = paid._rpc.requests_served  # type: ignore[union-attr]
        for index in range(args.rounds):
            order = ("paid", "unpaid") if index % 2 == 0 else ("unpaid", "paid")
            for name in order:
                sessions[name].append(await _session_round(managers[name], hosts[name]))
        rpc_per_session = (paid._rpc.requests_served - rpc_before) / args.rounds  # type: ignore[union-attr]
        for index in range(args.rounds):
            order = ("paid", "unpaid") if index % 2 == 0 else ("unpaid", "paid")
            for name in order:
                stateless[name].append(await _stateless_round(paid if name == "paid" else free))
        for manager in managers.values():
            await manager.aclose()
    if hasattr(os, "getloadavg"):
        print("load average after the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    def ms(values: list[float]) -> float:
        return 1000 * median(values)

    print(f"\n-- a session, {args.rounds} rounds (median, ms)")
    print(f"{'':8} {'create_session':>15} {'first token':>12} {'end_session':>12}")
    for name in ("unpaid", "paid"):
        rows = sessions[name]
        print(f"{name:8} {ms([r[0] for r in rows]):15.1f} {ms([r[1] for r in rows]):12.1f} "
              f"{ms([r[2] for r in rows]):12.1f}")
    added_first = ms([r[1] for r in sessions["paid"]]) - ms([r[1] for r in sessions["unpaid"]])
    added_end = ms([r[2] for r in sessions["paid"]]) - ms([r[2] for r in sessions["unpaid"]])
    print(f"paying adds {added_first:+.1f} ms before the first token (the job: its price read, its transaction "
          f"mined) and {added_end:+.1f} ms to end the session (the host's last proof, the settlement, the read-back); "
          f"{rpc_per_session:.0f} JSON-RPC requests per paid session (the client's and the host's)")
    print(f"\n-- stateless, {args.rounds} rounds (caller's time to first token, median, ms)")
    for name in ("unpaid", "paid"):
        rows = stateless[name]
        print(f"{name:8} first request {ms([r[0] for r in rows]):8.1f}   next request {ms([r[1] for r in rows]):8.1f}")
    print("(paid: the first request opens the host's tab job; the next reuses it)")


if __name__ == "__main__":
    asyncio.run(main())
