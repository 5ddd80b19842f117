"""Compile the local network's Vyper contracts into the committed JSON artifacts.

Usage::

    python -m fabstir_jupyter.local.contracts.build           # (re)write <Name>.json
    python -m fabstir_jupyter.local.contracts.build --check   # exit 1 if any differs

Needs the ``vyper`` compiler (version pinned below); nothing else in the package does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

from . import CONTRACTS, CONTRACTS_DIR

__all__ = ["VYPER_VERSION", "compile_contract", "render", "build"]

VYPER_VERSION = "0.4.3"
_OUTPUTS = ["abi", "bytecode", "bytecode_runtime", "method_identifiers"]


def compile_contract(name: str) -> dict[str, Any]:
    """Compile ``<name>.vy`` and return its artifact (ABI, bytecode, selectors, source hash).

    Raises:
        RuntimeError: the installed vyper is not :data:`VYPER_VERSION` (bytecode would differ).
    """
    import vyper  # deferred: only building needs the compiler

    if not vyper.__version__.startswith(VYPER_VERSION):
        raise RuntimeError(f"vyper {VYPER_VERSION} is needed to reproduce the artifacts, not {vyper.__version__}")
    path = CONTRACTS_DIR / f"{name}.vy"
    source = path.read_text(encoding="utf-8")
    out = vyper.compile_code(source, contract_path=path.name, output_formats=_OUTPUTS)
    return {
        "contractName": name,
        "compiler": f"vyper {VYPER_VERSION}",
        "sourceFile": path.name,
        "sourceSha256": hashlib.sha256(source.encode("utf-8")).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
        "deployedBytecode": out["bytecode_runtime"],
        # the 4-byte selectors, always as 8 hex digits (vyper drops leading zeros)
        "methodIdentifiers": {
            sig: "0x" + sel[2:].rjust(8, "0") for sig, sel in sorted(out["method_identifiers"].items())
        },
    }


def render(artifact: dict[str, Any]) -> str:
    """Return the artifact as the committed JSON text (sorted keys, one-space indent, final newline)."""
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def build(*, check: bool = False) -> list[str]:
    """Compile every contract; write its JSON unless ``check``. Return the names whose JSON differed."""
    differing = []
    for name in CONTRACTS:
        target = CONTRACTS_DIR / f"{name}.json"
        text = render(compile_contract(name))
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            differing.append(name)
            if not check:
                target.write_text(text, encoding="utf-8")
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabstir_jupyter.local.contracts.build", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON, write nothing")
    args = parser.parse_args(argv)
    differing = build(check=args.check)
    if args.check:
        for name in differing:
            print(f"{name}.json differs from a fresh compile of {name}.vy", file=sys.stderr)
        return 1 if differing else 0
    for name in CONTRACTS:
        print(f"{name}.json {'written' if name in differing else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
