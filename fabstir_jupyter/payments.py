"""Paid sessions, the client's side (spec/PROTOCOL.md §10): open jobs, bind sockets to them, settle them.

On a paid network every request to a registered host is billed to a job on the JobMarketplace,
opened and paid from the user's own :class:`~fabstir_jupyter.wallet.Wallet`:

- A **session** pins one job and one socket for its whole life: the job is opened when the session
  is created (on the chosen host, its deposit sized from ``max_tokens`` × the host's price unless
  given), its id rides in ``session_init`` (plaintext) or in the encrypted init's payload.
- **Stateless requests** (``stream_inference``, ``infer``, batches) share a *tab* per host and
  model: a few jobs (at most :attr:`PaymentConfig.jobs_per_host`), each with its own socket,
  opened lazily; a request takes a free one, opens another while the budget allows, else waits for
  one. Each request gets a session id of its own on the job (``"<job>-<n>"``), so a host's memory
  never mixes two requests.
- **Top-up**: when a job's deposit cannot pay for the next request's ``max_tokens`` (plus a
  margin), the next job is opened before the request is sent; a host that still caps a stream
  (``BUDGET_EXCEEDED``) ends that job and the answer continues on a new one.
- **A closed socket ends its job** (hosts settle a job when its socket closes): the client never
  reconnects to it. A socket that drops mid-answer leaves the answer to continue on a new job.
- **Settlement**: the job's socket is closed; the client waits (at most
  :attr:`PaymentConfig.final_proof_timeout`) for the host's last proof, completes the job as its
  depositor (no dispute window for the depositor) unless someone already has, and reads the result
  back from the chain: a :class:`JobSettlement`. Jobs whose socket broke are settled in the
  background; ending a session or closing the manager waits for them.

Budgets (:class:`~fabstir_jupyter.billing.Budget`) bound every deposit, per session and per
process: a deposit that would pass one is ``BUDGET_EXCEEDED`` before any transaction. The chain
client (:class:`~fabstir_jupyter.marketplace.MarketplaceClient`) blocks, so every chain call runs in
this module's small thread pool, never on the event loop, each with a timeout.

Payment token: the network's stable token (USDC) by default, where the host prices the model in
it: budgets and costs then read in dollars whatever the native token does, and the ledger's costs
are in the unit hosts quote. The allowance for it is raised once to the process budget (never
beyond), so a job costs one transaction, as a native deposit does. ``token="native"`` pays in the
native token instead.

:class:`Payments` owns jobs, budgets and the chain; only
:class:`~fabstir_jupyter.paid_connector.PaidConnector` touches sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from .billing import (
    MIN_PROOF_TOKENS,
    Budget,
    ProofCadence,
    base_units,
    cost_of,
    deposit_for,
    explain_difference,
    format_amount,
    tokens_for,
    whole_tokens,
)
from .errors import (
    BudgetExceeded,
    ConnectionFailed,
    FabstirError,
    InsufficientFunds,
    InvalidOptions,
    PaymentRequired,
    TransactionFailed,
)
from .hosts import HostInfo
from .transport import WebSocketClient
from .usage import JobRecord, UsageSink

if TYPE_CHECKING:
    from .marketplace import MarketplaceClient, OpenedJob
    from .networks import NetworkPreset
    from .wallet import Wallet

__all__ = [
    "PaymentConfig",
    "Payments",
    "PaidJob",
    "JobSettlement",
    "StreamEvent",
    "TOKENS",
    "JOB_REFUSALS",
]

logger = logging.getLogger("fabstir_jupyter.payments")
T = TypeVar("T")

#: The payment tokens a client may choose.
TOKENS = ("stable", "native")
#: Host refusals that end a paid job, not the request (at the session's init or mid-answer): its
#: deposit ran out, the host no longer takes it, or it does not exist. The request goes on on a new job.
JOB_REFUSALS = frozenset({"PAYMENT_REQUIRED", "BUDGET_EXCEEDED", "SESSION_NOT_FOUND"})
_NATIVE = "0x" + "00" * 20
_BYTES32 = 66  # "0x" + 64 hex digits
_NOT_ACTIVE = "Not active"
#: Seconds between reads of a job while waiting for its host's last proof: the first soon (a local
#: chain mines the proof within tens of milliseconds), doubling up to the last (a live chain's block is
#: about 2 s).
_POLL_FIRST, _POLL_MAX = 0.02, 0.2
#: The gas limit of every transaction on the embedded local chain, which is not estimated there: an
#: estimate executes the transaction over and over (eth-tester searches for the limit), about 8x the
#: time of mining it (150 ms against 18 ms for a job). Live networks estimate.
LOCAL_GAS_LIMIT = 3_000_000


@dataclass(frozen=True)
class StreamEvent:
    """Something a stream should say about its payment: a job opened, an answer moved to a new job.

    Attributes:
        kind: ``"job_opened"``, ``"job_continued"`` (the answer went on on a new job) or
            ``"job_ended"`` (the job before it ended, and why).
        message: a lower-case fragment for people.
        job_id: the job it is about.
        host: the host's URL.
        time: epoch seconds.
    """

    kind: str
    message: str
    job_id: int | None = None
    host: str | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PaymentConfig:
    """How a client pays (spec/PROTOCOL.md §10). Amounts are whole tokens of the payment token.

    Args:
        token: ``"stable"`` (the network's stable token, USDC: the default) or ``"native"``.
        budget: the most this process may hold in deposits and spend, in whole tokens (``None``: no cap).
        proof_interval: the jobs' ``proofInterval``, the tokens a job's first proof claims at least
            (minimum billing). 100, the contract's minimum, bounds what a short job pays beyond its
            tokens; production's SDK uses 1000.
        max_duration, proof_timeout_window: the jobs' ``maxDuration`` and ``proofTimeoutWindow`` (s).
        job_tokens: the tokens a new job's deposit pays for at least, so that one job serves many
            requests (the deposit is also at least the contract's minimum, and covers the request).
        jobs_per_host: stateless jobs per host and model at once (each with its own socket).
        requests_per_job: stateless requests on one job before it is settled and replaced (hosts
            remember encrypted conversations per session id, a bounded number of them).
        margin: extra tokens a job must have room for beyond a request's ``max_tokens``, as a share
            of it (at least 16 tokens): a host may generate a little past a client's stop.
        job_timeout: seconds to open a job (its transactions mined); a job that opens later is settled.
        read_timeout: seconds for a chain read (a price, a job, a balance).
        final_proof_timeout: seconds to wait after closing a job's socket for its host's last proof.
        settle_timeout: seconds to settle a job, retries included.
        replace_after: seconds a transaction may wait unmined before it is sent again with higher
            fees (see :class:`~fabstir_jupyter.marketplace.MarketplaceClient`); ``None``: never.
    """

    token: str = "stable"
    budget: Decimal | float | int | str | None = None
    proof_interval: int = 100
    max_duration: int = 3600
    proof_timeout_window: int = 300
    job_tokens: int = 4096
    jobs_per_host: int = 4
    requests_per_job: int = 256
    margin: float = 0.1
    job_timeout: float = 60.0
    read_timeout: float = 30.0
    final_proof_timeout: float = 10.0
    settle_timeout: float = 60.0
    replace_after: float | None = 30.0

    def __post_init__(self) -> None:
        token = {"usdc": "stable", "eth": "native"}.get(str(self.token).lower(), str(self.token).lower())
        if token not in TOKENS:
            raise InvalidOptions(f"payment token must be one of {', '.join(TOKENS)}, not {self.token!r}",
                                 field="payment_token")
        object.__setattr__(self, "token", token)
        if self.budget is not None:
            base_units(self.budget, 18, "budget")  # checked now; converted once the token's decimals are known
        for name in ("proof_interval", "max_duration", "proof_timeout_window", "job_tokens", "jobs_per_host",
                     "requests_per_job"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptions(f"{name} must be a positive integer, not {value!r}", field=name)
        if self.proof_interval < MIN_PROOF_TOKENS:
            raise InvalidOptions(f"proof_interval must be at least {MIN_PROOF_TOKENS} (the contract's minimum)",
                                 field="proof_interval")
        if not 60 <= self.proof_timeout_window <= 3600:
            raise InvalidOptions("proof_timeout_window must be between 60 and 3600 seconds",
                                 field="proof_timeout_window")
        for name in ("job_timeout", "read_timeout", "final_proof_timeout", "settle_timeout", "replace_after"):
            value = getattr(self, name)
            if value is None and name == "replace_after":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InvalidOptions(f"{name} must be a positive number of seconds, not {value!r}", field=name)
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin <= 1:
            raise InvalidOptions(f"margin must be between 0 and 1, not {self.margin!r}", field="margin")

    def padded(self, max_tokens: int) -> int:
        """``max_tokens`` plus the margin a job must have room for."""
        return max_tokens + max(16, int(max_tokens * self.margin))


@dataclass(frozen=True)
class JobSettlement:
    """How a job ended on chain, read back after settlement, beside what the client counted.

    Amounts are base units of the payment token (``decimals`` places; :meth:`amount` shows whole
    tokens). ``host_earnings + treasury_fee + refund == deposit``.

    Attributes:
        job_id, host, model, unit, decimals: the job.
        status: ``"completed"`` or ``"timed_out"``.
        deposit: what the job held.
        tokens_billed: ``tokensUsed`` as settled (minimum billing included).
        cost: what the chain charged (the host's earnings and the treasury fee).
        host_earnings, treasury_fee, refund: where the deposit went.
        open_tx, settle_tx: the transactions that opened and settled the job.
        settled_by: ``"client"`` (this wallet completed it), ``"host"``, or ``"other"`` (a timeout
            triggered by someone else).
        received_tokens: the tokens the client received on the job.
        streamed_tokens: the tokens its hosts reported generating (what they bill).
        expected_tokens: what the proof cadence implies for those.
        reason: why ``tokens_billed`` differs from ``streamed_tokens`` (``""`` when it does not).
    """

    job_id: int
    host: str | None
    model: str | None
    unit: str
    decimals: int
    status: str
    deposit: int
    tokens_billed: int
    cost: int
    host_earnings: int
    treasury_fee: int
    refund: int
    open_tx: str
    settle_tx: str
    settled_by: str
    received_tokens: int
    streamed_tokens: int
    expected_tokens: int
    reason: str

    def amount(self, units: int) -> float:
        """Base units as whole tokens."""
        return whole_tokens(units, self.decimals)

    @property
    def adds_up(self) -> bool:
        """Whether the host's earnings, the treasury fee and the refund add up to the deposit."""
        return self.host_earnings + self.treasury_fee + self.refund == self.deposit

    @property
    def agrees(self) -> bool:
        """Whether the chain billed what the proof cadence implies for the tokens streamed."""
        return self.tokens_billed == self.expected_tokens

    def __str__(self) -> str:
        show = functools.partial(format_amount, decimals=self.decimals, unit=self.unit)
        text = (f"job {self.job_id} {self.status.replace('_', ' ')}: {self.tokens_billed} tokens billed, "
                f"cost {show(self.cost)} (host {show(self.host_earnings)}, treasury {show(self.treasury_fee)}), "
                f"refund {show(self.refund)} of {show(self.deposit)}")
        return f"{text}; {self.reason}" if self.reason else text


class PaidJob:
    """A job this client pays for, and the socket bound to it (one socket per job, never reused).

    Read-only for callers: ``job_id``, ``host``, ``model``, the terms, :attr:`cadence` (its proofs
    replayed from what its hosts reported), :attr:`running_cost`, :attr:`state` (``"open"``,
    ``"closing"``, ``"settled"``, ``"unsettled"``) and :attr:`settlement` once settled.
    """

    def __init__(self, *, job_id: int, host: HostInfo, model: str, model_id: str, token: str, unit: str,
                 decimals: int, deposit: int, price_per_token: int, proof_interval: int, open_tx: str,
                 open_block: int | None, kind: str, session_id: str | None, budget: Budget,
                 tokens_used: int = 0) -> None:
        self.job_id = job_id
        self.host = host
        self.model = model
        self.model_id = model_id
        self.token = token
        self.unit = unit
        self.decimals = decimals
        self.deposit = deposit
        self.price_per_token = price_per_token
        self.proof_interval = proof_interval
        self.open_tx = open_tx
        self.open_block = open_block
        self.opened_at = time.time()
        self.kind = kind
        self.session_id = session_id
        self.budget = budget
        self.cadence = ProofCadence(proof_interval, tokens_used)
        self.received_tokens = 0
        # every answer on the job ended with the host's own count of its tokens (its bill can be judged)
        self.all_reported = True
        self.requests = 0
        self.socket: WebSocketClient | None = None
        self.initialised: set[str] = set()  # plaintext session ids bound on the socket
        self.busy = False
        self.state = "open"
        self.ended: str | None = None  # why the job takes no more requests
        self.settlement: JobSettlement | None = None
        self._settling: asyncio.Task[JobSettlement] | None = None

    def __repr__(self) -> str:
        return (f"<PaidJob {self.job_id} {self.state} host={self.host.address} "
                f"deposit={format_amount(self.deposit, self.decimals, self.unit)}>")

    @property
    def max_tokens(self) -> int:
        """The tokens the deposit pays for."""
        return tokens_for(self.deposit, self.price_per_token)

    @property
    def room(self) -> int:
        """How many tokens the next answer may take before the deposit runs out."""
        return self.cadence.room(self.max_tokens)

    @property
    def running_cost(self) -> float:
        """What the job would cost if settled now, in whole tokens of :attr:`unit` (minimum billing included)."""
        billed = self.cadence.settled() if self.cadence.streamed else 0
        return whole_tokens(cost_of(billed, self.price_per_token), self.decimals)

    @property
    def usable(self) -> bool:
        """Whether the job may take another request (open, its socket not closed)."""
        return self.ended is None and self.state == "open" and (self.socket is None or self.socket.is_open)

    def end(self, reason: str) -> None:
        """Take no more requests on this job (the first reason stays)."""
        if self.ended is None:
            self.ended = reason

    def record(self) -> JobRecord:
        """The job as the usage ledger keeps it."""
        settled = self.settlement
        return JobRecord(
            job_id=self.job_id, chain_id=0, marketplace="", host=self.host.api_url,
            host_address=self.host.address or "", model=self.model, model_id=self.model_id, token=self.token,
            unit=self.unit, decimals=self.decimals, deposit=self.deposit, price_per_token=self.price_per_token,
            proof_interval=self.proof_interval, open_tx=self.open_tx, opened_at=self.opened_at, kind=self.kind,
            session_id=self.session_id,
            status=settled.status if settled else ("unsettled" if self.state == "unsettled" else "open"),
            settle_tx=settled.settle_tx if settled else None, settled_at=time.time() if settled else None,
            settled_by=settled.settled_by if settled else None,
            tokens_billed=settled.tokens_billed if settled else None, chain_cost=settled.cost if settled else None,
            host_earnings=settled.host_earnings if settled else None,
            treasury_fee=settled.treasury_fee if settled else None, refund=settled.refund if settled else None,
        )


@dataclass(eq=False)
class SessionTerms:
    """What a session pays with: its deposit per job (``None``: sized per job), its budget, its jobs."""

    session_id: str
    deposit: int | None
    budget: Budget
    jobs: list[PaidJob] = field(default_factory=list)

    @property
    def job(self) -> PaidJob | None:
        """The job the session holds now (its last), if any."""
        return self.jobs[-1] if self.jobs else None


@dataclass(eq=False)
class _Creation:
    """One job being opened in the thread pool: its terms, whether its caller gave up, its transaction."""

    make_job: Callable[[OpenedJob], PaidJob]
    budget: Budget
    deposit: int
    model_id: str
    token: str
    price: int
    abandoned: threading.Event = field(default_factory=threading.Event)
    tx_hashes: list[str] = field(default_factory=list)  # the creating transaction (and its replacements), once sent


def _outcome_unknown(error: BaseException) -> bool:
    """Whether a job creation that failed after its transaction was sent may still have opened a job
    (the answer or the receipt was lost), rather than been refused (reverted, or short of funds)."""
    if isinstance(error, TransactionFailed):
        return error.reason is None
    return not isinstance(error, (InsufficientFunds, BudgetExceeded))


class Payments:
    """The paying side of a client: its wallet, budget, jobs and settlements (``manager.payments``).

    Args:
        wallet: who pays.
        network: the chain network (its ``rpc_url`` or in-process ``provider``, ``chain_id`` and
            ``addresses``: ``job_marketplace``, ``stable_token``).
        config: how to pay.
        usage: where job records go (a sink with ``record_job``), if anywhere.
        local: the network is the embedded local one (its hosts may be unregistered static hosts,
            served unpaid).

    Public, for the notebook and scripts: :attr:`address`, :meth:`balance`, :attr:`open_jobs`,
    :attr:`settlements`, :attr:`spent`, :attr:`held`, :attr:`remaining`, :attr:`unit`,
    :meth:`reconcile`. Everything else runs on the inference manager's event loop.
    """

    def __init__(self, wallet: Wallet, network: NetworkPreset, config: PaymentConfig | None = None, *,
                 usage: UsageSink | None = None, local: bool = False) -> None:
        self.wallet = wallet
        self.network = network
        self.config = config or PaymentConfig()
        self.usage = usage
        self.local = local
        self.budget: Budget | None = None  # made once the token's decimals are known (first chain use)
        self._executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fabstir-payments")
        self._client: MarketplaceClient | None = None
        self._chain_checked = False
        self._token_address: str | None = None
        self._decimals: int | None = None
        self._min_deposit: int | None = None
        self._jobs: list[PaidJob] = []
        self._settlements: list[JobSettlement] = []
        self._sessions: dict[str, SessionTerms] = {}
        self._background: set[asyncio.Future[Any]] = set()  # settlements, and creations given up on
        self._token_lock = threading.Lock()  # approve-then-create is one step per job in a token
        self._setup_lock = threading.Lock()  # balance() may run in another thread than the event loop's
        self._chain_id: int | None = network.chain_id
        self._executor_down = False
        self._closed = False

    def __repr__(self) -> str:
        if self.budget is not None:
            budget = repr(self.budget)
        else:
            budget = "no budget" if self.config.budget is None else f"budget {self.config.budget} {self.unit}"
        return (f"<Payments {self.network.name} wallet={self.wallet.address} token={self.config.token} "
                f"open_jobs={len(self.open_jobs)} {budget}>")

    def use_wallet(self, wallet: Wallet) -> None:
        """Pay later jobs from ``wallet``.

        Raises:
            InvalidOptions: jobs of the current wallet are still open (they settle with its key).
        """
        if self.open_jobs:
            raise InvalidOptions("jobs of the current wallet are still open: settle them first", field="wallet")
        self.wallet = wallet
        self._client = None

    # ------------------------------------------------------------------ public view

    @property
    def address(self) -> str:
        """The paying account's address."""
        return self.wallet.address

    @property
    def chain_id(self) -> int | None:
        """The chain's id: the network's, else the RPC endpoint's once checked (``None`` before)."""
        return self._chain_id

    @property
    def unit(self) -> str:
        """The payment token's name (``"USDC"``, ``"ETH"``)."""
        return "USDC" if self.config.token == "stable" else "ETH"

    @property
    def open_jobs(self) -> list[PaidJob]:
        """The jobs not settled yet (open, or being settled), oldest first."""
        return [job for job in self._jobs if job.settlement is None]

    @property
    def settlements(self) -> list[JobSettlement]:
        """Every job settled so far, oldest first."""
        return list(self._settlements)

    def _whole(self, units: int | None) -> float | None:
        return None if units is None else units / 10 ** (self._decimals or 0)

    @property
    def spent(self) -> float:
        """What settled jobs cost, in whole tokens of :attr:`unit`."""
        return self._whole(self.budget.spent if self.budget else 0) or 0.0

    @property
    def held(self) -> float:
        """What open jobs hold in deposits, in whole tokens."""
        return self._whole(self.budget.held if self.budget else 0) or 0.0

    @property
    def remaining(self) -> float | None:
        """What may still be deposited under the process budget, in whole tokens (``None``: no cap)."""
        return None if self.budget is None else self._whole(self.budget.remaining)

    def balance(self) -> dict[str, float]:
        """The wallet's balances on the network, in whole tokens: the payment token's, and the native
        token's (gas). Blocking: from async code, ``await asyncio.to_thread(payments.balance)``.

        Raises:
            ConnectionFailed: the chain cannot be reached.
        """
        self._check_chain()
        client = self._chain()
        native = client.balance()
        result = {"ETH": native / 10**18}
        if self.config.token == "stable":
            assert self._token_address is not None and self._decimals is not None
            result[self.unit] = client.balance(self._token_address) / 10**self._decimals
        return result

    def reconcile(self) -> Any:
        """Per job of this process: the ledger's tokens and cost beside the chain's bill (a DataFrame).

        Raises:
            InvalidOptions: the usage sink keeps no jobs.
        """
        from .usage import UsageLedger, current_client_id

        if isinstance(self.usage, UsageLedger):  # a file may hold other processes' jobs too
            return self.usage.reconcile(client_id=current_client_id())
        reconcile = getattr(self.usage, "reconcile", None)
        if not callable(reconcile):
            raise InvalidOptions("the usage sink keeps no paid jobs to reconcile", field="usage")
        return reconcile()  # a ListSink: everything it holds is this process's

    # ------------------------------------------------------------------ what a host needs

    def pays(self, host: HostInfo) -> bool:
        """Whether requests to ``host`` go through a job: a host with a registry address does.

        An unregistered host (a URL the user listed) is served unpaid on the local network; on a
        registry network it is refused (:meth:`check_unpaid`).
        """
        return host.address is not None

    def check_unpaid(self, host: HostInfo) -> None:
        """Refuse an unregistered host on a registry network (no job can name it).

        Raises:
            PaymentRequired: not on the local network.
        """
        if not self.local:
            raise PaymentRequired(
                f"host {host.api_url} is not in {self.network.name}'s registry, so no job can pay it",
                host=host.api_url, hint="use a host found by discovery (its registry entry names its address)",
            )

    def model_id(self, host: HostInfo, model: str) -> str:
        """The registry id (bytes32) of ``model`` on ``host``, from discovery's aliases.

        Raises:
            PaymentRequired: the host does not list the model under a registry id.
        """
        if model.startswith("0x") and len(model) == _BYTES32:
            return model.lower()
        for alias, name in host.model_names.items():
            if name == model and alias.startswith("0x") and len(alias) == _BYTES32:
                return alias.lower()
        raise PaymentRequired(f"host {host.api_url} lists no registry id for model {model!r}, so no job can "
                              f"pay for it", host=host.api_url, retryable=True)

    def listed_price(self, host: HostInfo, model: str) -> int | None:
        """The price ``host`` listed for ``model`` in the payment token when discovered (``None``: unknown)."""
        prices = host.prices.get(model) or {}
        value = prices.get(self.config.token)
        return int(value) if value else None

    # ------------------------------------------------------------------ the chain

    def _chain(self) -> MarketplaceClient:
        with self._setup_lock:
            return self._chain_client()

    def _chain_client(self) -> MarketplaceClient:
        if self._client is None:
            from .marketplace import MarketplaceClient

            marketplace = self.network.addresses.get("job_marketplace")
            if not marketplace:
                raise PaymentRequired(f"network {self.network.name} names no job_marketplace address: "
                                      "paid sessions need one", hint="add addresses['job_marketplace']")
            rpc: Any = self.network.rpc_url
            if self.network.provider is not None:
                from web3 import Web3

                provider = self.network.provider
                rpc = provider if isinstance(provider, Web3) else Web3(provider)
            if rpc is None:
                raise PaymentRequired(f"network {self.network.name} has no RPC URL to open jobs through",
                                      hint="set FABSTIR_RPC_URL or pass rpc_url=...")
            self._client = MarketplaceClient(rpc, marketplace, account=self.wallet._key,
                                             timeout=self.config.read_timeout,
                                             receipt_timeout=self.config.job_timeout, poll_interval=0.05,
                                             replace_after=self.config.replace_after,
                                             gas_limit=LOCAL_GAS_LIMIT if self.local else None)
        return self._client

    def _check_chain(self) -> None:
        """Check (once) that the endpoint is the network's chain; learn the token and its terms. Blocking.

        Raises:
            InvalidOptions: the endpoint's chain id is not the network's.
            PaymentRequired: the network names no stable token, or the marketplace does not take it.
        """
        with self._setup_lock:  # once, even when balance() and the event loop's first job race
            if not self._chain_checked:
                self._check_chain_once()

    def _check_chain_once(self) -> None:
        client = self._chain_client()
        expected = self.network.chain_id
        self._chain_id = client.chain_id
        if expected is not None and client.chain_id != expected:
            raise InvalidOptions(
                f"network {self.network.name} is chain {expected}, but its RPC endpoint serves chain "
                f"{client.chain_id}: no job was opened", field="chain_id",
                hint="check the RPC URL (FABSTIR_RPC_URL) or the network's chain_id")
        if self.config.token == "stable":
            token = self.network.addresses.get("stable_token")
            if not token:
                raise PaymentRequired(f"network {self.network.name} names no stable token to pay in",
                                      hint="pay in the native token: payment_token='native'")
        else:
            token = _NATIVE
        minimum = client.min_deposit(token)
        if minimum <= 0:
            raise PaymentRequired(f"the marketplace on {self.network.name} takes no deposits in {token}",
                                  hint="pay in the native token: payment_token='native'")
        decimals = client.decimals(token)
        self._token_address, self._decimals, self._min_deposit = token, decimals, minimum
        limit = None if self.config.budget is None else base_units(self.config.budget, decimals, "budget")
        self.budget = Budget(limit, decimals, self.unit, name="the process budget")
        self._chain_checked = True

    def _submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Start a blocking chain call in this module's thread pool.

        Raises:
            ConnectionFailed: payments are closed.
        """
        if self._executor_down:
            raise ConnectionFailed(f"payments on {self.network.name} are closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _wait(self, future: asyncio.Future[T], timeout: float) -> T:
        """Wait for a call :meth:`_submit` started, at most ``timeout`` seconds; the call itself is
        never cancelled (a transaction it sent may still be mined).

        Raises:
            ConnectionFailed: it did not finish in time.
        """
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise ConnectionFailed(f"chain call on {self.network.name} did not finish within {timeout:g} s") from None

    async def _run(self, call: Callable[[], T], timeout: float) -> T:
        """Run a blocking chain call in this module's thread pool, within ``timeout`` seconds.

        Raises:
            ConnectionFailed: it did not finish in time, or payments are closed.
        """
        return await self._wait(self._submit(call), timeout)

    async def ensure_ready(self) -> None:
        """Check the chain and make the budget (once), off the event loop."""
        if not self._chain_checked:
            await self._run(self._check_chain, self.config.read_timeout)

    # ------------------------------------------------------------------ sessions

    async def register_session(self, session_id: str, *, deposit: Any = None, budget: Any = None) -> SessionTerms:
        """Set what session ``session_id`` pays with; checked before anything is sent.

        Args:
            deposit: each of its jobs' deposit, in whole tokens (``None``: sized from ``max_tokens``).
            budget: the most the session may hold and spend, in whole tokens (``None``: the process's).

        Raises:
            InvalidOptions: a deposit or budget that is not above 0.
            BudgetExceeded: the deposit passes the session's or the process's budget.
        """
        await self.ensure_ready()
        assert self.budget is not None and self._decimals is not None
        decimals = self._decimals
        units = None if deposit is None else base_units(deposit, decimals, "deposit")
        limit = None if budget is None else base_units(budget, decimals, "budget")
        session_budget = Budget(limit, decimals, self.unit, name=f"session {session_id}'s budget",
                                parent=self.budget)
        terms = SessionTerms(session_id, units, session_budget)
        if units is not None:
            terms.budget.check(units, f"session {session_id}")
            minimum = self._min_deposit or 0
            if units < minimum:
                raise InvalidOptions(
                    f"deposit {format_amount(units, decimals, self.unit)} is below the marketplace's minimum of "
                    f"{format_amount(minimum, decimals, self.unit)}", field="deposit")
        self._sessions[session_id] = terms
        return terms

    def session(self, session_id: str) -> SessionTerms:
        """The terms of a session (made with the defaults for a session not registered)."""
        terms = self._sessions.get(session_id)
        if terms is None:
            assert self.budget is not None
            terms = SessionTerms(session_id, None, Budget(None, self.budget.decimals, self.unit,
                                                          name=f"session {session_id}'s budget", parent=self.budget))
            self._sessions[session_id] = terms
        return terms

    async def end_session(self, session_id: str) -> list[JobSettlement]:
        """Settle every job of a session (its socket already closed or closing); return their settlements.

        Raises:
            FabstirError: a job could not be settled (it stays Active on chain; see :meth:`settle`).
        """
        terms = self._sessions.pop(session_id, None)
        if terms is None:
            return []
        results = await asyncio.gather(*(self.settle(job, "the session ended") for job in terms.jobs),
                                       return_exceptions=True)
        for result in results:  # every job was tried; the first failure is the one to tell
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ opening jobs

    async def open_job(self, host: HostInfo, model: str, *, max_tokens: int, kind: str,
                       session: SessionTerms | None = None) -> PaidJob:
        """Open a job with ``host`` for ``model`` that can pay for an answer of ``max_tokens``.

        The price is the host's price on chain now (``getModelPricing``), refused if above what the
        host listed when discovered (the price the user chose the host at). The deposit is the
        session's, else sized: at least :attr:`PaymentConfig.job_tokens` and the request's tokens at
        that price, and the contract's minimum; within the remaining budget.

        Raises:
            BudgetExceeded: the deposit would pass a budget (nothing was sent).
            TransactionFailed: the host's price rose (``reason="Low price"``, retryable: another host may
                do), or the contract refused the job.
            InsufficientFunds: the wallet cannot pay the deposit or the gas.
            PaymentRequired: the host does not price the model in the payment token (retryable).
            InvalidOptions: the chain is not the network's.
            ConnectionFailed: the chain did not answer in time, or the payments are closing.
        """
        self._check_open()
        await self.ensure_ready()
        assert self.budget is not None and self._decimals is not None and self._token_address is not None
        client, token, decimals = self._chain(), self._token_address, self._decimals
        model_id = self.model_id(host, model)
        address = host.address
        assert address is not None
        listed = self.listed_price(host, model)
        what = f"open a job with host {host.api_url}"
        price = await self._run(functools.partial(self._price, client, address, model_id, token, what),
                                self.config.read_timeout)
        if listed is not None and price > listed:
            raise TransactionFailed(
                f"{what}: host {address} now asks {price} per 1000 tokens of {model} (in {self.unit} base units), "
                f"above the {listed} it listed when discovered: no job was opened", reason="Low price",
                retryable=True, host=host.api_url,
                hint="discover the hosts again to accept the new price, or use another host")
        budget = session.budget if session is not None else self.budget
        need = max(self.config.padded(max_tokens), self.config.proof_interval)
        floor = max(deposit_for(need, price), self._min_deposit or 0)
        if session is not None and session.deposit is not None:
            deposit = session.deposit
            if tokens_for(deposit, price) < self.config.proof_interval:
                raise InvalidOptions(
                    f"deposit {format_amount(deposit, decimals, self.unit)} pays for "
                    f"{tokens_for(deposit, price)} tokens at host {address}'s price, fewer than a job's first "
                    f"proof ({self.config.proof_interval})", field="deposit")
        else:
            deposit = max(floor, deposit_for(max(self.config.job_tokens, need), price))
            left = budget.remaining
            if left is not None and deposit > left >= floor:
                deposit = left  # a smaller job still pays for this request; top-ups follow
        self._check_open()  # (again: the price was read meanwhile)
        budget.check(deposit, what)
        budget.hold(deposit)
        approve = budget.remaining if token != _NATIVE else None

        def make_job(opened: OpenedJob) -> PaidJob:
            return PaidJob(job_id=opened.job_id, host=host, model=model, model_id=model_id, token=token,
                           unit=self.unit, decimals=decimals, deposit=deposit, price_per_token=price,
                           proof_interval=self.config.proof_interval, open_tx=opened.tx_hash,
                           open_block=opened.block_number,
                           kind=kind, session_id=session.session_id if session else None, budget=budget)

        creation = _Creation(make_job, budget, deposit, model_id, token, price)
        try:
            future = self._submit(functools.partial(self._create, client, address, creation, approve))
        except BaseException:
            budget.settle(deposit, 0)
            raise
        try:
            opened = await self._wait(future, self.config.job_timeout)
        except BaseException:
            # Given up (a timeout, a cancelled request, Ctrl-C) or failed after its transaction was
            # sent: whatever the chain makes of it, no deposit stays behind.
            creation.abandoned.set()
            self._follow(creation, future)
            raise
        job = make_job(opened)
        self._jobs.append(job)
        if session is not None:
            session.jobs.append(job)
        self._record(job)
        logger.info("job %d opened with host %s: deposit %s, price %d per 1000 tokens", job.job_id, address,
                    format_amount(deposit, decimals, self.unit), price)
        return job

    def _follow(self, creation: _Creation, future: asyncio.Future[Any]) -> None:
        """Make sure a job creation whose caller gave up, or that failed, holds no deposit: a job it
        opens (now or later) is settled at once (the whole deposit comes back); a transaction whose
        fate is unknown is looked for on chain; else the deposit is freed."""

        def finished(done: asyncio.Future[Any]) -> None:
            error = None if done.cancelled() else done.exception()
            if done.cancelled():
                creation.budget.settle(creation.deposit, 0)
            elif error is None:
                self._late_job(creation.make_job(done.result()))
            elif creation.tx_hashes and _outcome_unknown(error):
                self._track(asyncio.get_running_loop().create_task(self._recover(creation)))
            else:
                creation.budget.settle(creation.deposit, 0)
            self._background.discard(done)

        if future.done():
            finished(future)
        else:
            self._background.add(future)
            future.add_done_callback(finished)

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_open(self) -> None:
        """Refuse a new job once :meth:`aclose` has begun (it settles the jobs it knows; a job opened
        after that would outlive the client).

        Raises:
            ConnectionFailed: the payments are closing or closed.
        """
        if self._closed:
            raise ConnectionFailed(f"payments on {self.network.name} are closed: no new job is opened", retryable=False)

    def _late_job(self, job: PaidJob) -> None:
        """A job whose creation its caller gave up on opened after all: settle it now."""
        self._jobs.append(job)
        self._record(job)
        logger.warning("job %d was opened after its caller gave up waiting; settling it", job.job_id)
        self.retire(job, "opened after its caller gave up waiting")

    async def _recover(self, creation: _Creation) -> None:
        """Find out whether a creating transaction whose answer was lost opened a job; settle it if so."""
        client, tx_hashes = self._chain(), list(creation.tx_hashes)

        def look() -> Any:
            return client.opened_job(tx_hashes, creation.model_id, token=creation.token, price_per_token=creation.price,
                                     timeout=self.config.job_timeout)

        try:
            opened = await self._run(look, self.config.job_timeout + self.config.read_timeout)
        except FabstirError as exc:
            creation.budget.settle(creation.deposit, 0)
            logger.warning("job creation %s: not found on chain (%s); if it is mined later, its job holds the "
                           "deposit until its depositor completes it or anyone times it out", " / ".join(tx_hashes),
                           exc.message)
            return
        if opened is None:
            creation.budget.settle(creation.deposit, 0)
        else:
            self._late_job(creation.make_job(opened))

    def _price(self, client: MarketplaceClient, host: str, model_id: str, token: str, what: str) -> int:
        try:
            price = client.model_price(host, model_id, token)
        except TransactionFailed as exc:
            price, why = 0, exc.reason or exc.message
        else:
            why = "price 0"
        if price <= 0:
            raise PaymentRequired(f"{what}: host {host} does not price this model in {self.unit} ({why})",
                                  retryable=True, hint="another host may; or pay in the native token "
                                                       "(payment_token='native')")
        return price

    def _create(self, client: MarketplaceClient, host: str, creation: _Creation, approve: int | None) -> OpenedJob:
        """Open the job (in the thread pool): approve the token if needed, create."""
        deposit, token = creation.deposit, creation.token
        what = f"open a job with host {host}"

        def sending(tx_hash: str) -> None:  # (first) the last moment to give up without a job
            if not creation.tx_hashes and creation.abandoned.is_set():
                raise ConnectionFailed(f"{what}: given up before the transaction was sent")
            creation.tx_hashes.append(tx_hash)  # a replacement: either may be mined

        terms: dict[str, Any] = {"max_duration": self.config.max_duration, "proof_interval": self.config.proof_interval,
                 "proof_timeout_window": self.config.proof_timeout_window, "price_per_token": creation.price,
                 "deposit": deposit, "on_sent": sending}
        try:
            if token == _NATIVE:
                opened = client.create_job(host, creation.model_id, **terms)
            else:
                with self._token_lock:  # another job's create must not spend this one's allowance meanwhile
                    if creation.abandoned.is_set():  # nothing sent yet, not even an approval
                        raise ConnectionFailed(f"{what}: given up before the transaction was sent")
                    # an approval covers the rest of the budget too: later jobs need none until it is spent
                    opened = client.create_job(host, creation.model_id, token=token,
                                               allowance=None if approve is None else deposit + approve, **terms)
        except InsufficientFunds as exc:
            exc.hint = (f"fund {self.wallet.address} on {self.network.name} with {self.unit} for deposits and the "
                        f"native token for gas, or lower the deposit")
            raise
        except TransactionFailed as exc:
            if exc.reason == "Low price":
                exc.retryable = True
                exc.hint = "the host raised its price: discover the hosts again, or use another host"
            raise
        return opened

    async def adopt_job(self, job_id: Any, host: HostInfo, model: str, session: SessionTerms) -> PaidJob:
        """Take job ``job_id`` (opened earlier, by this wallet) for a session.

        Raises:
            InvalidOptions: not a positive integer.
            SessionNotFound: no such job.
            PaymentRequired: the job is another wallet's, settled, another host's, for another model,
                paid in another token, or already used by this client (another session's).
            BudgetExceeded: its deposit passes the session's budget.
        """
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
            raise InvalidOptions(f"job_id must be a positive integer, not {job_id!r}", field="job_id")
        self._check_open()
        await self.ensure_ready()
        assert self._decimals is not None
        client = self._chain()
        onchain = await self._run(lambda: client.get_job(job_id), self.config.read_timeout)
        chain_model = await self._run(lambda: client.session_model(job_id), self.config.read_timeout)
        if onchain.depositor.lower() != self.wallet.address.lower():
            raise PaymentRequired(f"job {job_id} was opened by {onchain.depositor}, not by this wallet "
                                  f"({self.wallet.address}): a session pays with its own jobs",
                                  hint="open a new job: create_session() without job_id")
        if not onchain.active:
            raise PaymentRequired(f"job {job_id} is {onchain.status.name.lower().replace('_', ' ')}: a settled job "
                                  f"is never reused", hint="open a new job: create_session() without job_id")
        if host.address is None or onchain.host.lower() != host.address.lower():
            raise PaymentRequired(f"job {job_id} pays host {onchain.host}, not {host.address or host.api_url}")
        wanted = self.model_id(host, model)
        if chain_model.lower() != wanted:
            raise PaymentRequired(f"job {job_id} pays for model {chain_model}, not {model} ({wanted})")
        if onchain.payment_token.lower() != (self._token_address or "").lower():
            raise PaymentRequired(f"job {job_id} is paid in {onchain.payment_token}, not in {self.unit}")
        self._check_open()
        held = next((job for job in self._jobs if job.job_id == job_id and job.settlement is None), None)
        if held is not None:  # (checked after the reads: nothing awaits between this and taking it)
            user = f"session {held.session_id}" if held.session_id else "a stateless request"
            raise PaymentRequired(f"job {job_id} is already in use by {user} of this client: a job pays for one "
                                  f"session, on one connection", hint="open a new job: create_session() without job_id")
        session.budget.check(onchain.deposit, f"adopt job {job_id}")
        session.budget.hold(onchain.deposit)
        job = PaidJob(job_id=job_id, host=host, model=model, model_id=wanted, token=onchain.payment_token,
                      unit=self.unit, decimals=self._decimals, deposit=onchain.deposit,
                      price_per_token=onchain.price_per_token, proof_interval=onchain.proof_interval,
                      open_tx="", open_block=None, kind="session", session_id=session.session_id,
                      budget=session.budget, tokens_used=onchain.tokens_used)
        # Proofs of its earlier answers may still land (their socket's settlement): its bill is not judged.
        job.all_reported = False
        self._jobs.append(job)
        session.jobs.append(job)
        self._record(job)
        return job

    # ------------------------------------------------------------------ settling jobs

    def retire(self, job: PaidJob, reason: str) -> None:
        """End ``job`` and settle it in the background (its socket closes now)."""
        job.end(reason)
        if job._settling is None and job.settlement is None:
            task = asyncio.get_running_loop().create_task(self._settle(job), name=f"fabstir-settle-{job.job_id}")
            job._settling = task
            self._background.add(task)
            task.add_done_callback(self._settled_in_background)

    def _settled_in_background(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("settlement failed in the background: %s", task.exception())

    async def settle(self, job: PaidJob, reason: str = "settled") -> JobSettlement:
        """Close the job's socket, wait for its host's last proof, complete it, read the result back.

        Returns at once for a job already settled; joins a settlement already running; tries again
        for a job whose earlier settlement failed (``state == "unsettled"``).

        Raises:
            TransactionFailed, ConnectionFailed: the job could not be settled within
                :attr:`PaymentConfig.settle_timeout` (it stays Active on chain: its depositor may
                complete it later, anyone may time it out after its proofTimeoutWindow).
        """
        if job.settlement is not None:
            return job.settlement
        job.end(reason)
        task = job._settling
        if task is None or task.done():  # not started, or an earlier try failed: (try again to) settle it
            task = job._settling = asyncio.get_running_loop().create_task(
                self._settle(job), name=f"fabstir-settle-{job.job_id}")
        return await asyncio.shield(task)

    async def _settle(self, job: PaidJob) -> JobSettlement:
        job.state = "closing"
        if job.socket is not None:
            await job.socket.close()
        client = self._chain()
        expected = job.cadence.settled()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.settle_timeout
        wait_proof_until = loop.time() + self.config.final_proof_timeout
        poll = _POLL_FIRST
        try:
            while True:
                onchain = await self._run(lambda: client.get_job(job.job_id), self.config.read_timeout)
                if not onchain.active or onchain.tokens_used >= expected or loop.time() >= wait_proof_until:
                    break
                await asyncio.sleep(poll)
                poll = min(_POLL_MAX, 2 * poll)
            if onchain.tokens_used < expected and onchain.active:
                logger.info("job %d: the host proved %d of the %d tokens the cadence implies; completing it",
                            job.job_id, onchain.tokens_used, expected)
            settled = None
            while onchain.active:
                try:
                    settled = await self._run(lambda: client.complete_job(job.job_id), self.config.settle_timeout)
                    break
                except TransactionFailed as exc:
                    if exc.reason == _NOT_ACTIVE:
                        break
                    if not exc.retryable or loop.time() >= deadline:
                        raise
                except ConnectionFailed:
                    if loop.time() >= deadline:
                        raise
                await asyncio.sleep(1.0)
            if settled is None:
                settled = await self._find_settlement(job, deadline)
            final = await self._run(lambda: client.get_job(job.job_id), self.config.read_timeout)
        except FabstirError as exc:
            job.state = "unsettled"
            self._record(job)
            logger.warning("job %d not settled: %s; it stays Active on chain", job.job_id, exc)
            raise
        fee = max(0, settled.payment - settled.host_earnings)
        me = self.wallet.address.lower()
        who = settled.completed_by or ""
        settled_by = "client" if who.lower() == me else ("host" if who.lower() == (job.host.address or "").lower()
                                                         else "other")
        streamed = job.cadence.streamed
        expected = job.cadence.settled()  # again: an answer may have been counted since the wait began
        record = JobSettlement(
            job_id=job.job_id, host=job.host.api_url, model=job.model, unit=job.unit, decimals=job.decimals,
            status=final.status.name.lower(), deposit=job.deposit, tokens_billed=settled.tokens_used,
            cost=settled.payment, host_earnings=settled.host_earnings, treasury_fee=fee, refund=settled.refund,
            open_tx=job.open_tx, settle_tx=settled.tx_hash, settled_by=settled_by,
            received_tokens=job.received_tokens, streamed_tokens=streamed, expected_tokens=expected,
            reason=explain_difference(settled.tokens_used, streamed, job.cadence),
        )
        # (an answer cut off may have had tokens the client never saw: then the bill is not judged)
        over = settled.tokens_used - job.cadence.most_billable()
        if over > 0 and job.all_reported:
            job.host.overbilled_tokens += over
            logger.warning("job %d: host %s billed %d tokens, %d more than the %d it reported streaming allow; it is "
                           "chosen only when no other host fits", job.job_id, job.host.api_url,
                           settled.tokens_used, over, streamed)
        job.settlement = record
        job.state = "settled"
        job.budget.settle(job.deposit, settled.payment)
        self._settlements.append(record)
        self._record(job)
        logger.info("%s", record)
        return record

    async def _find_settlement(self, job: PaidJob, deadline: float) -> Any:
        client = self._chain()
        loop = asyncio.get_running_loop()
        while True:  # someone else settled it: the event may lag the state on a load-balanced endpoint
            walk_until = time.monotonic() + max(0.0, deadline - loop.time())  # the windowed log search's bound
            search = functools.partial(client.find_settlement, job.job_id, from_block=job.open_block or 0,
                                       deadline=walk_until)
            found = await self._run(search, self.config.settle_timeout)
            if found is not None:
                return found
            if loop.time() >= deadline:
                raise TransactionFailed(f"job {job.job_id} is settled on chain but its SessionCompleted event "
                                        "was not found")
            await asyncio.sleep(1.0)

    def _record(self, job: PaidJob) -> None:
        record_job = getattr(self.usage, "record_job", None)
        if not callable(record_job):
            return
        record = job.record()
        client = self._client
        record = dataclasses.replace(record, chain_id=self._chain_id or 0,
                                     marketplace=client.marketplace_address if client else "")
        try:
            record_job(record)
        except Exception as exc:  # the ledger must never fail a payment
            logger.warning("job %d: not recorded in the usage ledger: %s", job.job_id, exc)

    async def aclose(self) -> None:
        """Settle every open job (their sockets close), wait for background settlements.

        Idempotent, and safe to call again after an interrupted call (a cancelled ``await``, Ctrl-C):
        the next call settles what the first did not reach. Each settlement takes at most
        :attr:`close_timeout` seconds.
        """
        self._closed = True
        pending = [job for job in self._jobs if job.settlement is None]  # an earlier failure is tried again
        results = await asyncio.gather(*(self.settle(job, "the client closed") for job in pending),
                                       return_exceptions=True)
        for job, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("job %d left unsettled at close: %s", job.job_id, result)
        while self._background:  # settlements, and job creations that may still open a job to settle
            await asyncio.gather(*list(self._background), return_exceptions=True)
            await asyncio.sleep(0)  # let done-callbacks add what they start
        self._executor_down = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def close_timeout(self) -> float:
        """The longest :meth:`aclose` may take: a job still opening, then its settlement."""
        config = self.config
        return config.job_timeout + config.read_timeout + config.final_proof_timeout + 2 * config.settle_timeout
