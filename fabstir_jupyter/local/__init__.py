"""The embedded default: a local chain with the registry deployed, and host processes on this machine.

:class:`HostProcess` is light; :class:`LocalNetwork` (and the names of :mod:`.network`) load web3
and py-evm, so they are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .process import HostProcess as HostProcess

if TYPE_CHECKING:
    # `X as X`: an explicit re-export, so type checkers (mypy --strict) see the lazy names as public.
    from .network import (
        SCRIPTED_MODEL as SCRIPTED_MODEL,
        SMOLLM2_MODEL as SMOLLM2_MODEL,
        LocalModel as LocalModel,
        LocalNetwork as LocalNetwork,
        LocalNetworkHost as LocalNetworkHost,
    )

_LAZY = {
    "LocalModel": "network",
    "LocalNetwork": "network",
    "LocalNetworkHost": "network",
    "SCRIPTED_MODEL": "network",
    "SMOLLM2_MODEL": "network",
}

__all__ = sorted(["HostProcess", *_LAZY])


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
