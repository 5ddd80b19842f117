"""The reference host node (``fabstir-host``): a WebSocket server over pluggable backends.

Uses only :mod:`fabstir_jupyter.errors` and :mod:`fabstir_jupyter.protocol` from the package.
``llama_cpp`` and ``httpx`` are imported only by the backends that need them::

    from fabstir_jupyter.host import HostConfig, HostServer, ScriptedBackend

    async with HostServer(HostConfig(port=0), ScriptedBackend()) as server:
        print(server.ws_url)

A paid host (``HostConfig(operator_key=..., payment=PaymentConfig(rpc_url, marketplace,
model_registry_id))``) also uses :mod:`fabstir_jupyter.marketplace` (web3), imported only when it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends import (
    AbortConnection,
    Backend,
    BackendUnavailable,
    GenerationParams,
    GenerationStats,
    ModelInfo,
)
from .config import PaymentConfig
from .scripted import ScriptedBackend, scripted_text, scripted_token
from .server import HostConfig, HostServer

if TYPE_CHECKING:
    from .llama import LlamaCppBackend
    from .openai_proxy import OpenAIProxyBackend

__all__ = [
    "HostConfig",
    "HostServer",
    "PaymentConfig",
    "Backend",
    "BackendUnavailable",
    "AbortConnection",
    "ModelInfo",
    "GenerationParams",
    "GenerationStats",
    "ScriptedBackend",
    "scripted_token",
    "scripted_text",
    "LlamaCppBackend",
    "OpenAIProxyBackend",
]

_LAZY = {"LlamaCppBackend": ".llama", "OpenAIProxyBackend": ".openai_proxy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
