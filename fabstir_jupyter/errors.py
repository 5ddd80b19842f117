"""Errors raised by fabstir_jupyter.

Every error carries a ``code`` from the one namespace shared with the reference host
(spec/PROTOCOL.md §7) and says whether retrying, possibly on another host, may help::

    FabstirError                      code           retryable
    ├── NoHostsAvailable              NO_HOSTS_AVAILABLE    yes
    ├── ConnectionFailed              CONNECTION_FAILED     yes
    ├── InferenceTimeout              INFERENCE_TIMEOUT     yes
    │   ├── FirstTokenTimeout
    │   ├── IdleTimeout
    │   └── DeadlineExceeded
    ├── ModelNotAvailable             MODEL_NOT_AVAILABLE   no
    ├── RateLimitExceeded             RATE_LIMIT_EXCEEDED   yes
    ├── HostBusy                      HOST_BUSY             yes
    ├── HostError                     HOST_ERROR            yes
    ├── ContextOverflow               CONTEXT_OVERFLOW      no
    ├── ProtocolError                 PROTOCOL_ERROR        yes
    ├── SessionNotFound               SESSION_NOT_FOUND     no
    ├── Cancelled                     CANCELLED             no
    ├── AuthFailed                    AUTH_FAILED           no
    ├── PaymentRequired               PAYMENT_REQUIRED      no
    ├── InsufficientFunds             INSUFFICIENT_FUNDS    no
    ├── BudgetExceeded                BUDGET_EXCEEDED       no
    ├── TransactionFailed             TRANSACTION_FAILED    no   (yes for a refusal that time may lift)
    ├── EncryptionError               ENCRYPTION_* etc.     no
    │   └── EncryptionUnavailable     ENCRYPTION_NOT_SUPPORTED  no   (client only: other hosts are tried)
    ├── ChainError                    CHAIN_ERROR           yes  (client only)
    ├── InvalidInput (also ValueError)
    │   ├── InvalidPrompt             INVALID_PROMPT        no
    │   └── InvalidOptions            INVALID_OPTIONS       no
    ├── LedgerUnavailable             LEDGER_UNAVAILABLE    no   (also OSError)
    └── LedgerClosed                  LEDGER_CLOSED         no   (also RuntimeError)

The ledger codes and ``CHAIN_ERROR`` are the client's own (the usage ledger is local; chain reads
go from the client to an RPC endpoint, not to a host): they never cross the wire, so spec §7 does
not list them.

Messages are lower-case fragments without a final period ("host ws://h:1/v1/ws: no first
token within 5 s"), so they nest. Errors never hold secrets: only the fields given here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FabstirError",
    "NoHostsAvailable",
    "ConnectionFailed",
    "InferenceTimeout",
    "FirstTokenTimeout",
    "IdleTimeout",
    "DeadlineExceeded",
    "ModelNotAvailable",
    "RateLimitExceeded",
    "HostBusy",
    "HostError",
    "ContextOverflow",
    "ProtocolError",
    "SessionNotFound",
    "Cancelled",
    "AuthFailed",
    "PaymentRequired",
    "InsufficientFunds",
    "BudgetExceeded",
    "TransactionFailed",
    "EncryptionError",
    "EncryptionUnavailable",
    "ChainError",
    "InvalidInput",
    "InvalidPrompt",
    "InvalidOptions",
    "LedgerUnavailable",
    "LedgerClosed",
    "ERROR_CODES",
    "CLIENT_ONLY_CODES",
    "error_from_code",
]


class FabstirError(Exception):
    """Base class of every error this package raises on purpose.

    Attributes:
        code: the protocol error code (spec/PROTOCOL.md §7).
        retryable: whether the same request may succeed on a retry or another host.
        message: the human-readable text, a lower-case fragment.
        host: the host URL the error came from, if any.
        hint: a short suggestion of what to do next, if any.
        partial_text: the text a stream had delivered before it failed (``""`` when none).
    """

    code: str = "HOST_ERROR"
    retryable: bool = False
    partial_text: str = ""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        host: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.host = host
        self.hint = hint
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.host:
            text = f"[{self.code}] host {self.host}: {self.message}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, host={self.host!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep code/host/hint/field and any other attribute when pickled or copied (e.g. across a
        # loop thread), without calling a subclass's __init__.
        return (_rebuild, (type(self), self.args), dict(self.__dict__))


def _rebuild(cls: type[FabstirError], args: tuple[Any, ...]) -> FabstirError:
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class NoHostsAvailable(FabstirError):
    """Raised when no known host can serve the request."""

    code = "NO_HOSTS_AVAILABLE"
    retryable = True


class ConnectionFailed(FabstirError):
    """Raised when a WebSocket or HTTP connection to a host fails or drops."""

    code = "CONNECTION_FAILED"
    retryable = True


class InferenceTimeout(FabstirError):
    """Raised when a host does not answer within a timeout."""

    code = "INFERENCE_TIMEOUT"
    retryable = True


class FirstTokenTimeout(InferenceTimeout):
    """Raised when no first frame of an answer arrives within ``first_token_timeout``."""


class IdleTimeout(InferenceTimeout):
    """Raised when the gap between two frames of a stream exceeds ``idle_timeout``."""


class DeadlineExceeded(InferenceTimeout):
    """Raised when the opt-in overall ``deadline`` of a request passes."""

    retryable = False


class ModelNotAvailable(FabstirError):
    """Raised when no host serves the requested model; the message lists the available ones."""

    code = "MODEL_NOT_AVAILABLE"


class RateLimitExceeded(FabstirError):
    """Raised when a host, or the client-side limiter, refuses a request for its rate."""

    code = "RATE_LIMIT_EXCEEDED"
    retryable = True


class HostBusy(FabstirError):
    """Raised when a host is at its concurrent-stream limit."""

    code = "HOST_BUSY"
    retryable = True


class HostError(FabstirError):
    """Raised when a host reports a failure with no better code; the host's text is kept."""

    code = "HOST_ERROR"
    retryable = True


class ContextOverflow(FabstirError):
    """Raised when the prompt does not fit the model's context window."""

    code = "CONTEXT_OVERFLOW"


class ProtocolError(FabstirError):
    """Raised when a frame cannot be interpreted."""

    code = "PROTOCOL_ERROR"
    retryable = True


class SessionNotFound(FabstirError):
    """Raised when a session id is unknown (or already ended)."""

    code = "SESSION_NOT_FOUND"


class Cancelled(FabstirError):
    """Raised when a stream was cancelled (by the caller, the host or a kernel interrupt)."""

    code = "CANCELLED"


class AuthFailed(FabstirError):
    """Raised when a host refuses the client's credentials."""

    code = "AUTH_FAILED"


class PaymentRequired(FabstirError):
    """Raised when inference needs a paid session that is not configured (no wallet or no budget: the
    message says what to set), or when a job is not usable (another wallet's, settled, another host's)."""

    code = "PAYMENT_REQUIRED"


class InsufficientFunds(FabstirError):
    """Raised when an account cannot pay a deposit, its gas, or a token transfer (balance or allowance)."""

    code = "INSUFFICIENT_FUNDS"


class BudgetExceeded(FabstirError):
    """Raised when spending would pass what was allowed: a deposit over a session's or the process's
    budget (before any transaction), or a proof over the tokens a job's deposit pays for."""

    code = "BUDGET_EXCEEDED"


class TransactionFailed(FabstirError):
    """Raised when a chain transaction is refused (reverted) or not mined in time.

    Attributes:
        reason: the contract's revert text (e.g. ``"Low price"``), or ``None``.
        tx_hash: the transaction's hash when it was sent, or ``None``.
    """

    code = "TRANSACTION_FAILED"

    def __init__(self, message: str, *, reason: str | None = None, tx_hash: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason
        self.tx_hash = tx_hash


class EncryptionError(FabstirError):
    """Raised for the encrypted-session codes of spec/PROTOCOL.md §6 (``code`` says which)."""

    code = "ENCRYPTION_NOT_SUPPORTED"


class EncryptionUnavailable(EncryptionError):
    """Raised before anything is sent to a host that the client will not use: ``encryption="required"``
    and the host has no usable key, or the host publishes a key that is not its own (refused in
    ``"auto"`` too). Not retryable on that host; a request tries its other hosts first and ends
    with this error only when none is left."""

    code = "ENCRYPTION_NOT_SUPPORTED"


class ChainError(FabstirError):
    """Raised when a chain read fails: the RPC endpoint answers with an error, or the registry's
    answers cannot be decoded (a wrong address or chain). ``PROTOCOL_ERROR`` is for host frames."""

    code = "CHAIN_ERROR"
    retryable = True


class InvalidInput(FabstirError, ValueError):
    """Raised before any I/O when the caller's input is invalid; ``field`` names the culprit."""

    code = "INVALID_OPTIONS"

    def __init__(self, message: str, *, field: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field = field


class InvalidPrompt(InvalidInput):
    """Raised when the prompt is empty, not a string, too long or holds control characters."""

    code = "INVALID_PROMPT"


class InvalidOptions(InvalidInput):
    """Raised when an option has a bad value, a bad type, or an unknown name."""

    code = "INVALID_OPTIONS"


class LedgerUnavailable(FabstirError, OSError):
    """Raised when the usage ledger's database cannot be opened or written, or a read of it fails."""

    code = "LEDGER_UNAVAILABLE"


class LedgerClosed(FabstirError, RuntimeError):
    """Raised when a closed usage ledger is asked to record or read."""

    code = "LEDGER_CLOSED"


_ENCRYPTION_CODES = (
    "ENCRYPTION_NOT_SUPPORTED",
    "MISSING_PAYLOAD",
    "INVALID_PAYLOAD",
    "INVALID_HEX_ENCODING",
    "INVALID_NONCE_SIZE",
    "DECRYPTION_FAILED",
    "SESSION_KEY_NOT_FOUND",
)

#: Every code this package knows, mapped to the class that carries it.
ERROR_CODES: dict[str, type[FabstirError]] = {
    cls.code: cls
    for cls in (
        NoHostsAvailable, ConnectionFailed, InferenceTimeout, ModelNotAvailable, RateLimitExceeded,
        HostBusy, HostError, ContextOverflow, ProtocolError, SessionNotFound, Cancelled, AuthFailed,
        PaymentRequired, InsufficientFunds, BudgetExceeded, TransactionFailed, ChainError, InvalidPrompt,
        InvalidOptions, LedgerUnavailable, LedgerClosed,
    )
}
ERROR_CODES.update({code: EncryptionError for code in _ENCRYPTION_CODES})

#: Codes of the client's own failures (the usage ledger, chain reads): never sent by a host, so not in spec §7.
CLIENT_ONLY_CODES = frozenset({LedgerUnavailable.code, LedgerClosed.code, ChainError.code})


def error_from_code(code: object, message: str, **kwargs: Any) -> FabstirError:
    """Build the error class that matches ``code``; unknown codes become a ``HostError`` keeping them.

    Used for codes that arrive from a host, so an unexpected value never raises here. The client's
    own codes (:data:`CLIENT_ONLY_CODES`) are not a host's to send: they become a ``HostError`` too.
    """
    code_text = code if isinstance(code, str) and code else "HOST_ERROR"
    cls = HostError if code_text in CLIENT_ONLY_CODES else ERROR_CODES.get(code_text, HostError)
    return cls(message, code=code_text, **kwargs)
