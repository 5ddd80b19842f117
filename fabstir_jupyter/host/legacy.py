"""Frames as a production host sends them, for the host's ``legacy`` mode (spec/PROTOCOL.md §3, §4).

A legacy stream ends with an empty chunk and a ``stream_end`` without ``usage`` or
``finish_reason``; errors are flat ``{code, message}``; a mid-stream failure is an ``"Error: "``
chunk followed by a normal end; a context overflow is an empty answer.
"""

from __future__ import annotations

from typing import Any

from ..errors import FabstirError
from ..protocol import chunk_frame

__all__ = ["legacy_error_frame", "legacy_end_frame", "legacy_final_frames"]


def legacy_error_frame(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """Build production's flat coded error (no nested ``error`` object)."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return frame


def legacy_end_frame(reason: str, tokens_used: int, request_id: str | None = None) -> dict[str, Any]:
    """Build a ``stream_end`` with neither ``usage`` nor ``finish_reason``."""
    frame: dict[str, Any] = {"type": "stream_end", "reason": reason, "tokens_used": tokens_used}
    if request_id is not None:
        frame["id"] = request_id
    return frame


def legacy_final_frames(
    finish: str, tokens_used: int, error: FabstirError | None, request_id: str | None = None
) -> list[dict[str, Any]]:
    """Return the frames that end a legacy stream after ``tokens_used`` tokens.

    Args:
        finish: the host's finish reason (``cancelled`` is kept as the end's ``reason``).
        tokens_used: tokens generated so far.
        error: the failure that ended the stream, if any.
        request_id: the request's ``id``.
    """
    terminal = chunk_frame("", tokens=0, request_id=request_id)
    if error is None:
        reason = "cancelled" if finish == "cancelled" else "complete"
        return [terminal, legacy_end_frame(reason, tokens_used, request_id)]
    if error.code == "CONTEXT_OVERFLOW":
        return [terminal, legacy_end_frame("complete", 0, request_id)]  # the empty answer of spec §4.2
    if error.code == "HOST_ERROR":  # spec §4.5: the error as text, then a normal end
        return [
            chunk_frame(f"Error: {error.message}", tokens=0, request_id=request_id),
            terminal,
            legacy_end_frame("complete", tokens_used, request_id),
        ]
    return [legacy_error_frame(error.code, error.message, request_id), legacy_end_frame("error", tokens_used, request_id)]
