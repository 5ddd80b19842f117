"""Hosts from the on-chain NodeRegistry, read in a constant number of RPC round trips (spec/PROTOCOL.md §8).

:class:`ChainRegistrySource` is a discovery source (``async discover() -> list[HostInfo]``). Whatever
the number of hosts, :meth:`~ChainRegistrySource.discover` costs three round trips:

1. ``getAllActiveNodes()``;
2. ``getNodeFullInfo(node)`` for every node;
3. ``getHostModelPrices(node, token)`` for every node in the native and the stable token (all of a
   node's model prices in one call), and ModelRegistry ``getModel(id)`` for every distinct model id.

Steps 2 and 3 go through Multicall3 ``aggregate3`` (allowing failures) in chunks of ``chunk_size``
calls; the chunks of a step travel in one JSON-RPC batch when the provider takes batches (HTTP
endpoints and :class:`~fabstir_jupyter.local.chain.LocalChain` do), else one request per chunk.
Without a Multicall3 address the calls themselves go in the batch. With ``read_prices=False``
step 3 only names the models and every model gets the node's minimum prices (what the TypeScript
SDK reads). :meth:`sequential_discover` is the naive 1 + N reading (what the production
TypeScript SDK does), kept for comparison.

The calls and their output types are production's (spec/PROTOCOL.md §8, spec/production-abi.txt):
``getModel`` returns one struct, which ABI-encodes with an offset word before its members, and an
answer that is not that struct's canonical encoding (six flat values, say) is rejected, never
misread.

Discovery is lenient: metadata that is not a JSON object, a reverting call or an unusable node is
logged and skipped or flagged, never fatal. A price of 0 means "not priced"; a node whose
``getHostModelPrices`` fails (a registry older than that function) gets its minimum prices from
``getNodeFullInfo`` for that token. Flags go into ``HostInfo.metadata``: ``_invalid_metadata`` and
``_public_key_mismatch`` (the published ``publicKey`` does not derive the node's address, or is
malformed).

:meth:`~ChainRegistrySource.recover_public_key` recovers the encryption key of a host that publishes
none from a registry transaction it signed (:func:`~fabstir_jupyter.hosts.keys.registration_key`).

The sync provider runs in an executor thread, never on the event loop. eth-abi and web3 are
imported when first used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ChainError, ConnectionFailed, EncryptionError, InvalidOptions
from ..networks import NetworkPreset
from ..urls import hide_rpc_url_in_logs, hide_rpc_urls, redact_url
from .info import HostInfo

if TYPE_CHECKING:
    from ..crypto import PublicKey

__all__ = [
    "ChainRegistrySource",
    "MODEL_REGISTRY_SIGNATURES",
    "NODE_REGISTRY_SIGNATURES",
    "ModelRecord",
    "NodeRecord",
    "build_host",
    "host_model_ids",
    "model_aliases",
    "parse_metadata",
    "public_key_address",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The production view functions (spec/PROTOCOL.md §8): signature → ABI output types.
NODE_REGISTRY_SIGNATURES: dict[str, tuple[str, ...]] = {
    "getAllActiveNodes()": ("address[]",),
    "getNodeFullInfo(address)": ("address", "uint256", "bool", "string", "string", "bytes32[]", "uint256", "uint256"),
    "getNodesForModel(bytes32)": ("address[]",),
    "nodeSupportsModel(address,bytes32)": ("bool",),
    "isActiveNode(address)": ("bool",),
    "getNodeApiUrl(address)": ("string",),
    "getModelPricing(address,bytes32,address)": ("uint256",),
    "getHostModelPrices(address,address)": ("bytes32[]", "uint256[]"),
}
MODEL_REGISTRY_SIGNATURES: dict[str, tuple[str, ...]] = {
    "getModelId(string,string)": ("bytes32",),
    "getAllModels()": ("bytes32[]",),
    "getModel(bytes32)": ("(string,string,bytes32,uint256,bool,uint256)",),  # one struct
}
AGGREGATE3 = "aggregate3((address,bool,bytes)[])"

DEFAULT_CHUNK_SIZE = 256  # calls per aggregate3: the bound of the local Vyper Multicall3
TOKEN_DECIMALS = 18
NATIVE_TOKEN = "0x" + "00" * 20
ZERO_ADDRESS = NATIVE_TOKEN

# eth-abi decodes "string" strictly as UTF-8; "bytes" has the same encoding, so decode that and
# replace bad bytes ourselves: a host's odd metadata must not break discovery.
_FULL_INFO_TYPES = ["address", "uint256", "bool", "bytes", "bytes", "bytes32[]", "uint256", "uint256"]
_MODEL_TYPES = ["(bytes,bytes,bytes32,uint256,bool,uint256)"]
_HOST_PRICES_TYPES = ["bytes32[]", "uint256[]"]


def _selector(signature: str) -> bytes:
    from eth_utils import keccak

    return keccak(text=signature)[:4]


def _encode(signature: str, types: Sequence[str] = (), args: Sequence[Any] = ()) -> bytes:
    from eth_abi import encode

    return _selector(signature) + (encode(list(types), list(args)) if types else b"")


def _checksum(address: Any) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


def public_key_address(public_key: Any) -> str | None:
    """Return the checksummed Ethereum address of a compressed secp256k1 key, or ``None`` if malformed.

    The key is 66 hex characters (33 bytes, ``02``/``03`` prefix), with or without ``0x``, and must
    be a point on the curve (:class:`~fabstir_jupyter.crypto.PublicKey` checks that).
    """
    if not isinstance(public_key, str):
        return None
    text = public_key.strip().removeprefix("0x").removeprefix("0X")
    if len(text) != 66 or text[:2] not in ("02", "03"):
        return None
    from ..crypto import PublicKey  # deferred: the crypto libraries come with the chain extra

    try:
        return PublicKey.from_hex(text).address
    except EncryptionError:  # not hex, or not a point on secp256k1
        return None


# ---------------------------------------------------------------------------- what the chain says


@dataclass(frozen=True)
class NodeRecord:
    """One ``getNodeFullInfo`` answer."""

    address: str
    stake_wei: int
    active: bool
    metadata: str
    api_url: str
    model_ids: tuple[str, ...]  # 0x-hex bytes32
    min_price_native: int
    min_price_stable: int


@dataclass(frozen=True)
class ModelRecord:
    """One ModelRegistry ``getModel`` answer (``repo`` empty for an unknown id)."""

    repo: str
    file_name: str
    active: bool


def _decode_full_info(data: bytes) -> NodeRecord:
    from eth_abi import decode

    operator, stake, active, metadata, api_url, models, native, stable = decode(_FULL_INFO_TYPES, data)
    return NodeRecord(
        address=_checksum(operator),
        stake_wei=stake,
        active=active,
        metadata=metadata.decode("utf-8", errors="replace"),
        api_url=api_url.decode("utf-8", errors="replace"),
        model_ids=tuple("0x" + m.hex() for m in models),
        min_price_native=native,
        min_price_stable=stable,
    )


def _decode_model(data: bytes) -> ModelRecord:
    """Decode a ``getModel`` answer: one struct, as production encodes it.

    Raises:
        ValueError: ``data`` is not the canonical encoding of that struct (six flat values, say).
    """
    from eth_abi import decode, encode

    (model,) = decode(_MODEL_TYPES, data)
    if encode(_MODEL_TYPES, [model]) != data:  # a decoding that would not give these bytes back
        raise ValueError("getModel answer is not one (string,string,bytes32,uint256,bool,uint256) struct")
    repo, file_name, _sha, _tier, active, _ts = model
    return ModelRecord(repo.decode("utf-8", errors="replace"), file_name.decode("utf-8", errors="replace"), active)


def _decode_host_prices(data: bytes) -> dict[str, int]:
    """Decode a ``getHostModelPrices`` answer into ``{model id: price}``.

    Raises:
        ValueError: the two lists differ in length.
    """
    from eth_abi import decode

    model_ids, prices = decode(_HOST_PRICES_TYPES, data)
    if len(model_ids) != len(prices):
        raise ValueError(f"getHostModelPrices gave {len(model_ids)} models and {len(prices)} prices")
    return {"0x" + m.hex(): p for m, p in zip(model_ids, prices, strict=True)}


def _decode_addresses(data: bytes) -> list[str]:
    from eth_abi import decode

    return [_checksum(a) for a in decode(["address[]"], data)[0]]


# ---------------------------------------------------------------------------- chain → HostInfo (no I/O)


def parse_metadata(text: str) -> tuple[dict[str, Any], bool]:
    """Parse a registry metadata string leniently: return ``(metadata, valid)``.

    An empty string is valid and empty; anything that is not a JSON object gives ``({}, False)``.
    """
    if not text.strip():
        return {}, True
    try:
        value = json.loads(text)
    except ValueError:
        return {}, False
    return (value, True) if isinstance(value, dict) else ({}, False)


def host_model_ids(model_ids: Sequence[str], models: Mapping[str, ModelRecord]) -> dict[str, str]:
    """Map each registry model id of one host to the id the client sends it.

    A model the ModelRegistry knows is named by its file name, or by ``repo/file`` where two of the
    host's models share a file name; an unknown one by its 0x id.
    """
    known = {mid: models[mid] for mid in model_ids if mid in models and models[mid].repo and models[mid].file_name}
    file_counts: dict[str, int] = {}
    for model in known.values():
        file_counts[model.file_name.lower()] = file_counts.get(model.file_name.lower(), 0) + 1
    names = {}
    for mid in model_ids:
        record = known.get(mid)
        if record is None:
            names[mid] = mid
        elif file_counts[record.file_name.lower()] > 1:
            names[mid] = f"{record.repo}/{record.file_name}"
        else:
            names[mid] = record.file_name
    return names


def model_aliases(names: Mapping[str, str], models: Mapping[str, ModelRecord]) -> dict[str, str]:
    """Return the aliases of one host's models: ``repo/file``, ``repo:file`` and the 0x id → host id.

    An alias that would name two different models, or another model's id, is left out: a name
    never silently resolves to the wrong model.
    """
    ids = {name.lower(): name for name in names.values()}
    aliases: dict[str, tuple[str, str]] = {}  # lower-cased alias → (alias, host id)
    clashing: set[str] = set()
    for mid, name in names.items():
        record = models.get(mid)
        candidates = [mid]
        if record is not None and record.repo and record.file_name:
            candidates += [f"{record.repo}/{record.file_name}", f"{record.repo}:{record.file_name}"]
        for alias in candidates:
            key = alias.lower()
            if key == name.lower():
                continue
            if (key in ids and ids[key] != name) or (key in aliases and aliases[key][1] != name):
                clashing.add(key)
            aliases[key] = (alias, name)
    return {alias: name for key, (alias, name) in aliases.items() if key not in clashing}


def _log_warning(message: str) -> None:
    logger.warning("%s", message)


def build_host(
    node: NodeRecord,
    *,
    prices: Mapping[tuple[str, str], tuple[int, int]] | None,
    models: Mapping[str, ModelRecord],
    warn: Callable[[str], None] = _log_warning,
) -> HostInfo | None:
    """Turn one node's registry record into a :class:`HostInfo`, or ``None`` if it is unusable.

    Args:
        node: the ``getNodeFullInfo`` answer.
        prices: ``{(node address, model id): (native, stable)}``; ``None`` takes the node's minimum
            prices for every model (what the 1 + N reading knows).
        models: ModelRegistry records by model id (may be empty).
        warn: called with the text of each problem found (default: a logged warning).
    """
    if not node.active or int(node.address, 16) == 0:
        return None
    metadata, valid = parse_metadata(node.metadata)
    metadata = dict(metadata)
    if not valid:
        metadata["_invalid_metadata"] = True
        warn(f"host {node.address}: metadata is not a JSON object; ignored")
    if "publicKey" in metadata:
        derived = public_key_address(metadata["publicKey"])
        if derived is None or derived != node.address:
            metadata["_public_key_mismatch"] = True
            problem = "is malformed" if derived is None else f"belongs to {derived}"
            warn(f"host {node.address}: its published publicKey {problem}, not to the host's address")
    names = host_model_ids(node.model_ids, models)
    host_prices: dict[str, dict[str, int]] = {}
    for mid, name in names.items():
        if prices is None:
            native, stable = node.min_price_native, node.min_price_stable
        else:
            native, stable = prices.get((node.address, mid), (0, 0))
        host_prices[name] = {"native": native, "stable": stable}
    regions = [metadata.get(k) for k in ("location", "region")]
    region = next((r for r in regions if isinstance(r, str) and r), None)
    try:
        return HostInfo(
            api_url=node.api_url,
            address=node.address,
            models=tuple(dict.fromkeys(names.values())),
            model_names=model_aliases(names, models),
            region=region,
            stake=node.stake_wei / 10**TOKEN_DECIMALS,
            prices=host_prices,
            metadata=metadata,
        )
    except InvalidOptions:
        warn(f"host {node.address}: apiUrl {node.api_url!r} is not a usable URL; skipped")
        return None


# ---------------------------------------------------------------------------- JSON-RPC transport


class _Rpc:
    """Raw JSON-RPC ``eth_call`` over a sync web3 provider, counting round trips."""

    def __init__(self, provider: Any, label: str) -> None:
        self.provider = provider
        self.label = label
        self.round_trips = 0
        self.requests = 0
        self._batch = callable(getattr(provider, "make_batch_request", None))
        self._lock = threading.Lock()

    def _count(self, requests: int) -> None:
        with self._lock:
            self.round_trips += 1
            self.requests += requests

    @staticmethod
    def _params(to: str, data: bytes) -> list[Any]:
        return [{"to": to, "data": "0x" + data.hex()}, "latest"]

    def _failure(self, exc: Exception) -> ConnectionFailed:
        text = hide_rpc_urls(str(exc)) or type(exc).__name__  # an RPC URL's path and query may hold a key
        return ConnectionFailed(f"registry rpc {self.label}: {text}", retryable=True)

    def _send(self, method: str, params: Any) -> Any:
        self._count(1)
        try:
            return self.provider.make_request(method, params)
        except Exception as exc:  # requests, aiohttp, OS errors: the transport failed
            raise self._failure(exc) from exc

    @staticmethod
    def _result(response: Any) -> bytes | ChainError:
        if not isinstance(response, dict):
            return ChainError(f"not a JSON-RPC response: {response!r:.80}")
        if response.get("error") is not None:
            error = response["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            return ChainError(f"{message}")
        result = response.get("result")
        if isinstance(result, (bytes, bytearray)):
            return bytes(result)
        if isinstance(result, str):
            try:
                return bytes.fromhex(result.removeprefix("0x"))
            except ValueError:
                pass
        return ChainError(f"eth_call result is not hex: {result!r:.80}")

    def request(self, method: str, params: Any) -> Any:
        """One JSON-RPC request in one round trip: its ``result``.

        Raises:
            ConnectionFailed: the transport failed.
            ChainError: the endpoint answered with an error, or not with a JSON-RPC response.
        """
        response = self._send(method, params)
        if not isinstance(response, dict):
            raise ChainError(f"{method}: not a JSON-RPC response: {response!r:.80}")
        if response.get("error") is not None:
            error = response["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise ChainError(f"{method}: {message}")
        return response.get("result")

    def call(self, to: str, data: bytes) -> bytes | ChainError:
        """One ``eth_call`` in one round trip: the return data, or the error as a value."""
        return self._result(self._send("eth_call", self._params(to, data)))

    def call_many(self, calls: Sequence[tuple[str, bytes]]) -> list[bytes | ChainError]:
        """Several ``eth_call`` in one round trip where the provider takes batches, else one each."""
        if len(calls) > 1 and self._batch:
            requests = [("eth_call", self._params(to, data)) for to, data in calls]
            try:
                responses = self.provider.make_batch_request(requests)
            except NotImplementedError:  # web3's BaseProvider: no batches
                self._batch = False
            except Exception as exc:
                self._count(len(requests))
                raise self._failure(exc) from exc
            else:
                self._count(len(requests))
                if isinstance(responses, list) and len(responses) == len(requests):
                    return [self._result(r) for r in responses]
                logger.info("registry rpc %s: batch refused (%r); sending one request per call", self.label, responses)
                self._batch = False
        return [self.call(to, data) for to, data in calls]


# ---------------------------------------------------------------------------- the source


def _addresses(addresses: Mapping[str, Any]) -> dict[str, str | None]:
    def pick(*names: str) -> str | None:
        for name in names:
            value = addresses.get(name)
            if value:
                return _checksum(value)
        return None

    try:
        found = {
            "node_registry": pick("node_registry", "nodeRegistry", "NodeRegistry"),
            "model_registry": pick("model_registry", "modelRegistry", "ModelRegistry"),
            "multicall": pick("multicall", "multicall3", "Multicall3"),
            "stable_token": pick("stable_token", "usdc", "USDC", "stableToken"),
        }
    except ValueError as exc:
        raise InvalidOptions(f"registry addresses: {exc}", field="addresses") from exc
    if found["node_registry"] is None:
        raise InvalidOptions("registry addresses need a node_registry", field="addresses")
    return found


class ChainRegistrySource:
    """Discover hosts from a NodeRegistry on chain, batching reads through Multicall3.

    Args:
        web3_or_rpc_url: a sync :class:`web3.Web3`, a sync web3 provider, or an ``http(s)://``
            JSON-RPC URL. Requests go to the provider raw (standard JSON-RPC, no web3
            middleware); for eth-tester use :class:`~fabstir_jupyter.local.chain.LocalProvider`
            (``LocalChain.w3`` has one), which fills what a bare eth-tester provider lacks.
        addresses: ``node_registry`` (required), ``model_registry`` (for model names),
            ``multicall`` (Multicall3; without it the calls are batched as JSON-RPC) and
            ``stable_token`` (USDC: without it stable prices are not read).
        chunk_size: calls per ``aggregate3``.
        read_prices: read every node's model prices with ``getHostModelPrices``; ``False`` takes
            the nodes' minimum prices from ``getNodeFullInfo`` for every model instead (what the
            TypeScript SDK knows), so step 3 only names the models.
        executor: where the blocking RPC runs (default: the loop's default executor).
        timeout: seconds per HTTP request, when given a URL.

    Attributes:
        rpc_calls: RPC round trips made so far (a JSON-RPC batch counts once).
        rpc_requests: JSON-RPC requests made so far (each request of a batch counts).
    """

    def __init__(
        self,
        web3_or_rpc_url: Any,
        addresses: Mapping[str, Any],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        read_prices: bool = True,
        executor: Executor | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise InvalidOptions(f"chunk_size must be a positive integer, not {chunk_size!r}", field="chunk_size")
        if isinstance(web3_or_rpc_url, str):
            from web3 import HTTPProvider  # deferred: web3 is heavy

            provider = HTTPProvider(web3_or_rpc_url, request_kwargs={"timeout": timeout})
            hide_rpc_url_in_logs(web3_or_rpc_url)  # web3 logs the whole URI at DEBUG
            label = redact_url(web3_or_rpc_url, keep_path=False) or "rpc"  # the path may hold an API key
        elif callable(getattr(web3_or_rpc_url, "make_request", None)):
            provider, label = web3_or_rpc_url, type(web3_or_rpc_url).__name__
        elif callable(getattr(getattr(web3_or_rpc_url, "provider", None), "make_request", None)):
            provider, label = web3_or_rpc_url.provider, type(web3_or_rpc_url.provider).__name__
        else:
            raise InvalidOptions(
                f"expected a web3.Web3, a web3 provider or an RPC URL, not {type(web3_or_rpc_url).__name__}",
                field="rpc_url",
            )
        self.addresses = _addresses(addresses)
        self.chunk_size = chunk_size
        self.read_prices = read_prices
        self._executor = executor
        self._rpc = _Rpc(provider, label)
        self._warned: set[str] = set()

    @classmethod
    def for_network(cls, network: NetworkPreset, **options: Any) -> ChainRegistrySource:
        """Return a source reading ``network``'s registry (through its provider, else its RPC URL).

        Args:
            network: a chain network preset.
            options: as for the constructor (``chunk_size``, ``read_prices``, ``executor``, ``timeout``).

        Raises:
            InvalidOptions: the preset has neither an RPC URL nor a provider.
        """
        endpoint = network.provider if network.provider is not None else network.rpc_url
        if endpoint is None:
            raise InvalidOptions(f"network {network.name!r} has no RPC URL: set FABSTIR_RPC_URL", field="rpc_url")
        return cls(endpoint, dict(network.addresses), **options)

    def __repr__(self) -> str:
        registry = self.addresses["node_registry"]
        return f"<ChainRegistrySource {self._rpc.label} node_registry={registry} rpc_calls={self.rpc_calls}>"

    @property
    def rpc_calls(self) -> int:
        return self._rpc.round_trips

    @property
    def rpc_requests(self) -> int:
        return self._rpc.requests

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def rpc(self, method: str, params: Any) -> Any:
        """Send one raw JSON-RPC request to this source's endpoint and return its ``result`` (blocking).

        Raises:
            ConnectionFailed: the endpoint cannot be reached.
            ChainError: the endpoint answered with an error.
        """
        return self._rpc.request(method, params)

    async def recover_public_key(self, address: str, *, deadline: float | None = None) -> PublicKey:
        """Recover a registered host's public key from a transaction it signed (its registration).

        For hosts whose metadata publishes no ``publicKey`` (the production node's CLI writes none):
        see :func:`~fabstir_jupyter.hosts.keys.registration_key`, which this runs off the event
        loop against this source's NodeRegistry.

        Args:
            address: the host's registered address.
            deadline: a ``time.monotonic()`` reading after which a slow log search gives up.

        Raises:
            EncryptionError: ``ENCRYPTION_NOT_SUPPORTED``: no transaction signed by ``address`` was found.
            ConnectionFailed, ChainError: the endpoint failed.
        """
        from .keys import registration_key

        registry = self.addresses["node_registry"]
        assert registry is not None
        return await self._off_loop(lambda: registration_key(self.rpc, registry, address, deadline=deadline))

    async def discover(self) -> list[HostInfo]:
        """Return the active hosts in three round trips (see the module docstring).

        Raises:
            ConnectionFailed: the RPC endpoint cannot be reached.
            ChainError: the RPC endpoint answers with errors, or the registry's node list cannot be
                read (wrong address or chain?).
        """
        return await self._off_loop(self.discover_sync)

    async def sequential_discover(self, *, full: bool = False) -> list[HostInfo]:
        """Read the registry one call per round trip, as the production TypeScript SDK does.

        With ``full=False``: ``getAllActiveNodes`` then ``getNodeFullInfo`` per node (1 + N round
        trips); prices are the nodes' minimum prices and models are named by their 0x ids. With
        ``full=True`` it also reads every price and model one call at a time, giving exactly what
        :meth:`discover` gives.
        """
        return await self._off_loop(lambda: self.sequential_discover_sync(full=full))

    # -- blocking implementation, run in the executor

    def _node_list(self) -> list[str]:
        registry = self.addresses["node_registry"]
        assert registry is not None
        answer = self._rpc.call(registry, _encode("getAllActiveNodes()"))
        if isinstance(answer, ChainError):
            raise ChainError(f"registry {registry}: getAllActiveNodes failed: {answer.message}")
        try:
            return list(dict.fromkeys(_decode_addresses(answer)))
        except Exception as exc:
            raise ChainError(
                f"registry {registry}: getAllActiveNodes answered {len(answer)} bytes that do not decode "
                "(wrong address or chain?)"
            ) from exc

    def _aggregate(self, calls: Sequence[tuple[str, bytes]]) -> list[bytes | None]:
        """Run read calls in one round trip (chunked aggregate3s); ``None`` where a call failed."""
        if not calls:
            return []
        multicall = self.addresses["multicall"]
        if multicall is None:
            return [None if isinstance(r, ChainError) else r for r in self._rpc.call_many(calls)]
        from eth_abi import decode, encode

        chunks = [calls[i : i + self.chunk_size] for i in range(0, len(calls), self.chunk_size)]
        selector = _selector(AGGREGATE3)
        requests = [
            (multicall, selector + encode(["(address,bool,bytes)[]"], [[(to, True, data) for to, data in chunk]]))
            for chunk in chunks
        ]
        results: list[bytes | None] = []
        for chunk, answer in zip(chunks, self._rpc.call_many(requests), strict=True):
            decoded = None
            if not isinstance(answer, ChainError):
                try:
                    decoded = decode(["(bool,bytes)[]"], answer)[0]
                except Exception:
                    decoded = None
            if decoded is None or len(decoded) != len(chunk):
                why = answer.message if isinstance(answer, ChainError) else f"{len(answer)} bytes that do not decode"
                self._warn(f"multicall {multicall}: an aggregate3 of {len(chunk)} calls failed: {why}")
                results += [None] * len(chunk)
            else:
                results += [bytes(data) if ok else None for ok, data in decoded]
        return results

    def _warn(self, message: str) -> None:
        # each problem once per source: discovery repeats every cache period
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s", message)

    @staticmethod
    def _decoded(data: bytes | None, decoder: Callable[[bytes], Any]) -> Any:
        if data is None:
            return None
        try:
            return decoder(data)
        except Exception:
            return None

    def _price_calls(self, nodes: Iterable[NodeRecord]) -> list[tuple[NodeRecord, str, bytes]]:
        """One ``getHostModelPrices(node, token)`` per node and token: ``(node, token, call data)``."""
        tokens = [NATIVE_TOKEN] + ([self.addresses["stable_token"]] if self.addresses["stable_token"] else [])
        signature = "getHostModelPrices(address,address)"
        return [
            (node, token, _encode(signature, ("address", "address"), (node.address, token)))
            for node in nodes
            if node.model_ids
            for token in tokens
        ]

    def _model_calls(self, nodes: Iterable[NodeRecord]) -> list[str]:
        if self.addresses["model_registry"] is None:
            return []
        return list(dict.fromkeys(mid for node in nodes for mid in node.model_ids))

    def _get_model_calls(self, model_ids: Sequence[str]) -> list[tuple[str, bytes]]:
        model_registry = self.addresses["model_registry"]
        if model_registry is None:
            return []
        signature = "getModel(bytes32)"
        return [(model_registry, _encode(signature, ("bytes32",), (bytes.fromhex(m[2:]),))) for m in model_ids]

    def _assemble(
        self,
        records: Sequence[NodeRecord],
        price_calls: Sequence[tuple[NodeRecord, str, bytes]] | None,
        price_answers: Sequence[bytes | None],
        model_ids: Sequence[str],
        model_answers: Sequence[bytes | None],
    ) -> list[HostInfo]:
        prices: dict[tuple[str, str], tuple[int, int]] | None = None if price_calls is None else {}
        failed = 0
        for (node, token, _data), answer in zip(price_calls or (), price_answers, strict=True):
            assert prices is not None
            by_model = self._decoded(answer, _decode_host_prices)
            if by_model is None:  # the call failed: the node's minimum price stands in
                failed += 1
                minimum = node.min_price_native if token == NATIVE_TOKEN else node.min_price_stable
                by_model = dict.fromkeys(node.model_ids, minimum)
            for mid in node.model_ids:
                value = by_model.get(mid, 0)  # 0: not priced
                native, stable = prices.get((node.address, mid), (0, 0))
                prices[(node.address, mid)] = (value, stable) if token == NATIVE_TOKEN else (native, value)
        if failed:
            self._warn(
                f"registry {self.addresses['node_registry']}: getHostModelPrices failed for {failed} of "
                f"{len(price_answers)} (node, token) reads; those nodes' minimum prices stand in"
            )
        models = {}
        for mid, answer in zip(model_ids, model_answers, strict=True):
            record = self._decoded(answer, _decode_model)
            if record is not None:
                models[mid] = record
            elif answer is not None:
                self._warn(
                    f"model registry {self.addresses['model_registry']}: getModel answers do not decode as "
                    "production's struct; those models are named by their ids"
                )
        hosts = [build_host(record, prices=prices, models=models, warn=self._warn) for record in records]
        return [h for h in hosts if h is not None]

    def _records(self, nodes: Sequence[str], answers: Sequence[bytes | None]) -> list[NodeRecord]:
        records = []
        for address, answer in zip(nodes, answers, strict=True):
            record = self._decoded(answer, _decode_full_info)
            if record is None:
                self._warn(f"host {address}: getNodeFullInfo failed or did not decode; skipped")
            elif record.active and record.address == address:
                records.append(record)
        return records

    def discover_sync(self) -> list[HostInfo]:
        """Blocking :meth:`discover`, for a thread or a script."""
        registry = self.addresses["node_registry"]
        assert registry is not None
        nodes = self._node_list()
        if not nodes:
            return []
        info_calls = [(registry, _encode("getNodeFullInfo(address)", ("address",), (a,))) for a in nodes]
        info_answers = self._aggregate(info_calls)
        if all(a is None for a in info_answers):
            raise ChainError(f"registry {registry}: every getNodeFullInfo call failed")
        records = self._records(nodes, info_answers)
        price_calls = self._price_calls(records) if self.read_prices else []
        model_ids = self._model_calls(records)
        calls = [(registry, data) for _node, _token, data in price_calls] + self._get_model_calls(model_ids)
        answers = self._aggregate(calls)
        return self._assemble(
            records,
            price_calls if self.read_prices else None,
            answers[: len(price_calls)],
            model_ids,
            answers[len(price_calls) :],
        )

    def sequential_discover_sync(self, *, full: bool = False) -> list[HostInfo]:
        """Blocking :meth:`sequential_discover`: one call per round trip."""
        registry = self.addresses["node_registry"]
        assert registry is not None

        def one(to: str, data: bytes) -> bytes | None:
            answer = self._rpc.call(to, data)
            return None if isinstance(answer, ChainError) else answer

        nodes = self._node_list()
        infos = [one(registry, _encode("getNodeFullInfo(address)", ("address",), (a,))) for a in nodes]
        records = self._records(nodes, infos)
        if not full:
            hosts = [build_host(record, prices=None, models={}, warn=self._warn) for record in records]
            return [h for h in hosts if h is not None]
        price_calls = self._price_calls(records)
        price_answers = [one(registry, data) for _node, _token, data in price_calls]
        model_ids = self._model_calls(records)
        model_answers = [one(to, data) for to, data in self._get_model_calls(model_ids)]
        return self._assemble(records, price_calls, price_answers, model_ids, model_answers)
