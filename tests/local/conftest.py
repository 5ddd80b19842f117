"""Fixtures for the local network tests: a running network of scripted hosts, and process checks."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("eth_tester", reason="the local network needs eth-tester and py-evm (the 'chain' extra)")

from fabstir_jupyter.local.network import LocalNetwork

PROCESS_DEADLINE = 10.0  # seconds a host may take to die after its parent


def process_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs: no such process, or a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/status") as status:
            state = next((line.split()[1] for line in status if line.startswith("State:")), "?")
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # zombie or dead: it has exited, init reaps it


def wait_gone(pids: list[int], deadline: float = PROCESS_DEADLINE) -> list[int]:
    """Wait up to ``deadline`` seconds for every pid to be gone; return those still running."""
    end = time.monotonic() + deadline
    alive = list(pids)
    while alive and time.monotonic() < end:
        alive = [pid for pid in alive if not process_gone(pid)]
        if alive:
            time.sleep(0.05)
    return alive


@pytest.fixture(scope="module")
def network():
    """Three scripted hosts registered on a fresh local chain (read-only: do not kill hosts)."""
    with LocalNetwork(3, "scripted", seed=7) as local:
        yield local
