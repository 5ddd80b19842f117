"""The embedded default: a local chain with the registry deployed, and host processes on this machine.

:class:`HostProcess` is light; :class:`LocalNetwork` (and the names of :mod:`.network`) load web3
and py-evm, so they are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .process import HostProcess

if TYPE_CHECKING:
    from .network import SCRIPTED_MODEL, SMOLLM2_MODEL, LocalModel, LocalNetwork, LocalNetworkHost

_LAZY = {
    "LocalModel": "network",
    "LocalNetwork": "network",
    "LocalNetworkHost": "network",
    "SCRIPTED_MODEL": "network",
    "SMOLLM2_MODEL": "network",
}

__all__ = sorted(["HostProcess", *_LAZY])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
