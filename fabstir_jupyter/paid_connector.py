"""Requests over sockets bound to paid jobs (spec/PROTOCOL.md §10): the connector of a paid network.

:class:`PaidConnector` gives each request a connection whose socket is bound to a job that can pay
for it (see :mod:`fabstir_jupyter.payments` for the rules: a session pins one job and one socket,
stateless requests share a tab of jobs per host and model). It asks :class:`~fabstir_jupyter.payments.Payments`
to open, end and settle jobs, and never touches the chain itself; :class:`JobChannel` speaks the
plaintext protocol over a bound socket.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import protocol
from .billing import format_amount
from .config import InferenceConfig
from .connections import Channel, Connection, PoolConnector
from .errors import BudgetExceeded, ConnectionFailed, FabstirError
from .hosts import HostInfo, HostKeys
from .payments import JOB_REFUSALS, PaidJob, Payments, StreamEvent
from .transport import ConnectionPool, WebSocketClient

if TYPE_CHECKING:
    from .crypto import PrivateKey, PublicKey

__all__ = ["JobChannel", "PaidConnector"]


class JobChannel(Channel):
    """The plaintext protocol over a socket bound to a paid job: every request is a ``prompt`` in a
    session whose ``session_init`` carried the job id (hosts refuse unbound generation requests)."""

    def __init__(self, socket: WebSocketClient, *, bound_session: str, job_id: int, chain_id: int | None) -> None:
        super().__init__(socket)
        self.bound_session = bound_session
        self.job_id = job_id
        self.chain_id = chain_id

    def __repr__(self) -> str:
        return f"<JobChannel job={self.job_id} session={self.bound_session!r} {self.socket!r}>"

    async def open_session(self, session_id: str, *, request_id: str | None, timeout: float) -> None:
        """Send ``session_init`` naming the job and wait for its ack.

        Raises:
            FabstirError: the host refused the job (its code: ``PAYMENT_REQUIRED``, ``BUDGET_EXCEEDED``...).
        """
        await self.socket.send(protocol.session_init_frame(self.bound_session, job_id=str(self.job_id),
                                                           chain_id=self.chain_id, request_id=request_id))
        await self.wait_for_ack(timeout)

    async def send_request(self, request: protocol.GenerationRequest, *, session_id: str | None,
                           request_id: str) -> None:
        """Send ``request`` as a ``prompt`` of the bound session (``session_id`` is not used)."""
        await super().send_request(request, session_id=self.bound_session, request_id=request_id)

    async def send_cancel(self, session_id: str | None) -> None:
        """Ask the host to stop the bound session's running request."""
        await super().send_cancel(self.bound_session)


@dataclass(eq=False)
class _Tab:
    """One host's stateless jobs for one model."""

    jobs: list[PaidJob] = field(default_factory=list)
    opening: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)


class PaidConnector(PoolConnector):
    """A :class:`~fabstir_jupyter.connections.PoolConnector` whose sockets to registered hosts are bound
    to paid jobs (the rules: :mod:`fabstir_jupyter.payments`); unregistered hosts go through the pool
    unpaid on the local network and are refused elsewhere.

    Args:
        pool, config, keys, signer: as :class:`~fabstir_jupyter.connections.PoolConnector`'s.
        payments: opens, tracks and settles the jobs.
    """

    def __init__(self, pool: ConnectionPool, config: InferenceConfig, payments: Payments, *,
                 keys: HostKeys | None = None, signer: PrivateKey | None = None) -> None:
        super().__init__(pool, config, keys=keys, signer=signer)
        self.payments = payments
        self._tabs: dict[tuple[str, str], _Tab] = {}
        self._counter = itertools.count(1)

    def __repr__(self) -> str:
        return f"<PaidConnector jobs={len(self.payments.open_jobs)} pool={self.pool!r}>"

    async def connect(self, host: HostInfo, *, session_id: str | None, request_id: str,
                      encryption: str | bool = "auto", model: str | None = None,
                      max_tokens: int | None = None) -> Connection:
        """Return a connection to ``host`` bound to a job that can pay for ``max_tokens`` of ``model``.

        Raises:
            PaymentRequired, BudgetExceeded, InsufficientFunds, TransactionFailed: the job could not
                be opened (see :meth:`Payments.open_job`).
            EncryptionUnavailable: ``encryption`` refuses the host (nothing was sent or paid).
            FabstirError: the socket could not be opened, or the host refused the job.
        """
        if not self.payments.pays(host):
            self.payments.check_unpaid(host)
            return await super().connect(host, session_id=session_id, request_id=request_id, encryption=encryption)
        key = await self.host_key(host, encryption)
        wanted = max_tokens if max_tokens is not None else self.config.default_max_tokens
        model = model or (host.models[0] if host.models else "")
        if session_id is None:
            return await self._tab_connection(host, key, model, wanted, request_id)
        return await self._session_connection(host, key, model, wanted, session_id, request_id)

    # ------------------------------------------------------------------ sessions

    async def _session_connection(self, host: HostInfo, key: PublicKey | None, model: str, max_tokens: int,
                                  session_id: str, request_id: str) -> Connection:
        payments = self.payments
        await payments.ensure_ready()
        terms = payments.session(session_id)
        job = terms.job
        notes: list[StreamEvent] = []
        need = payments.config.padded(max_tokens)
        if job is not None:
            why = None
            if job.host.key != host.key or job.model != model:
                why = f"the session moved to host {host.api_url}" if job.host.key != host.key else "another model"
            elif job.socket is not None and not job.socket.is_open:
                job.end("its connection closed")
            elif job.ended is None and job.room < need and (terms.deposit is None or job.room < job.max_tokens):
                # (a session's own deposit that cannot pay for a whole turn still serves a fresh job:
                # the host caps the stream and the answer goes on on the next one)
                why = f"its deposit has room for {job.room} more tokens, fewer than this turn's {need}"
            if why is not None:
                job.end(why)
            if job.ended is not None:
                notes.append(StreamEvent("job_ended", f"job {job.job_id} ended: {job.ended}", job.job_id,
                                         job.host.api_url))
                if job.socket is not None:
                    self.pool.discard(job.socket)
                payments.retire(job, job.ended)
                job = None
        fresh = False
        if job is None or job.socket is None:
            socket = await self.pool.checkout(host.ws_url)  # a reachable host before any deposit
            if job is None:
                try:
                    job = await payments.open_job(host, model, max_tokens=max_tokens, kind="session", session=terms)
                except BaseException:
                    self.pool.discard(socket)
                    raise
                notes.append(self._opened(job))
            job.socket = socket
            socket.bound_to = str(job.job_id)
            fresh = True
        channel = self._job_channel(job, key, session_id if key is not None else str(job.job_id))
        if not channel.encrypted and str(job.job_id) not in job.initialised:
            await self._bind(job, channel, request_id)
            job.initialised.add(str(job.job_id))
        memory = "plaintext" if not channel.encrypted or self.signer is None else f"encrypted:{self.signer.address}"
        fresh = fresh or self._memory.get(session_id) != memory
        self._memory[session_id] = memory
        return Connection(socket=job.socket, channel=channel, fresh=fresh, job=job, notes=tuple(notes),
                          _give_back=functools.partial(self._session_release, job))

    def _session_release(self, job: PaidJob, clean: bool) -> None:
        if not clean and job.ended is None:
            job.end("a turn did not end cleanly on its socket")  # retired at the session's next turn or end
            if job.socket is not None:
                self.pool.discard(job.socket)
            self.payments.retire(job, job.ended or "closed")

    def end_session(self, session_id: str) -> None:
        """Close the socket of the session's job (the job is settled by ``Payments.end_session``)."""
        super().end_session(session_id)
        terms = self.payments._sessions.get(session_id)
        if terms is not None:
            for job in terms.jobs:
                job.end("the session ended")
                if job.socket is not None:
                    self.pool.discard(job.socket)

    def pinned_socket(self, session_id: str) -> WebSocketClient | None:
        """The socket of the session's current job (else the pool's pinned socket, unpaid)."""
        terms = self.payments._sessions.get(session_id)
        if terms is not None and terms.job is not None and terms.job.socket is not None:
            return terms.job.socket
        return super().pinned_socket(session_id)

    # ------------------------------------------------------------------ stateless tabs

    async def _tab_connection(self, host: HostInfo, key: PublicKey | None, model: str, max_tokens: int,
                              request_id: str) -> Connection:
        payments = self.payments
        config = payments.config
        tab = self._tabs.setdefault((host.key, model), _Tab())
        need = config.padded(max_tokens)
        notes: list[StreamEvent] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connection_timeout
        job: PaidJob | None = None
        while job is None:
            tab.released.clear()
            for idle in [j for j in tab.jobs if not j.busy]:
                if not idle.usable or idle.requests >= config.requests_per_job:
                    idle.end(idle.ended or ("its connection closed" if idle.socket is not None and not
                                            idle.socket.is_open else f"{idle.requests} requests served"))
                elif idle.room < need:
                    idle.end(f"its deposit has room for {idle.room} more tokens, fewer than this request's {need}")
                if idle.ended is not None:
                    tab.jobs.remove(idle)
                    notes.append(StreamEvent("job_ended", f"job {idle.job_id} ended: {idle.ended}", idle.job_id,
                                             host.api_url))
                    if idle.socket is not None:
                        self.pool.discard(idle.socket)
                    payments.retire(idle, idle.ended)
            free = next((j for j in tab.jobs if not j.busy), None)
            if free is not None:
                job = free
                break
            if len(tab.jobs) + tab.opening < config.jobs_per_host:
                tab.opening += 1
                try:
                    socket = await self.pool.checkout(host.ws_url)
                    try:
                        opened = await payments.open_job(host, model, max_tokens=max_tokens, kind="tab")
                    except BudgetExceeded:
                        self.pool.discard(socket)
                        if not tab.jobs and tab.opening == 1:  # (1: this request) no job to wait for
                            raise
                        opened = None  # the budget holds no second job: wait for one open or opening
                    except BaseException:
                        self.pool.discard(socket)
                        raise
                finally:
                    tab.opening -= 1
                if opened is not None:
                    opened.socket = socket
                    socket.bound_to = str(opened.job_id)
                    tab.jobs.append(opened)
                    notes.append(self._opened(opened))
                    job = opened
                    break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConnectionFailed(f"all {len(tab.jobs)} paid jobs with this host stayed busy for "
                                       f"{self.config.connection_timeout:g} s", host=host.api_url)
            try:
                await asyncio.wait_for(tab.released.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        job.busy = True
        job.requests += 1
        try:
            bound = f"{job.job_id}-{next(self._counter)}"
            channel = self._job_channel(job, key, bound)
            if not channel.encrypted:
                await self._bind(job, channel, request_id)
        except BaseException:
            job.end("its session init failed")
            self._tab_release(tab, job, False)  # its socket closes, the job is settled
            raise
        assert job.socket is not None
        return Connection(socket=job.socket, channel=channel, fresh=True, job=job, notes=tuple(notes),
                          _give_back=functools.partial(self._tab_release, tab, job))

    def _tab_release(self, tab: _Tab, job: PaidJob, clean: bool) -> None:
        job.busy = False
        if not clean:
            job.end("a request did not end cleanly on its socket")
            if job in tab.jobs:
                tab.jobs.remove(job)
            if job.socket is not None:
                self.pool.discard(job.socket)
            self.payments.retire(job, job.ended or "closed")
        tab.released.set()

    # ------------------------------------------------------------------ plumbing

    def _opened(self, job: PaidJob) -> StreamEvent:
        deposit = format_amount(job.deposit, job.decimals, job.unit)
        return StreamEvent("job_opened", f"opened job {job.job_id} with {job.host.address}: deposit {deposit}, "
                                         f"pays for {job.max_tokens} tokens", job.job_id, job.host.api_url)

    def _job_channel(self, job: PaidJob, key: PublicKey | None, bound: str) -> Channel:
        assert job.socket is not None
        chain_id = self.payments.chain_id
        if key is None:
            return JobChannel(job.socket, bound_session=bound, job_id=job.job_id, chain_id=chain_id)
        return self._channel(job.socket, key, bound, job_id=str(job.job_id), chain_id=chain_id)

    async def _bind(self, job: PaidJob, channel: Channel, request_id: str) -> None:
        try:
            await channel.open_session("", request_id=request_id, timeout=self.config.first_token_timeout)
        except FabstirError as exc:
            exc.host = exc.host or job.host.api_url
            if exc.code in JOB_REFUSALS:
                job.end(f"the host refused it ({exc.code})")
                exc.retryable = True  # this job is over; a new one may do
            raise
