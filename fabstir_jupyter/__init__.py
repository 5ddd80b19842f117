"""fabstir_jupyter: use a decentralised LLM network from Python and Jupyter.

The public names below are imported lazily, so ``import fabstir_jupyter`` (and ``%load_ext``)
stays cheap: nothing heavy loads until a name is used.

Quick start::

    from fabstir_jupyter import InferenceManager

    async with InferenceManager(["ws://127.0.0.1:8080/v1/ws"]) as manager:
        async for token in manager.stream_inference("Explain entropy", max_tokens=64):
            print(token, end="")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    # `X as X`: an explicit re-export, so type checkers (mypy --strict) see the lazy names as public.
    from .config import (
        HostRequirements as HostRequirements,
        InferenceConfig as InferenceConfig,
        InferenceOptions as InferenceOptions,
    )
    from .errors import (
        AuthFailed as AuthFailed,
        Cancelled as Cancelled,
        ConnectionFailed as ConnectionFailed,
        ContextOverflow as ContextOverflow,
        FabstirError as FabstirError,
        HostBusy as HostBusy,
        HostError as HostError,
        InferenceTimeout as InferenceTimeout,
        InvalidOptions as InvalidOptions,
        InvalidPrompt as InvalidPrompt,
        ModelNotAvailable as ModelNotAvailable,
        NoHostsAvailable as NoHostsAvailable,
        PaymentRequired as PaymentRequired,
        ProtocolError as ProtocolError,
        RateLimitExceeded as RateLimitExceeded,
        SessionNotFound as SessionNotFound,
    )
    from .hosts import (
        HostInfo as HostInfo,
        HostManager as HostManager,
        StaticSource as StaticSource,
    )
    from .inference import (
        InferenceManager as InferenceManager,
        InferenceResult as InferenceResult,
        InferenceStream as InferenceStream,
    )
    from .sdk import (
        FabstirSDK as FabstirSDK,
        FabstirSDKCore as FabstirSDKCore,
    )
    from .sessions import (
        Session as Session,
        SessionManager as SessionManager,
    )
    from .transport import (
        ConnectionPool as ConnectionPool,
        WebSocketClient as WebSocketClient,
    )
    from .usage import (
        UsageLedger as UsageLedger,
        UsageRecord as UsageRecord,
    )

_LAZY = {
    "HostRequirements": "config",
    "InferenceConfig": "config",
    "InferenceOptions": "config",
    "AuthFailed": "errors",
    "Cancelled": "errors",
    "ConnectionFailed": "errors",
    "ContextOverflow": "errors",
    "FabstirError": "errors",
    "HostBusy": "errors",
    "HostError": "errors",
    "InferenceTimeout": "errors",
    "InvalidOptions": "errors",
    "InvalidPrompt": "errors",
    "ModelNotAvailable": "errors",
    "NoHostsAvailable": "errors",
    "PaymentRequired": "errors",
    "ProtocolError": "errors",
    "RateLimitExceeded": "errors",
    "SessionNotFound": "errors",
    "HostInfo": "hosts",
    "HostManager": "hosts",
    "StaticSource": "hosts",
    "InferenceManager": "inference",
    "InferenceResult": "inference",
    "InferenceStream": "inference",
    "FabstirSDK": "sdk",
    "FabstirSDKCore": "sdk",
    "Session": "sessions",
    "SessionManager": "sessions",
    "ConnectionPool": "transport",
    "WebSocketClient": "transport",
    "UsageLedger": "usage",
    "UsageRecord": "usage",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%fabstir`` and ``%fabstir`` (``%load_ext fabstir_jupyter``); IPython loads here only."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and stop the loop thread, sockets and local hosts (``%unload_ext fabstir_jupyter``)."""
    from .notebook.magics import unload_ipython_extension as unload

    unload(ipython)
