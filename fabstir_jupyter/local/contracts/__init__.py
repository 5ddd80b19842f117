"""Contracts of the local network: Vyper sources and their committed compiled artifacts.

``NodeRegistry`` and ``ModelRegistry`` define what the local network needs of the production
contracts, each function and event with production's exact signature, outputs and selector
(spec/production-abi.txt; tests/chain/test_production_abi.py holds every artifact to it), plus a
few local-only helpers under names production does not use. ``MockERC20`` is the local FAB that
hosts stake; ``Multicall3`` serves ``aggregate3``. Each ``<Name>.vy`` has a ``<Name>.json``
beside it (ABI and bytecode), written by ``python -m fabstir_jupyter.local.contracts.build``;
loading one needs no compiler.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CONTRACTS", "CONTRACTS_DIR", "load_artifact"]

CONTRACTS_DIR = Path(__file__).resolve().parent
CONTRACTS = ("MockERC20", "ModelRegistry", "NodeRegistry", "Multicall3", "HostEarnings", "JobMarketplace")


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """Return the committed artifact of contract ``name``: ``abi``, ``bytecode`` and build facts.

    Raises:
        ValueError: ``name`` is not one of :data:`CONTRACTS`.
    """
    if name not in CONTRACTS:
        raise ValueError(f"unknown contract {name!r}; known: {', '.join(CONTRACTS)}")
    artifact: dict[str, Any] = json.loads((CONTRACTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return artifact
