"""An in-process EVM chain with the registry and payment contracts deployed: the local network's chain.

:class:`LocalChain` runs py-evm through eth-tester and web3's sync API, deploys a mock FAB token
and a mock USDC (``MockERC20``, 18 and 6 decimals), ``ModelRegistry``, ``NodeRegistry``,
``Multicall3``, ``HostEarnings`` and ``JobMarketplace`` from their committed artifacts (no compiler
needed), at the addresses :mod:`fabstir_jupyter.local.layout` computes before the chain exists,
and registers hosts, each with its own funded secp256k1 account whose compressed public key goes
into the metadata's ``publicKey``. Everything here blocks: an async caller runs it in a thread.

A host registers with the production functions only, in production's order (spec/PROTOCOL.md §8):
FAB ``approve``, ``registerNode`` (which pulls ``MIN_STAKE``), ``stake`` for the rest, then
``setModelTokenPricing`` per model and token. Only funding the account (gas, and FAB from the
token's ``mint``) is local.

The chain lives in the process that made it and vanishes with it. Reads go through
:attr:`LocalChain.provider`, which serves raw JSON-RPC requests and batches the way a node does,
so :class:`~fabstir_jupyter.hosts.registry.ChainRegistrySource` reads it like any endpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from eth_account import Account
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed
from eth_utils import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.providers.eth_tester import EthereumTesterProvider
from web3.providers.eth_tester.middleware import request_formatters, result_formatters
from web3.types import RPCEndpoint, Wei

from ..crypto import PrivateKey
from ..errors import InvalidOptions
from .contracts import load_artifact
from .layout import DEPLOYER, contract_addresses, derive_key, model_id

__all__ = [
    "LocalAccount", "LocalChain", "LocalChainError", "LocalHost", "LocalProvider", "NATIVE_TOKEN", "derive_key",
    "model_id",
]

TOKEN_DECIMALS: Final = 18
USDC_DECIMALS: Final = 6
#: The token address that stands for the chain's native token in prices.
NATIVE_TOKEN = "0x" + "00" * 20
_FUNDER_BALANCE = 10**12 * 10**18  # wei in each genesis account: gas for thousands of hosts
_GAS_ALLOWANCE = 10**18  # wei given to each host account for its transactions
_TX_GAS = 3_000_000  # explicit gas: web3 then skips estimate_gas (a second execution)
#: The marketplace's settings, as production's (spec/PROTOCOL.md §10): 10% to the treasury, and a
#: host may complete a job itself 30 s after its last proof.
FEE_BASIS_POINTS = 1000
DISPUTE_WINDOW = 30

ModelRef = str | tuple[str, str]
PricePair = tuple[int, int]


class LocalChainError(RuntimeError):
    """Raised when a local chain transaction reverts; the message holds the contract's reason."""


def _split_model(model: ModelRef) -> tuple[str, str]:
    if isinstance(model, tuple) and len(model) == 2 and all(isinstance(p, str) and p for p in model):
        return model
    if isinstance(model, str) and "/" in model.strip("/"):
        repo, _, file_name = model.strip().rpartition("/")
        return repo, file_name
    raise InvalidOptions(f"a model must be (repo, file) or 'repo/file', not {model!r}", field="models")


_MODEL_ID = re.compile(r"0x[0-9a-fA-F]{64}")


def _model_key(model: ModelRef) -> str:
    if isinstance(model, str) and _MODEL_ID.fullmatch(model.strip()):
        return model.strip().lower()
    return model_id(*_split_model(model))


def _wei(tokens: int | float | Decimal | str) -> int:
    # whole tokens → base units (18 decimals, FAB's)
    try:
        amount = Decimal(str(tokens)) * 10**TOKEN_DECIMALS
    except ArithmeticError:
        raise InvalidOptions(f"stake must be a number of tokens, not {tokens!r}", field="stake") from None
    if amount < 0 or amount != amount.to_integral_value():
        raise InvalidOptions(
            f"stake must be a non-negative amount with at most 18 decimals, not {tokens!r}", field="stake"
        )
    return int(amount)


#: Raw requests whose parameters and answers are translated between a node's names and eth-tester's.
_NODE_SHAPED = frozenset({"eth_getLogs", "eth_getTransactionByHash"})
#: Requests that run against the pending block: its timestamp is brought up to the wall clock first.
_PENDING_READERS = frozenset({"eth_call", "eth_estimateGas", "eth_sendRawTransaction", "eth_sendTransaction"})
#: web3's translations of eth-tester's results into a node's shapes, by method (web3 types it as optional).
_RESULT_FORMATTERS: dict[RPCEndpoint, Callable[..., Any]] = result_formatters or {}
_SENDS = frozenset({"eth_sendRawTransaction", "eth_sendTransaction"})
#: How far in the past the chain starts: room for its setup blocks, so that the clock is not ahead
#: of the wall when the first user transaction comes.
GENESIS_BACKDATE = 3600
#: Seconds between blocks on an idle chain (Base's block time): a read of the latest block that is
#: this far behind the wall clock mines an empty block first, as a live chain would have.
BLOCK_TIME = 2


class LocalProvider(EthereumTesterProvider):
    """eth-tester answering raw JSON-RPC requests as a node does.

    web3's own calls pass through eth-tester's middleware; a raw ``make_request`` (what
    :class:`~fabstir_jupyter.hosts.registry.ChainRegistrySource` sends) skips it, so this provider
    fills the ``from`` that eth-tester requires of ``eth_call``, translates the node's field names
    of ``eth_getLogs`` and ``eth_getTransactionByHash`` (camelCase, as a node speaks them) with
    that middleware's formatters, answers a revert with a JSON-RPC error instead of raising, and
    serves ``make_batch_request`` in order (one round trip). A lock keeps requests from several
    threads apart: py-evm is not thread-safe.

    Its clock follows the wall clock, so the contracts' time rules (2000 tokens/s, the dispute window,
    timeouts) run as on a live chain: a transaction's block (and a call or gas estimate, which run on
    the pending block) is stamped ``max(now, last + 1)``; a read of the latest block that lags the
    wall clock by :data:`BLOCK_TIME` seconds or more first mines an empty block at ``now`` (a live
    chain makes a block every few seconds whether or not anyone transacts). The chain's own setup
    (deploying, funding, registering: :meth:`setup`) is stamped ``last + 1`` from a genesis
    :data:`GENESIS_BACKDATE` seconds in the past, so registering many hosts does not push the clock
    ahead of the wall. Time travel (:meth:`LocalChain.advance_time`) only moves the clock ahead of
    the wall: it never goes back.
    """

    def __init__(self, ethereum_tester: EthereumTester, default_from: str) -> None:
        super().__init__(ethereum_tester)
        self._tester = ethereum_tester  # web3 types its own reference (ethereum_tester) as optional
        self.default_from = default_from
        self._lock = threading.RLock()
        self._setup_depth = 0  # > 0 while the chain's own setup transacts (see setup())

    def make_request(self, method: RPCEndpoint, params: Any) -> Any:
        needs_from = method in ("eth_call", "eth_estimateGas") and params and isinstance(params[0], dict)
        if needs_from and not params[0].get("from"):
            params = [{**params[0], "from": self.default_from}, *params[1:]]
        node_shaped = method in _NODE_SHAPED
        if node_shaped and method in request_formatters:
            params = request_formatters[method](params)
        with self._lock:
            if self._setup_depth:
                if method in _SENDS:
                    self._stamp_setup()
            elif method in _PENDING_READERS:
                self._follow_wall_clock()
            elif method == "eth_getBlockByNumber" and params and params[0] == "latest":
                self._produce_block_if_idle()
            try:
                response = super().make_request(method, params)
                if node_shaped and isinstance(response, dict) and "result" in response and method in _RESULT_FORMATTERS:
                    response = {**response, "result": _RESULT_FORMATTERS[method](response["result"])}
                return response
            except TransactionFailed as exc:
                self._current_request_id += 1
                return {
                    "jsonrpc": "2.0",
                    "id": str(self._current_request_id),
                    "error": {"code": 3, "message": str(exc)},
                }

    def _follow_wall_clock(self) -> int:
        """Stamp the pending block with the wall clock if it is behind; return its timestamp (lock held)."""
        chain = self._tester.backend.chain
        now = int(time.time())
        if chain.header.timestamp < now:
            chain.header = chain.header.copy(timestamp=now)
        return int(chain.header.timestamp)

    @contextlib.contextmanager
    def setup(self) -> Iterator[None]:
        """Hold the chain for its own setup: transactions sent meanwhile (from this thread) are
        stamped one second after the latest block, whatever the wall clock says, and no idle block is
        produced; other threads wait."""
        with self._lock:
            self._setup_depth += 1
            try:
                yield
            finally:
                self._setup_depth -= 1

    def _stamp_setup(self) -> None:
        """Stamp the pending block one second after the latest (lock held): setup takes no wall time."""
        chain = self._tester.backend.chain
        chain.header = chain.header.copy(timestamp=chain.get_canonical_head().timestamp + 1)

    def _produce_block_if_idle(self) -> None:
        """Mine an empty block when the latest one lags the wall clock by BLOCK_TIME or more (lock held)."""
        latest = self._tester.backend.chain.get_canonical_head()
        if time.time() - latest.timestamp >= BLOCK_TIME:
            self._follow_wall_clock()
            self._tester.mine_blocks(1)

    def make_batch_request(self, requests: list[tuple[Any, Any]]) -> list[Any]:
        with self._lock:
            return [self.make_request(method, params) for method, params in requests]

    @property
    def lock(self) -> threading.RLock:
        """The lock every request holds; hold it too to drive the tester directly (time travel)."""
        return self._lock


@dataclass(frozen=True)
class LocalHost:
    """A host registered on a :class:`LocalChain`: its account, URL and offer as registered."""

    address: str
    api_url: str
    public_key: str  # compressed secp256k1 key, 66 hex characters, as published in metadata
    model_ids: tuple[str, ...]
    stake_wei: int
    metadata: str
    private_key: str = field(repr=False)  # 0x-hex; never printed

    @property
    def stake(self) -> float:
        """The stake in whole tokens."""
        return self.stake_wei / 10**TOKEN_DECIMALS


@dataclass(frozen=True)
class LocalAccount:
    """A funded account of a :class:`LocalChain` that signs its own transactions (a user's wallet)."""

    address: str
    private_key: str = field(repr=False)  # 0x-hex; never printed


class LocalChain:
    """An in-process EVM chain with the registry and payment contracts deployed.

    Deploys a mock FAB (18 decimals) that hosts stake, a mock USDC (6 decimals), ``ModelRegistry``,
    ``NodeRegistry``, ``Multicall3``, ``HostEarnings`` and ``JobMarketplace`` (10% fee, 30 s
    dispute window, USDC accepted; the deployer is owner and treasury), and authorizes the
    marketplace to credit host earnings.

    Args:
        minimum_stake: whole FAB a node must stake to register (the registry's ``MIN_STAKE``).
        stable_token: the address that stands for the stable token in prices (default: the mock
            USDC, which the marketplace accepts; another address is only a price key).
        seed: derive host keys from this seed (reproducible addresses) instead of at random.

    Attributes:
        w3: a sync :class:`web3.Web3` on :attr:`provider`.
        addresses: ``node_registry``, ``model_registry``, ``multicall``, ``stable_token`` (the mock
            USDC), ``fab_token``, ``job_marketplace`` and ``host_earnings``.
        fab_token, usdc, node_registry, model_registry, multicall, host_earnings, job_marketplace:
            the contracts (web3).
        hosts: the hosts registered so far, in order.
    """

    def __init__(
        self, *, minimum_stake: int | float = 0, stable_token: str | None = None, seed: int | None = None
    ) -> None:
        state = PyEVMBackend.generate_genesis_state(overrides={"balance": _FUNDER_BALANCE}, num_accounts=2)
        genesis = PyEVMBackend.generate_genesis_params(overrides={"timestamp": int(time.time()) - GENESIS_BACKDATE})
        self.tester = EthereumTester(PyEVMBackend(genesis_parameters=genesis, genesis_state=state))
        self.deployer = self.tester.get_accounts()[0]
        self.provider = LocalProvider(self.tester, default_from=self.deployer)
        self.w3 = Web3(self.provider)
        self.w3.eth.default_account = self.deployer
        self.chain_id = self.w3.eth.chain_id
        self._seed = seed
        self._counter = itertools.count()
        self._known_models: set[str] = set()
        self.hosts: list[LocalHost] = []
        self.minimum_stake_wei = _wei(minimum_stake)
        fab_token = self._deploy("MockERC20", "Fabstir Token (local)", "FAB", TOKEN_DECIMALS)
        usdc = self._deploy("MockERC20", "USD Coin (local)", "USDC", USDC_DECIMALS)
        model_registry = self._deploy("ModelRegistry")
        node_registry = self._deploy("NodeRegistry", fab_token.address, model_registry.address, self.minimum_stake_wei)
        multicall = self._deploy("Multicall3")
        host_earnings = self._deploy("HostEarnings")
        job_marketplace = self._deploy(
            "JobMarketplace", node_registry.address, host_earnings.address, FEE_BASIS_POINTS, DISPUTE_WINDOW,
            usdc.address,
        )
        deployed = {"fab_token": fab_token, "usdc": usdc, "model_registry": model_registry,
                    "node_registry": node_registry, "multicall": multicall, "host_earnings": host_earnings,
                    "job_marketplace": job_marketplace}
        expected = contract_addresses()  # what the local network gave its hosts before this chain existed
        wrong = {name: contract.address for name, contract in deployed.items() if contract.address != expected[name]}
        if self.deployer != DEPLOYER or wrong:
            raise LocalChainError(f"the local chain deployed from {self.deployer} to {wrong}, not from {DEPLOYER} to "
                                  f"the addresses layout.contract_addresses() gives")
        authorize = host_earnings.functions.setAuthorizedCaller(job_marketplace.address, True)
        self._transact(authorize, self.deployer, "authorize the marketplace in HostEarnings")
        self.fab_token = fab_token
        self.usdc = usdc
        self.model_registry = model_registry
        self.node_registry = node_registry
        self.multicall = multicall
        self.host_earnings = host_earnings
        self.job_marketplace = job_marketplace
        self.addresses: dict[str, str] = {
            "node_registry": node_registry.address,
            "model_registry": model_registry.address,
            "multicall": multicall.address,
            "stable_token": to_checksum_address(stable_token) if stable_token else usdc.address,
            "fab_token": fab_token.address,
            "job_marketplace": job_marketplace.address,
            "host_earnings": host_earnings.address,
        }

    def __repr__(self) -> str:
        registry = self.addresses["node_registry"]
        return f"<LocalChain chain_id={self.chain_id} hosts={len(self.hosts)} node_registry={registry}>"

    def __enter__(self) -> LocalChain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget the hosts; the chain itself is garbage-collected with this object."""
        self.hosts.clear()

    # ------------------------------------------------------------------ transactions

    def _deploy(self, name: str, *args: Any) -> Any:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx = {"from": self.deployer, "gas": 10_000_000}
        tx_hash = self._send(lambda: factory.constructor(*args).transact(tx), f"deploy {name}")
        receipt = self.w3.eth.get_transaction_receipt(tx_hash)
        return self.w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"])

    def _send(self, transact: Any, what: str) -> Any:
        try:
            with self.provider.setup():  # the chain's own setup takes no time on its clock
                return transact()
        except (ContractLogicError, Web3RPCError, TransactionFailed) as exc:
            raise LocalChainError(f"{what}: {getattr(exc, 'message', None) or exc}") from exc

    def _transact(self, fn: Any, sender: str, what: str, value: int = 0) -> Any:
        tx = {"from": sender, "value": value, "gas": _TX_GAS}
        tx_hash = self._send(lambda: fn.transact(tx), what)
        receipt = self.w3.eth.get_transaction_receipt(tx_hash)
        if receipt["status"] != 1:
            # eth-tester mines a reverted transaction; replay it as a call for the reason
            self._send(lambda: fn.call(tx, block_identifier=receipt["blockNumber"] - 1), what)
            raise LocalChainError(f"{what}: reverted")
        return receipt

    def _new_key(self) -> str:
        return derive_key(self._seed, next(self._counter))

    # ------------------------------------------------------------------ time

    @property
    def timestamp(self) -> int:
        """The latest block's timestamp (seconds)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    @property
    def next_timestamp(self) -> int:
        """The timestamp the next transaction's block would have now (eth-tester mines one per transaction)."""
        with self.provider.lock:
            return self.provider._follow_wall_clock()

    def advance_time(self, seconds: int) -> int:
        """Move the clock: the next transaction's block lands ``seconds`` later than it would have now.

        Tests use this instead of sleeping (eth-tester's time travel mines an empty block). The
        clock then runs ahead of the wall clock by ``seconds`` until the wall catches up.
        Returns the new :attr:`next_timestamp`.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
            raise InvalidOptions(f"seconds must be a positive integer, not {seconds!r}", field="seconds")
        with self.provider.lock:
            target = self.provider._follow_wall_clock() + seconds
            self.tester.time_travel(target)  # mines an empty block at target - 1; the next one is at target
            return int(self.tester.get_block_by_number("pending")["timestamp"])

    # ------------------------------------------------------------------ accounts and balances

    def native_balance(self, address: str) -> int:
        """The native balance of an address, in wei."""
        return int(self.w3.eth.get_balance(to_checksum_address(address)))

    def usdc_balance(self, address: str) -> int:
        """The mock USDC an address holds, in base units (6 decimals)."""
        return int(self.usdc.functions.balanceOf(to_checksum_address(address)).call())

    def fund(self, address: str, *, native: int = 0, usdc: int = 0) -> None:
        """Send ``native`` wei from the deployer and mint ``usdc`` base units of mock USDC to ``address``."""
        address = to_checksum_address(address)
        if native > 0:
            self._send(
                lambda: self.w3.eth.send_transaction(
                    {"from": self.deployer, "to": address, "value": Wei(native), "gas": 21_000}
                ),
                f"fund {address}",
            )
        if usdc > 0:
            self._transact(self.usdc.functions.mint(address, usdc), self.deployer, f"mint USDC to {address}")

    def create_account(self, *, native: int = 0, usdc: int = 0, private_key: str | None = None) -> LocalAccount:
        """Make a funded account that signs its own transactions (it is not unlocked in the tester).

        Args:
            native: wei to send it.
            usdc: mock USDC base units (6 decimals) to mint to it.
            private_key: its key (0x-hex); default a fresh one.
        """
        account = Account.from_key(private_key) if private_key else Account.create()
        self.fund(account.address, native=native, usdc=usdc)
        return LocalAccount(address=account.address, private_key=account.key.to_0x_hex())

    # ------------------------------------------------------------------ models

    def add_model(self, repo: str, file_name: str, *, sha256: bytes | str | None = None) -> str:
        """Add a trusted model to the ModelRegistry (unless there) and return its id as ``0x`` hex."""
        mid = model_id(repo, file_name)
        if mid in self._known_models:
            return mid
        registered = self.model_registry.functions.getModel(bytes.fromhex(mid[2:])).call()
        if registered[5] == 0:  # no timestamp: not added yet
            digest = bytes.fromhex(sha256.removeprefix("0x")) if isinstance(sha256, str) else (sha256 or bytes(32))
            fn = self.model_registry.functions.addTrustedModel(repo, file_name, digest.rjust(32, b"\0"))
            self._transact(fn, self.deployer, f"addTrustedModel {repo}/{file_name}")
        self._known_models.add(mid)
        return mid

    # ------------------------------------------------------------------ FAB

    def fab_balance(self, address: str) -> int:
        """The FAB an address holds, in base units (18 decimals)."""
        return int(self.fab_token.functions.balanceOf(to_checksum_address(address)).call())

    def _fund_fab(self, address: str, amount: int) -> None:
        # mint to the host, which lets the registry pull it (approve): production's staking path
        if amount <= 0:
            return
        self._transact(self.fab_token.functions.mint(address, amount), self.deployer, f"mint FAB to {address}")
        approve = self.fab_token.functions.approve(self.addresses["node_registry"], amount)
        self._transact(approve, address, f"approve FAB {address}")

    # ------------------------------------------------------------------ hosts

    def register_host(
        self,
        api_url: str,
        *,
        models: Iterable[ModelRef] = (),
        stake: int | float | Decimal = 1000,
        prices: PricePair | Mapping[ModelRef, PricePair] = (0, 0),
        metadata: Mapping[str, Any] | str | None = None,
        region: str | None = None,
        name: str | None = None,
        private_key: str | None = None,
        publish_key: bool = True,
    ) -> LocalHost:
        """Register a host with its own funded account, staking ``stake`` whole FAB.

        The host approves the registry for its stake, calls ``registerNode`` (which pulls
        ``MIN_STAKE``), ``stake`` for the rest, and ``setModelTokenPricing`` for every non-zero
        price: the production sequence.

        Args:
            api_url: the host's ``http(s)://`` URL, as the registry stores it.
            models: the models it serves (at least one), ``(repo, file)`` or ``"repo/file"``;
                each is added to the ModelRegistry if new.
            stake: whole FAB (18 decimals), at least the registry's minimum.
            prices: ``(native, stable)`` for every model, or ``{model: (native, stable)}`` per
                model. Each non-zero price is set with ``setModelTokenPricing``; a zero one is
                left unset (not priced). The node's recorded minimum prices are the smallest
                non-zero price of each token. Raw units, precision factor 1000.
            metadata: a mapping merged over the generated metadata (``name``, ``location``,
                ``publicKey``), or a string stored verbatim (e.g. invalid JSON, for tests).
            region: stored as the metadata ``location``.
            name: the metadata ``name`` (default ``local-host-<n>``).
            private_key: the host's key (0x-hex); default a fresh one.
            publish_key: put the host's ``publicKey`` in the generated metadata; ``False`` leaves
                it out, as the production node's own CLI does (clients then recover the key from
                this registration transaction).

        Raises:
            InvalidOptions: a malformed model or price, no model, or a stake below the minimum.
            LocalChainError: the registration reverted (e.g. already registered).
        """
        stake_wei = _wei(stake)
        if stake_wei < self.minimum_stake_wei:
            raise InvalidOptions(
                f"stake {stake} is below the registry's minimum of {self.minimum_stake_wei / 10**TOKEN_DECIMALS:g}",
                field="stake",
            )
        pairs = [_split_model(m) for m in models]
        if not pairs:
            raise InvalidOptions("a host must serve at least one model", field="models")
        ids = [model_id(repo, file_name) for repo, file_name in pairs]
        per_model = self._prices(prices, ids)  # checked before any transaction or key
        min_native = min((native for native, _stable in per_model if native), default=0)
        min_stable = min((stable for _native, stable in per_model if stable), default=0)
        key = private_key or self._new_key()
        account = Account.from_key(key)
        public_key = PrivateKey.from_bytes(bytes(account.key)).public_key.compressed.hex()
        if isinstance(metadata, str):
            text = metadata
        else:
            fields: dict[str, Any] = {"name": name or f"local-host-{len(self.hosts)}"}
            if publish_key:
                fields["publicKey"] = public_key
            if region is not None:
                fields["location"] = region
            fields.update(metadata or {})
            text = json.dumps(fields, separators=(",", ":"))
        if account.address not in self.tester.get_accounts():
            self.tester.add_account(account.key.to_0x_hex())
        self._send(
            lambda: self.w3.eth.send_transaction(
                {"from": self.deployer, "to": account.address, "value": Wei(_GAS_ALLOWANCE), "gas": 21_000}
            ),
            f"fund {account.address}",
        )
        for repo, file_name in pairs:
            self.add_model(repo, file_name)
        self._fund_fab(account.address, stake_wei)
        registry = self.node_registry.functions
        fn = registry.registerNode(text, api_url, [bytes.fromhex(i[2:]) for i in ids], min_native, min_stable)
        self._transact(fn, account.address, f"registerNode {account.address}")
        if stake_wei > self.minimum_stake_wei:
            extra = stake_wei - self.minimum_stake_wei
            self._transact(registry.stake(extra), account.address, f"stake {account.address}")
        stable_token = self.addresses["stable_token"]
        for mid, (native, stable) in zip(ids, per_model, strict=True):
            for token, price in ((NATIVE_TOKEN, native), (stable_token, stable)):
                if price:
                    self.set_model_token_pricing(account.address, mid, token, price)
        host = LocalHost(
            address=account.address,
            api_url=api_url,
            public_key=public_key,
            model_ids=tuple(ids),
            stake_wei=stake_wei,
            metadata=text,
            private_key=account.key.to_0x_hex(),
        )
        self.hosts.append(host)
        return host

    @staticmethod
    def _prices(prices: PricePair | Mapping[ModelRef, PricePair], ids: Sequence[str]) -> list[tuple[int, int]]:
        # (native, stable) for each model id, in order
        def pair(value: Any) -> tuple[int, int]:
            if (
                isinstance(value, (tuple, list))
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            ):
                return int(value[0]), int(value[1])
            raise InvalidOptions(
                f"a price must be (native, stable) non-negative integers, not {value!r}", field="prices"
            )

        if not isinstance(prices, Mapping):
            return [pair(prices)] * len(ids)
        by_id: dict[str, tuple[int, int]] = {}
        for model, value in prices.items():
            by_id[_model_key(model)] = pair(value)
        unknown = set(by_id) - set(ids)
        if unknown:
            raise InvalidOptions(f"prices name models the host does not serve: {sorted(unknown)}", field="prices")
        return [by_id.get(i, (0, 0)) for i in ids]

    @staticmethod
    def _host(host: LocalHost | str) -> str:
        return host.address if isinstance(host, LocalHost) else to_checksum_address(host)

    def deactivate_host(self, host: LocalHost | str) -> None:
        """Take a host off the active list (it stays registered, stake kept)."""
        address = self._host(host)
        self._transact(self.node_registry.functions.deactivateNode(), address, f"deactivateNode {address}")

    def reactivate_host(self, host: LocalHost | str) -> None:
        """Put a deactivated host back on the active list."""
        address = self._host(host)
        self._transact(self.node_registry.functions.reactivateNode(), address, f"reactivateNode {address}")

    def unregister_host(self, host: LocalHost | str) -> None:
        """Remove a host; the registry returns its FAB stake."""
        address = self._host(host)
        self._transact(self.node_registry.functions.unregisterNode(), address, f"unregisterNode {address}")
        self.hosts = [h for h in self.hosts if h.address != address]

    def update_metadata(self, host: LocalHost | str, metadata: Mapping[str, Any] | str) -> None:
        """Replace a host's metadata (a mapping is stored as compact JSON, a string verbatim)."""
        address = self._host(host)
        text = metadata if isinstance(metadata, str) else json.dumps(dict(metadata), separators=(",", ":"))
        self._transact(self.node_registry.functions.updateMetadata(text), address, f"updateMetadata {address}")

    def add_stake(self, host: LocalHost | str, tokens: int | float | Decimal | str) -> None:
        """Add whole FAB to a host's stake: minted to the host, approved, then ``stake``."""
        address = self._host(host)
        amount = _wei(tokens)
        self._fund_fab(address, amount)
        self._transact(self.node_registry.functions.stake(amount), address, f"stake {address}")

    def set_model_token_pricing(self, host: LocalHost | str, model: ModelRef, token: str, price: int) -> None:
        """Set a host's price for a model it serves in ``token`` (:data:`NATIVE_TOKEN`: native); 0 unsets it."""
        address = self._host(host)
        mid = _model_key(model)
        fn = self.node_registry.functions.setModelTokenPricing(bytes.fromhex(mid[2:]), to_checksum_address(token),
                                                               price)
        self._transact(fn, address, f"setModelTokenPricing {address}")
