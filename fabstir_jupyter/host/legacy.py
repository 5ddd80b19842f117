"""Frames as a production host sends them, for the host's ``legacy`` mode (spec/PROTOCOL.md §3, §4).

Read from the production node's WebSocket handler (plaintext path, no encryption key):

* a stream ends with an empty chunk and a ``stream_end`` without ``usage`` or ``finish_reason``;
* a cancelled stream ends with one ``stream_end`` carrying ``finish_reason:"cancelled"`` and the
  connection's ``session_id`` but no ``id``, and no empty chunk before it;
* a request refused before it starts (validation, rate limit) gets an uncoded ``{error: text}``
  then ``stream_end(reason="error", tokens_used=0)``; a request it cannot deserialize gets nothing;
* errors raised while generating are flat ``{code, message}``; a mid-stream failure is an
  ``"Error: "`` chunk followed by a normal end; a context overflow is an empty answer;
* encrypted frames get the coded errors of a node without a key.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import FabstirError, RateLimitExceeded
from ..protocol import chunk_frame

__all__ = [
    "PRODUCTION_DEFAULT_MAX_TOKENS",
    "legacy_error_frame",
    "legacy_end_frame",
    "legacy_cancel_end_frame",
    "legacy_final_frames",
    "legacy_rejection_frames",
    "legacy_encrypted_reply",
    "production_job_id",
    "production_validation_error",
]

#: What production fills in for a ``prompt`` frame that has no ``request`` and no ``max_tokens``.
PRODUCTION_DEFAULT_MAX_TOKENS = 4000
_U64_MAX = 2**64 - 1


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


def legacy_cancel_end_frame(tokens_used: int, session_id: str | None = None) -> dict[str, Any]:
    """Build production's answer to ``stream_cancel``: no ``id``, the connection's ``session_id``."""
    frame: dict[str, Any] = {
        "type": "stream_end", "reason": "cancelled", "tokens_used": tokens_used, "finish_reason": "cancelled",
    }
    if session_id is not None:
        frame["session_id"] = session_id
    return frame


def legacy_final_frames(
    finish: str,
    tokens_used: int,
    error: FabstirError | None,
    request_id: str | None = None,
    *,
    session_id: str | None = None,
) -> list[dict[str, Any]]:
    """Return the frames that end a legacy stream after ``tokens_used`` tokens.

    Args:
        finish: the host's finish reason.
        tokens_used: tokens generated so far.
        error: the failure that ended the stream, if any.
        request_id: the request's ``id``.
        session_id: the connection's session (only a cancelled stream's end carries it).
    """
    if finish == "cancelled" and error is None:
        return [legacy_cancel_end_frame(tokens_used, session_id)]
    terminal = chunk_frame("", tokens=0, request_id=request_id)
    if error is None:
        return [terminal, legacy_end_frame("complete", tokens_used, request_id)]
    if error.code == "CONTEXT_OVERFLOW":
        return [terminal, legacy_end_frame("complete", 0, request_id)]  # the empty answer of spec §4.2
    if error.code == "HOST_ERROR":  # spec §4.5: the error as text, then a normal end
        return [
            chunk_frame(f"Error: {error.message}", tokens=0, request_id=request_id),
            terminal,
            legacy_end_frame("complete", tokens_used, request_id),
        ]
    return [legacy_error_frame(error.code, error.message, request_id), legacy_end_frame("error", tokens_used, request_id)]


def production_validation_error(prompt: str, model: str, max_tokens: int, temperature: float) -> str | None:
    """Return the text production's request validation answers with, or ``None`` when it passes."""
    if not model:
        return "Validation error for model: Model name cannot be empty"
    if not prompt:
        return "Validation error for prompt: Prompt cannot be empty"
    if max_tokens == 0:
        return "Validation error for max_tokens: max_tokens must be greater than 0"
    if not 0.0 <= temperature <= 2.0:
        return "Validation error for temperature: Temperature must be between 0.0 and 2.0"
    return None


def legacy_rejection_frames(error: FabstirError, request_id: str | None = None) -> list[dict[str, Any]]:
    """Return production's answer to a request refused before it starts: ``{error: text}`` then ``stream_end``."""
    text = error.message
    if isinstance(error, RateLimitExceeded):
        text = f"Rate limit exceeded, retry after {math.ceil(error.retry_after or 60)} seconds"
    frame: dict[str, Any] = {"type": "error", "error": text}
    if request_id is not None:
        frame["id"] = request_id
    return [frame, legacy_end_frame("error", 0, request_id)]


def production_job_id(job_id: str | None) -> int | None:
    """Return a ``session_init`` job id as production echoes it: a number, or ``None`` (JSON null)."""
    if job_id is None or not (job_id.isascii() and job_id.isdigit()):
        return None
    number = int(job_id)
    return number if number <= _U64_MAX else None


def legacy_encrypted_reply(frame: dict[str, Any], session_id: str | None) -> dict[str, Any] | None:
    """Return what a production node without an encryption key answers to an encrypted frame.

    Args:
        frame: the decoded client frame.
        session_id: the connection's session (from an earlier ``session_init``).

    Returns:
        The error frame, or ``None`` for a frame that is not an encrypted one.
    """
    kind = frame.get("type")
    frame_session = next((v for v in (frame.get("session_id"), frame.get("sessionId")) if isinstance(v, str)), None)
    if kind == "encrypted_session_init":
        reply: dict[str, Any] = {
            "type": "error",
            "code": "ENCRYPTION_NOT_SUPPORTED",
            "message": "Node does not have encryption key configured. "
                       "Please use plaintext session_init or configure HOST_PRIVATE_KEY.",
            "session_id": frame_session or "unknown",
        }
    elif kind == "encrypted_message":
        target = frame_session or session_id
        if target is None:
            reply = {"type": "error", "code": "MISSING_SESSION_ID", "message": "encrypted_message requires session_id"}
        else:
            reply = {"type": "error", "code": "SESSION_KEY_NOT_FOUND",
                     "message": f"No session key found for session_id: {target}"}
    else:
        return None
    if "id" in frame:
        reply["id"] = frame["id"]
    return reply
