"""The notebook layer: ``%%fabstir``/``%fabstir`` magics, the loop-thread bridge, live outputs, and
what it shows about paying (the wallet summary, a settled session's receipt).

Load it with ``%load_ext fabstir_jupyter``. Names here resolve lazily, so importing this package
loads neither IPython nor the widgets until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .bridge import BackgroundRun, NotebookBridge, close_bridge, get_bridge
    from .magics import FabstirMagics, load_ipython_extension, unload_ipython_extension
    from .output import OutputSink, TextOutput, make_output
    from .parsers import interpolate
    from .paying import SettlementReceipt, WalletSummary
    from .widgets import HostDashboard, StreamOutput

_LAZY = {
    "BackgroundRun": "bridge",
    "NotebookBridge": "bridge",
    "close_bridge": "bridge",
    "get_bridge": "bridge",
    "FabstirMagics": "magics",
    "load_ipython_extension": "magics",
    "unload_ipython_extension": "magics",
    "OutputSink": "output",
    "TextOutput": "output",
    "make_output": "output",
    "interpolate": "parsers",
    "SettlementReceipt": "paying",
    "WalletSummary": "paying",
    "HostDashboard": "widgets",
    "StreamOutput": "widgets",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
