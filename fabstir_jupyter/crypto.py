"""Keys and cryptographic primitives of end-to-end encryption: thin wrappers over audited libraries.

Nothing here is hand-written cryptography. Each primitive is one call into a kept library:

* secp256k1 keys, ECDH and recoverable ECDSA signatures: ``coincurve`` (libsecp256k1);
* HKDF-SHA256: ``cryptography``;
* XChaCha20-Poly1305 (IETF AEAD, 24-byte nonce): ``PyNaCl`` (libsodium);
* Ethereum addresses (keccak-256) and signed transactions: ``eth-utils`` and ``eth-account``.

These come with the ``crypto`` extra (``pip install 'fabstir-jupyter[crypto]'``). Like
:mod:`fabstir_jupyter.protocol`, this module is pure: no sockets, no asyncio, no clock.

Secrets never leave a :class:`PrivateKey` through ``repr``, ``str``, pickling or an error
message: only its address is shown. Failures raise a coded
:class:`~fabstir_jupyter.errors.FabstirError`: :class:`~fabstir_jupyter.errors.InvalidOptions` for a
bad key given by the caller, :class:`~fabstir_jupyter.errors.EncryptionError` (its ``code`` from
spec/PROTOCOL.md §6) for bad material from the wire.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from typing import Any

from .errors import EncryptionError, InvalidOptions

try:
    import coincurve
    import nacl.bindings
    import nacl.exceptions
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "end-to-end encryption needs the crypto extra: pip install 'fabstir-jupyter[crypto]'"
    ) from exc

#: The most of a key file read: a key is 66 characters; a larger file is read no further.
_MAX_KEY_FILE = 4096

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "SIGNATURE_SIZE",
    "PrivateKey",
    "PublicKey",
    "decode_hex",
    "hkdf_sha256",
    "aead_encrypt",
    "aead_decrypt",
    "recover_public_key",
    "public_key_from_transaction",
    "random_bytes",
]

KEY_SIZE = 32  # XChaCha20-Poly1305 key, HKDF output, secp256k1 secret
NONCE_SIZE = 24  # XChaCha20 nonce
SIGNATURE_SIZE = 65  # r (32) ‖ s (32) ‖ recovery id (1)

_HEX = re.compile(r"[0-9a-fA-F]*")


def decode_hex(text: Any, *, what: str, code: str = "INVALID_HEX_ENCODING") -> bytes:
    """Decode hex with an optional ``0x`` prefix, in either case (what production peers accept).

    Unlike :meth:`bytes.fromhex`, whitespace is refused.

    Raises:
        EncryptionError: ``code`` (default ``INVALID_HEX_ENCODING``): not a string, odd length or
            a non-hex character. The message names ``what``, never the value.
    """
    if not isinstance(text, str):
        raise EncryptionError(f"{what} is a {type(text).__name__}, not a hex string", code=code)
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    if not digits:
        return b""
    # isascii() and isalnum() rule out whitespace (which bytes.fromhex would skip); fromhex refuses
    # every other non-hex character. Cheaper than a regex: this runs three times per streamed chunk.
    if len(digits) % 2 == 0 and digits.isascii() and digits.isalnum():
        try:
            return bytes.fromhex(digits)
        except ValueError:
            pass
    raise EncryptionError(f"{what} is not valid hex", code=code)


def _keccak(data: bytes) -> bytes:
    from eth_utils import keccak  # imported on first use: eth-utils takes most of a second to load

    return keccak(data)


def _address(uncompressed: bytes) -> str:
    # Ethereum: the last 20 bytes of keccak-256 over X ‖ Y (the 0x04 prefix dropped), EIP-55 cased.
    from eth_utils import to_checksum_address

    return to_checksum_address(_keccak(uncompressed[1:])[12:])


class PublicKey:
    """A secp256k1 public key.

    Equal keys compare equal whatever encoding they were read from; ``str`` is the compressed key
    as 66 lower-case hex characters (the registry's ``publicKey`` form, without ``0x``).
    """

    __slots__ = ("_key",)

    def __init__(self, key: coincurve.PublicKey) -> None:
        self._key = key

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKey:
        """Read a compressed (33-byte) or uncompressed (65-byte) SEC1 key.

        Raises:
            EncryptionError: ``INVALID_PAYLOAD``: not a point on the curve.
        """
        if len(data) not in (33, 65):
            raise EncryptionError(f"a public key is 33 or 65 bytes, not {len(data)}", code="INVALID_PAYLOAD")
        try:
            return cls(coincurve.PublicKey(bytes(data)))
        except ValueError:
            raise EncryptionError("public key is not a point on secp256k1", code="INVALID_PAYLOAD") from None

    @classmethod
    def from_hex(cls, text: Any) -> PublicKey:
        """Read a key from hex (66 or 130 characters, optional ``0x``).

        Raises:
            EncryptionError: ``INVALID_HEX_ENCODING`` or ``INVALID_PAYLOAD``.
        """
        return cls.from_bytes(decode_hex(text, what="public key"))

    @property
    def compressed(self) -> bytes:
        """The 33-byte compressed encoding (``02``/``03`` ‖ X)."""
        return self._key.format(compressed=True)

    @property
    def uncompressed(self) -> bytes:
        """The 65-byte uncompressed encoding (``04`` ‖ X ‖ Y)."""
        return self._key.format(compressed=False)

    @property
    def address(self) -> str:
        """The EIP-55 checksummed Ethereum address of this key."""
        return _address(self.uncompressed)

    def ecdh(self, private_key: PrivateKey) -> bytes:
        """Return the 32-byte x-coordinate of ``private_key`` × this point (raw ECDH, unhashed)."""
        return self._key.multiply(private_key._secret()).format(compressed=True)[1:]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.compressed == other.compressed

    def __hash__(self) -> int:
        return hash(self.compressed)

    def __str__(self) -> str:
        return self.compressed.hex()

    def __repr__(self) -> str:
        return f"PublicKey('{self.compressed.hex()}')"


class PrivateKey:
    """A secp256k1 private key: a host operator's key, a client's signing key or an ephemeral key.

    The secret never appears in ``repr``/``str`` (they show the address), cannot be pickled, and is
    never put into an error message.
    """

    __slots__ = ("_key",)

    def __init__(self, key: coincurve.PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> PrivateKey:
        """Make a fresh random key (from the OS's CSPRNG)."""
        return cls(coincurve.PrivateKey())

    @classmethod
    def from_bytes(cls, secret: bytes) -> PrivateKey:
        """Load a key from its 32 secret bytes.

        Raises:
            InvalidOptions: not 32 bytes, or not a valid secp256k1 scalar (0 or ≥ the group order).
        """
        if len(secret) != KEY_SIZE:
            raise InvalidOptions("a private key is 32 bytes", field="private_key")
        try:
            return cls(coincurve.PrivateKey(bytes(secret)))
        except ValueError:
            raise InvalidOptions("private key is out of range for secp256k1", field="private_key") from None

    @classmethod
    def from_hex(cls, text: Any) -> PrivateKey:
        """Load a key written as ``0x`` and 64 hex characters (the ``0x`` may be left out).

        Raises:
            InvalidOptions: any other form, or an out-of-range scalar; the message never holds the value.
        """
        digits = text.strip() if isinstance(text, str) else ""
        digits = digits[2:] if digits[:2] in ("0x", "0X") else digits
        if len(digits) != 2 * KEY_SIZE or not _HEX.fullmatch(digits):
            raise InvalidOptions("a private key is 0x followed by 64 hex characters", field="private_key")
        return cls.from_bytes(bytes.fromhex(digits))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, label: str, holder: str, field: str) -> PrivateKey:
        """Load a key from a file holding ``0x`` and 64 hex characters, that only its owner may read.

        Args:
            path: the file.
            label: how messages name the file (``"key file PATH"``, ``"--key-file PATH"``).
            holder: whose key it holds, for the permission message (``"your wallet's key"``).
            field: the ``field`` of the errors.

        Raises:
            InvalidOptions: the file cannot be read, may be read by group or others (POSIX), or holds
                no key. No message shows the file's content.
        """
        try:
            with open(path, encoding="utf-8") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                if os.name == "posix" and mode & 0o077:
                    raise InvalidOptions(
                        f"{label} may be read by group or others (mode {stat.S_IMODE(mode):04o}); it holds "
                        f"{holder}: run chmod 600 {os.fspath(path)}", field=field)
                text = handle.read(_MAX_KEY_FILE)
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidOptions(f"cannot read {label}: {type(exc).__name__}", field=field) from None
        try:
            return cls.from_hex(text)
        except InvalidOptions as exc:
            raise InvalidOptions(f"{label} does not hold a usable key: {exc.message}", field=field) from None

    def _secret(self) -> bytes:
        return self._key.secret

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        return PublicKey(self._key.public_key)

    @property
    def address(self) -> str:
        """The EIP-55 checksummed Ethereum address of this key."""
        return self.public_key.address

    def ecdh(self, public_key: PublicKey) -> bytes:
        """Return the 32-byte x-coordinate of this key × ``public_key`` (raw ECDH, unhashed)."""
        return public_key.ecdh(self)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest; return 65 bytes r ‖ s ‖ v with v 0 or 1.

        The signature is deterministic (RFC 6979) with a low ``s``, like ``@noble/secp256k1``'s.
        """
        if len(digest) != 32:
            raise ValueError("sign_digest takes a 32-byte digest")
        return self._key.sign_recoverable(digest, hasher=None)

    def sign_transaction(self, transaction: Mapping[str, Any]) -> bytes:
        """Sign an Ethereum transaction (the dict web3's ``build_transaction`` returns) with eth-account.

        Returns:
            The raw signed transaction, ready for ``eth_sendRawTransaction``.

        Raises:
            InvalidOptions: eth-account refuses the transaction's fields (the message never holds the key).
        """
        from eth_account import Account

        fields = {k: v for k, v in transaction.items() if k != "from"}
        try:
            signed = Account.sign_transaction(fields, self._key.secret)
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidOptions(
                f"the transaction cannot be signed ({type(exc).__name__})", field="transaction"
            ) from None
        return bytes(signed.raw_transaction)

    def __reduce__(self) -> Any:
        raise TypeError("a PrivateKey cannot be pickled or copied")

    def __str__(self) -> str:
        return f"PrivateKey(address={self.address})"

    __repr__ = __str__


def hkdf_sha256(secret: bytes, *, salt: bytes, info: bytes = b"", length: int = KEY_SIZE) -> bytes:
    """Derive ``length`` bytes with HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _check_key_and_nonce(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise EncryptionError(f"an XChaCha20-Poly1305 key is {KEY_SIZE} bytes, not {len(key)}",
                              code="DECRYPTION_FAILED")
    if len(nonce) != NONCE_SIZE:
        raise EncryptionError(f"nonce is {len(nonce)} bytes, not {NONCE_SIZE}", code="INVALID_NONCE_SIZE")


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Encrypt with XChaCha20-Poly1305; return the ciphertext with its 16-byte tag appended.

    Raises:
        EncryptionError: ``INVALID_NONCE_SIZE`` for a nonce that is not 24 bytes.
    """
    _check_key_and_nonce(key, nonce)
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        bytes(plaintext), bytes(aad), bytes(nonce), bytes(key)
    )


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes = b"") -> bytes:
    """Decrypt and authenticate XChaCha20-Poly1305 ciphertext (tag appended).

    Raises:
        EncryptionError: ``INVALID_NONCE_SIZE``; ``DECRYPTION_FAILED`` when the tag does not
            authenticate the ciphertext, the AAD, the nonce and the key together.
    """
    _check_key_and_nonce(key, nonce)
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            bytes(ciphertext), bytes(aad), bytes(nonce), bytes(key)
        )
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise EncryptionError("ciphertext failed authentication", code="DECRYPTION_FAILED") from None


def recover_public_key(signature: bytes, digest: bytes) -> PublicKey:
    """Recover the key that signed a 32-byte digest from a 65-byte r ‖ s ‖ v signature.

    ``v`` may be 0-3 or Ethereum's 27/28. Recovery only says which key *would* have signed: compare
    the result (or its address) with a key you expect before trusting it.

    Raises:
        EncryptionError: ``INVALID_PAYLOAD``: wrong length, a bad ``v``, or no key recovers.
    """
    if len(signature) != SIGNATURE_SIZE:
        raise EncryptionError(f"a signature is {SIGNATURE_SIZE} bytes, not {len(signature)}", code="INVALID_PAYLOAD")
    v = signature[64] - 27 if signature[64] >= 27 else signature[64]
    if not 0 <= v <= 3 or len(digest) != 32:
        raise EncryptionError("signature has an invalid recovery id", code="INVALID_PAYLOAD")
    try:
        key = coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except (ValueError, TypeError):
        raise EncryptionError("no public key recovers from this signature", code="INVALID_PAYLOAD") from None
    return PublicKey(key)


# ---------------------------------------------------------------------------- signed transactions


def _signing_hash_and_vrs(raw: bytes) -> tuple[bytes, tuple[int, int, int]]:
    # eth-account knows every transaction type: EIP-2718 typed ones (first byte < 0x80) and legacy
    # RLP ones, whose v carries the EIP-155 chain id.
    from eth_account._utils.legacy_transactions import Transaction, vrs_from
    from eth_account._utils.signing import hash_of_signed_transaction
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes

    if raw[0] <= 0x7F:
        typed = TypedTransaction.from_bytes(HexBytes(raw))
        return typed.hash(), typed.vrs()
    legacy = Transaction.from_bytes(raw)
    v, r, s = vrs_from(legacy)
    return hash_of_signed_transaction(legacy), (v, r, s)


# Fields of an eth_getTransactionByHash answer that are not part of the signed payload.
_RPC_ONLY_FIELDS = {
    "hash", "from", "blockHash", "blockNumber", "transactionIndex", "v", "r", "s", "yParity", "y_parity",
}


def _raw_from_rpc_fields(tx: Mapping[str, Any]) -> bytes:
    # Rebuild the signed encoding from what eth_getTransactionByHash returns, then check it
    # against the transaction hash so that a missing or altered field cannot slip through.
    from eth_account._utils.legacy_transactions import encode_transaction, serializable_unsigned_transaction_from_dict

    fields = {key: value for key, value in tx.items() if key not in _RPC_ONLY_FIELDS}
    if "input" in fields:
        fields["data"] = fields.pop("input")
    kind = _int(tx.get("type") or 0)
    v = _int(tx["v"])
    if kind == 0:
        fields.pop("type", None)
        fields.pop("chainId", None)
        if v >= 35:  # EIP-155: v = 35 + 2 × chain id + parity
            fields["chainId"] = (v - 35) // 2
    else:
        v = _int(tx.get("yParity", tx.get("y_parity", v)))
        if kind >= 2:
            fields.pop("gasPrice", None)  # the effective price, not a field of the signed payload
    unsigned = serializable_unsigned_transaction_from_dict(fields)
    raw = bytes(encode_transaction(unsigned, (v, _int(tx["r"]), _int(tx["s"]))))
    expected = tx.get("hash")
    if expected is not None and _keccak(raw) != _bytes(expected):
        raise EncryptionError("transaction fields do not reproduce the transaction hash", code="INVALID_PAYLOAD")
    return raw


def _int(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value, 16) if value[:2] in ("0x", "0X") else int(value)
    return int.from_bytes(_bytes(value), "big")


def _bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return decode_hex(value, what="transaction field", code="INVALID_PAYLOAD")


def public_key_from_transaction(
    tx: bytes | str | Mapping[str, Any], *, expected_address: str | None = None
) -> PublicKey:
    """Recover the public key of the account that signed an Ethereum transaction.

    A host that publishes no ``publicKey`` has still signed its registration transaction: the key
    recovered from it is the operator's key, and its address is the registered address.

    Args:
        tx: the signed transaction, raw (bytes or 0x-hex, as ``eth_getRawTransactionByHash`` and
            ``Account.sign_transaction`` give it), or the fields ``eth_getTransactionByHash`` returns
            (``v``/``r``/``s`` included; checked against its ``hash``).
        expected_address: if given, the recovered key must derive this address.

    Raises:
        EncryptionError: ``INVALID_PAYLOAD``: not a signed transaction, fields that do not match
            the hash, or a key that derives another address than ``expected_address``.
    """
    try:
        raw = _raw_from_rpc_fields(tx) if isinstance(tx, Mapping) else _bytes(tx)
        if not raw:
            raise ValueError("empty transaction")
        digest, (v, r, s) = _signing_hash_and_vrs(raw)
    except EncryptionError:
        raise
    except Exception as exc:  # eth-account / rlp raise many types for malformed input
        raise EncryptionError(f"not a signed transaction: {type(exc).__name__}", code="INVALID_PAYLOAD") from None
    recid = v - 27 if v in (27, 28) else (v - 35) % 2 if v >= 35 else v
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([recid])
    key = recover_public_key(signature, digest)
    if expected_address is not None and key.address.lower() != expected_address.lower():
        raise EncryptionError(
            f"transaction was signed by {key.address}, not by {expected_address}", code="INVALID_PAYLOAD"
        )
    return key


def random_bytes(size: int) -> bytes:
    """Return ``size`` bytes from the OS's CSPRNG (the default source of nonces and session keys)."""
    return os.urandom(size)

