"""A host's encryption key: published in its registry metadata and checked, or recovered from its registration.

End-to-end encryption (spec/PROTOCOL.md §6) encrypts to the host's static key, the key of the
address it registered with. The client trusts a key only when the address derived from it is the
host's registered address:

1. **Published**: the registry metadata's ``publicKey``, checked with
   :func:`~fabstir_jupyter.encryption.host_public_key`. A key that derives another address (or is
   malformed) is *suspicious*: the host is refused, never used in clear instead.
2. **Recovered**: a host that publishes no key (the production node's own CLI writes none, and the
   production SDK then cannot encrypt to it) still signed its registration transaction. A discovery
   source that can read the chain (``recover_public_key(address, deadline=...)``, e.g.
   :class:`~fabstir_jupyter.hosts.registry.ChainRegistrySource`) finds a registry event the host's
   own transaction emitted (:func:`registration_key`), fetches that transaction and recovers the
   signer's key from its signature, which must derive the host's address.

:class:`HostKeys` does this lazily (only when a host is about to be used), once per host (the
answer is cached on :attr:`HostInfo.encryption_key`; a failed recovery is tried again after
``retry_after`` seconds), off the event loop, and bounded by a timeout. Its answer is a
:class:`~fabstir_jupyter.hosts.info.HostKey`; what to do with it (encrypt, speak plaintext, refuse the host) is the
connector's decision (:func:`~fabstir_jupyter.connections.encryption_key_for`).

The crypto libraries come with the ``crypto`` extra; without them no key is usable and
``HostKey.problem`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._compat import timeout as _timeout
from ..chainlogs import LOG_WINDOW, search_logs
from ..errors import EncryptionError, FabstirError
from .info import HostInfo, HostKey

if TYPE_CHECKING:
    from ..crypto import PublicKey

__all__ = [
    "HostKeys",
    "OPERATOR_EVENTS",
    "LOG_WINDOW",
    "published_key",
    "registration_key",
]

logger = logging.getLogger("fabstir_jupyter.hosts")

#: NodeRegistry events that the operator's own transactions emit, with the operator as the first
#: indexed argument (the production signatures, spec/production-abi.txt).
OPERATOR_EVENTS = (
    "NodeRegistered(address,uint256,string,bytes32[])",
    "MetadataUpdated(address,string)",
    "ApiUrlUpdated(address,string)",
    "ModelsUpdated(address,bytes32[])",
    "ModelTokenPricingUpdated(address,bytes32,address,uint256)",
)
# Problems are verb phrases about the host: "the host <problem>".
_NO_CRYPTO = (
    "has a key this client cannot use: the crypto libraries are not installed (pip install 'fabstir-jupyter[crypto]')"
)


def published_key(host: HostInfo, *, now: float = 0.0) -> HostKey | None:
    """Check the ``publicKey`` a host publishes in its registry metadata; no I/O.

    Returns:
        ``None`` when the metadata names no ``publicKey``; else the checked key, or a
        :class:`HostKey` saying why it is not usable (``suspicious`` when it is not the host's own).
    """
    metadata = host.metadata or {}
    if "publicKey" not in metadata:
        return None
    if not host.address:
        return HostKey(None, problem="publishes a publicKey but has no registered address to check it against",
                       checked_at=now)
    try:
        from ..encryption import host_public_key
    except ImportError:
        return HostKey(None, problem=_NO_CRYPTO, checked_at=now)
    try:
        key = host_public_key(metadata.get("publicKey"), host.address)
    except EncryptionError as exc:
        suspicious = bool(str(metadata.get("publicKey") or "").strip())  # an empty value is simply none
        problem = exc.message.removeprefix(f"host {host.address} ")  # "publishes the publicKey of 0x…, not its own"
        return HostKey(None, problem=problem, suspicious=suspicious or bool(metadata.get("_public_key_mismatch")),
                       checked_at=now)
    return HostKey(key, source="metadata", checked_at=now)


def _topic(signature: str) -> str:
    from eth_utils import keccak

    return "0x" + keccak(text=signature).hex()


def _as_int(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def registration_key(rpc: Callable[[str, Any], Any], registry: str, address: str, *,
                     deadline: float | None = None, window: int = LOG_WINDOW) -> PublicKey:
    """Recover a host's public key from a registry transaction it signed (blocking: run it in a thread).

    Looks up the NodeRegistry events of :data:`OPERATOR_EVENTS` that name ``address`` (its
    registration first of all) with ``eth_getLogs``, fetches each event's transaction with
    ``eth_getTransactionByHash``, newest first, and returns the first key recovered from a
    transaction signed by ``address`` (:func:`~fabstir_jupyter.crypto.public_key_from_transaction`
    checks the fields against the transaction hash and the signer against ``address``). An endpoint
    that refuses to search the whole chain at once is searched backwards in ``window``-block ranges
    until ``deadline``.

    Args:
        rpc: ``rpc(method, params) -> result``, raising on an error answer
            (:meth:`ChainRegistrySource.rpc <fabstir_jupyter.hosts.registry.ChainRegistrySource.rpc>`).
        registry: the NodeRegistry address.
        address: the host's registered address.
        deadline: a ``time.monotonic()`` reading after which the windowed search stops.
        window: blocks per ``eth_getLogs`` in the windowed search.

    Raises:
        EncryptionError: ``ENCRYPTION_NOT_SUPPORTED``: no transaction signed by ``address`` found.
        ConnectionFailed, ChainError: the endpoint failed.
    """
    from ..crypto import public_key_from_transaction

    operator = "0x" + "00" * 12 + address.lower().removeprefix("0x")
    topics = [[_topic(signature) for signature in OPERATOR_EVENTS], operator]
    for log in reversed(_operator_logs(rpc, registry, topics, deadline, window)):
        tx_hash = log.get("transactionHash") if isinstance(log, dict) else None
        if not tx_hash:
            continue
        transaction = rpc("eth_getTransactionByHash", [tx_hash])
        if not isinstance(transaction, dict):
            continue
        try:
            return public_key_from_transaction(transaction, expected_address=address)
        except EncryptionError:
            continue  # emitted by another account's transaction (a contract calling the registry)
    raise EncryptionError(f"no transaction signed by {address} found among registry {registry}'s events",
                          code="ENCRYPTION_NOT_SUPPORTED", retryable=True)


def _operator_logs(rpc: Callable[[str, Any], Any], registry: str, topics: list[Any], deadline: float | None,
                   window: int) -> list[Any]:
    """The operator's registry logs, oldest first: of the whole chain, else of the newest window with any."""
    def logs(from_block: int, to_block: int | None) -> list[Any]:
        found = rpc("eth_getLogs", [{"address": registry, "topics": topics, "fromBlock": hex(from_block),
                                     "toBlock": "latest" if to_block is None else hex(to_block)}])
        return list(found) if isinstance(found, list) else []

    return search_logs(logs, lambda: _as_int(rpc("eth_blockNumber", [])), window=window, deadline=deadline,
                       what=f"registry {registry}: eth_getLogs")


class HostKeys:
    """Find the encryption keys of hosts, once per host, caching them on :attr:`HostInfo.encryption_key`.

    Args:
        sources: the discovery sources; those with ``recover_public_key`` recover the keys of hosts
            that publish none. The sequence is read at each lookup (sources added later count).
        timeout: seconds one recovery may take.
        retry_after: seconds before a host whose key could not be recovered is tried again.
        clock: the monotonic clock (a fake one in tests).
    """

    def __init__(self, sources: Sequence[Any], *, timeout: float = 10.0, retry_after: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sources = sources
        self.timeout = timeout
        self.retry_after = retry_after
        self._clock = clock
        self._pending: dict[str, asyncio.Future[HostKey]] = {}

    def __repr__(self) -> str:
        return f"<HostKeys timeout={self.timeout:g} s pending={len(self._pending)}>"

    def _fresh(self, known: HostKey | None) -> bool:
        if known is None:
            return False
        return known.usable or known.suspicious or self._clock() - known.checked_at < self.retry_after

    async def find(self, host: HostInfo) -> HostKey:
        """Return what is known of ``host``'s key, finding it out (and caching it) first if needed.

        Never raises for a host without a key: the answer's ``problem`` says why. Concurrent
        lookups of one host share one recovery; cancelling a caller does not cancel it.
        """
        known = host.encryption_key
        if self._fresh(known):
            assert known is not None
            return known
        found = published_key(host, now=self._clock())
        if found is None:
            key = host.key
            pending = self._pending.get(key)
            if pending is None:
                pending = asyncio.ensure_future(self._recover(host))
                self._pending[key] = pending
                pending.add_done_callback(lambda _done: self._pending.pop(key, None))
            found = await asyncio.shield(pending)
        host.encryption_key = found
        return found

    async def _recover(self, host: HostInfo) -> HostKey:
        now = self._clock()
        if not host.address:
            return HostKey(None, problem="publishes no publicKey and has no registered address", checked_at=now)
        sources = [s for s in self._sources if callable(getattr(s, "recover_public_key", None))]
        if not sources:
            return HostKey(None, problem="publishes no publicKey", checked_at=now)
        problems = []
        for source in sources:
            try:
                async with _timeout(self.timeout):
                    key = await source.recover_public_key(host.address, deadline=now + self.timeout)
            except ImportError:
                return HostKey(None, problem=_NO_CRYPTO, checked_at=now)
            except asyncio.TimeoutError:
                problems.append(f"recovering it from the chain took longer than {self.timeout:g} s")
            except FabstirError as exc:
                problems.append(exc.message)
            else:
                logger.info("host %s: encryption key recovered from its registration transaction", host.address)
                return HostKey(key, source="registration", checked_at=self._clock())
        why = "; ".join(problems)
        logger.info("host %s publishes no publicKey and its key could not be recovered: %s", host.address, why)
        return HostKey(None, problem=f"publishes no publicKey, and recovering it failed: {why}", checked_at=now)
