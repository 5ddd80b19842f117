"""The Vyper contracts: committed artifacts match a fresh compile; the client encodes what they define.

The comparison with production's interfaces is in test_production_abi.py.
"""

from __future__ import annotations

import pytest
from eth_utils import keccak

from fabstir_jupyter.hosts.registry import AGGREGATE3, MODEL_REGISTRY_SIGNATURES, NODE_REGISTRY_SIGNATURES
from fabstir_jupyter.local.contracts import CONTRACTS, load_artifact


def _abi_type(param: dict) -> str:
    if param["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + param["type"][len("tuple"):]
    return param["type"]


def _functions(name: str) -> dict[str, dict]:
    """Map each ABI function's canonical signature to its entry."""
    return {
        f"{e['name']}({','.join(_abi_type(i) for i in e['inputs'])})": e
        for e in load_artifact(name)["abi"]
        if e["type"] == "function"
    }


def _selector(signature: str) -> str:
    return "0x" + keccak(text=signature)[:4].hex()


def test_committed_artifacts_match_a_fresh_compile():
    """Recompiling every .vy source reproduces its committed JSON byte for byte."""
    pytest.importorskip("vyper", reason="checking the artifacts needs the vyper compiler")
    from fabstir_jupyter.local.contracts import build

    assert build.build(check=True) == []


def test_build_check_fails_on_a_difference(monkeypatch, capsys):
    """`build --check` exits non-zero and writes nothing when an artifact differs."""
    pytest.importorskip("vyper", reason="checking the artifacts needs the vyper compiler")
    from fabstir_jupyter.local.contracts import CONTRACTS_DIR, build

    before = {name: (CONTRACTS_DIR / f"{name}.json").read_text() for name in CONTRACTS}
    monkeypatch.setattr(build, "compile_contract", lambda name: {"contractName": name, "changed": True})
    assert build.main(["--check"]) == 1
    assert "differs" in capsys.readouterr().err
    assert {name: (CONTRACTS_DIR / f"{name}.json").read_text() for name in CONTRACTS} == before


def test_artifacts_hold_abi_and_bytecode():
    """Each committed artifact has an ABI, creation bytecode and the source's hash."""
    for name in CONTRACTS:
        artifact = load_artifact(name)
        assert artifact["contractName"] == name
        assert artifact["abi"] and artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 100
        assert len(artifact["sourceSha256"]) == 64


def test_multicall_has_the_canonical_aggregate3():
    """Multicall3's aggregate3 has the canonical selector 0x82ad56cb and (bool,bytes)[] results."""
    functions = _functions("Multicall3")
    assert _selector(AGGREGATE3) == "0x82ad56cb"
    assert [_abi_type(o) for o in functions[AGGREGATE3]["outputs"]] == ["(bool,bytes)[]"]


def test_client_signatures_match_the_contracts():
    """The signatures and output types the discovery client encodes are those of the contracts."""
    for name, table in (("NodeRegistry", NODE_REGISTRY_SIGNATURES), ("ModelRegistry", MODEL_REGISTRY_SIGNATURES)):
        functions = _functions(name)
        for signature, outputs in table.items():
            assert [_abi_type(o) for o in functions[signature]["outputs"]] == list(outputs), signature
            assert functions[signature]["stateMutability"] in ("view", "pure"), signature
