"""The Vyper contracts: committed artifacts match a fresh compile, selectors match the spec."""

from __future__ import annotations

import pytest
from eth_utils import keccak

from fabstir_jupyter.hosts.registry import AGGREGATE3, MODEL_REGISTRY_SIGNATURES, NODE_REGISTRY_SIGNATURES
from fabstir_jupyter.local.contracts import CONTRACTS, load_artifact

# spec/PROTOCOL.md §8, typed out as the spec gives them
SPEC_NODE_REGISTRY = [
    "getAllActiveNodes()",
    "getNodeFullInfo(address)",
    "getNodesForModel(bytes32)",
    "nodeSupportsModel(address,bytes32)",
    "isActiveNode(address)",
    "getNodeApiUrl(address)",
    "getModelPricing(address,bytes32,address)",
]
SPEC_MODEL_REGISTRY = ["getModelId(string,string)", "getAllModels()", "getModel(bytes32)"]
SPEC_NODE_FULL_INFO_OUTPUTS = ["address", "uint256", "bool", "string", "string", "bytes32[]", "uint256", "uint256"]
SPEC_GET_MODEL_OUTPUTS = ["string", "string", "bytes32", "uint256", "bool", "uint256"]


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


def test_node_registry_selectors_match_the_spec():
    """NodeRegistry has every §8 view function, with the §8 selector and output types."""
    functions = _functions("NodeRegistry")
    identifiers = load_artifact("NodeRegistry")["methodIdentifiers"]
    for signature in SPEC_NODE_REGISTRY:
        assert signature in functions, signature
        assert identifiers[signature] == _selector(signature)
        assert functions[signature]["stateMutability"] == "view"
    outputs = [_abi_type(o) for o in functions["getNodeFullInfo(address)"]["outputs"]]
    assert outputs == SPEC_NODE_FULL_INFO_OUTPUTS
    assert [_abi_type(o) for o in functions["getModelPricing(address,bytes32,address)"]["outputs"]] == ["uint256"]
    assert [_abi_type(o) for o in functions["getAllActiveNodes()"]["outputs"]] == ["address[]"]


def test_model_registry_selectors_match_the_spec():
    """ModelRegistry has the §8 functions (getModelId pure) with the §8 selectors and outputs."""
    functions = _functions("ModelRegistry")
    identifiers = load_artifact("ModelRegistry")["methodIdentifiers"]
    for signature in SPEC_MODEL_REGISTRY:
        assert identifiers[signature] == _selector(signature)
    assert functions["getModelId(string,string)"]["stateMutability"] == "pure"
    assert [_abi_type(o) for o in functions["getModel(bytes32)"]["outputs"]] == SPEC_GET_MODEL_OUTPUTS


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
    assert sorted(NODE_REGISTRY_SIGNATURES) == sorted(SPEC_NODE_REGISTRY)
