"""Search an endpoint's event logs, also where it refuses to search many blocks at once.

Public JSON-RPC endpoints cap ``eth_getLogs`` ranges (commonly a few thousand to ten thousand
blocks) and answer a wider query with an error. :func:`search_logs` asks once for the whole range
and, when that is refused, walks back from the chain's head in windows (halved while the endpoint
refuses them too) and returns the newest window that holds a match: what this package looks for (a
host's registration, a job's settlement) is the newest such event, and usually recent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import FabstirError

__all__ = ["LOG_WINDOW", "search_logs"]

logger = logging.getLogger("fabstir_jupyter.chain")

#: Blocks per ``eth_getLogs`` when an endpoint refuses to search the whole range at once.
LOG_WINDOW = 10_000

T = TypeVar("T")


def search_logs(
    fetch: Callable[[int, int | None], list[T]],
    head: Callable[[], int],
    *,
    from_block: int = 0,
    window: int = LOG_WINDOW,
    deadline: float | None = None,
    refused: tuple[type[FabstirError], ...] = (FabstirError,),
    what: str = "eth_getLogs",
) -> list[T]:
    """The logs from ``from_block`` to the head; blocking (run it in a thread).

    Args:
        fetch: ``fetch(first, last)`` returns the matching logs of blocks ``first`` to ``last``
            (``None``: to the head), oldest first.
        head: returns the chain's newest block number.
        from_block: the oldest block to search.
        window: blocks per query once the whole range was refused; a window that is refused too
            is halved until the endpoint answers.
        deadline: a ``time.monotonic()`` reading after which the windowed search stops.
        refused: the errors of ``fetch`` that mean "too wide a range, ask for less"; any other
            error propagates.
        what: names the search in the debug log.

    Returns:
        All matches of the whole range; else, after a refusal, the matches of the newest window that
        has any (empty when none has one before ``from_block`` or the deadline).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 block, not {window}")
    try:
        return fetch(from_block, None)
    except refused as exc:
        logger.debug("%s from block %d refused (%s); searching back from the head in %d-block windows",
                     what, from_block, exc.message, window)
    last = head()
    while last >= from_block and (deadline is None or time.monotonic() < deadline):
        first = max(from_block, last - window + 1)
        try:
            found = fetch(first, last)
        except refused:
            if first == last:  # a single block refused: not a matter of range
                raise
            window = max(1, (last - first + 1) // 2)
            continue
        if found:
            return found
        last = first - 1
    return []
