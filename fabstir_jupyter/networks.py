"""Chain networks whose registry the SDK reads: presets, and custom networks given as a dict.

A :class:`NetworkPreset` names a chain (id), how to reach it (an RPC URL, or an in-process web3
provider) and the registry addresses (spec/PROTOCOL.md §8). Addresses change between
deployments, so they live here as data: discovery code takes them as arguments and never
hard-wires one. :func:`resolve_network` turns ``"base-sepolia"`` or a dict such as::

    {"rpc_url": "https://sepolia.base.org", "chain_id": 84532,
     "addresses": {"node_registry": "0x…", "model_registry": "0x…", "multicall": "0x…", "stable_token": "0x…"}}

into a preset; :meth:`~fabstir_jupyter.hosts.registry.ChainRegistrySource.for_network` reads its
registry. Nothing here imports web3.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .errors import InvalidOptions
from .urls import redact_url

__all__ = ["NETWORKS", "NetworkPreset", "ADDRESS_KEYS", "resolve_network"]

#: The contract addresses a network may name; ``node_registry`` is required (discovery). Paid sessions
#: (spec/PROTOCOL.md §10) use ``job_marketplace`` and ``host_earnings``; hosts stake ``fab_token``.
ADDRESS_KEYS = (
    "node_registry", "model_registry", "multicall", "stable_token", "job_marketplace", "host_earnings", "fab_token",
)
#: Names a custom network may not take: they mean the SDK's own networks.
RESERVED_NAMES = ("local", "static")
CUSTOM_NAME = "custom"

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_DICT_KEYS = ("name", "rpc_url", "chain_id", "addresses", "provider")


def _shown(rpc_url: str) -> str:
    # RPC URLs often carry an API key in the path or query: show only scheme, host and port
    return redact_url(rpc_url, keep_path=False) or "rpc"


@dataclass(frozen=True, repr=False)
class NetworkPreset:
    """A chain network: its id, how to reach it, and its registry addresses.

    Args:
        chain_id: the chain id (``None``: not known).
        addresses: ``node_registry`` (required), ``model_registry``, ``multicall`` (Multicall3),
            ``stable_token`` (the stable token prices are quoted in: USDC), ``job_marketplace``,
            ``host_earnings`` and ``fab_token`` (the stake token), as ``0x`` hex.
        rpc_url: an ``http(s)://`` JSON-RPC endpoint (``None``: set one with :meth:`with_rpc_url`).
        name: what the SDK calls the network.
        provider: instead of ``rpc_url``, an in-process ``web3.Web3`` or web3 provider (a local
            chain, say); compared by identity, never printed.
    """

    chain_id: int | None
    addresses: Mapping[str, str]
    rpc_url: str | None = None
    name: str = CUSTOM_NAME
    provider: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidOptions(f"a network name must be a non-empty string, not {self.name!r}", field="network")
        if self.chain_id is not None and (
            isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0
        ):
            raise InvalidOptions(f"chain_id must be a positive integer, not {self.chain_id!r}", field="chain_id")
        if self.rpc_url is not None and (
            not isinstance(self.rpc_url, str)
            or urlsplit(self.rpc_url).scheme not in ("http", "https")
            or not urlsplit(self.rpc_url).netloc
        ):
            shown = _shown(self.rpc_url) if isinstance(self.rpc_url, str) else type(self.rpc_url).__name__
            raise InvalidOptions(f"rpc_url must be an http(s):// URL, not {shown}", field="rpc_url")
        if not isinstance(self.addresses, Mapping):
            raise InvalidOptions("addresses must be a mapping of registry names to 0x addresses", field="addresses")
        unknown = sorted(set(self.addresses) - set(ADDRESS_KEYS))
        if unknown:
            raise InvalidOptions(
                f"unknown registry addresses {unknown}; expected {', '.join(ADDRESS_KEYS)}", field="addresses"
            )
        if not self.addresses.get("node_registry"):
            raise InvalidOptions("addresses need a node_registry", field="addresses")
        for key, value in self.addresses.items():
            if value is not None and (not isinstance(value, str) or not _ADDRESS.fullmatch(value)):
                raise InvalidOptions(f"address {key} must be 0x and 40 hex digits, not {value!r}", field="addresses")
        clean = {k: v for k, v in self.addresses.items() if v is not None}
        object.__setattr__(self, "addresses", MappingProxyType(clean))

    def __repr__(self) -> str:
        where = _shown(self.rpc_url) if self.rpc_url else ("in-process provider" if self.provider else "no rpc")
        return (f"NetworkPreset(name={self.name!r}, chain_id={self.chain_id}, {where}, "
                f"node_registry={self.addresses['node_registry']})")

    @property
    def reachable(self) -> bool:
        """Whether the preset says how to reach the chain (an RPC URL or a provider)."""
        return self.rpc_url is not None or self.provider is not None

    def with_rpc_url(self, rpc_url: str | None) -> NetworkPreset:
        """Return a copy reaching the chain at ``rpc_url`` (``None`` keeps this one)."""
        if rpc_url is None or self.provider is not None:
            return self
        return dataclasses.replace(self, rpc_url=rpc_url)


#: Chain networks known by name. Addresses from spec/PROTOCOL.md §8 and §10 (the newest recorded
#: JobMarketplace; older deployments exist); the RPC URL comes from ``rpc_url=``, ``FABSTIR_RPC_URL``
#: or the config file.
NETWORKS: dict[str, NetworkPreset] = {
    "base-sepolia": NetworkPreset(
        name="base-sepolia",
        chain_id=84532,
        rpc_url=None,
        addresses={
            "node_registry": "0x8BC0Af4aAa2dfb99699B1A24bA85E507de10Fd22",
            "model_registry": "0x1a9d91521c85bD252Ac848806Ff5096bBb9ACDb2",
            "multicall": "0xcA11bde05977b3631167028862bE2a173976CA11",
            "stable_token": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "job_marketplace": "0xD067719Ee4c514B5735d1aC0FfB46FECf2A9adA4",
            "host_earnings": "0xE4F33e9e132E60fc3477509f99b9E1340b91Aee0",
            "fab_token": "0xC78949004B4EB6dEf2D66e49Cd81231472612D62",
        },
    ),
}


def _from_dict(spec: Mapping[str, Any]) -> NetworkPreset:
    unknown = sorted(str(k) for k in set(spec) - set(_DICT_KEYS))
    if unknown:
        raise InvalidOptions(f"unknown network keys {unknown}; expected {', '.join(_DICT_KEYS)}", field="network")
    name = spec.get("name", CUSTOM_NAME)
    if name in RESERVED_NAMES:
        raise InvalidOptions(f"a custom network cannot be called {name!r}", field="network")
    if "addresses" not in spec:
        raise InvalidOptions("a custom network needs addresses (at least node_registry)", field="addresses")
    provider = spec.get("provider")
    if provider is not None and not (callable(getattr(provider, "make_request", None))
                                     or callable(getattr(getattr(provider, "provider", None), "make_request", None))):
        raise InvalidOptions(f"provider must be a web3.Web3 or a web3 provider, not {type(provider).__name__}",
                             field="provider")
    return NetworkPreset(
        name=name, chain_id=spec.get("chain_id"), addresses=spec["addresses"], rpc_url=spec.get("rpc_url"),
        provider=provider,
    )


def resolve_network(network: str | Mapping[str, Any] | NetworkPreset, *, rpc_url: str | None = None) -> NetworkPreset:
    """Return the chain network for a preset name, a dict or a preset.

    Args:
        network: a name in :data:`NETWORKS`, a dict with ``rpc_url`` (or ``provider``),
            ``chain_id``, ``addresses`` and optionally ``name``, or a :class:`NetworkPreset`.
        rpc_url: the RPC URL to use where ``network`` names none (the SDK passes its setting:
            argument, then ``FABSTIR_RPC_URL``, then the config file).

    Raises:
        InvalidOptions: an unknown name, or a malformed dict (``field`` says which part).
    """
    if isinstance(network, NetworkPreset):
        preset = network
    elif isinstance(network, str):
        preset = NETWORKS.get(network)  # type: ignore[assignment]
        if preset is None:
            raise InvalidOptions(
                f"unknown chain network {network!r}; choose one of {', '.join(NETWORKS)} or pass a dict",
                field="network",
            )
    elif isinstance(network, Mapping):
        preset = _from_dict(network)
    else:
        raise InvalidOptions(f"a network is a name or a dict, not {type(network).__name__}", field="network")
    return preset if preset.rpc_url is not None else preset.with_rpc_url(rpc_url)
