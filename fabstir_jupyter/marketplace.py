"""Paid sessions on chain: a small sync client for the JobMarketplace and HostEarnings contracts.

Both sides of a paid session use it (spec/PROTOCOL.md §10): the client opens and settles jobs, the
host proves the tokens it served, settles and withdraws its earnings. It speaks standard JSON-RPC
through web3 (an ``http(s)://`` URL, or a ``web3.Web3`` for an in-process chain), signs every
transaction with the caller's own key (:class:`~fabstir_jupyter.crypto.PrivateKey`), waits for
receipts with a timeout, and turns refusals into coded errors:

- a revert keeps the contract's reason (``"Low price"``, ``"Not host"``…) on a
  :class:`~fabstir_jupyter.errors.TransactionFailed` (retryable where time lifts it: ``"Too many"``
  tokens per second, ``"Dispute wait"``, ``"Not timeout"``);
- a proof past what the deposit pays for (``"Over dep"``) is
  :class:`~fabstir_jupyter.errors.BudgetExceeded`;
- too little balance or allowance for a deposit or gas is
  :class:`~fabstir_jupyter.errors.InsufficientFunds`;
- an unreachable endpoint is :class:`~fabstir_jupyter.errors.ConnectionFailed`.

A transaction left unmined for ``replace_after`` seconds (priced under a fee spike) is sent again
with the same nonce and fees raised by a quarter, up to :data:`MAX_REPLACEMENTS` times; whichever of
them is mined is the transaction's outcome.

Layering: it imports only :mod:`.errors`, :mod:`.crypto`, :mod:`.urls` and :mod:`.chainlogs` (plus
web3), so the reference host, which uses nothing above errors/config/protocol, can import it as
well as the client. The ABI below is production's, signature for signature (tests/chain holds it to
spec/production-abi.txt). Everything blocks: async callers run it in a thread.

Amounts are integers in base units (wei, or the token's units: USDC has 6 decimals); prices carry
the precision factor :data:`PRICE_PRECISION`: cost = tokens × price / 1000.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from .chainlogs import LOG_WINDOW, search_logs
from .crypto import PrivateKey
from .errors import (
    BudgetExceeded,
    ConnectionFailed,
    FabstirError,
    InsufficientFunds,
    InvalidOptions,
    SessionNotFound,
    TransactionFailed,
)
from .urls import hide_rpc_url_in_logs, hide_rpc_urls, redact_url

try:
    import requests
    from eth_typing import ChecksumAddress, HexStr
    from eth_utils import to_checksum_address
    from web3 import Web3
    from web3.exceptions import (
        ContractLogicError,
        TransactionIndexingInProgress,
        TransactionNotFound,
        Web3RPCError,
    )
    from web3.logs import DISCARD
    from web3.types import TxReceipt
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("paid sessions need the chain extra: pip install 'fabstir-jupyter[chain]'") from exc

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

T = TypeVar("T")
logger = logging.getLogger("fabstir_jupyter.chain")

__all__ = [
    "NATIVE_TOKEN",
    "PRICE_PRECISION",
    "MAX_REPLACEMENTS",
    "RECEIPT_POLL_FAILURES",
    "JobStatus",
    "SessionJob",
    "ProofSubmission",
    "OpenedJob",
    "Settlement",
    "MarketplaceClient",
    "MARKETPLACE_ABI",
    "HOST_EARNINGS_ABI",
    "NODE_REGISTRY_ABI",
    "ERC20_ABI",
    "max_tokens",
    "job_cost",
    "deposit_for",
]

#: The token address that stands for the chain's native token.
NATIVE_TOKEN = "0x" + "00" * 20
#: Prices are per 1000 tokens: cost = tokens × price / PRICE_PRECISION.
PRICE_PRECISION = 1000
#: Production SDK defaults (spec/PROTOCOL.md §10).
DEFAULT_PROOF_INTERVAL = 1000
DEFAULT_MAX_DURATION = 3600
DEFAULT_PROOF_TIMEOUT_WINDOW = 300

# Contract refusals that may pass with time: the proof rate, the host's dispute window, the timeout.
_RETRY_LATER = frozenset({"Too many", "Dispute wait", "Not timeout"})
#: How many times an unmined transaction is sent again with higher fees (same nonce).
MAX_REPLACEMENTS = 4
#: Each replacement's fees over the last one's (nodes want at least +10 %).
_FEE_BUMP = (5, 4)
#: Receipt polls failing in a row before the wait gives up (fewer are a passing blip of the endpoint).
RECEIPT_POLL_FAILURES = 3
_OVER_DEPOSIT = "Over dep"
_NO_FUNDS = re.compile(
    r"balance too low|allowance too low|insufficient (funds|balance|allowance)|exceeds (balance|allowance)"
    r"|not have enough (funds|balance)|cannot afford", re.I,
)


# ---------------------------------------------------------------------------- arithmetic (pure)


def max_tokens(deposit: int, price_per_token: int) -> int:
    """The tokens a deposit pays for at a price: ``deposit × 1000 // price`` (the contract's bound)."""
    return deposit * PRICE_PRECISION // price_per_token


def job_cost(tokens: int, price_per_token: int) -> int:
    """What ``tokens`` cost at a price: ``tokens × price // 1000`` (the contract's settlement)."""
    return tokens * price_per_token // PRICE_PRECISION


def deposit_for(tokens: int, price_per_token: int) -> int:
    """The smallest deposit that pays for ``tokens`` at a price (``max_tokens`` of it is ≥ ``tokens``)."""
    return -(-tokens * price_per_token // PRICE_PRECISION)


# ---------------------------------------------------------------------------- the ABI (production's)


def _params(text: str, *, event: bool = False) -> list[dict[str, Any]]:
    params = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        words = item.split()
        entry: dict[str, Any] = {"type": words[0], "name": words[-1] if len(words) > 1 else ""}
        if event:
            entry["indexed"] = "indexed" in words[1:-1]
        params.append(entry)
    return params


def _function(signature: str, mutability: str, outputs: str = "") -> dict[str, Any]:
    name, _, inputs = signature.partition("(")
    return {"type": "function", "name": name, "inputs": _params(inputs.rstrip(")")),
            "outputs": _params(outputs), "stateMutability": mutability}


def _event(signature: str) -> dict[str, Any]:
    name, _, inputs = signature.partition("(")
    return {"type": "event", "name": name, "inputs": _params(inputs.rstrip(")"), event=True), "anonymous": False}


_SESSION_JOB_FIELDS = (
    "uint256 id,address depositor,address host,address paymentToken,uint256 deposit,uint256 pricePerToken,"
    "uint256 tokensUsed,uint256 maxDuration,uint256 startTime,uint256 lastProofTime,uint256 proofInterval,"
    "uint256 proofTimeoutWindow,uint8 status,uint256 withdrawnByHost,uint256 refundedToUser,"
    "string conversationCID,bytes32 lastProofHash,string lastProofCID"
)

#: What this client calls and reads of the JobMarketplace, as production declares it.
MARKETPLACE_ABI: list[dict[str, Any]] = [
    _function("createSessionJobForModel(address host,bytes32 modelId,uint256 pricePerToken,uint256 maxDuration,"
              "uint256 proofInterval,uint256 proofTimeoutWindow)", "payable", "uint256 jobId"),
    _function("createSessionJobForModelWithToken(address host,bytes32 modelId,address token,uint256 deposit,"
              "uint256 pricePerToken,uint256 maxDuration,uint256 proofInterval,uint256 proofTimeoutWindow)",
              "nonpayable", "uint256 jobId"),
    _function("submitProofOfWork(uint256 jobId,uint256 tokensClaimed,bytes32 proofHash,string proofCID,"
              "string deltaCID)", "nonpayable"),
    _function("completeSessionJob(uint256 jobId,string conversationCID)", "nonpayable"),
    _function("triggerSessionTimeout(uint256 jobId)", "nonpayable"),
    _function("sessionJobs(uint256)", "view", _SESSION_JOB_FIELDS),
    _function("sessionModel(uint256)", "view", "bytes32"),
    _function("getProofSubmission(uint256 sessionId,uint256 proofIndex)", "view",
              "bytes32 proofHash,uint256 tokensClaimed,uint256 timestamp,bool verified,string deltaCID"),
    _function("getDepositBalance(address account,address token)", "view", "uint256"),
    _function("withdrawNative(uint256 amount)", "nonpayable"),
    _function("withdrawToken(address token,uint256 amount)", "nonpayable"),
    _function("MIN_DEPOSIT()", "view", "uint256"),
    _function("USDC_MIN_DEPOSIT()", "view", "uint256"),
    _function("PRICE_PRECISION()", "view", "uint256"),
    _function("tokenMinDeposits(address)", "view", "uint256"),
    _function("feeBasisPoints()", "view", "uint256"),
    _function("disputeWindow()", "view", "uint256"),
    _function("nodeRegistry()", "view", "address"),
    _function("nextJobId()", "view", "uint256"),
    _function("hostEarnings()", "view", "address"),
    _function("treasuryAddress()", "view", "address"),
    _function("accumulatedTreasuryNative()", "view", "uint256"),
    _function("accumulatedTreasuryTokens(address)", "view", "uint256"),
    _event("SessionJobCreated(uint256 indexed jobId,address indexed depositor,address indexed host,uint256 deposit)"),
    _event("SessionJobCreatedForModel(uint256 indexed jobId,address indexed depositor,address indexed host,"
           "bytes32 modelId,uint256 deposit)"),
    _event("ProofSubmitted(uint256 indexed jobId,address indexed host,uint256 tokensClaimed,bytes32 proofHash,"
           "string proofCID,string deltaCID)"),
    _event("SessionCompleted(uint256 indexed jobId,uint256 totalTokensUsed,uint256 hostEarnings,uint256 userRefund)"),
    _event("SessionCompletedBy(uint256 indexed jobId,address indexed completedBy,uint256 tokensUsed,"
           "uint256 paymentAmount,uint256 refundAmount)"),
    _event("SessionTimedOut(uint256 indexed jobId,uint256 hostEarnings,uint256 userRefund)"),
    _event("RefundCreditedToDeposit(uint256 indexed jobId,address indexed depositor,uint256 amount,"
           "address indexed token)"),
]

#: What this client calls and reads of HostEarnings, as production declares it.
HOST_EARNINGS_ABI: list[dict[str, Any]] = [
    _function("getBalance(address,address)", "view", "uint256"),
    _function("withdraw(uint256,address)", "nonpayable"),
    _function("withdrawAll(address)", "nonpayable"),
    _event("EarningsCredited(address indexed host,address indexed token,uint256 amount,uint256 newBalance)"),
    _event("EarningsWithdrawn(address indexed host,address indexed token,uint256 amount,uint256 remainingBalance)"),
]

#: What a host and a depositor read of the NodeRegistry the marketplace names (production's signatures).
NODE_REGISTRY_ABI: list[dict[str, Any]] = [
    _function("isActiveNode(address)", "view", "bool"),
    _function("getModelPricing(address operator,bytes32 modelId,address token)", "view", "uint256"),
]

#: The ERC-20 functions a deposit in a token needs.
ERC20_ABI: list[dict[str, Any]] = [
    _function("approve(address spender,uint256 amount)", "nonpayable", "bool"),
    _function("allowance(address owner,address spender)", "view", "uint256"),
    _function("balanceOf(address account)", "view", "uint256"),
    _function("decimals()", "view", "uint8"),
]


# ---------------------------------------------------------------------------- what it returns


class JobStatus(enum.IntEnum):
    """A job's ``status`` on chain."""

    ACTIVE = 0
    COMPLETED = 1
    TIMED_OUT = 2


@dataclass(frozen=True)
class SessionJob:
    """A job as ``sessionJobs(jobId)`` returns it (amounts in base units, times in seconds)."""

    id: int
    depositor: str
    host: str
    payment_token: str  # NATIVE_TOKEN for the native token
    deposit: int
    price_per_token: int
    tokens_used: int
    max_duration: int
    start_time: int
    last_proof_time: int
    proof_interval: int
    proof_timeout_window: int
    status: JobStatus
    withdrawn_by_host: int
    refunded_to_user: int
    conversation_cid: str
    last_proof_hash: str  # 0x hex
    last_proof_cid: str

    @classmethod
    def from_values(cls, values: Any) -> SessionJob:
        """Build it from the 18 values of ``sessionJobs``, in order."""
        v = list(values)
        if len(v) != 18:
            raise ValueError(f"sessionJobs returns 18 values, not {len(v)}")
        deposit, price, used, duration, start, last_proof, interval, window = map(int, v[4:12])
        return cls(int(v[0]), to_checksum_address(v[1]), to_checksum_address(v[2]), to_checksum_address(v[3]),
                   deposit, price, used, duration, start, last_proof, interval, window,
                   JobStatus(int(v[12])), int(v[13]), int(v[14]), str(v[15]), "0x" + bytes(v[16]).hex(), str(v[17]))

    @property
    def native(self) -> bool:
        """Whether the deposit is in the native token."""
        return int(self.payment_token, 16) == 0

    @property
    def active(self) -> bool:
        """Whether the job is still open (neither completed nor timed out)."""
        return self.status is JobStatus.ACTIVE

    @property
    def max_tokens(self) -> int:
        """The tokens the deposit pays for."""
        return max_tokens(self.deposit, self.price_per_token)

    @property
    def remaining_tokens(self) -> int:
        """The tokens that may still be proven."""
        return self.max_tokens - self.tokens_used

    @property
    def cost(self) -> int:
        """What the proven tokens cost so far (before the minimum billing of settlement)."""
        return job_cost(self.tokens_used, self.price_per_token)


@dataclass(frozen=True)
class ProofSubmission:
    """One proof of a job, as ``getProofSubmission`` returns it."""

    proof_hash: str
    tokens_claimed: int
    timestamp: int
    verified: bool
    delta_cid: str


@dataclass(frozen=True)
class OpenedJob:
    """A job just created: its id (from ``SessionJobCreated``), terms and block (where its events start)."""

    job_id: int
    tx_hash: str
    depositor: str
    host: str
    model_id: str
    token: str
    deposit: int
    price_per_token: int
    block_number: int | None = None


@dataclass(frozen=True)
class Settlement:
    """A job's settlement, from ``SessionCompleted`` / ``SessionCompletedBy`` / ``SessionTimedOut``.

    ``payment`` is the gross cost of the billed tokens; ``treasury_fee`` went to the treasury,
    ``host_earnings`` to the host's HostEarnings balance, ``refund`` back to the depositor
    (``refund_credited``: to its deposit balance in the marketplace, the transfer having failed).
    """

    job_id: int
    tx_hash: str
    tokens_used: int
    payment: int
    host_earnings: int
    refund: int
    timed_out: bool
    refund_credited: bool = False
    completed_by: str | None = None  # who sent the settling transaction
    block_number: int | None = None

    @property
    def treasury_fee(self) -> int:
        """What the treasury kept of the payment (the payment less the host's earnings)."""
        return self.payment - self.host_earnings if self.payment >= self.host_earnings else 0


# ---------------------------------------------------------------------------- the client


def _redacted(url: str) -> str:
    # RPC URLs often carry an API key in the path or query: show only scheme, host and port
    return redact_url(url, keep_path=False) or "rpc"


class _Sender:
    """One account's transactions in this process: sent one at a time, their nonces tracked.

    The nonce of a transaction is the larger of the node's ``pending`` count and one past the
    nonces this process sent whose receipts it still awaits: a load-balanced endpoint may answer
    the count from a node that has not seen the last transaction yet, and two clients of one key
    (two SDKs in a kernel) would otherwise take the same nonce. A nonce leaves the set once its
    receipt came or its wait failed (a dropped transaction must not hold later ones back).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._waiting: dict[int, set[int]] = {}  # chain id -> nonces sent, receipts not read yet

    def nonce(self, chain_id: int, counted: int) -> int:
        waiting = self._waiting.get(chain_id)
        return max(counted, max(waiting) + 1) if waiting else counted

    def sent(self, chain_id: int, nonce: int) -> None:
        self._waiting.setdefault(chain_id, set()).add(nonce)

    def forget(self, chain_id: int, nonce: int) -> None:
        self._waiting.get(chain_id, set()).discard(nonce)


_SENDERS: dict[str, _Sender] = {}
_SENDERS_LOCK = threading.Lock()


def _sender(address: str) -> _Sender:
    """The process-wide :class:`_Sender` of ``address`` (every client signing with that key shares it)."""
    with _SENDERS_LOCK:
        return _SENDERS.setdefault(address.lower(), _Sender())


def _bytes32(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        digits = value[2:] if value[:2] in ("0x", "0X") else value
        try:
            value = bytes.fromhex(digits)
        except ValueError:
            raise InvalidOptions(f"{what} must be 32 bytes or 64 hex digits", field=what) from None
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise InvalidOptions(f"{what} must be 32 bytes or 64 hex digits", field=what)
    return bytes(value)


def _amount(value: Any, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOptions(f"{what} must be an integer >= {minimum}, not {value!r}", field=what)
    return value


def _address(value: Any, what: str) -> ChecksumAddress:
    try:
        return to_checksum_address(value)
    except (TypeError, ValueError):
        raise InvalidOptions(f"{what} must be a 0x address, not {value!r}", field=what) from None


class MarketplaceClient:
    """Open, prove, settle and read paid jobs on a JobMarketplace; withdraw host earnings.

    Args:
        rpc: an ``http(s)://`` JSON-RPC URL, or a sync ``web3.Web3`` (an in-process chain).
        marketplace: the JobMarketplace address.
        account: the key that signs (a :class:`~fabstir_jupyter.crypto.PrivateKey` or an
            eth-account ``LocalAccount``); ``None`` for a read-only client.
        host_earnings: the HostEarnings address (default: the marketplace's ``hostEarnings()``).
        timeout: seconds per RPC request.
        receipt_timeout: seconds to wait for a transaction to be mined.
        poll_interval: seconds between receipt polls.
        replace_after: seconds a sent transaction may stay unmined before it is sent again, same
            nonce, fees up by a quarter (up to :data:`MAX_REPLACEMENTS` times, within
            ``receipt_timeout``); ``None``: never.
        gas_limit: send every transaction with this gas limit instead of estimating it; for a local
            chain only, where an estimate costs several times the transaction (eth-tester searches
            for the limit by executing it over and over). A transaction the contract refuses is then
            mined and reverts, instead of failing unsent; the error and its reason are the same (read
            by replaying it). ``None``: estimate, as a live network needs.

    Raises:
        InvalidOptions: a malformed address, URL or key type.
    """

    def __init__(
        self,
        rpc: str | Web3,
        marketplace: str,
        *,
        account: PrivateKey | LocalAccount | None = None,
        host_earnings: str | None = None,
        timeout: float = 30.0,
        receipt_timeout: float = 120.0,
        poll_interval: float = 0.2,
        replace_after: float | None = 30.0,
        gas_limit: int | None = None,
    ) -> None:
        if isinstance(rpc, Web3):
            self._w3 = rpc
            self._where = "in-process chain"
        elif isinstance(rpc, str) and urlsplit(rpc).scheme in ("http", "https") and urlsplit(rpc).netloc:
            hide_rpc_url_in_logs(rpc)
            # cache_allowed_requests: web3 caches what cannot change (the chain id, which its validation
            # asks for around every eth_call: two round trips per read otherwise)
            provider = Web3.HTTPProvider(rpc, request_kwargs={"timeout": timeout}, exception_retry_configuration=None,
                                         cache_allowed_requests=True)
            self._w3 = Web3(provider)
            self._where = f"chain rpc {_redacted(rpc)}"
        else:
            shown = _redacted(rpc) if isinstance(rpc, str) else type(rpc).__name__
            raise InvalidOptions(f"rpc must be an http(s):// URL or a web3.Web3, not {shown}", field="rpc")
        self._key = self._as_key(account)
        self.marketplace_address = _address(marketplace, "marketplace")
        self._marketplace = self._w3.eth.contract(address=self.marketplace_address, abi=MARKETPLACE_ABI)
        self._host_earnings_address = _address(host_earnings, "host_earnings") if host_earnings else None
        self.receipt_timeout = receipt_timeout
        self.poll_interval = poll_interval
        if replace_after is not None and not replace_after > 0:
            raise InvalidOptions(f"replace_after must be a positive number of seconds or None, not {replace_after!r}",
                                 field="replace_after")
        self.replace_after = replace_after
        self.gas_limit = None if gas_limit is None else _amount(gas_limit, "gas_limit", minimum=21_000)
        self._chain_id: int | None = None

    @staticmethod
    def _as_key(account: Any) -> PrivateKey | None:
        if account is None or isinstance(account, PrivateKey):
            return account
        secret = getattr(account, "key", None)
        if secret is not None and hasattr(account, "sign_transaction"):  # an eth-account LocalAccount
            return PrivateKey.from_bytes(bytes(secret))
        raise InvalidOptions(
            f"account must be a fabstir_jupyter.crypto.PrivateKey or an eth-account LocalAccount, "
            f"not {type(account).__name__}", field="account",
        )

    def __repr__(self) -> str:
        who = self._key.address if self._key else "read-only"
        return f"<MarketplaceClient {self._where} marketplace={self.marketplace_address} account={who}>"

    # ------------------------------------------------------------------ plumbing

    @property
    def address(self) -> str | None:
        """The signing account's address (``None`` for a read-only client)."""
        return self._key.address if self._key else None

    @property
    def w3(self) -> Web3:
        """The web3 instance the client speaks through."""
        return self._w3

    def _rpc(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call``; transport failures become ConnectionFailed, refusals the matching coded error.

        The error is raised outside the ``except`` clause, so it carries no ``__context__``: a
        transport exception's text may hold the RPC URL's key.
        """
        try:
            return call()
        except FabstirError:
            raise
        except (requests.ConnectionError, requests.Timeout) as exc:
            error: FabstirError = ConnectionFailed(f"{self._where}: {what}: {type(exc).__name__}")
        except requests.HTTPError as exc:  # 429, 5xx, 403...: its text quotes the URL, and with it any API key
            status = exc.response.status_code if exc.response is not None else "error"
            error = ConnectionFailed(f"{self._where}: {what}: HTTP {status}")
        except ContractLogicError as exc:
            error = self._refusal(what, _reason(exc))
        except Web3RPCError as exc:
            message = _rpc_message(exc)
            error = (InsufficientFunds(f"{what}: {message}") if _NO_FUNDS.search(message)
                     else TransactionFailed(f"{what}: the node refused it: {message}"))
        except Exception as exc:  # an in-process chain raises its own errors (eth-tester's ValidationError)
            message = hide_rpc_urls(str(exc)) or type(exc).__name__
            error = (InsufficientFunds(f"{what}: {message}") if _NO_FUNDS.search(message)
                     else TransactionFailed(f"{what}: {type(exc).__name__}: {message}"))
        raise error

    @staticmethod
    def _refusal(what: str, reason: str, tx_hash: str | None = None) -> FabstirError:
        if reason == _OVER_DEPOSIT:
            return BudgetExceeded(f"{what}: the job's deposit pays for no more tokens ({reason})")
        if _NO_FUNDS.search(reason):
            return InsufficientFunds(f"{what}: {reason}")
        return TransactionFailed(f"{what}: refused by the contract ({reason})", reason=reason, tx_hash=tx_hash,
                                 retryable=reason in _RETRY_LATER)

    @property
    def chain_id(self) -> int:
        """The RPC endpoint's chain id (read once)."""
        if self._chain_id is None:
            self._chain_id = int(self._rpc("eth_chainId", lambda: self._w3.eth.chain_id))
        return self._chain_id

    def _signer(self, what: str) -> PrivateKey:
        if self._key is None:
            raise InvalidOptions(f"{what} needs a signing key: this client is read-only", field="account")
        return self._key

    def _transact(self, fn: Any, what: str, *, value: int = 0,
                  on_sent: Callable[[str], None] | None = None) -> TxReceipt:
        """Estimate (unless ``gas_limit`` is set), sign, send and wait for ``fn``; return the receipt of a
        successful transaction.

        ``on_sent`` is called with the transaction's hash just before it is sent, and again with each
        replacement's (see ``replace_after``): whatever fails after that (the send's answer lost,
        the receipt not read in time), one of them may be mined. Errors after the signature carry
        the last hash (``tx_hash`` on a :class:`TransactionFailed`).
        """
        key = self._signer(what)
        address = to_checksum_address(key.address)
        chain_id = self.chain_id
        sender = _sender(address)

        def build() -> dict[str, Any]:
            if self.gas_limit is not None:
                gas = self.gas_limit
            else:  # a refusal surfaces here, unsent
                gas = fn.estimate_gas({"from": address, "value": value}) * 6 // 5 + 10_000
            nonce = sender.nonce(chain_id, self._w3.eth.get_transaction_count(address, "pending"))
            return dict(fn.build_transaction({
                "from": address, "value": value, "gas": gas, "chainId": chain_id, "nonce": nonce,
            }))

        with sender.lock:  # one transaction of this account at a time, in this process
            tx = self._rpc(what, build)
            nonce = int(tx["nonce"])
            raw = key.sign_transaction(tx)
            tx_hash = Web3.keccak(raw).to_0x_hex()
            sender.sent(chain_id, nonce)
            try:
                if on_sent is not None:
                    on_sent(tx_hash)
                self._rpc(what, lambda: self._w3.eth.send_raw_transaction(raw))
            except BaseException as error:
                sender.forget(chain_id, nonce)
                if isinstance(error, FabstirError):
                    _note_tx(error, tx_hash)  # its answer may be lost after the node took it
                raise
        hashes = [tx_hash]
        try:
            receipt = self._mined(what, hashes, self.receipt_timeout,
                                  replace=lambda: self._replace(what, key, tx, hashes, on_sent))
        except FabstirError as error:
            _note_tx(error, hashes[-1])
            raise
        finally:
            with sender.lock:
                sender.forget(chain_id, nonce)
        if receipt["status"] != 1:
            raise self._mined_refusal(fn, what, address, value, receipt, receipt["transactionHash"].to_0x_hex())
        return receipt

    def _mined(self, what: str, hashes: Sequence[str], timeout: float,
               replace: Callable[[], None] | None = None) -> TxReceipt:
        """The receipt of whichever transaction of ``hashes`` is mined first, polled every
        ``poll_interval`` for ``timeout`` seconds; ``replace`` is called after each ``replace_after``
        seconds unmined (at most :data:`MAX_REPLACEMENTS` times) and may add a hash.

        Raises:
            TransactionFailed: none was mined within ``timeout`` (one may still be).
            FabstirError: the endpoint failed :data:`RECEIPT_POLL_FAILURES` polls in a row (the last error).
        """
        def receipt_of(tx_hash: str) -> TxReceipt | None:
            try:
                return self._w3.eth.get_transaction_receipt(HexStr(tx_hash))
            except (TransactionNotFound, TransactionIndexingInProgress):  # not mined (yet), or not indexed yet
                return None

        start = time.monotonic()
        replaced = failed = 0
        while True:
            for tx_hash in list(hashes):
                try:
                    receipt = self._rpc(what, functools.partial(receipt_of, tx_hash))
                except FabstirError as exc:  # a blip (a 503, a reset) must not lose track of a sent transaction
                    failed += 1
                    if failed >= RECEIPT_POLL_FAILURES:
                        raise
                    logger.debug("%s: receipt poll failed (%s); polling on", what, exc.message)
                    break
                failed = 0
                if receipt is not None:
                    return receipt
                if time.monotonic() - start >= timeout:
                    break
            waited = time.monotonic() - start
            if waited >= timeout:
                raise TransactionFailed(f"{what}: not mined within {timeout:g} s (it may still be mined)")
            if (replace is not None and self.replace_after is not None and replaced < MAX_REPLACEMENTS
                    and waited >= self.replace_after * (replaced + 1)):
                replaced += 1
                replace()
            time.sleep(min(self.poll_interval, max(0.0, timeout - waited)))

    def _replace(self, what: str, key: PrivateKey, tx: dict[str, Any], hashes: list[str],
                 on_sent: Callable[[str], None] | None) -> None:
        """Send ``tx`` again, same nonce, fees up by a quarter (and to at least what the chain asks
        now); ``tx`` is updated and the new hash appended to ``hashes``. Whatever goes wrong here
        leaves the earlier transactions to wait on: a failed fee read skips this round, a node that
        refuses the replacement (the first was mined meanwhile, the bump was not enough, the account
        cannot pay the higher fee) drops its hash, a send whose answer was lost keeps it."""
        up, down = _FEE_BUMP
        try:
            if "maxFeePerGas" in tx:
                asked = int(self._rpc(what, lambda: self._w3.eth.max_priority_fee))
                priority = max(int(tx["maxPriorityFeePerGas"]) * up // down + 1, asked)
                base = int(self._rpc(what, lambda: self._w3.eth.get_block("latest")).get("baseFeePerGas", 0))
                fees = {"maxPriorityFeePerGas": priority,
                        "maxFeePerGas": max(int(tx["maxFeePerGas"]) * up // down + 1, 2 * base + priority)}
            else:  # a legacy transaction (a Web3 given a gas price strategy)
                now = int(self._rpc(what, lambda: self._w3.eth.gas_price))
                fees = {"gasPrice": max(int(tx["gasPrice"]) * up // down + 1, now)}
        except FabstirError as exc:
            logger.info("%s: transaction %s not mined; fees not read (%s), not replaced this time", what, hashes[-1],
                        exc.message)
            return
        tx.update(fees)
        raw = key.sign_transaction(tx)
        tx_hash = Web3.keccak(raw).to_0x_hex()
        logger.info("%s: transaction %s not mined after %d s: sent again as %s with higher fees", what, hashes[-1],
                    round(self.replace_after or 0), tx_hash)
        if on_sent is not None:
            on_sent(tx_hash)
        hashes.append(tx_hash)
        try:
            self._rpc(what, lambda: self._w3.eth.send_raw_transaction(raw))
        except (TransactionFailed, InsufficientFunds) as exc:  # refused by the node: it is not in its pool
            logger.info("%s: the replacement %s was refused (%s)", what, tx_hash, exc.message)
            hashes.pop()
        except FabstirError as exc:  # the node may have taken it: wait on it too
            logger.info("%s: the replacement %s may not have been sent (%s)", what, tx_hash, exc.message)

    def _mined_refusal(self, fn: Any, what: str, sender: str, value: int, receipt: TxReceipt,
                       tx_hash: str) -> FabstirError:
        # a reverted transaction was mined: replay it as a call before its block for the reason
        try:
            fn.call({"from": sender, "value": value}, block_identifier=max(0, receipt["blockNumber"] - 1))
        except ContractLogicError as exc:
            return self._refusal(what, _reason(exc), tx_hash)
        except Exception:  # the reason is a nicety; the failure is what matters
            pass
        return TransactionFailed(f"{what}: reverted (transaction {tx_hash})", tx_hash=tx_hash)

    def _read(self, fn: Any, what: str) -> Any:
        return self._rpc(what, fn.call)

    def _earnings_contract(self) -> Any:
        address = self._host_earnings_address
        if address is None:
            address = to_checksum_address(self._read(self._marketplace.functions.hostEarnings(), "hostEarnings"))
            self._host_earnings_address = address
        return self._w3.eth.contract(address=address, abi=HOST_EARNINGS_ABI)

    def _token(self, token: str) -> Any:
        return self._w3.eth.contract(address=_address(token, "token"), abi=ERC20_ABI)

    # ------------------------------------------------------------------ reads

    def get_job(self, job_id: int) -> SessionJob:
        """Read job ``job_id``.

        Raises:
            SessionNotFound: no such job.
        """
        _amount(job_id, "job_id", minimum=1)
        job = SessionJob.from_values(self._read(self._marketplace.functions.sessionJobs(job_id), "sessionJobs"))
        if job.id == 0:
            raise SessionNotFound(f"job {job_id} does not exist on marketplace {self.marketplace_address}")
        return job

    def session_model(self, job_id: int) -> str:
        """The model id (0x hex) job ``job_id`` was opened for."""
        return "0x" + bytes(self._read(self._marketplace.functions.sessionModel(job_id), "sessionModel")).hex()

    def get_proof(self, job_id: int, index: int) -> ProofSubmission:
        """Proof ``index`` (0-based) of job ``job_id``."""
        values = self._read(self._marketplace.functions.getProofSubmission(job_id, index), "getProofSubmission")
        return ProofSubmission("0x" + bytes(values[0]).hex(), int(values[1]), int(values[2]), bool(values[3]),
                               str(values[4]))

    def min_deposit(self, token: str = NATIVE_TOKEN) -> int:
        """The contract's minimum deposit in ``token`` (0 for a token it does not accept)."""
        functions = self._marketplace.functions
        if int(token, 16) == 0:
            return int(self._read(functions.MIN_DEPOSIT(), "MIN_DEPOSIT"))
        return int(self._read(functions.tokenMinDeposits(_address(token, "token")), "tokenMinDeposits"))

    def fee_basis_points(self) -> int:
        """The treasury's share of each payment, in basis points (1000 = 10%)."""
        return int(self._read(self._marketplace.functions.feeBasisPoints(), "feeBasisPoints"))

    def dispute_window(self) -> int:
        """Seconds a host waits after its last proof before it may complete a job itself."""
        return int(self._read(self._marketplace.functions.disputeWindow(), "disputeWindow"))

    def chain_time(self) -> int:
        """The latest block's timestamp (seconds): the clock the contract's windows run on."""
        return int(self._rpc("eth_getBlockByNumber", lambda: self._w3.eth.get_block("latest")["timestamp"]))

    def is_active_node(self, address: str | None = None) -> bool:
        """Whether ``address`` (default: this account) is an active node on the marketplace's NodeRegistry."""
        who = _address(address, "address") if address else self._signer("is_active_node").address
        registry = self._read(self._marketplace.functions.nodeRegistry(), "nodeRegistry")
        contract = self._w3.eth.contract(address=registry, abi=NODE_REGISTRY_ABI)
        return bool(self._read(contract.functions.isActiveNode(who), "isActiveNode"))

    def model_price(self, host: str, model_id: bytes | str, token: str = NATIVE_TOKEN) -> int:
        """The host's price for ``model_id`` in ``token`` (``getModelPricing`` on the marketplace's
        NodeRegistry): what a job must offer at least. 0 or a refusal means the host does not price it.

        Raises:
            TransactionFailed: the registry refuses (no price set for that token: ``reason`` says so).
        """
        registry = self._read(self._marketplace.functions.nodeRegistry(), "nodeRegistry")
        contract = self._w3.eth.contract(address=registry, abi=NODE_REGISTRY_ABI)
        fn = contract.functions.getModelPricing(_address(host, "host"), _bytes32(model_id, "model_id"),
                                                _address(token, "token"))
        return int(self._read(fn, "getModelPricing"))

    def decimals(self, token: str = NATIVE_TOKEN) -> int:
        """The decimals of ``token`` (18 for the native token)."""
        if int(token, 16) == 0:
            return 18
        return int(self._read(self._token(token).functions.decimals(), "decimals"))

    def allowance(self, token: str, owner: str | None = None) -> int:
        """What the marketplace may take of ``owner``'s (default: this account's) ``token``."""
        who = _address(owner, "owner") if owner else self._signer("allowance").address
        return int(self._read(self._token(token).functions.allowance(who, self.marketplace_address), "allowance"))

    def approve(self, token: str, amount: int) -> str | None:
        """Let the marketplace take up to ``amount`` of ``token`` for deposits; nothing is sent when it
        already may. Returns the transaction's hash, or ``None``.

        Raises:
            TransactionFailed, InsufficientFunds: the token or the node refused it.
        """
        _amount(amount, "amount")
        if self.allowance(token) >= amount:
            return None
        return self._approve(token, amount)

    def _approve(self, token: str, amount: int) -> str:
        receipt = self._transact(self._token(token).functions.approve(self.marketplace_address, amount),
                                 f"approve {token}")
        return receipt["transactionHash"].to_0x_hex()

    def balance(self, token: str = NATIVE_TOKEN, address: str | None = None) -> int:
        """What ``address`` (default: this account) holds of ``token`` (native: wei)."""
        who = _address(address, "address") if address else to_checksum_address(self._signer("balance").address)
        if int(token, 16) == 0:
            return int(self._rpc("eth_getBalance", lambda: self._w3.eth.get_balance(who)))
        return int(self._read(self._token(token).functions.balanceOf(who), "balanceOf"))

    def earnings(self, host: str | None = None, token: str = NATIVE_TOKEN) -> int:
        """A host's HostEarnings balance in ``token`` (default: this account's)."""
        who = _address(host, "host") if host else self._signer("earnings").address
        contract = self._earnings_contract()
        return int(self._read(contract.functions.getBalance(who, _address(token, "token")), "getBalance"))

    # ------------------------------------------------------------------ the depositor's side

    def create_job(
        self,
        host: str,
        model_id: bytes | str,
        *,
        deposit: int,
        price_per_token: int,
        token: str = NATIVE_TOKEN,
        max_duration: int = DEFAULT_MAX_DURATION,
        proof_interval: int = DEFAULT_PROOF_INTERVAL,
        proof_timeout_window: int = DEFAULT_PROOF_TIMEOUT_WINDOW,
        on_sent: Callable[[str], None] | None = None,
        allowance: int | None = None,
    ) -> OpenedJob:
        """Open a job with ``host`` for ``model_id``, paying ``deposit`` (native, or an ERC-20 ``token``).

        For a token whose allowance for the marketplace is below ``deposit``, it is first raised to
        ``allowance`` (default: ``deposit``; never less) with an ``approve`` transaction: a caller
        opening several jobs approves for them all at once. The contract checks the terms
        (spec/PROTOCOL.md §10).
        ``on_sent`` is called with the creating transaction's hash just before it is sent: if this
        call fails after that, the job may still open (:meth:`opened_job` finds out).

        Returns:
            The job, its id read from ``SessionJobCreated``.

        Raises:
            InvalidOptions: malformed arguments.
            InsufficientFunds: the balance cannot pay the deposit (and gas).
            TransactionFailed: the contract refused (``reason``: e.g. ``"Low price"``, ``"No model"``).
            ConnectionFailed: the RPC endpoint failed.
        """
        host = _address(host, "host")
        model = _bytes32(model_id, "model_id")
        for value, name in ((deposit, "deposit"), (price_per_token, "price_per_token"), (max_duration, "max_duration"),
                            (proof_interval, "proof_interval"), (proof_timeout_window, "proof_timeout_window")):
            _amount(value, name)
        if allowance is not None:
            _amount(allowance, "allowance")
        token = _address(token, "token")
        functions = self._marketplace.functions
        what = f"open a job with host {host}"
        if int(token, 16) == 0:
            have = self.balance()
            if have < deposit:
                raise InsufficientFunds(f"{what}: deposit {deposit} wei exceeds the balance of {have} wei")
            fn = functions.createSessionJobForModel(host, model, price_per_token, max_duration, proof_interval,
                                                    proof_timeout_window)
            receipt = self._transact(fn, what, value=deposit, on_sent=on_sent)
        else:
            have = self.balance(token)
            if have < deposit:
                raise InsufficientFunds(f"{what}: deposit {deposit} exceeds the token balance of {have}")
            if self.allowance(token) < deposit:
                self._approve(token, deposit if allowance is None else max(deposit, allowance))
            fn = functions.createSessionJobForModelWithToken(host, model, token, deposit, price_per_token,
                                                             max_duration, proof_interval, proof_timeout_window)
            receipt = self._transact(fn, what, on_sent=on_sent)
        opened = self._opened(receipt, model, token, price_per_token)
        if opened is None:
            raise TransactionFailed(f"{what}: no SessionJobCreated event in the receipt",
                                    tx_hash=receipt["transactionHash"].to_0x_hex())
        return opened

    def _opened(self, receipt: Any, model: bytes, token: str, price_per_token: int) -> OpenedJob | None:
        """The job a creating transaction's receipt shows opened (``None``: it reverted, or opened none)."""
        created = self._marketplace.events.SessionJobCreated().process_receipt(receipt, errors=DISCARD)
        if receipt["status"] != 1 or not created:
            return None
        args = created[0]["args"]
        return OpenedJob(int(args["jobId"]), receipt["transactionHash"].to_0x_hex(), args["depositor"], args["host"],
                         "0x" + model.hex(), token, int(args["deposit"]), price_per_token, int(receipt["blockNumber"]))

    def opened_job(self, tx_hashes: str | Sequence[str], model_id: bytes | str, *, token: str = NATIVE_TOKEN,
                   price_per_token: int, timeout: float) -> OpenedJob | None:
        """The job that a :meth:`create_job` whose outcome is unknown (its caller gave up, or the answer
        was lost) opened, waiting up to ``timeout`` seconds for its transaction to be mined;
        ``None`` when it reverted or opened no job.

        Args:
            tx_hashes: the creating transaction's hash, or the hashes of it and its replacements
                (whichever is mined).

        Raises:
            TransactionFailed: not mined within ``timeout`` (it may have been dropped).
            ConnectionFailed: the RPC endpoint failed.
        """
        hashes = [tx_hashes] if isinstance(tx_hashes, str) else list(tx_hashes)
        receipt = self._mined(f"transaction {hashes[-1]}", hashes, timeout)
        return self._opened(receipt, _bytes32(model_id, "model_id"), _address(token, "token"), price_per_token)

    def complete_job(self, job_id: int, conversation_cid: str = "") -> Settlement:
        """Settle job ``job_id`` (the depositor at any time; its host after the dispute window).

        Raises:
            TransactionFailed: refused (``"Not active"``, ``"Not depositor or host"``, ``"Dispute wait"``…).
        """
        _amount(job_id, "job_id", minimum=1)
        fn = self._marketplace.functions.completeSessionJob(job_id, conversation_cid)
        receipt = self._transact(fn, f"complete job {job_id}")
        return self._settlement(job_id, receipt, timed_out=False)

    def trigger_timeout(self, job_id: int) -> Settlement:
        """Settle job ``job_id`` as timed out (anyone may, once it has timed out).

        Raises:
            TransactionFailed: refused (``"Not timeout"`` yet, ``"Not active"``).
        """
        _amount(job_id, "job_id", minimum=1)
        receipt = self._transact(self._marketplace.functions.triggerSessionTimeout(job_id), f"time out job {job_id}")
        return self._settlement(job_id, receipt, timed_out=True)

    def _settlement(self, job_id: int, receipt: Any, *, timed_out: bool) -> Settlement:
        events = self._marketplace.events
        completed = events.SessionCompleted().process_receipt(receipt, errors=DISCARD)
        by = events.SessionCompletedBy().process_receipt(receipt, errors=DISCARD)
        credited = events.RefundCreditedToDeposit().process_receipt(receipt, errors=DISCARD)
        if not completed or not by:
            raise TransactionFailed(f"job {job_id}: no SessionCompleted event in the settlement receipt",
                                    tx_hash=receipt["transactionHash"].to_0x_hex())
        done, paid = completed[0]["args"], by[0]["args"]
        return Settlement(job_id, receipt["transactionHash"].to_0x_hex(), int(done["totalTokensUsed"]),
                          int(paid["paymentAmount"]), int(done["hostEarnings"]), int(done["userRefund"]),
                          timed_out, bool(credited), to_checksum_address(paid["completedBy"]),
                          int(receipt["blockNumber"]))

    def find_settlement(self, job_id: int, *, from_block: int = 0, window: int = LOG_WINDOW,
                        deadline: float | None = None) -> Settlement | None:
        """Read how job ``job_id`` was settled from the chain's logs (whoever settled it), or ``None``
        while it is not settled.

        Args:
            from_block: the first block to search (the job's opening block keeps the query small).
            window: blocks per query when the endpoint refuses to search from ``from_block`` to the
                head at once (public endpoints cap log ranges): the search then walks back from the
                head, where a settlement just made is.
            deadline: a ``time.monotonic()`` reading after which that walk stops (``None``: it stops
                only at ``from_block``; for a job not settled yet that is every window back to it).

        Raises:
            ConnectionFailed: the RPC endpoint failed.
        """
        _amount(job_id, "job_id", minimum=1)
        events = self._marketplace.events

        def completed(first: int, last: int | None) -> list[Any]:
            query = {"argument_filters": {"jobId": job_id}, "from_block": first,
                     "to_block": "latest" if last is None else last}
            return list(self._rpc("eth_getLogs", lambda: events.SessionCompleted().get_logs(**query)))

        found = search_logs(completed, lambda: self._rpc("eth_blockNumber", lambda: self._w3.eth.block_number),
                            from_block=from_block, window=window, deadline=deadline, refused=(TransactionFailed,),
                            what=f"job {job_id}: SessionCompleted logs")
        if not found:
            return None
        tx_hash = found[0]["transactionHash"]
        receipt = self._rpc("eth_getTransactionReceipt", lambda: self._w3.eth.get_transaction_receipt(HexStr(tx_hash)))
        timed_out = bool(events.SessionTimedOut().process_receipt(receipt, errors=DISCARD))
        return self._settlement(job_id, receipt, timed_out=timed_out)

    # ------------------------------------------------------------------ the host's side

    def submit_proof(
        self, job_id: int, tokens: int, proof_hash: bytes | str, proof_cid: str = "", delta_cid: str = ""
    ) -> str:
        """Prove ``tokens`` more tokens served in job ``job_id`` (the host only). Returns the tx hash.

        The contract wants at least 100 tokens, the job's proof interval in the first proof, at most
        2000 tokens per second since the last proof, a total within the deposit, and a fresh
        ``proof_hash``.

        Raises:
            BudgetExceeded: the total would pass what the deposit pays for.
            TransactionFailed: refused (``"Too many"`` is retryable: wait and prove again).
        """
        _amount(job_id, "job_id", minimum=1)
        _amount(tokens, "tokens", minimum=1)
        fn = self._marketplace.functions.submitProofOfWork(job_id, tokens, _bytes32(proof_hash, "proof_hash"),
                                                           proof_cid, delta_cid)
        receipt = self._transact(fn, f"prove {tokens} tokens of job {job_id}")
        return receipt["transactionHash"].to_0x_hex()

    def withdraw_earnings(self, token: str = NATIVE_TOKEN, amount: int | None = None) -> int:
        """Withdraw this host's HostEarnings balance in ``token`` (all of it by default). Returns the amount.

        Raises:
            TransactionFailed: nothing to withdraw, or more than the balance.
        """
        token = _address(token, "token")
        contract = self._earnings_contract()
        if amount is None:
            fn = contract.functions.withdrawAll(token)
        else:
            fn = contract.functions.withdraw(_amount(amount, "amount", minimum=1), token)
        receipt = self._transact(fn, f"withdraw earnings in {token}")
        withdrawn = contract.events.EarningsWithdrawn().process_receipt(receipt, errors=DISCARD)
        return sum(int(e["args"]["amount"]) for e in withdrawn)


def _note_tx(error: FabstirError, tx_hash: str) -> None:
    if isinstance(error, TransactionFailed) and error.tx_hash is None:
        error.tx_hash = tx_hash


def _rpc_message(exc: Web3RPCError) -> str:
    response = getattr(exc, "rpc_response", None)
    error = response.get("error") if isinstance(response, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str):
        return message
    return str(getattr(exc, "message", None) or exc)


def _reason(exc: ContractLogicError) -> str:
    # web3 puts "execution reverted: <reason>" in the message
    message = str(getattr(exc, "message", None) or (exc.args[0] if exc.args else "") or "")
    return message.removeprefix("execution reverted: ").removeprefix("execution reverted").strip() or "no reason"
