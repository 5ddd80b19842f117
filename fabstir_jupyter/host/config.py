"""Settings of the reference host (:class:`HostConfig`, and :class:`PaymentConfig` for a paid host)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidOptions

if TYPE_CHECKING:  # the crypto extra is imported only by a host that has a key
    from ..crypto import PrivateKey

__all__ = ["DEFAULT_VERSION", "HostConfig", "PaymentConfig"]

DEFAULT_VERSION = "0.1.0"


@dataclass(frozen=True)
class PaymentConfig:
    """Where a paid host proves and settles its jobs (spec/PROTOCOL.md §10), and how patiently.

    Attributes:
        rpc_url: the chain's JSON-RPC endpoint (``http(s)://``); it may carry an API key, so it is
            never logged nor shown by ``repr``.
        marketplace: the JobMarketplace address.
        model_registry_id: the ModelRegistry id (``0x`` + 64 hex digits) of the model the host
            serves (its backend's default model): a job must be opened for it.
        rpc_timeout: seconds per JSON-RPC request.
        receipt_timeout: seconds a transaction may take to be mined before it is sent again.
        retry_base: the first delay (seconds) before a failed transaction is tried again; it doubles
            up to ``retry_max_delay``.
        retry_max_delay: the longest delay between two tries.
        retry_window: seconds a proof or a settlement keeps being retried before the host gives up
            on it (and logs it with the job id).
        settle_poll: seconds between two looks at the chain's clock while a settlement waits out
            the contract's dispute window.
        settle_timeout: seconds a settlement may take after its connection closed, dispute window
            included; past it the job is left open (its depositor may complete it, anyone may time
            it out, and the proven tokens are paid either way).
        shutdown_timeout: seconds :meth:`HostServer.close` waits for the settlements of the jobs
            still open; what remains is left open as after ``settle_timeout``.
        chain_threads: worker threads that run the chain calls, off the event loop.
        connect_timeout: seconds the host keeps trying to reach its chain after it starts (it
            serves meanwhile; a job check waits for the chain); past it paid jobs are refused
            with ``HOST_ERROR`` and ``fabstir-host`` exits.
        gas_limit: send proofs and settlements with this gas limit instead of estimating it; for a
            local test chain only (eth-tester's estimate executes a transaction many times over).
            ``None``: estimate, as a live network needs.
    """

    rpc_url: str = field(repr=False)
    marketplace: str
    model_registry_id: str
    rpc_timeout: float = 10.0
    receipt_timeout: float = 60.0
    retry_base: float = 0.5
    retry_max_delay: float = 15.0
    retry_window: float = 300.0
    settle_poll: float = 1.0
    settle_timeout: float = 900.0
    shutdown_timeout: float = 60.0
    chain_threads: int = 4
    connect_timeout: float = 30.0
    gas_limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rpc_url, str) or not self.rpc_url.startswith(("http://", "https://")):
            raise InvalidOptions("payment config: rpc_url must be an http(s):// URL", field="rpc_url")
        if not _is_hex(self.marketplace, 20):
            raise InvalidOptions(f"payment config: marketplace must be a 0x address, not {self.marketplace!r}",
                                 field="marketplace")
        if not _is_hex(self.model_registry_id, 32):
            raise InvalidOptions(f"payment config: model_registry_id must be 0x and 64 hex digits, "
                                 f"not {self.model_registry_id!r}", field="model_registry_id")
        for name in ("rpc_timeout", "receipt_timeout", "retry_max_delay", "retry_window", "settle_poll",
                     "settle_timeout", "chain_threads", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise InvalidOptions(f"payment config: {name} must be positive", field=name)
        if self.gas_limit is not None and (isinstance(self.gas_limit, bool) or not isinstance(self.gas_limit, int)
                                           or self.gas_limit < 21_000):
            raise InvalidOptions(f"payment config: gas_limit must be an integer >= 21000, not {self.gas_limit!r}",
                                 field="gas_limit")
        for name in ("retry_base", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise InvalidOptions(f"payment config: {name} must not be negative", field=name)


def _is_hex(value: object, size: int) -> bool:
    if not isinstance(value, str) or len(value) != 2 + 2 * size or value[:2] not in ("0x", "0X"):
        return False
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostConfig:
    """Settings of a :class:`HostServer`; every limit is answered with a coded error.

    Attributes:
        host: the address to bind.
        port: the port to bind (0 picks a free one; read ``HostServer.port``).
        max_frame_bytes: the largest WebSocket message accepted; a larger one closes the
            connection with code 1009.
        max_prompt_chars: prompt plus message characters per request (``INVALID_PROMPT`` above).
        max_tokens_cap: the largest ``max_tokens`` accepted (``INVALID_OPTIONS`` above).
        default_max_tokens: used when a request has no ``max_tokens`` (capped by the cap).
        max_concurrent_streams: streams running or queued on the whole host (``HOST_BUSY`` above).
        rate_limit_per_connection: generation requests per minute per connection (0 = off).
        rate_limit_per_address: generation requests per minute per remote address (0 = off).
        session_idle_timeout: seconds after which an unused plaintext session is forgotten.
        max_sessions: the most sessions kept (the least recently used goes first).
        max_session_messages: the most messages a session transcript keeps.
        max_stop_sequences: the most stop sequences per request.
        max_stop_chars: the longest stop sequence.
        max_connections: open WebSocket connections; more are refused with HTTP 503.
        idle_connection_timeout: seconds a connection with no stream running may stay silent
            before the host closes it (so idle sockets cannot hold every connection slot).
        compression: accept permessage-deflate.
        log_prompts: log prompt text (never logged otherwise).
        legacy: imitate a production node without an encryption key (spec §4): no usage or
            finish_reason, an empty terminal chunk, empty features, silent drops of what it cannot
            read, uncoded validation errors, no pong, stop/top_p/seed/messages ignored, ``/health``
            degraded and ``/v1/models`` 503 (see :mod:`fabstir_jupyter.host.legacy`).
        send_timeout: seconds a frame may wait for the client to read before the connection is
            dropped.
        cancel_grace: seconds a backend gets to stop after a cancel before its task is cancelled.
        version: reported by ``GET /v1/version``.
        auth_token: when set, the WebSocket upgrade and ``GET /v1/models`` need the header
            ``Authorization: Bearer <auth_token>`` (HTTP 401 otherwise); ``/health`` and
            ``/v1/version`` stay public. Never shown by ``repr`` nor logged.
        certfile: a PEM certificate chain; when set the host serves ``wss://`` and ``https://``.
        keyfile: the PEM private key of ``certfile`` (default: read from ``certfile``).
        operator_key: the host operator's secp256k1 key (the key of its on-chain address). With it
            the host serves encrypted sessions (spec §6) besides plaintext ones; without it an
            encrypted frame is answered ``ENCRYPTION_NOT_SUPPORTED``. Never shown by ``repr`` nor
            logged; only its address and public key are.
        session_key_lifetime: seconds an encrypted session's key may go unused before it is
            wiped (keys are also wiped when their connection closes).
        max_session_keys: encrypted session keys kept per connection; the least recently used
            goes first.
        payment: where and how the host is paid (:class:`PaymentConfig`); ``None`` serves every
            request unpaid. A paid host serves only requests that carry a job opened on the
            marketplace for it (``PAYMENT_REQUIRED`` otherwise), proves the tokens it streams and
            settles each job when its connection closes. Needs ``operator_key`` (the host's on-chain
            key signs the proofs).
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_frame_bytes: int = 1 << 20
    max_prompt_chars: int = 32_000
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    max_concurrent_streams: int = 4
    rate_limit_per_connection: float = 600.0
    rate_limit_per_address: float = 600.0
    session_idle_timeout: float = 600.0
    max_sessions: int = 1000
    max_session_messages: int = 200
    max_stop_sequences: int = 16
    max_stop_chars: int = 256
    max_connections: int = 1000
    idle_connection_timeout: float = 300.0
    compression: bool = True
    log_prompts: bool = False
    legacy: bool = False
    send_timeout: float = 30.0
    cancel_grace: float = 0.5
    version: str = DEFAULT_VERSION
    auth_token: str | None = field(default=None, repr=False, compare=False)
    certfile: str | None = None
    keyfile: str | None = None
    operator_key: PrivateKey | None = field(default=None, repr=False, compare=False)
    session_key_lifetime: float = 1800.0
    max_session_keys: int = 16
    payment: PaymentConfig | None = None

    def __post_init__(self) -> None:
        positive = (
            "max_frame_bytes", "max_prompt_chars", "max_tokens_cap", "default_max_tokens",
            "max_concurrent_streams", "max_sessions", "max_session_messages", "send_timeout", "max_connections",
            "idle_connection_timeout", "session_key_lifetime", "max_session_keys",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidOptions(f"host config: {name} must be positive", field=name)
        for name in ("rate_limit_per_connection", "rate_limit_per_address", "session_idle_timeout", "cancel_grace"):
            if getattr(self, name) < 0:
                raise InvalidOptions(f"host config: {name} must not be negative", field=name)
        if not 0 <= self.port <= 65535:
            raise InvalidOptions(f"host config: port {self.port} is out of range", field="port")
        if self.auth_token is not None:
            token = self.auth_token
            if not isinstance(token, str) or not token or any(not 0x21 <= ord(c) <= 0x7E for c in token):
                # the message must not echo the token
                raise InvalidOptions("host config: auth_token must be non-empty printable ASCII without spaces",
                                     field="auth_token")
        if self.operator_key is not None:
            from ..crypto import PrivateKey

            if not isinstance(self.operator_key, PrivateKey):  # the message must not echo the value
                raise InvalidOptions("host config: operator_key must be a fabstir_jupyter.crypto.PrivateKey",
                                     field="operator_key")
        if self.payment is not None:
            if not isinstance(self.payment, PaymentConfig):
                raise InvalidOptions("host config: payment must be a PaymentConfig", field="payment")
            if self.operator_key is None:
                raise InvalidOptions("host config: a paid host needs operator_key, the key that signs its proofs",
                                     field="operator_key")
        if self.keyfile is not None and self.certfile is None:
            raise InvalidOptions("host config: keyfile needs a certfile", field="keyfile")

    @property
    def tls(self) -> bool:
        """Whether the host serves TLS (``wss://`` and ``https://``)."""
        return self.certfile is not None
