"""Small shims for the oldest supported Python (3.10)."""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - exercised on Python 3.10 only
    from async_timeout import timeout

__all__ = ["timeout", "reschedule"]


def reschedule(scope: Any, when: float) -> None:
    """Move the deadline of an entered :func:`timeout` scope to ``when`` (a ``loop.time()``); a
    past ``when`` expires it at once (asyncio's ``reschedule``, async-timeout 4's ``update``)."""
    move = getattr(scope, "reschedule", None)
    if move is None:  # pragma: no cover - async-timeout 4, Python 3.10 only
        move = scope.update
    move(when)
