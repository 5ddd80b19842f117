"""Our contracts against production's interfaces: same name, same signature, outputs and selector.

``tests/data/production-abi.txt`` is a copy of ``spec/production-abi.txt``: every function and
event of the production NodeRegistry, ModelRegistry, JobMarketplace and HostEarnings on Base
Sepolia, with outputs, selectors and topics. Every committed artifact whose ``contractName`` is one
of those sections is held to it: a function or event of ours that bears a production name must be
production's exactly (input types, output types with tuple vs flat, mutability, selector; for
events the indexed flags, parameter names and topic). Names production lacks are local-only and
free. An artifact added later (JobMarketplace, HostEarnings) is picked up by its ``contractName``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_utils import keccak

from fabstir_jupyter.hosts.registry import MODEL_REGISTRY_SIGNATURES, NODE_REGISTRY_SIGNATURES
from fabstir_jupyter.local.contracts import CONTRACTS_DIR
from fabstir_jupyter.marketplace import HOST_EARNINGS_ABI, MARKETPLACE_ABI, NODE_REGISTRY_ABI

PRODUCTION_ABI = Path(__file__).resolve().parents[1] / "data" / "production-abi.txt"
SECTIONS = ("NodeRegistry", "ModelRegistry", "JobMarketplace", "HostEarnings")

# What the client and LocalChain call or watch: these must exist on both sides, so the comparison
# can never pass by our contracts dropping a production name.
MUST_SHARE = {
    "NodeRegistry": {
        "registerNode", "stake", "unregisterNode", "updateMetadata", "updateApiUrl", "updateSupportedModels",
        "setModelTokenPricing", "clearModelTokenPricing", "getAllActiveNodes", "getNodeFullInfo",
        "getNodesForModel", "getNodeModels", "nodeSupportsModel", "isActiveNode", "getNodeApiUrl",
        "getModelPricing", "getHostModelPrices", "modelTokenPricing", "fabToken", "modelRegistry", "MIN_STAKE",
        "PRICE_PRECISION", "NodeRegistered", "NodeUnregistered", "MetadataUpdated", "ApiUrlUpdated",
        "ModelsUpdated", "ModelTokenPricingUpdated",
    },
    "ModelRegistry": {
        "getModelId", "getAllModels", "getModel", "addTrustedModel", "isModelApproved", "isTrustedModel",
        "getModelHash", "deactivateModel", "reactivateModel", "owner", "ModelAdded", "ModelDeactivated",
        "ModelReactivated",
    },
    # what MarketplaceClient calls and decodes (its ABI is checked against production below)
    "JobMarketplace": {entry["name"] for entry in MARKETPLACE_ABI},
    "HostEarnings": {entry["name"] for entry in HOST_EARNINGS_ABI} | {"creditEarnings", "setAuthorizedCaller"},
}


@dataclass(frozen=True)
class Entry:
    """One function or event, in canonical form."""

    kind: str  # "function" or "event"
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...] = ()  # functions: canonical output types, tuples kept as (…)
    mutability: str = ""  # functions
    indexed: tuple[bool, ...] = ()  # events
    names: tuple[str, ...] = ()  # events: parameter names
    hash: str = ""  # functions: 4-byte selector; events: topic

    @property
    def signature(self) -> str:
        return f"{self.name}({','.join(self.inputs)})"


# ---------------------------------------------------------------------------- the production list


def _split_top(text: str) -> list[str]:
    """Split at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _type_and_name(item: str) -> tuple[str, str]:
    """``"(string,bytes32) data"`` → ``("(string,bytes32)", "data")``; a bare type has name ``""``."""
    depth = 0
    for i, char in enumerate(item):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == " " and depth == 0:
            return item[:i], item[i + 1 :].strip()
    return item, ""


def _name_and_params(text: str) -> tuple[str, str, str]:
    """``"f(a,(b,c)) rest"`` → ``("f", "a,(b,c)", "rest")``."""
    name, _, rest = text.partition("(")
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return name, rest[:i], rest[i + 1 :].strip()
    raise ValueError(f"unbalanced parentheses: {text!r}")


def _parse_line(line: str) -> Entry:
    body, _, tail = line.partition("  ")
    label, value = tail.split()
    kind, _, text = body.partition(" ")
    name, params, rest = _name_and_params(text)
    if kind == "event":
        assert label == "topic", line
        flagged = [(p.startswith("indexed "), p.removeprefix("indexed ")) for p in _split_top(params)]
        typed = [_type_and_name(p) for _flag, p in flagged]
        return Entry("event", name, tuple(t for t, _ in typed), indexed=tuple(f for f, _ in flagged),
                     names=tuple(n for _, n in typed), hash=value)
    assert kind == "function" and label == "selector", line
    mutability, _, returns = rest.partition(" returns ")
    _, outputs, _ = _name_and_params(returns)
    return Entry("function", name, tuple(_type_and_name(p)[0] for p in _split_top(params)),
                 outputs=tuple(_type_and_name(p)[0] for p in _split_top(outputs)), mutability=mutability, hash=value)


def production() -> dict[str, list[Entry]]:
    """The production list by contract section."""
    sections: dict[str, list[Entry]] = {}
    current = None
    for line in PRODUCTION_ABI.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif line.strip() and not line.startswith("#"):
            assert current is not None, line
            current.append(_parse_line(line))
    return sections


# ---------------------------------------------------------------------------- our artifacts


def _abi_type(param: dict) -> str:
    if param["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + param["type"][len("tuple"):]
    return param["type"]


def _ours(abi: list[dict]) -> list[Entry]:
    entries = []
    for item in abi:
        inputs = tuple(_abi_type(i) for i in item.get("inputs", ()))
        if item["type"] == "function":
            signature = f"{item['name']}({','.join(inputs)})"
            entries.append(Entry(
                "function", item["name"], inputs, outputs=tuple(_abi_type(o) for o in item["outputs"]),
                mutability=item["stateMutability"], hash="0x" + keccak(text=signature)[:4].hex(),
            ))
        elif item["type"] == "event":
            signature = f"{item['name']}({','.join(inputs)})"
            entries.append(Entry(
                "event", item["name"], inputs, indexed=tuple(i["indexed"] for i in item["inputs"]),
                names=tuple(i["name"] for i in item["inputs"]), hash="0x" + keccak(text=signature).hex(),
            ))
    return entries


def artifacts() -> dict[str, dict]:
    """Every committed contract artifact, by contractName."""
    found = {}
    for path in sorted(CONTRACTS_DIR.glob("*.json")):
        artifact = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(artifact, dict) and "abi" in artifact and "contractName" in artifact:
            found[artifact["contractName"]] = artifact
    return found


def differences(ours: list[Entry], theirs: list[Entry]) -> list[str]:
    """What in ``ours`` bears a production name without being production's entry exactly."""
    by_name: dict[tuple[str, str], list[Entry]] = {}
    for entry in theirs:
        by_name.setdefault((entry.kind, entry.name), []).append(entry)
    problems = []
    for entry in ours:
        candidates = by_name.get((entry.kind, entry.name))
        if candidates is None:
            continue  # local only
        same = [c for c in candidates if c.signature == entry.signature]
        if not same:
            problems.append(f"{entry.kind} {entry.signature}: production has {[c.signature for c in candidates]}")
            continue
        if entry.kind == "function":
            want = (same[0].outputs, same[0].mutability, same[0].hash)
            if (entry.outputs, entry.mutability, entry.hash) != want:
                problems.append(f"{entry.signature}: ours {(entry.outputs, entry.mutability, entry.hash)}, "
                                f"production {want}")
        else:
            want = (same[0].indexed, same[0].names, same[0].hash)
            if (entry.indexed, entry.names, entry.hash) != want:
                problems.append(f"event {entry.signature}: ours {(entry.indexed, entry.names, entry.hash)}, "
                                f"production {want}")
    return problems


# ---------------------------------------------------------------------------- tests


def test_the_production_list_parses_and_its_hashes_are_its_signatures():
    """All four sections parse; each selector and topic is the keccak of the line's own signature."""
    sections = production()
    assert set(SECTIONS) <= set(sections)
    for name in SECTIONS:
        assert len(sections[name]) > 10, name
        for entry in sections[name]:
            digest = keccak(text=entry.signature)
            assert entry.hash == "0x" + (digest[:4] if entry.kind == "function" else digest).hex(), entry
    get_model = next(e for e in sections["ModelRegistry"] if e.name == "getModel")
    assert get_model.outputs == ("(string,string,bytes32,uint256,bool,uint256)",)  # one struct, not six values
    registered = next(e for e in sections["NodeRegistry"] if e.name == "NodeRegistered")
    assert registered.indexed == (True, False, False, False) and registered.inputs[-1] == "bytes32[]"


@pytest.mark.parametrize("contract", SECTIONS)
def test_our_contract_matches_production_wherever_a_name_is_shared(contract):
    """Every function and event of ours named as in production is production's, output shape included."""
    artifact = artifacts().get(contract)
    if artifact is None:
        pytest.skip(f"no local {contract} artifact: nothing to compare")
    ours = _ours(artifact["abi"])
    theirs = production()[contract]
    assert differences(ours, theirs) == []
    shared = {e.name for e in ours} & {e.name for e in theirs}
    assert MUST_SHARE.get(contract, set()) <= shared, MUST_SHARE[contract] - shared
    for entry in ours:  # the committed selectors are those the comparison used
        if entry.kind == "function":
            assert artifact["methodIdentifiers"][entry.signature] == entry.hash


def test_the_comparison_catches_flat_outputs_and_another_signature():
    """The pre-fix shapes fail: getModel as six flat values, a registerNode with price arrays, a payable one."""
    theirs = production()["ModelRegistry"] + production()["NodeRegistry"]
    flat = Entry("function", "getModel", ("bytes32",), outputs=("string", "string", "bytes32", "uint256", "bool",
                 "uint256"), mutability="view", hash="0x21e7c498")
    overloaded = Entry("function", "registerNode", ("string", "string", "bytes32[]", "uint256", "uint256",
                       "uint256[]", "uint256[]"), mutability="payable")
    payable = Entry("function", "registerNode", ("string", "string", "bytes32[]", "uint256", "uint256"),
                    mutability="payable", hash="0x79cd5db6")
    event = Entry("event", "NodeRegistered", ("address", "uint256", "string"), indexed=(True, False, False),
                  names=("operator", "stakedAmount", "apiUrl"))
    local_only = Entry("function", "deactivateNode", (), mutability="nonpayable")
    assert len(differences([flat, overloaded, payable, event, local_only], theirs)) == 4


def test_the_clients_calls_are_production_calls():
    """Every signature the discovery client encodes, and its output types, are in the production list."""
    sections = production()
    for contract, table in (("NodeRegistry", NODE_REGISTRY_SIGNATURES), ("ModelRegistry", MODEL_REGISTRY_SIGNATURES)):
        functions = {e.signature: e for e in sections[contract] if e.kind == "function"}
        for signature, outputs in table.items():
            assert functions[signature].outputs == outputs, signature


@pytest.mark.parametrize("contract, abi", [("JobMarketplace", MARKETPLACE_ABI), ("HostEarnings", HOST_EARNINGS_ABI),
                                           ("NodeRegistry", NODE_REGISTRY_ABI)])
def test_the_payment_clients_abi_is_production(contract, abi):
    """Every function and event MarketplaceClient encodes or decodes is production's exactly (selector,
    outputs, mutability; indexed flags, names and topic), and none is missing from production."""
    ours = _ours(abi)
    theirs = production()[contract]
    assert differences(ours, theirs) == []
    assert {e.name for e in ours} <= {e.name for e in theirs}
    if contract == "JobMarketplace":
        session_jobs = next(e for e in ours if e.name == "sessionJobs")
        assert len(session_jobs.outputs) == 18 and session_jobs.hash == "0xef39d372"  # flat, as production's
        created = next(e for e in ours if e.name == "SessionJobCreated")
        assert created.hash == "0x513b4fec3e6ae39000befae860b986c341242d8f5137c9ffafc229557420c42f"
