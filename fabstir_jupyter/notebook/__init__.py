"""The notebook layer: ``%%fabstir``/``%fabstir`` magics, the loop-thread bridge, live outputs, and
what it shows about paying (the wallet summary, a settled session's receipt).

Load it with ``%load_ext fabstir_jupyter``. Names here resolve lazily, so importing this package
loads neither IPython nor the widgets until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    # `X as X`: an explicit re-export, so type checkers (mypy --strict) see the lazy names as public.
    from .bridge import (
        BackgroundRun as BackgroundRun,
        NotebookBridge as NotebookBridge,
        close_bridge as close_bridge,
        get_bridge as get_bridge,
    )
    from .magics import (
        FabstirMagics as FabstirMagics,
        load_ipython_extension as load_ipython_extension,
        unload_ipython_extension as unload_ipython_extension,
    )
    from .output import (
        OutputSink as OutputSink,
        TextOutput as TextOutput,
        make_output as make_output,
    )
    from .parsers import interpolate as interpolate
    from .paying import (
        SettlementReceipt as SettlementReceipt,
        WalletSummary as WalletSummary,
    )
    from .widgets import (
        HostDashboard as HostDashboard,
        StreamOutput as StreamOutput,
    )

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
