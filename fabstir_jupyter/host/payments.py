"""A paid host's chain work: check jobs, prove the tokens streamed, settle each job when its connection closes.

:class:`PaymentManager` is the host's side of spec/PROTOCOL.md §10. The server asks it to
:meth:`~PaymentManager.open_job` when a ``session_init`` (or the encrypted init's payload) names a
job: the job must exist (``SESSION_NOT_FOUND``), be Active, name this host, be for the model it
serves, be on its chain, and have deposit left for another proof (``PAYMENT_REQUIRED`` /
``BUDGET_EXCEEDED``). The job's :class:`~fabstir_jupyter.host.metering.JobMeter` then counts what
streams and says when a proof is due.

The host serves before its chain client is ready: :meth:`PaymentManager.start` connects in the
background (loading web3 takes about a second on a small machine), and a job check waits for that
connection, at most ``connect_timeout`` seconds from the start; past it jobs are refused with
``HOST_ERROR``.

Chain work never blocks a stream. Every web3 call runs in a small thread pool of this host; each
job has one worker task that takes its proofs, then its settlement, in order, from a queue the
server fills without awaiting. A failed transaction is retried with exponential backoff for
``retry_window`` seconds; ``"Too many"`` (the contract's 2000 tokens/s rule) just waits. Every log
line names the job id; none holds a prompt or an answer.

Settlement, production's: when the connection that carried a job closes (for any reason), its
worker finishes the proofs in flight, proves what is pending, then waits until the contract's
dispute window has passed since the last proof (read on the chain's own clock, so a test moves it
with ``LocalChain.advance_time``) and calls ``completeSessionJob``. If the depositor settled first,
the host meets ``Not active`` and stops quietly. :meth:`PaymentManager.aclose` waits
``shutdown_timeout`` for the settlements still running; a job left open then is logged: its proofs
stay on chain, its depositor may complete it, and anyone may time it out after its
``proofTimeoutWindow`` (both pay the proven tokens).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _compat
from ..errors import (
    BudgetExceeded,
    ConnectionFailed,
    FabstirError,
    HostError,
    InvalidOptions,
    PaymentRequired,
    SessionNotFound,
    TransactionFailed,
)
from .config import PaymentConfig
from .metering import MIN_PROOF_TOKENS, JobMeter, Proof

if TYPE_CHECKING:
    from ..crypto import PrivateKey
    from ..marketplace import MarketplaceClient

__all__ = ["PAID_FEATURE", "PaymentManager", "backoff"]

T = TypeVar("T")
logger = logging.getLogger("fabstir_jupyter.host.payments")

#: Listed by /v1/version on a paid host.
PAID_FEATURE = "paid-sessions"
#: Threads for job checks (reads only), beside the pool that sends proofs and settlements.
_READ_THREADS = 2
_MAX_FINISHED = 10_000  # settled job ids remembered, so that none is served again
_PROOF_LANDED = "Proof already used"  # an earlier try of the same proof was mined
_NOT_ACTIVE = "Not active"
_DISPUTE_WAIT = "Dispute wait"


def backoff(base: float, cap: float) -> Iterator[float]:
    """Yield retry delays: ``base``, doubling up to ``cap`` (no jitter: one host, one chain account)."""
    delay = base
    while True:
        yield delay
        delay = min(cap, delay * 2 if delay > 0 else cap)


class _State(enum.Enum):
    OPEN = "open"  # bound to a live connection
    SETTLING = "settling"  # its connection closed; the worker proves the rest and completes it
    DONE = "done"


@dataclass(eq=False)
class _PaidJob:
    meter: JobMeter
    owner: object  # the connection that carries it
    queue: asyncio.Queue[Proof | None] = field(default_factory=asyncio.Queue)  # None: settle
    state: _State = _State.OPEN
    worker: asyncio.Task[None] | None = None
    landed: int = 0  # tokens of this host's proofs known to be on chain

    @property
    def done(self) -> bool:
        """Whether it is over here (settled, closed by another party, or failed); any chain call may end it."""
        return self.state is _State.DONE


class PaymentManager:
    """Check, meter, prove and settle a paid host's jobs; every chain call off the event loop.

    Args:
        config: the chain, the marketplace, the model's registry id and the retry policy.
        key: the operator key (it signs proofs and settlements).

    Use from the host's event loop: ``await start()``, then :meth:`open_job`, :meth:`submit`,
    :meth:`answer_ended` and :meth:`release` as connections come and go, and ``await aclose()``.
    """

    def __init__(self, config: PaymentConfig, key: PrivateKey) -> None:
        self.config = config
        self.operator = key.address
        self._key = key
        self.model_registry_id = config.model_registry_id.lower()
        self.chain_id: int | None = None
        self.dispute_window = 0
        self._client: MarketplaceClient | None = None  # set once connected
        self._connecting: asyncio.Task[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Job checks read on threads of their own: a client's session_init must not queue behind proof
        # transactions, each holding a pool thread while it waits to be mined.
        self._reads: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: dict[int, _PaidJob] = {}
        self._finished: OrderedDict[int, str] = OrderedDict()  # job id -> how it ended
        self._owners: dict[object, set[int]] = {}
        self._workers: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<PaymentManager marketplace={self.config.marketplace} chain={self.chain_id} operator={self.operator}>"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting to the chain in the background; return at once.

        The host serves meanwhile (a job check waits for the connection: :meth:`open_job`).
        Connecting loads the chain client (web3: about a second of imports on a small machine, in
        a worker thread), reads the chain's id and the marketplace's dispute window, and warns if
        the operator is not an active node (jobs cannot name it until it registers). Failures that
        time may lift (an endpoint not up yet) are retried for ``connect_timeout`` seconds;
        :meth:`wait_connected` says how it ended.
        """
        if self._connecting is not None:
            return
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.chain_threads,
                                                           thread_name_prefix="fabstir-host-chain")
        self._reads = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="fabstir-host-chain-read")
        self._connecting = asyncio.get_running_loop().create_task(self._connect(), name="fabstir-host-chain-connect")
        # A failure is reported by wait_connected, open_job and /health; never as an unretrieved exception.
        self._connecting.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def wait_connected(self) -> None:
        """Wait until the chain client is connected (at most ``connect_timeout`` from :meth:`start`).

        Raises:
            ConnectionFailed: the chain did not answer within ``connect_timeout`` (or another coded
                error: the last failure of the window).
            InvalidOptions: the address is not a JobMarketplace, or the chain extra is missing.
            RuntimeError: :meth:`start` was not called.
        """
        if self._connecting is None:
            raise RuntimeError("payment manager not started")
        await asyncio.shield(self._connecting)

    @property
    def chain_state(self) -> str:
        """``"connecting"``, ``"connected"`` or ``"failed"`` (``"stopped"`` before :meth:`start`)."""
        task = self._connecting
        if task is None:
            return "stopped"
        if not task.done():
            return "connecting"
        return "connected" if not task.cancelled() and task.exception() is None else "failed"

    async def _connect(self) -> None:
        """Load the chain client and check the chain, retrying what time may lift (see :meth:`start`)."""
        cfg = self.config
        delays = backoff(cfg.retry_base, cfg.retry_max_delay)
        deadline = time.monotonic() + cfg.connect_timeout
        while True:
            try:
                async with _compat.timeout(max(0.0, deadline - time.monotonic())):
                    await self._connect_once()
                return
            except InvalidOptions as exc:
                logger.error("paid sessions off: %s", exc)
                raise
            except (FabstirError, asyncio.TimeoutError) as exc:
                error = exc if isinstance(exc, FabstirError) else ConnectionFailed(
                    f"the chain did not answer within {cfg.connect_timeout:g} s")
            delay = next(delays)
            if time.monotonic() + delay >= deadline:
                logger.error("paid sessions off: the chain could not be reached within %g s: %s",
                             cfg.connect_timeout, error)
                raise error
            logger.warning("cannot reach the chain yet (%s); retrying in %.1f s", error.code, delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        client = await loop.run_in_executor(self._pool, self._make_client)  # the imports stay off the loop
        logger.info("chain client loaded in %.2f s; reading the chain", time.monotonic() - started)
        chain_id = await self._call(lambda: client.chain_id)
        try:
            dispute_window = await self._call(client.dispute_window)
        except TransactionFailed:
            raise InvalidOptions(f"{cfg.marketplace} on chain {chain_id} is not a JobMarketplace "
                                 f"(disputeWindow() fails)", field="marketplace") from None
        try:
            active = await self._call(client.is_active_node)
        except FabstirError as exc:
            active = None
            logger.warning("cannot tell whether operator %s is an active node: %s", self.operator, exc.code)
        if active is False:
            logger.warning("operator %s is not (yet) an active node on the marketplace's NodeRegistry: no job can "
                           "name this host until it registers", self.operator)
        self.chain_id, self.dispute_window, self._client = chain_id, dispute_window, client
        logger.info("paid sessions on: marketplace %s on chain %d, operator %s, model %s, dispute window %d s",
                    cfg.marketplace, self.chain_id, self.operator, self.model_registry_id, self.dispute_window)

    def _make_client(self) -> MarketplaceClient:
        try:
            from ..marketplace import MarketplaceClient
        except ImportError as exc:
            raise InvalidOptions(f"paid sessions need the chain extra: {exc}", field="payment") from None
        cfg = self.config
        return MarketplaceClient(cfg.rpc_url, cfg.marketplace, account=self._key, timeout=cfg.rpc_timeout,
                                 receipt_timeout=cfg.receipt_timeout, poll_interval=0.1, gas_limit=cfg.gas_limit)

    async def aclose(self) -> None:
        """Settle every job still open (their connections are closed by now) within ``shutdown_timeout``.

        Jobs not settled by then are logged and left open (see the module docstring).
        """
        for owner in list(self._owners):
            self.release(owner)
        pending = {t for t in self._workers if not t.done()}
        if pending:
            logger.info("settling jobs %s before shutdown (at most %g s)",
                        ", ".join(str(j) for j in sorted(self._jobs)), self.config.shutdown_timeout)
            _, pending = await asyncio.wait(pending, timeout=self.config.shutdown_timeout)
        for job_id, job in list(self._jobs.items()):
            if not job.done:
                meter = job.meter
                on_chain = meter.tokens_used + job.landed
                logger.warning("job %d left open at shutdown: %d tokens proven on chain, %d more in proofs not "
                               "landed, %d streamed and not proven; its depositor may complete it, anyone may "
                               "time it out after its proofTimeoutWindow", job_id, on_chain,
                               max(0, meter.claimed - on_chain), meter.pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        for pool in (self._pool, self._reads):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ what the server asks

    async def open_job(self, job_id_text: str | None, chain_id: int | None, owner: object) -> JobMeter:
        """Check the job a session names and bind it to connection ``owner``; return its meter.

        A job already bound to ``owner`` is returned without reading the chain (the production
        SDK re-sends its encrypted init before every prompt). While the host is still connecting
        to its chain (just started), the check waits for it.

        Raises:
            InvalidOptions: the job id is not a positive integer.
            SessionNotFound: no such job on the marketplace.
            PaymentRequired: the job is not usable here: not Active, another host's, for another
                model, on another chain, settled by this host, or in use on another connection.
            BudgetExceeded: its deposit cannot pay for another proof.
            HostError: the chain cannot be read now (retryable), or could not be reached since the
                host started.
        """
        job_id = _job_number(job_id_text)
        known = self._usable(job_id, owner)
        if known is not None:
            return known
        client = await self._connected(job_id)
        if chain_id is not None and chain_id != self.chain_id:
            raise PaymentRequired(f"job {job_id}: this host is paid on chain {self.chain_id}, not chain {chain_id}")
        try:
            job = await self._read(lambda: client.get_job(job_id))
            model = await self._read(lambda: client.session_model(job_id))
        except SessionNotFound:
            raise SessionNotFound(f"job {job_id} does not exist on marketplace {self.config.marketplace} "
                                  f"(chain {self.chain_id})") from None
        except Exception as exc:  # any failure to read is the chain's, not the client's
            code = exc.code if isinstance(exc, FabstirError) else type(exc).__name__
            logger.warning("job %d: cannot read it from the chain: %s", job_id, code)
            raise HostError(f"job {job_id}: this host cannot read the chain now ({code}); try again") from None
        if job.host.lower() != self.operator.lower():
            raise PaymentRequired(f"job {job_id} pays host {job.host}, not this host ({self.operator})")
        if not job.active:
            raise PaymentRequired(f"job {job_id} is {job.status.name.lower().replace('_', ' ')}; open a new job")
        if model.lower() != self.model_registry_id:
            raise PaymentRequired(f"job {job_id} pays for model {model}; this host serves {self.model_registry_id}")
        if job.tokens_used > 0 and job.remaining_tokens < MIN_PROOF_TOKENS:
            raise BudgetExceeded(f"job {job_id}: its deposit pays for {job.remaining_tokens} more tokens, fewer than "
                                 f"a proof's {MIN_PROOF_TOKENS}; open a new job")
        known = self._usable(job_id, owner)  # another connection may have taken it while we read
        if known is not None:
            return known
        meter = JobMeter(job_id, proof_interval=job.proof_interval, max_tokens=job.max_tokens,
                         tokens_used=job.tokens_used)
        self._jobs[job_id] = _PaidJob(meter, owner)
        self._owners.setdefault(owner, set()).add(job_id)
        logger.info("job %d opened: deposit pays for %d tokens, %d used, proof interval %d", job_id,
                    job.max_tokens, job.tokens_used, job.proof_interval)
        return meter

    def _usable(self, job_id: int, owner: object) -> JobMeter | None:
        """The meter of a job this host already holds for ``owner``; None for a job it does not know.

        Raises:
            PaymentRequired: the job is settled (or settling) here, or held by another connection.
        """
        if job_id in self._finished:
            raise PaymentRequired(f"job {job_id} was settled when its connection closed; open a new job")
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.state is not _State.OPEN:
            raise PaymentRequired(f"job {job_id} was settled when its connection closed; open a new job")
        if job.owner is not owner:
            raise PaymentRequired(f"job {job_id} is in use on another connection to this host; "
                                  f"a paid job keeps one connection")
        meter = job.meter
        if meter.closed is not None:
            raise type(meter.closed)(meter.closed.message)
        if meter.claimed > 0 and meter.remaining < MIN_PROOF_TOKENS:
            raise BudgetExceeded(f"job {job_id}: its deposit pays for {meter.remaining} more tokens, fewer than "
                                 f"a proof's {MIN_PROOF_TOKENS}; open a new job")
        return meter

    def submit(self, meter: JobMeter, proof: Proof | None) -> None:
        """Queue ``proof`` (if any) for its job's worker; never waits."""
        if proof is None:
            return
        job = self._jobs.get(meter.job_id)
        if job is None or job.done:
            return
        logger.debug("job %d: proof of %d tokens due (%s)", meter.job_id, proof.tokens, proof.reason)
        job.queue.put_nowait(proof)
        self._ensure_worker(job)

    def answer_ended(self, meter: JobMeter) -> None:
        """An answer of ``meter``'s job ended: queue the proof production makes then, if any."""
        self.submit(meter, meter.answer_ended())

    def release(self, owner: object) -> None:
        """Connection ``owner`` closed: settle every job it carried (in the background)."""
        for job_id in sorted(self._owners.pop(owner, ())):
            job = self._jobs.get(job_id)
            if job is None or job.state is not _State.OPEN:
                continue
            job.state = _State.SETTLING
            job.meter.close(PaymentRequired(f"job {job_id} was settled when its connection closed; open a new job"))
            logger.info("job %d: connection closed after %d tokens; settling", job_id, job.meter.streamed)
            job.queue.put_nowait(None)
            self._ensure_worker(job)

    def health(self) -> dict[str, Any]:
        """What ``/health`` shows of the payments (never the key nor the RPC URL)."""
        states = [job.state for job in self._jobs.values()]
        return {
            "marketplace": self.config.marketplace,
            "chain": self.chain_state,
            "chain_id": self.chain_id,
            "operator": self.operator,
            "model_registry_id": self.model_registry_id,
            "open_jobs": states.count(_State.OPEN),
            "settling_jobs": states.count(_State.SETTLING),
            "settled_jobs": len(self._finished),
        }

    # ------------------------------------------------------------------ the workers

    def _ensure_worker(self, job: _PaidJob) -> None:
        if job.worker is None or job.worker.done():
            job.worker = asyncio.get_running_loop().create_task(self._work(job))
            self._workers.add(job.worker)
            job.worker.add_done_callback(self._workers.discard)

    async def _work(self, job: _PaidJob) -> None:
        """Take the job's proofs, then its settlement, in order."""
        job_id = job.meter.job_id
        try:
            while True:
                action = await job.queue.get()
                if action is None:
                    await self._settle(job)
                    return
                if job.meter.closed is None or job.state is _State.SETTLING:
                    await self._prove(job, action)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not take the host down; say which job it hit
            logger.exception("job %d: payment worker failed", job_id)
            job.meter.close(HostError(f"job {job_id}: this host's payment worker failed; open a new job"))
            self._finish(job, "failed")

    async def _prove(self, job: _PaidJob, proof: Proof) -> bool:
        """Submit one proof, retrying; return whether it is on chain."""
        client, job_id = self._chain(), proof.job_id

        def send() -> str:
            return client.submit_proof(job_id, proof.tokens, proof.proof_hash, "", "")

        try:
            tx_hash = await self._retrying(f"proof of {proof.tokens} tokens", job_id, send)
        except _JobInactive:
            return False
        except FabstirError as exc:
            if isinstance(exc, TransactionFailed) and exc.reason == _PROOF_LANDED:
                logger.info("job %d: proof of %d tokens was already mined by an earlier try", job_id, proof.tokens)
                job.landed += proof.tokens
                return True
            logger.error("job %d: proof of %d tokens (total %d) abandoned, unpaid: %s", job_id, proof.tokens,
                         proof.total, exc)
            # Serving on would be unpaid: a lost first proof makes every later one "Low first", and the
            # chain may stay out of reach. The client takes a new job (PAYMENT_REQUIRED ends this one).
            job.meter.close(PaymentRequired(f"job {job_id}: this host could not prove its tokens on chain "
                                            f"({exc.code}); it serves the job no more: open a new job"))
            return False
        logger.info("job %d: proved %d tokens (%s), total %d, tx %s", job_id, proof.tokens, proof.reason,
                    proof.total, tx_hash)
        job.landed += proof.tokens
        return True

    async def _settle(self, job: _PaidJob) -> None:
        """Prove what is pending, wait out the dispute window, complete the job."""
        meter, job_id = job.meter, job.meter.job_id
        if job.done:  # closed on chain by someone else meanwhile
            return
        started = time.monotonic()
        last = meter.settle()
        if meter.unbilled:
            logger.info("job %d: %d tokens after the last proof stay unbilled (a proof needs %d)", job_id,
                        meter.unbilled, MIN_PROOF_TOKENS)
        if last is not None:
            await self._prove(job, last)
        if job.done:  # the proof met Not active: someone else closed it, and _retrying finished it
            return
        client = self._chain()
        deadline = started + self.config.settle_timeout
        try:
            while True:
                onchain = await self._retrying("job read", job_id, lambda: client.get_job(job_id), complete=False)
                if not onchain.active:
                    logger.info("job %d: already %s on chain; nothing to settle", job_id, onchain.status.name.lower())
                    self._finish(job, onchain.status.name.lower())
                    return
                now = await self._retrying("clock read", job_id, client.chain_time, complete=False)
                due = onchain.last_proof_time + self.dispute_window
                if now + 1 >= due:
                    try:
                        settled = await self._retrying("settlement", job_id, lambda: client.complete_job(job_id))
                    except TransactionFailed as exc:
                        if exc.reason != _DISPUTE_WAIT:
                            raise
                    else:
                        logger.info("job %d settled: %d tokens billed, host earnings %d, refund %d, tx %s", job_id,
                                    settled.tokens_used, settled.host_earnings, settled.refund, settled.tx_hash)
                        self._finish(job, "completed")
                        return
                if time.monotonic() >= deadline:
                    raise TransactionFailed(f"job {job_id}: dispute window not over after "
                                            f"{self.config.settle_timeout:g} s")
                await asyncio.sleep(self.config.settle_poll)
        except _JobInactive:
            return
        except FabstirError as exc:
            logger.error("job %d left open: settlement failed: %s; its depositor may complete it, anyone may time it "
                         "out after its proofTimeoutWindow", job_id, exc)
            self._finish(job, "left open")

    async def _retrying(self, what: str, job_id: int, call: Callable[[], T], *, complete: bool = True) -> T:
        """Run ``call`` in the chain pool; retry failures that time may lift, for ``retry_window`` seconds.

        Raises:
            _JobInactive: the contract says ``Not active`` (someone else settled the job).
            FabstirError: a refusal that retrying cannot lift, or the last failure of the window.
        """
        cfg = self.config
        deadline = time.monotonic() + cfg.retry_window
        delays = backoff(cfg.retry_base, cfg.retry_max_delay)
        while True:
            try:
                return await self._call(call)
            except TransactionFailed as exc:
                if exc.reason == _NOT_ACTIVE:
                    job = self._jobs.get(job_id)
                    if job is not None:
                        logger.info("job %d: no longer active on chain (settled by its depositor or timed out); "
                                    "stopping", job_id)
                        job.meter.close(PaymentRequired(f"job {job_id} is no longer active; open a new job"))
                        self._finish(job, "closed by another party")
                    raise _JobInactive() from None
                if exc.reason is not None and (not exc.retryable or (exc.reason == _DISPUTE_WAIT and complete)):
                    raise
                error: FabstirError = exc
            except (ConnectionFailed, HostError) as exc:
                error = exc
            except (BudgetExceeded, InvalidOptions):
                raise
            except FabstirError as exc:  # InsufficientFunds (gas) and the like: an operator may fix it
                error = exc
            delay = next(delays)
            if time.monotonic() + delay > deadline:
                raise error
            logger.warning("job %d: %s failed (%s); retrying in %.1f s", job_id, what, error, delay)
            await asyncio.sleep(delay)

    def _finish(self, job: _PaidJob, how: str) -> None:
        job.state = _State.DONE
        job_id = job.meter.job_id
        self._jobs.pop(job_id, None)
        self._finished[job_id] = how
        while len(self._finished) > _MAX_FINISHED:
            self._finished.popitem(last=False)
        for jobs in self._owners.values():
            jobs.discard(job_id)

    # ------------------------------------------------------------------ plumbing

    def _chain(self) -> MarketplaceClient:
        if self._client is None:
            raise RuntimeError("payment manager not connected")
        return self._client

    async def _connected(self, job_id: int) -> MarketplaceClient:
        """The chain client, once connected (waiting for it while the host connects).

        Raises:
            HostError: the chain could not be reached since the host started (or the marketplace is
                not one); the message names the cause's code, never the RPC URL.
        """
        try:
            await self.wait_connected()
        except FabstirError as exc:
            raise HostError(f"job {job_id}: this host cannot check jobs: no connection to its chain ({exc.code}); "
                            f"use another host", retryable=True) from None
        return self._chain()

    async def _call(self, call: Callable[[], T]) -> T:
        """Run a blocking web3 call in the chain pool (the event loop never blocks on the chain)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, call)

    async def _read(self, call: Callable[[], T]) -> T:
        """Run a blocking chain read for a job check on the read threads, within twice the RPC timeout.

        Raises:
            TimeoutError: no answer in time (the thread finishes on its own).
        """
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._reads, call), 2 * self.config.rpc_timeout)


class _JobInactive(Exception):
    """The contract refused with ``Not active``: the job is over; its worker stops quietly."""


def _job_number(text: str | None) -> int:
    if text is None or not (text.isascii() and text.isdigit()) or int(text) == 0 or len(text) > 78:
        raise InvalidOptions(f"job id must be a positive integer, not {text!r}", field="job_id")
    return int(text)
