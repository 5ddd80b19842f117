"""Frames as a production host sends them, for the host's ``legacy`` mode (spec/PROTOCOL.md §3, §4).

Read from the production node's WebSocket handler (plaintext path, no encryption key):

* a stream ends with an empty chunk and a ``stream_end`` without ``usage`` or ``finish_reason``;
* a cancelled stream ends with one ``stream_end`` carrying ``finish_reason:"cancelled"`` and the
  connection's ``session_id`` but no ``id``, and no empty chunk before it;
* a request refused before it starts (validation, rate limit) gets an uncoded ``{error: text}``
  then ``stream_end(reason="error", tokens_used=0)``; a request it cannot deserialize gets nothing;
* errors raised while generating are flat ``{code, message}``; a mid-stream failure is an
  ``"Error: "`` chunk followed by a normal end; a context overflow is an empty answer;
* encrypted frames get the coded errors of a node without a key;
* with a key, encrypted frames are answered as the node's encrypted path does: an ack with
  ``client_address``, errors with the node's codes and texts (init errors carry ``session_id``),
  and a reply of ``encrypted_chunk`` frames (the last one ``final``), ``encrypted_response`` and a
  ``stream_end`` that carries only ``id`` and ``session_id``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..errors import FabstirError, RateLimitExceeded
from ..protocol import chunk_frame

if TYPE_CHECKING:  # the crypto extra is imported only by a host that has a key
    from ..encryption import EncryptedReplyWriter, EncryptedSessionInit

__all__ = [
    "PRODUCTION_DEFAULT_MAX_TOKENS",
    "legacy_error_frame",
    "legacy_end_frame",
    "legacy_cancel_end_frame",
    "legacy_final_frames",
    "legacy_rejection_frames",
    "legacy_encrypted_reply",
    "legacy_encrypted_init_ack",
    "legacy_encrypted_error_frames",
    "legacy_encrypted_final_frames",
    "legacy_encrypted_rejection_frames",
    "production_job_id",
    "production_validation_error",
]

#: What production fills in for a ``prompt`` frame that has no ``request`` and no ``max_tokens``.
PRODUCTION_DEFAULT_MAX_TOKENS = 4000
#: The chain a production node assumes for an ``encrypted_session_init`` without ``chain_id`` (Base Sepolia).
PRODUCTION_DEFAULT_CHAIN_ID = 84532
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
    return [
        legacy_error_frame(error.code, error.message, request_id),
        legacy_end_frame("error", tokens_used, request_id),
    ]


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


# --------------------------------------------------------------------------- a node with a key

_INIT_TEXTS = {
    "MISSING_PAYLOAD": "encrypted_session_init must include payload object",
    "INVALID_PAYLOAD": "Missing required fields in encrypted session init payload "
                       "(ephPubHex, ciphertextHex, signatureHex, nonceHex, aadHex)",
    "INVALID_HEX_ENCODING": "Failed to decode hex fields in encrypted session init payload",
}
_MESSAGE_TEXTS = {
    "MISSING_SESSION_ID": "encrypted_message requires session_id",
    "MISSING_PAYLOAD": "encrypted_message must include payload object",
    "MISSING_PAYLOAD_FIELDS": "Payload must contain ciphertextHex, nonceHex, and aadHex",
    "INVALID_HEX_ENCODING": "Failed to decode hex fields in payload",
    "INVALID_UTF8": "Decrypted plaintext is not valid UTF-8",
}
_MESSAGE_FIELDS = ("ciphertextHex", "nonceHex", "aadHex")
#: What :class:`~fabstir_jupyter.encryption.HostEncryption` says of a message whose plaintext is not UTF-8.
_NOT_UTF8 = "decrypted message is not UTF-8 text"


def _frame_session(frame: dict[str, Any]) -> str | None:
    return next((v for v in (frame.get("session_id"), frame.get("sessionId")) if isinstance(v, str)), None)


def _nonce_size(frame: dict[str, Any]) -> int:
    payload = frame.get("payload")
    text = payload.get("nonceHex") if isinstance(payload, dict) else None
    text = text[2:] if isinstance(text, str) and text[:2] == "0x" else text
    return len(text) // 2 if isinstance(text, str) else 0


def _echo_id(reply: dict[str, Any], frame: dict[str, Any]) -> dict[str, Any]:
    if "id" in frame:
        reply["id"] = frame["id"]
    return reply


def legacy_encrypted_init_ack(event: EncryptedSessionInit, frame: dict[str, Any]) -> dict[str, Any]:
    """Return a production node's ``session_init_ack`` for a decrypted ``encrypted_session_init``.

    ``client_address`` is the address the node recovers (over SHA-256 of the ciphertext: the last
    of ``event.signer_addresses``); the node only echoes it.
    """
    ack: dict[str, Any] = {
        "type": "session_init_ack",
        "status": "success",
        "session_id": event.session_id if event.session_id is not None else "unknown",
        "job_id": production_job_id(event.job_id),
        "chain_id": event.chain_id if event.chain_id is not None else PRODUCTION_DEFAULT_CHAIN_ID,
        "client_address": event.signer_addresses[-1],
        "message": "Encrypted session initialized successfully",
    }
    return _echo_id(ack, frame)


def legacy_encrypted_error_frames(frame: dict[str, Any], error: FabstirError,
                                  session_id: str | None) -> list[dict[str, Any]]:
    """Return what a production node with a key answers to an encrypted frame it cannot serve.

    Args:
        frame: the decoded ``encrypted_session_init`` or ``encrypted_message``.
        error: what :class:`~fabstir_jupyter.encryption.HostEncryption` raised for it.
        session_id: the connection's session (a message naming none uses it).

    Returns:
        One coded ``error`` with the node's code and text (an init's also names ``session_id``).
        Where the node has other codes than spec §6 (``MISSING_PAYLOAD_FIELDS``, ``INVALID_UTF8``,
        ``MISSING_SESSION_ID``), the node's are used. A request the host refuses after decrypting
        it (a field the node would have defaulted) gets the node's uncoded refusal and
        ``stream_end``. A replayed message, which the node would run again, stays
        ``INVALID_PAYLOAD``.
    """
    code, text = error.code, error.message
    payload = frame.get("payload")
    if frame.get("type") == "encrypted_session_init":
        if code == "MISSING_PAYLOAD" and "payload" in frame:  # null reads as present, then fields are missing
            code = "INVALID_PAYLOAD"
        if code == "INVALID_NONCE_SIZE":
            text = f"Invalid nonce size: expected 24 bytes, got {_nonce_size(frame)}"
        elif code == "DECRYPTION_FAILED":
            text = f"Failed to decrypt session init payload: {text}"
        else:
            text = _INIT_TEXTS.get(code, text)
        reply = {"type": "error", "code": code, "message": text, "session_id": _frame_session(frame) or "unknown"}
        return [_echo_id(reply, frame)]
    if code == "SESSION_KEY_NOT_FOUND":
        target = _frame_session(frame) or session_id
        if target is None:
            code, text = "MISSING_SESSION_ID", _MESSAGE_TEXTS["MISSING_SESSION_ID"]
        else:
            text = f"No session key found for session_id: {target}"
    elif code == "MISSING_PAYLOAD" and "payload" in frame:
        code = "MISSING_PAYLOAD_FIELDS"
    elif code == "INVALID_PAYLOAD" and text == _NOT_UTF8:
        code = "INVALID_UTF8"
    elif code == "INVALID_PAYLOAD" and (not isinstance(payload, dict)
                                        or any(not isinstance(payload.get(n), str) for n in _MESSAGE_FIELDS)):
        code = "MISSING_PAYLOAD_FIELDS"
    elif code == "INVALID_NONCE_SIZE":
        text = f"Invalid nonce size: expected 24 bytes, got {_nonce_size(frame)}"
    elif code == "DECRYPTION_FAILED":
        text = f"Failed to decrypt message: {text}"
    elif code in ("INVALID_PROMPT", "INVALID_OPTIONS"):
        rid = frame.get("id")
        return legacy_encrypted_rejection_frames(error, rid if isinstance(rid, str) else None)
    text = _MESSAGE_TEXTS.get(code, text)
    return [_echo_id({"type": "error", "code": code, "message": text}, frame)]


def _encrypted_end(request_id: str | None, session_id: str | None) -> dict[str, Any]:
    # The node's stream_end on the encrypted path: no reason, no token count.
    frame: dict[str, Any] = {"type": "stream_end"}
    if request_id is not None:
        frame["id"] = request_id
    if session_id is not None:
        frame["session_id"] = session_id
    return frame


def legacy_encrypted_rejection_frames(error: FabstirError, request_id: str | None) -> list[dict[str, Any]]:
    """Return the node's answer to an encrypted request refused before it starts: uncoded error, bare ``stream_end``."""
    return [legacy_rejection_frames(error, request_id)[0], _encrypted_end(request_id, None)]


def legacy_encrypted_final_frames(
    finish: str,
    tokens_used: int,
    error: FabstirError | None,
    writer: EncryptedReplyWriter,
    *,
    session_id: str | None = None,
) -> list[dict[str, Any]]:
    """Return the frames that end a legacy encrypted stream, encrypted with ``writer``.

    A finished answer ends with an empty ``encrypted_chunk`` marked ``final``, the
    ``encrypted_response`` (the finish reason) and ``stream_end {id, session_id}``; a cancel as on
    the plaintext path; a generation failure as the plaintext quirks of spec §4, encrypted.

    Args:
        finish: the host's finish reason.
        tokens_used: tokens generated so far.
        error: the failure that ended the stream, if any.
        writer: the reply's writer (it knows the request id, the session and the next chunk index).
        session_id: the connection's session (only a cancelled stream's end carries it).
    """
    if finish == "cancelled" and error is None:
        return [legacy_cancel_end_frame(tokens_used, session_id)]
    end = _encrypted_end(writer.request_id, writer.session_id)
    if error is not None and error.code not in ("CONTEXT_OVERFLOW", "HOST_ERROR"):
        return [legacy_error_frame(error.code, error.message, writer.request_id), end]
    frames = []
    if error is not None and error.code == "HOST_ERROR":  # spec §4.5: the error as text
        frames.append(writer.chunk(f"Error: {error.message}", tokens=0))
    frames.append(writer.chunk("", tokens=0, final=True))
    frames.append(writer.response("stop" if error is not None else finish))
    return [*frames, end]
