"""The user's wallet: the key that pays for paid sessions, and where it came from. Never shown.

A :class:`Wallet` holds one secp256k1 key (a :class:`~fabstir_jupyter.crypto.PrivateKey`) and says
only its address and its source: ``$FABSTIR_PRIVATE_KEY``, a key file (``FABSTIR_KEY_FILE``, the
``key_file`` setting), ``authenticate()``, or the local network's funded test account. Its repr,
its errors and its pickling refusal never hold the key; a key file that group or others may read is
refused, as ``fabstir-host --key-file`` refuses one.

The key signs deposits and settlements (spec/PROTOCOL.md §10) and the encrypted session inits
(§6), so that a host can tie a session to the job's depositor. Nothing here does network I/O:
balances are read by the payments layer, which knows the chain.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .errors import AuthFailed, InvalidOptions

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "Wallet", "read_key_file"]

#: The environment variable holding the user's key (0x and 64 hex digits).
KEY_ENV = "FABSTIR_PRIVATE_KEY"
#: The environment variable naming a file that holds the key.
KEY_FILE_ENV = "FABSTIR_KEY_FILE"


def _private_key_class() -> Any:
    try:
        from .crypto import PrivateKey
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise AuthFailed(f"a wallet needs the crypto extra (pip install 'fabstir-jupyter[chain]'): {exc}") from None
    return PrivateKey


def read_key_file(path: str | os.PathLike[str]) -> Any:
    """Read a key from ``path``: ``0x`` and 64 hex digits, in a file only its owner may read.

    Returns:
        A :class:`~fabstir_jupyter.crypto.PrivateKey`.

    Raises:
        InvalidOptions: the file cannot be read, may be read by group or others (POSIX), or does not
            hold a key. No message shows the file's content.
    """
    shown = os.fspath(path)
    return _private_key_class().from_file(path, label=f"key file {shown}", holder="your wallet's key",
                                          field="key_file")


class Wallet:
    """The account that pays: a key, shown only as its address and where it came from.

    Args:
        key: a :class:`~fabstir_jupyter.crypto.PrivateKey`.
        source: where it came from, for messages (``"$FABSTIR_PRIVATE_KEY"``, ``"key file PATH"``,
            ``"authenticate()"``, ``"the local network's test account"``).
    """

    __slots__ = ("_key", "source")

    def __init__(self, key: Any, source: str) -> None:
        if not hasattr(key, "sign_transaction") or not hasattr(key, "address"):
            raise InvalidOptions(f"a wallet needs a fabstir_jupyter.crypto.PrivateKey, not {type(key).__name__}",
                                 field="key")
        self._key = key
        self.source = source

    @classmethod
    def from_hex(cls, text: Any, source: str = "authenticate()") -> Wallet:
        """A wallet for a key written as ``0x`` and 64 hex digits.

        Raises:
            AuthFailed: not a valid secp256k1 key (the message never echoes it).
        """
        try:
            return cls(_private_key_class().from_hex(text), source)
        except InvalidOptions:
            raise AuthFailed(f"the private key from {source} is not valid (expected 0x and 64 hex digits)") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Wallet:
        """A wallet for the key in ``path`` (see :func:`read_key_file`)."""
        return cls(read_key_file(path), f"key file {os.fspath(path)}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *,
                         key_file: str | None = None) -> Wallet | None:
        """The wallet the environment configures: ``$FABSTIR_PRIVATE_KEY``, else a key file
        (``key_file`` as resolved by the settings, else ``$FABSTIR_KEY_FILE``); ``None`` when neither.

        Raises:
            AuthFailed: the variable does not hold a valid key.
            InvalidOptions: the key file is unreadable, readable by others, or holds no key.
        """
        env = os.environ if environ is None else environ
        text = env.get(KEY_ENV, "").strip()
        if text:
            return cls.from_hex(text, f"${KEY_ENV}")
        path = key_file or env.get(KEY_FILE_ENV, "").strip()
        return cls.from_file(path) if path else None

    @property
    def address(self) -> str:
        """The account's checksummed address."""
        return str(self._key.address)

    def __repr__(self) -> str:
        return f"<Wallet {self.address} from {self.source}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Wallet) and other.address == self.address

    def __hash__(self) -> int:
        return hash(self.address)

    def __reduce__(self) -> Any:
        raise TypeError("a Wallet holds a private key and cannot be pickled")
