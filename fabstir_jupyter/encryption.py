"""End-to-end encrypted sessions (spec/PROTOCOL.md §6), sans I/O: both halves.

The encrypted frames wrap the plaintext protocol of :mod:`fabstir_jupyter.protocol` in one place.
Nothing here touches sockets, asyncio or the clock: the host passes ``now`` in, randomness comes from
an injectable ``rng``.

Key schedule::

    client                                          host (operator key h, public H)
    e = fresh ephemeral key, k = fresh 32-byte session key
    K = HKDF-SHA256(x(e·H), salt = 32 zero bytes, info = "")          K = HKDF-SHA256(x(h·E), ...)
    encrypted_session_init: XChaCha20-Poly1305(K, nonce, aad = "")
        over {"sessionKey": hex(k), "jobId", "modelName", "pricePerToken"}, signed by the client
    encrypted_message:  XChaCha20-Poly1305(k, nonce, aad = "message_<n>") over the request JSON
    encrypted_chunk:    XChaCha20-Poly1305(k, nonce, aad = "chunk_<i>") over the text
    encrypted_response: XChaCha20-Poly1305(k, nonce, aad = "encrypted_response_final") over the finish reason

Client half: :func:`host_public_key` checks a host's published key against its address;
:class:`EncryptedSession` builds the init and message frames and decrypts the reply into the
plaintext events :class:`~fabstir_jupyter.protocol.ResponseReader` reads. Anything it cannot
authenticate is a :class:`~fabstir_jupyter.errors.ProtocolError`, never text.

Host half: :class:`HostEncryption` (one per connection) decrypts ``encrypted_session_init`` and
``encrypted_message`` into :class:`EncryptedSessionInit` / :class:`EncryptedPrompt`, owns the
session keys (:class:`SessionKeys`: bounded lifetime, wiped on close) and hands out
:class:`EncryptedReplyWriter` for the answer. Malformed frames raise
:class:`~fabstir_jupyter.errors.EncryptionError` with the production node's codes
(``MISSING_PAYLOAD``, ``INVALID_PAYLOAD``, ``INVALID_HEX_ENCODING``, ``INVALID_NONCE_SIZE``,
``DECRYPTION_FAILED``, ``SESSION_KEY_NOT_FOUND``); the inner request is validated like a plaintext
one (``INVALID_PROMPT`` / ``INVALID_OPTIONS``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    PrivateKey,
    PublicKey,
    aead_decrypt,
    aead_encrypt,
    decode_hex,
    hkdf_sha256,
    random_bytes,
    recover_public_key,
)
from .errors import EncryptionError, InvalidOptions, ProtocolError
from .protocol import (
    Chunk,
    GenerationRequest,
    HostEvent,
    UnknownFrame,
    _count,
    _load_object,
    _opt_ident,
    _parse_generation,
    _request_body,
    request_body,
)

__all__ = [
    "HKDF_SALT",
    "HKDF_INFO",
    "ALG",
    "RESPONSE_AAD",
    "ENCRYPTED_CLIENT_TYPES",
    "message_aad",
    "chunk_aad",
    "transcript_digest",
    "SessionInitData",
    "seal_session_init",
    "open_session_init",
    "seal",
    "open_sealed",
    # client side
    "host_public_key",
    "EncryptedSession",
    # host side
    "EncryptedSessionInit",
    "EncryptedPrompt",
    "EncryptedEvent",
    "StoredKey",
    "SessionKeys",
    "HostEncryption",
    "EncryptedReplyWriter",
]

#: HKDF salt of the session-init key: 32 zero bytes (what the production node's ``None`` salt means).
HKDF_SALT = bytes(32)
#: HKDF info of the session-init key: empty.
HKDF_INFO = b""
#: The ``alg`` the production SDK announces in the init payload (informative; nobody checks it).
ALG = "secp256k1-ecdh(ephemeral→static)+hkdf(sha256)+xchacha20-poly1305"
#: AAD of the ``encrypted_response`` that ends a reply.
RESPONSE_AAD = b"encrypted_response_final"
#: The client frame types this module parses on the host side.
ENCRYPTED_CLIENT_TYPES = ("encrypted_session_init", "encrypted_message")

_MESSAGE_AAD = re.compile(rb"message_(0|[1-9][0-9]{0,17})")
_INIT_FIELDS = ("ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex")
_SEALED_FIELDS = ("ciphertextHex", "nonceHex", "aadHex")


def message_aad(index: int) -> bytes:
    """The AAD of the ``index``-th ``encrypted_message`` under one session key: ``message_<index>``."""
    return f"message_{index}".encode()


def chunk_aad(index: int) -> bytes:
    """The AAD of the ``index``-th ``encrypted_chunk`` of a reply: ``chunk_<index>``."""
    return f"chunk_{index}".encode()


def transcript_digest(
    ephemeral: bytes, host: bytes, *, salt: bytes = HKDF_SALT, nonce: bytes, info: bytes = HKDF_INFO, aad: bytes = b""
) -> bytes:
    """Return what the production SDK signs in an init: SHA-256 of its E2EEv1 transcript.

    The transcript is ``"E2EEv1|" ‖ ephemeral ‖ "|" ‖ host ‖ "|" ‖ salt ‖ "|" ‖ nonce ‖ "|" ‖ info``
    (``‖ "|" ‖ aad`` when the AAD is not empty), over the raw bytes: the 33-byte compressed keys,
    the salt, the 24-byte nonce.
    """
    parts = [b"E2EEv1|", ephemeral, b"|", host, b"|", salt, b"|", nonce, b"|", info]
    if aad:
        parts += [b"|", aad]
    return hashlib.sha256(b"".join(parts)).digest()


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    # What JSON.stringify writes: no spaces, non-ASCII as is.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the session-init payload


@dataclass(frozen=True, slots=True)
class SessionInitData:
    """The plaintext of an ``encrypted_session_init``.

    ``session_key`` never appears in the repr.
    """

    session_key: bytes = field(repr=False)
    job_id: str
    model: str
    price_per_token: int = 0
    recovery_public_key: str | None = None

    def to_json(self) -> bytes:
        """Serialise as the production SDK does: camelCase keys, ``jobId`` a string, the price a number."""
        data: dict[str, Any] = {
            "sessionKey": self.session_key.hex(),
            "jobId": str(self.job_id),
            "modelName": self.model,
            "pricePerToken": self.price_per_token,
        }
        if self.recovery_public_key is not None:
            data["recoveryPublicKey"] = self.recovery_public_key
        return _json_bytes(data)

    @classmethod
    def from_json(cls, text: bytes) -> SessionInitData:
        """Read the decrypted init payload (extra keys are ignored, as production does).

        Raises:
            EncryptionError: ``DECRYPTION_FAILED`` (the production node's code for every failure
                after the hex fields decoded): not UTF-8 JSON, or a field missing or mistyped.
        """
        try:
            obj = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _init_failure("decrypted session init is not UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise _init_failure("decrypted session init is not a JSON object")
        key = obj.get("sessionKey")
        try:
            session_key = decode_hex(key, what="sessionKey", code="DECRYPTION_FAILED")
        except EncryptionError:
            raise _init_failure("'sessionKey' is not hex") from None
        if len(session_key) != KEY_SIZE:
            raise _init_failure(f"'sessionKey' is {len(session_key)} bytes, not {KEY_SIZE}")
        job_id = obj.get("jobId")
        if isinstance(job_id, int) and not isinstance(job_id, bool) and job_id >= 0:
            job_id = str(job_id)  # the SDK sends a string; a number is accepted too
        if not isinstance(job_id, str):
            raise _init_failure("'jobId' must be a string")
        model = obj.get("modelName")
        if not isinstance(model, str):
            raise _init_failure("'modelName' must be a string")
        price = obj.get("pricePerToken", 0)
        if isinstance(price, float) and price.is_integer():
            price = int(price)
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise _init_failure("'pricePerToken' must be a non-negative integer")
        recovery = obj.get("recoveryPublicKey")
        if recovery is not None and not isinstance(recovery, str):
            raise _init_failure("'recoveryPublicKey' must be a string")
        return cls(session_key=session_key, job_id=job_id, model=model, price_per_token=price,
                   recovery_public_key=recovery)


def _init_failure(message: str) -> EncryptionError:
    return EncryptionError(f"session init: {message}", code="DECRYPTION_FAILED")


def seal_session_init(
    host_key: PublicKey,
    signer: PrivateKey,
    data: SessionInitData,
    *,
    ephemeral: PrivateKey | None = None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    """Encrypt an init payload for the host and sign it; return the nine-field ``payload``.

    Args:
        host_key: the host's static (operator) public key.
        signer: the client's key; it signs :func:`transcript_digest` as the production SDK does.
        data: what to encrypt.
        ephemeral, nonce: fixed values for known-answer tests; fresh random ones by default.
    """
    ephemeral = ephemeral or PrivateKey.generate()
    nonce = random_bytes(NONCE_SIZE) if nonce is None else nonce
    key = hkdf_sha256(ephemeral.ecdh(host_key), salt=HKDF_SALT, info=HKDF_INFO)
    ciphertext = aead_encrypt(key, nonce, data.to_json(), b"")
    eph_pub = ephemeral.public_key.compressed
    signature = signer.sign_digest(transcript_digest(eph_pub, host_key.compressed, nonce=nonce))
    return {
        "ephPubHex": eph_pub.hex(),
        "saltHex": HKDF_SALT.hex(),
        "nonceHex": nonce.hex(),
        "ciphertextHex": ciphertext.hex(),
        "signatureHex": signature.hex(),
        "recid": signature[64],
        "alg": ALG,
        "info": HKDF_INFO.hex(),
        "aadHex": "",
    }


def _payload_object(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    payload = obj.get("payload")
    if payload is None:
        raise EncryptionError(f"{obj['type']} must include a payload object", code="MISSING_PAYLOAD")
    if not isinstance(payload, dict):
        raise EncryptionError(f"{obj['type']} payload is a {type(payload).__name__}, not an object",
                              code="INVALID_PAYLOAD")
    return payload


def _hex_fields(payload: Mapping[str, Any], names: Iterable[str]) -> dict[str, bytes]:
    missing = [name for name in names if not isinstance(payload.get(name), str)]
    if missing:
        raise EncryptionError(f"payload lacks string field(s) {', '.join(missing)}", code="INVALID_PAYLOAD")
    out = {name: decode_hex(payload[name], what=name) for name in names}
    if len(out["nonceHex"]) != NONCE_SIZE:
        raise EncryptionError(f"nonce is {len(out['nonceHex'])} bytes, not {NONCE_SIZE}", code="INVALID_NONCE_SIZE")
    return out


def open_session_init(payload: Mapping[str, Any], operator_key: PrivateKey) -> tuple[SessionInitData, tuple[str, ...]]:
    """Decrypt an init ``payload`` with the host's operator key.

    Only ``ephPubHex``, ``ciphertextHex``, ``nonceHex``, ``signatureHex`` and ``aadHex`` are read
    (the production node's five); ``saltHex``, ``info``, ``recid`` and ``alg`` are ignored: the key
    schedule is fixed.

    Returns:
        The plaintext, and the signer addresses that recover from the signature: first over the
        SDK's E2EEv1 transcript, then over SHA-256(ciphertext) (what the production node
        recovers). Recovery proves nothing by itself: a host that knows who should have signed
        (e.g. the job's depositor) compares; nothing is refused here on an address.

    Raises:
        EncryptionError: ``INVALID_PAYLOAD``, ``INVALID_HEX_ENCODING``, ``INVALID_NONCE_SIZE``,
            ``DECRYPTION_FAILED`` (bad ephemeral key, signature size, tag or plaintext).
    """
    fields = _hex_fields(payload, _INIT_FIELDS)
    ciphertext, nonce, signature = fields["ciphertextHex"], fields["nonceHex"], fields["signatureHex"]
    if not ciphertext:
        raise _init_failure("ciphertext is empty")
    if len(signature) != 65:
        raise _init_failure(f"signature is {len(signature)} bytes, not 65")
    try:
        ephemeral = PublicKey.from_bytes(fields["ephPubHex"])
    except EncryptionError:
        raise _init_failure("ephemeral public key is not a secp256k1 point") from None
    key = hkdf_sha256(operator_key.ecdh(ephemeral), salt=HKDF_SALT, info=HKDF_INFO)
    try:
        plaintext = aead_decrypt(key, nonce, ciphertext, fields["aadHex"])
    except EncryptionError:
        raise _init_failure("ciphertext failed authentication (wrong host key?)") from None
    data = SessionInitData.from_json(plaintext)
    digests = (
        transcript_digest(ephemeral.compressed, operator_key.public_key.compressed, nonce=nonce,
                          aad=fields["aadHex"]),
        hashlib.sha256(ciphertext).digest(),
    )
    signers = []
    for digest in digests:
        try:
            signers.append(recover_public_key(signature, digest).address)
        except EncryptionError:
            continue
    if not signers:
        raise _init_failure("no key recovers from the signature")
    return data, tuple(signers)


def seal(key: bytes, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> dict[str, str]:
    """Encrypt with a session key; return ``{ciphertextHex, nonceHex, aadHex}`` (lower-case, no ``0x``)."""
    nonce = random_bytes(NONCE_SIZE) if nonce is None else nonce
    ciphertext = aead_encrypt(key, nonce, plaintext, aad)
    return {"ciphertextHex": ciphertext.hex(), "nonceHex": nonce.hex(), "aadHex": aad.hex()}


def open_sealed(key: bytes, payload: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """Decrypt ``{ciphertextHex, nonceHex, aadHex}`` with the AAD it carries; return (plaintext, aad).

    Raises:
        EncryptionError: ``INVALID_PAYLOAD``, ``INVALID_HEX_ENCODING``, ``INVALID_NONCE_SIZE``,
            ``DECRYPTION_FAILED``.
    """
    fields = _hex_fields(payload, _SEALED_FIELDS)
    aad = fields["aadHex"]
    return aead_decrypt(key, fields["nonceHex"], fields["ciphertextHex"], aad), aad


# --------------------------------------------------------------------------- client side


def host_public_key(published: Any, address: str) -> PublicKey:
    """Check a host's published ``publicKey`` (registry metadata) against its registered address.

    Args:
        published: the metadata's ``publicKey`` (66 hex characters, optional ``0x``), or ``None``.
        address: the host's registered (operator) address.

    Returns:
        The key, whose derived address equals ``address``.

    Raises:
        EncryptionError: ``ENCRYPTION_NOT_SUPPORTED`` (retryable: another host may do): no key,
            a malformed key, or a key of another address. A host without a published key can
            still be reached: recover its key from its registration transaction with
            :func:`~fabstir_jupyter.crypto.public_key_from_transaction`.
    """
    if isinstance(published, str):
        published = published.strip()
    if not published:
        raise EncryptionError(f"host {address} publishes no publicKey", code="ENCRYPTION_NOT_SUPPORTED", retryable=True)
    try:
        key = PublicKey.from_hex(published)
    except EncryptionError:
        raise EncryptionError(
            f"host {address} publishes a malformed publicKey", code="ENCRYPTION_NOT_SUPPORTED", retryable=True
        ) from None
    if key.address.lower() != str(address).lower():
        raise EncryptionError(
            f"host {address} publishes the publicKey of {key.address}, not its own",
            code="ENCRYPTION_NOT_SUPPORTED",
            retryable=True,
        )
    return key


class EncryptedSession:
    """The client half of one encrypted session (spec §6).

    Call :meth:`init_frame` to start (or re-key) the session, :meth:`message_frame` for each request,
    and pass every event the host sends through :meth:`decrypt` before the
    :class:`~fabstir_jupyter.protocol.ResponseReader`. Re-keying before each request, as the
    production SDK does, also stops an earlier reply's chunks (same AADs) being replayed.

    Args:
        host_key: the host's public key, checked with :func:`host_public_key` or recovered with
            :func:`~fabstir_jupyter.crypto.public_key_from_transaction`.
        session_id, job_id, chain_id: the outer fields; ``job_id`` also travels encrypted (an empty
            one means no paid job); ``chain_id=None`` leaves the field out (hosts assume theirs).
        model: the model name sent in the init payload.
        signer: the client's static key that signs each init (the user's key, so that a host can
            match the job's depositor); a fresh key per session by default.
        price_per_token: sent in the init payload (the SDK sends 0).
        rng: source of session keys, nonces and ephemeral keys; the OS's CSPRNG by default.
    """

    def __init__(
        self,
        host_key: PublicKey,
        *,
        session_id: str,
        job_id: str | int,
        chain_id: int | None,
        model: str,
        signer: PrivateKey | None = None,
        price_per_token: int = 0,
        rng: Callable[[int], bytes] = random_bytes,
    ) -> None:
        self.host_key = host_key
        self.session_id = str(session_id)
        self.job_id = str(job_id)
        self.chain_id = chain_id
        self.model = model
        self.price_per_token = price_per_token
        self._signer = signer or PrivateKey.generate()
        self._rng = rng
        self._key: bytes | None = None
        self.message_index = 0
        self._next_chunk = 0
        self._reply_open = False

    def __repr__(self) -> str:
        return f"EncryptedSession(session_id={self.session_id!r}, host_key={self.host_key!r})"

    @property
    def signer_address(self) -> str:
        """The address whose key signs the inits."""
        return self._signer.address

    def _ephemeral(self) -> PrivateKey:
        while True:  # a random 32-byte string is a valid scalar but with probability 2**-128
            try:
                return PrivateKey.from_bytes(self._rng(KEY_SIZE))
            except InvalidOptions:
                continue

    def init_frame(self) -> dict[str, Any]:
        """Build an ``encrypted_session_init`` with a fresh session key; the message count restarts at 0.

        The frame carries no ``id`` (the production SDK sends none). The host answers
        ``session_init_ack`` (or a coded ``error``).
        """
        self._key = self._rng(KEY_SIZE)
        self.message_index = 0
        self._reply_open = False
        data = SessionInitData(session_key=self._key, job_id=self.job_id, model=self.model,
                               price_per_token=self.price_per_token)
        payload = seal_session_init(self.host_key, self._signer, data, ephemeral=self._ephemeral(),
                                    nonce=self._rng(NONCE_SIZE))
        frame: dict[str, Any] = {"type": "encrypted_session_init", "session_id": self.session_id}
        if self.chain_id is not None:
            frame["chain_id"] = self.chain_id
        frame["job_id"] = self.job_id
        frame["payload"] = payload
        return frame

    def message_frame(
        self,
        prompt: str,
        *,
        model: str,
        max_tokens: int,
        temperature: float,
        request_id: str,
        stream: bool = True,
        top_p: float | None = None,
        stop: Iterable[str] | None = None,
        seed: int | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Build the ``encrypted_message`` of one request and start reading its reply.

        The request body (the same fields as a plaintext ``prompt``'s ``request``) is encrypted
        with AAD ``message_<n>``; nothing of the prompt stays in clear.

        Raises:
            RuntimeError: :meth:`init_frame` was not called first.
        """
        body = _request_body(prompt=prompt, model=model, max_tokens=max_tokens, temperature=temperature,
                             stream=stream, top_p=top_p, stop=stop, seed=seed, messages=messages)
        return self._sealed_message(body, request_id)

    def request_frame(self, request: GenerationRequest, *, request_id: str) -> dict[str, Any]:
        """Build the ``encrypted_message`` that carries ``request`` (:meth:`message_frame` for a
        :class:`~fabstir_jupyter.protocol.GenerationRequest`: the same body as a plaintext ``request``).

        Raises:
            RuntimeError: :meth:`init_frame` was not called first.
        """
        return self._sealed_message(request_body(request), request_id)

    def _sealed_message(self, body: Mapping[str, Any], request_id: str) -> dict[str, Any]:
        if self._key is None:
            raise RuntimeError("call init_frame() before message_frame()")
        payload = seal(self._key, _json_bytes(body), message_aad(self.message_index), nonce=self._rng(NONCE_SIZE))
        self.message_index += 1
        self._next_chunk = 0
        self._reply_open = True
        return {
            "type": "encrypted_message",
            "session_id": self.session_id,
            "id": request_id,
            "payload": payload,
            "web_search": False,
            "max_searches": 0,
            "search_queries": None,
        }

    def decrypt(self, event: HostEvent) -> HostEvent:
        """Turn an encrypted reply frame into the plaintext event it stands for.

        ``encrypted_chunk`` → :class:`~fabstir_jupyter.protocol.Chunk` with its text;
        ``encrypted_response`` → an empty ``Chunk`` carrying the finish reason. Other events pass
        unchanged, but a plaintext ``stream_chunk`` is refused: in an encrypted session it can only
        be injected text.

        Raises:
            ProtocolError: a frame that does not authenticate under the session key, a chunk out of
                order (its authenticated AAD names another index), a reply frame for another session
                or outside a request, a plaintext chunk.
        """
        if isinstance(event, Chunk):
            raise ProtocolError("plaintext stream_chunk in an encrypted session")
        if not isinstance(event, UnknownFrame) or event.type not in ("encrypted_chunk", "encrypted_response"):
            return event
        frame = event.data
        kind = event.type
        if self._key is None or not self._reply_open:
            raise ProtocolError(f"{kind} outside a request")
        session_id = frame.get("session_id")
        if session_id is not None and str(session_id) != self.session_id:
            raise ProtocolError(f"{kind} for session {str(session_id)[:64]!r}, not {self.session_id!r}")
        request_id = frame.get("id")
        request_id = None if request_id is None else str(request_id)
        payload = frame.get("payload")
        if not isinstance(payload, dict):
            raise ProtocolError(f"{kind} has no payload object")
        try:
            plaintext, aad = open_sealed(self._key, payload)
            text = plaintext.decode("utf-8")
        except EncryptionError as exc:
            raise ProtocolError(f"{kind} failed authentication: {exc.message}") from None
        except UnicodeDecodeError:
            raise ProtocolError(f"{kind} holds no UTF-8 text") from None
        if kind == "encrypted_response":
            if aad != RESPONSE_AAD:
                raise ProtocolError("encrypted_response has the wrong AAD")
            self._reply_open = False
            return Chunk(content="", tokens=0, finish_reason=text, id=request_id)
        index = payload.get("index", self._next_chunk)
        if aad != chunk_aad(self._next_chunk) or isinstance(index, bool) or index != self._next_chunk:
            raise ProtocolError(f"encrypted_chunk out of order: chunk {self._next_chunk} expected")
        self._next_chunk += 1
        return Chunk(content=text, tokens=_count(frame, "tokens", 1 if text else 0), id=request_id)


# --------------------------------------------------------------------------- host side


@dataclass(frozen=True, slots=True)
class EncryptedSessionInit:
    """An ``encrypted_session_init``, decrypted. Its key is already stored in the connection's :class:`SessionKeys`.

    Attributes:
        session_id: the outer ``session_id`` (``None`` if absent: the key then serves messages
            that name no session).
        job_id: the job id from the encrypted payload (what production hosts bill).
        signer_addresses: the addresses recovering from the client's signature (see
            :func:`open_session_init`); never checked here.
    """

    session_id: str | None
    job_id: str
    model: str
    price_per_token: int
    signer_addresses: tuple[str, ...]
    chain_id: int | None = None
    recovery_public_key: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class EncryptedPrompt:
    """An ``encrypted_message``, decrypted into the request it carries.

    Attributes:
        message_index: ``n`` of its AAD ``message_<n>``, or ``None`` for another AAD.
        web_search: the outer ``web_search`` flag (the production SDK sends ``false``).
    """

    request: GenerationRequest
    session_id: str | None
    message_index: int | None = None
    web_search: bool = False
    id: str | None = None


EncryptedEvent: TypeAlias = EncryptedSessionInit | EncryptedPrompt


@dataclass
class StoredKey:
    """One session key in a :class:`SessionKeys` store (its bytes never appear in the repr).

    Attributes:
        key: the 32-byte session key; zeroed when it leaves the store.
        used_at: when it was stored or last used (the host's clock).
        next_message: the smallest ``message_<n>`` still accepted (a replay guard).
    """

    key: bytearray = field(repr=False)
    used_at: float
    next_message: int = 0


class SessionKeys:
    """The session keys of one connection, host side.

    A key lives until ``lifetime`` seconds pass without use, until a new init for the same session
    replaces it, until ``max_keys`` newer sessions push it out, or until :meth:`wipe`. Keys leaving
    the store are overwritten with zeros (best effort: Python may hold other copies).
    """

    def __init__(self, *, lifetime: float = 1800.0, max_keys: int = 16) -> None:
        if lifetime <= 0 or max_keys < 1:
            raise ValueError("lifetime must be positive and max_keys at least 1")
        self.lifetime = lifetime
        self.max_keys = max_keys
        self._entries: dict[str | None, StoredKey] = {}
        self._latest: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SessionKeys({len(self._entries)} keys, lifetime={self.lifetime:g} s)"

    def put(self, session_id: str | None, key: bytes, *, now: float) -> None:
        """Store (or replace) a session's key; it becomes the default for frames that name no session."""
        self.expire(now)
        self.discard(session_id)
        while len(self._entries) >= self.max_keys:
            oldest = min(self._entries, key=lambda sid: self._entries[sid].used_at)
            self.discard(oldest)
        self._entries[session_id] = StoredKey(key=bytearray(key), used_at=now)
        self._latest = session_id

    def get(self, session_id: str | None, *, now: float) -> StoredKey | None:
        """Return a live entry and refresh its lifetime; ``session_id=None`` means the latest session."""
        self.expire(now)
        entry = self._entries.get(self._latest if session_id is None else session_id)
        if entry is not None:
            entry.used_at = now
        return entry

    def expire(self, now: float) -> None:
        """Wipe the keys unused for longer than ``lifetime``."""
        for sid in [sid for sid, entry in self._entries.items() if now - entry.used_at > self.lifetime]:
            self.discard(sid)

    def discard(self, session_id: str | None) -> None:
        """Wipe one session's key, if stored."""
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            entry.key[:] = bytes(len(entry.key))

    def wipe(self) -> None:
        """Wipe every key (call it when the connection closes)."""
        for sid in list(self._entries):
            self.discard(sid)
        self._latest = None


def _request_id(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidOptions("'id' must be a string", field="id")
    return str(value)


class HostEncryption:
    """The host half of spec §6 for one connection: decrypts requests, encrypts replies, owns the keys.

    Args:
        operator_key: the host's static key; its public key is the registry's ``publicKey``.
        key_lifetime, max_keys: bounds of the connection's :class:`SessionKeys`.
    """

    def __init__(self, operator_key: PrivateKey, *, key_lifetime: float = 1800.0, max_keys: int = 16) -> None:
        self._operator_key = operator_key
        self.keys = SessionKeys(lifetime=key_lifetime, max_keys=max_keys)

    def __repr__(self) -> str:
        return f"HostEncryption(address={self._operator_key.address}, {self.keys!r})"

    @property
    def public_key(self) -> PublicKey:
        """The key clients encrypt the init to."""
        return self._operator_key.public_key

    def receive(self, data: str | bytes | Mapping[str, Any], *, now: float) -> EncryptedEvent:
        """Decrypt one ``encrypted_session_init`` or ``encrypted_message`` frame.

        An init stores its session key (replacing that session's previous key, as the production
        SDK re-inits before every prompt); a message must use the next unused ``message_<n>`` of
        its key (a replayed message is refused).

        Args:
            data: the frame's text, or the frame already parsed.
            now: the host's monotonic clock, for key lifetimes.

        Raises:
            ProtocolError: not a JSON object with an encrypted ``type``.
            EncryptionError: the §6 code of what is wrong (see the module docstring).
            InvalidPrompt, InvalidOptions: the decrypted request has bad fields.
        """
        obj = dict(data) if isinstance(data, Mapping) else _load_object(data)
        kind = obj.get("type")
        if kind not in ENCRYPTED_CLIENT_TYPES:
            raise ProtocolError(f"not an encrypted frame: {str(kind)[:64]!r}")
        request_id = _request_id(obj)
        session_id = _opt_ident(obj, "session_id", "sessionId")
        if kind == "encrypted_session_init":
            return self._receive_init(obj, session_id, request_id, now)
        return self._receive_message(obj, session_id, request_id, now)

    def _receive_init(self, obj: Mapping[str, Any], session_id: str | None, request_id: str | None,
                      now: float) -> EncryptedSessionInit:
        chain_id = obj.get("chain_id", obj.get("chainId"))
        if chain_id is not None and (isinstance(chain_id, bool) or not isinstance(chain_id, int)):
            raise InvalidOptions("'chain_id' must be an integer", field="chain_id")
        data, signers = open_session_init(_payload_object(obj), self._operator_key)
        self.keys.put(session_id, data.session_key, now=now)
        return EncryptedSessionInit(
            session_id=session_id, job_id=data.job_id, model=data.model, price_per_token=data.price_per_token,
            signer_addresses=signers, chain_id=chain_id, recovery_public_key=data.recovery_public_key,
            id=request_id,
        )

    def _receive_message(self, obj: Mapping[str, Any], session_id: str | None, request_id: str | None,
                         now: float) -> EncryptedPrompt:
        entry = self.keys.get(session_id, now=now)
        if entry is None:
            name = "this connection" if session_id is None else f"session {session_id[:64]!r}"
            raise EncryptionError(f"no session key for {name}: send encrypted_session_init first",
                                  code="SESSION_KEY_NOT_FOUND")
        plaintext, aad = open_sealed(bytes(entry.key), _payload_object(obj))
        match = _MESSAGE_AAD.fullmatch(aad)
        index = int(match.group(1)) if match else None
        if index is not None:
            if index < entry.next_message:
                raise EncryptionError(f"message_{index} replayed: message_{entry.next_message} or later expected",
                                      code="INVALID_PAYLOAD")
            entry.next_message = index + 1
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise EncryptionError("decrypted message is not UTF-8 text", code="INVALID_PAYLOAD") from None
        try:
            inner = json.loads(text)
        except (ValueError, RecursionError):
            inner = None
        if isinstance(inner, dict):
            body = dict(inner)
            # Production hosts take these from the outer frame when the encrypted body lacks them.
            for name in ("model", "max_tokens", "temperature", "stream"):
                if name not in body and name in obj:
                    body[name] = obj[name]
        else:
            body = {"prompt": text}  # older SDKs encrypt the bare prompt
        return EncryptedPrompt(
            request=_parse_generation(body, complete=False), session_id=session_id, message_index=index,
            web_search=obj.get("web_search") is True, id=request_id,
        )

    def reply_writer(self, session_id: str | None, *, request_id: str | None, now: float,
                     rng: Callable[[int], bytes] = random_bytes) -> EncryptedReplyWriter:
        """Return a writer for the reply to a request of ``session_id`` (``None``: the latest session).

        Raises:
            EncryptionError: ``SESSION_KEY_NOT_FOUND``.
        """
        entry = self.keys.get(session_id, now=now)
        if entry is None:
            raise EncryptionError("no session key for this reply", code="SESSION_KEY_NOT_FOUND")
        return EncryptedReplyWriter(bytes(entry.key), session_id=session_id, request_id=request_id, rng=rng)

    def forget(self, session_id: str | None) -> None:
        """Wipe one session's key (e.g. when the session ends)."""
        self.keys.discard(session_id)

    def wipe(self) -> None:
        """Wipe every session key of the connection (call it on close)."""
        self.keys.wipe()


class EncryptedReplyWriter:
    """Encrypt the frames of one reply: ``encrypted_chunk`` × N (AAD ``chunk_<i>``), then ``encrypted_response``.

    Send the plaintext ``stream_end`` (:func:`~fabstir_jupyter.protocol.end_frame`) after
    :meth:`response`; ``error`` and ``stream_end`` stay plaintext.
    """

    def __init__(self, key: bytes, *, session_id: str | None, request_id: str | None,
                 rng: Callable[[int], bytes] = random_bytes) -> None:
        self._key = bytes(key)
        self.session_id = session_id
        self.request_id = request_id
        self.index = 0
        self._rng = rng

    def __repr__(self) -> str:
        return f"EncryptedReplyWriter(session_id={self.session_id!r}, index={self.index})"

    def _frame(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": kind, "payload": payload}
        if self.session_id is not None:
            frame["session_id"] = self.session_id
        if self.request_id is not None:
            frame["id"] = self.request_id
        return frame

    def chunk(self, text: str, *, tokens: int = 1, final: bool = False) -> dict[str, Any]:
        """Build the next ``encrypted_chunk``; ``final=True`` marks the last one (production sends it empty)."""
        payload: dict[str, Any] = seal(self._key, text.encode("utf-8"), chunk_aad(self.index),
                                       nonce=self._rng(NONCE_SIZE))
        payload["index"] = self.index
        self.index += 1
        frame = self._frame("encrypted_chunk", payload)
        frame["tokens"] = tokens
        if final:
            frame["final"] = True
        return frame

    def response(self, finish_reason: str) -> dict[str, Any]:
        """Build the ``encrypted_response`` that ends the reply; its plaintext is the finish reason."""
        return self._frame("encrypted_response", seal(self._key, finish_reason.encode("utf-8"), RESPONSE_AAD,
                                                       nonce=self._rng(NONCE_SIZE)))
