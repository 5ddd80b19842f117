"""The stream object and the attempt orchestrator: one request, from host choice to usage record.

:class:`InferenceStream` owns one request. Use it as an async context manager and async iterator::

    async with manager.stream("Explain entropy", max_tokens=64) as stream:
        async for token in stream:
            print(token, end="")
    print(stream.finish_reason, stream.usage)

Its producer task runs the one attempt orchestrator: choose a host (a :class:`HostPolicy`) →
get the connection for it (a :class:`~fabstir_jupyter.connections.Connector`) → send →
read frames (timeouts measured here, at the socket reader) → deliver text through a bounded queue
→ record usage. A retryable failure moves on to another attempt, at most ``max_retries`` times, with
exponential backoff and jitter: from scratch before the first token, as a continuation of the
partial answer after it (failover), on another host where the policy has one. However the stream
ends (normally, with an error, ``break`` or cancellation), ``stream_cancel`` is sent if the host may
still be generating and the connection is given back, or closed if it is not clean.

:class:`InferenceCore` holds what streams share (settings, hosts, connections, usage sink, cache,
rate limiter, the owning event loop) and creates them; :class:`~fabstir_jupyter.inference.InferenceManager`
adds the brief's API on top. Sessions and batches are policies over the same loop: a session
(:class:`Conversation`) decides what each turn resends, a batch (:class:`HostPolicy`) which host each
attempt gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    NoReturn,
    Protocol,
    TypeVar,
)

from . import _compat, protocol
from .cache import ResponseCache
from .config import (
    DEFAULT_TEMPERATURE,
    HostRequirements,
    InferenceConfig,
    InferenceOptions,
    resolve_options,
    validate_request,
)
from .connections import Channel, Connector, PoolConnector
from .errors import (
    Cancelled,
    ConnectionFailed,
    DeadlineExceeded,
    EncryptionUnavailable,
    FabstirError,
    FirstTokenTimeout,
    IdleTimeout,
    InferenceTimeout,
    InvalidOptions,
    NoHostsAvailable,
    PaymentRequired,
    RateLimitExceeded,
    SessionNotFound,
)
from .hosts import HostInfo, HostManager, resolve_model
from .limits import RateLimiter
from .payments import JOB_REFUSALS
from .runner import LoopThread, wait_future
from .transport import ConnectionPool
from .usage import UsageLedger, UsageRecord, UsageSink

if TYPE_CHECKING:
    from .crypto import PrivateKey
    from .payments import PaidJob, Payments, StreamEvent

__all__ = [
    "InferenceCore",
    "InferenceStream",
    "InferenceResult",
    "HostPolicy",
    "BestHostPolicy",
    "Conversation",
    "backoff_delay",
]

logger = logging.getLogger("fabstir_jupyter.inference")

T = TypeVar("T")

_END = object()  # queue sentinel: the stream is over (see InferenceStream._error)
_CANCEL_DRAIN_TIMEOUT = 2.0  # seconds to wait for stream_end after stream_cancel (at most idle_timeout)
_COMPACT_EVERY = 256  # pieces (and chunks) joined at a time; bounds both memory overhead and join cost


class _ReadTimer:
    """The timeouts of one attempt's reading, kept with one timer however many frames arrive.

    The attempt times out at :attr:`until` (a ``loop.time()``): ``first_token_timeout`` after the
    request is sent, then ``idle_timeout`` after the last progress (text, its end, an error), never
    after the request's deadline. Progress only moves :attr:`until`; the timer, armed for the
    value it saw, re-arms itself at the new one when it fires, so a stream costs one timer per
    ``idle_timeout`` rather than one per frame. Firing with nothing moved, it sets :attr:`expired`
    and calls the ``on_expiry`` given to :meth:`start` (the attempt drops its socket, which ends
    the pending read; a socket that timed out is not reused anyway). While text waits for a slow
    consumer the timer is paused: a slow consumer is not a stalled host.

    Args:
        config: ``first_token_timeout`` and ``idle_timeout``.
        deadline: the request's deadline (a ``time.perf_counter()``), or ``None``.
    """

    def __init__(self, config: InferenceConfig, deadline: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._idle = config.idle_timeout
        self._deadline = math.inf if deadline is None else now + (deadline - time.perf_counter())
        self.until = min(now + config.first_token_timeout, self._deadline)
        self.sent_at = time.perf_counter()
        self.first_at: float | None = None  # perf_counter() when the first chunk or stream_end came
        self.progressed = False
        self.expired = False
        self._paused = False
        self._on_expiry: Callable[[], object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0

    def start(self, on_expiry: Callable[[], object]) -> None:
        """Arm the timer; ``on_expiry`` is called (from the event loop) if it expires."""
        self._on_expiry = on_expiry
        self._arm()

    def _arm(self) -> None:
        self._armed = self.until
        self._handle = self._loop.call_at(self._armed, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._paused:
            return  # progress() re-arms it
        if self.until > self._armed:
            self._arm()
            return
        self.expired = True
        if self._on_expiry is not None:
            self._on_expiry()

    def pause(self) -> None:
        """Stop counting while text waits for the consumer; :meth:`progress` starts again."""
        self._paused = True

    def progress(self) -> None:
        """The answer progressed just now: it times out ``idle_timeout`` from here (or at the deadline)."""
        self.progressed = True
        self._paused = False
        self.until = until = min(self._loop.time() + self._idle, self._deadline)
        if (self._handle is None or until < self._armed) and self._on_expiry is not None and not self.expired:
            # Disarmed while paused, or armed for a later time (first_token_timeout > idle_timeout).
            if self._handle is not None:
                self._handle.cancel()
            self._arm()

    def stop(self) -> None:
        """Disarm the timer for good."""
        self._on_expiry = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def deadline_passed(self) -> bool:
        """Whether the request's deadline, not an idle or first-token wait, ended the read."""
        return self.until >= self._deadline


def _job_over(job: PaidJob, error: FabstirError, host: HostInfo) -> FabstirError:
    """The error of an attempt whose paid job the host ended or refused (at the session's init, or
    mid-answer): retryable, so that the answer goes on on a new job."""
    reason = "its deposit ran out" if error.code == "BUDGET_EXCEEDED" else "the host no longer takes it"
    job.end(f"{reason} ({error.code}: {error.message})")
    error.retryable = True
    error.host = host.api_url
    error.message = f"job {job.job_id} ended, {reason}; continuing on a new job: {error.message}"
    error.args = (error.message,)
    return error


def _is_progress(event: protocol.HostEvent) -> bool:
    """Whether a frame advances the answer (text, its end, an error); pings, unknown frames and
    empty chunks do not, so they never restart first_token_timeout or idle_timeout."""
    if isinstance(event, protocol.Chunk):
        return bool(event.content)
    return isinstance(event, (protocol.StreamEnd, protocol.ErrorEvent))


def backoff_delay(attempt: int, config: InferenceConfig, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): full-jitter exponential backoff.

    A host's ``retry_after`` hint is a floor.
    """
    ceiling = min(config.backoff_max, config.backoff_initial * (2 ** (attempt - 1)))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, config.backoff_max))
    return delay


def _refusals_error(refused: Sequence[tuple[HostInfo, EncryptionUnavailable]]) -> EncryptionUnavailable:
    """The error of a request whose every remaining host was refused for encryption."""
    if len(refused) == 1:
        return refused[0][1]
    reasons = "; ".join(f"{host.api_url}: {error.message}" for host, error in refused)
    return EncryptionUnavailable(f"no host could be used ({reasons})", hint=refused[-1][1].hint)


@dataclass(frozen=True)
class InferenceResult:
    """The outcome of a finished request (what :meth:`InferenceManager.infer` returns).

    A request that failed after delivering text has that partial ``text`` and its ``error`` set.
    ``encrypted`` is ``True`` when every attempt that sent the request sent it end-to-end
    encrypted, ``False`` when one sent it in clear, ``None`` when nothing was sent (a cache hit,
    or a request refused before any host got it).
    """

    text: str
    finish_reason: str | None
    usage: UsageRecord | None
    host: str | None
    model: str | None
    ttft: float | None
    request_id: str
    error: FabstirError | None = None
    records: tuple[UsageRecord, ...] = ()  # one per attempt, oldest first (retries, failover)
    encrypted: bool | None = None
    job_ids: tuple[int, ...] = ()  # the paid jobs the request was billed to, in order
    events: tuple[StreamEvent, ...] = ()  # jobs opened, ended and continued on (paid networks)
    cost: float | None = None  # at the jobs' own prices, where paid (see InferenceStream.running_cost)
    cost_unit: str | None = None

    def __str__(self) -> str:
        return self.text


class Conversation(Protocol):
    """What a stream needs from the session it is a turn of (a :class:`~fabstir_jupyter.sessions.Session`).

    The session decides what each turn sends; the stream does all the I/O.
    """

    id: str
    ended: bool
    host: HostInfo | None

    def plan_turn(self, prompt: str, host: HostInfo, model: str, *, fresh_socket: bool, prefill: str | None,
                  max_tokens: int) -> tuple[str, tuple[protocol.Message, ...]]:
        """Return the ``(prompt, messages)`` to send for this turn's attempt on ``host``."""
        ...

    def complete_turn(self, prompt: str, answer: str, *, synced: bool, usage: protocol.Usage | None) -> None:
        """Record a finished turn; ``synced``: the host's memory now matches the transcript."""
        ...

    def cancel_turn(self) -> None:
        """Count a turn stopped before its end."""
        ...


class HostPolicy(Protocol):
    """Which host each attempt of a stream goes to; the orchestrator asks once per attempt."""

    async def choose(self, stream: InferenceStream, tried: Sequence[HostInfo]) -> HostInfo:
        """Return the host for the next attempt of ``stream``; ``tried`` lists earlier attempts' hosts.

        Raises:
            NoHostsAvailable, ModelNotAvailable: no host fits (the orchestrator then pings the
                hosts marked unreachable and asks once more).
        """
        ...

    def release(self, host: HostInfo, *, failed: bool, error: FabstirError | None = None) -> None:
        """The attempt on ``host`` is over; ``failed``: it ended with a retryable error; ``error``:
        the error it ended with, if any."""
        ...


class BestHostPolicy:
    """The default policy: a session's host first, else the stream's pinned host, else the best
    host by selection mode that earlier attempts did not use (a tried host only when no other fits)."""

    def __init__(self, host_manager: HostManager, config: InferenceConfig) -> None:
        self.host_manager = host_manager
        self.config = config

    async def choose(self, stream: InferenceStream, tried: Sequence[HostInfo]) -> HostInfo:
        if stream.session is not None and stream.session.host is not None and not tried:
            return stream.session.host
        if stream.fixed_host is not None:
            return stream.fixed_host
        requirements = HostRequirements(model=stream.options.model or self.config.default_model)
        return await self.host_manager.select_best_host(requirements, mode=stream.options.mode or "auto",
                                                        exclude=tried)

    def release(self, host: HostInfo, *, failed: bool, error: FabstirError | None = None) -> None:
        pass


class InferenceStream:
    """One inference request: an async context manager and async iterator of text pieces.

    A piece is the text of one chunk from the host while the client keeps up with it. Chunks that
    were already waiting in the socket when the client read them (a host faster than the
    client, or a client busy elsewhere) come as one piece holding their text joined: the text,
    its order, the token counts and the usage are the same either way; only the number of pieces
    differs. (:meth:`chunks` joins pieces further, at a fixed interval.)

    When the iteration ends, ``text``, ``usage``, ``finish_reason``, ``host``, ``model``, ``ttft``
    and ``encrypted`` are filled. ``ttft`` is what the caller waited: seconds from the stream's
    start (host selection and connection included) to the first text; ``usage.ttft`` is the host's
    part: from sending the request to its first frame. ``encrypted`` is set as soon as the request
    is sent: ``True`` while every attempt sent it end-to-end encrypted (spec §6), ``False`` once
    one sent it in clear (a host without a key, or ``encryption=False``), ``None`` before anything
    was sent (or for a cached answer). Leaving the ``async with`` block early cancels the request on the host.
    On a paid network, :attr:`job` is the job the current attempt is billed to, :attr:`running_cost`
    what the answer costs so far at its jobs' prices, and :attr:`events` says which jobs were opened
    and when an answer went on on a new job (its socket dropped, or its deposit ran out).
    Create it with :meth:`InferenceCore.stream`; it can be iterated from the core's own event loop or
    from another thread's loop (pieces are then handed across).

    Args:
        core: what the stream runs on (hosts, connections, usage).
        prompt: the prompt, already checked.
        options: the request's options, already resolved.
        kind: recorded with the usage (``stream``, ``direct``, ``session``, ``batch``, ``infer``).
        host: a pinned host: every attempt goes there.
        session: the session this stream is a turn of.
        policy: which host each attempt gets (default: the core's :class:`BestHostPolicy`).
    """

    def __init__(
        self,
        core: InferenceCore,
        prompt: str,
        options: InferenceOptions,
        *,
        kind: str = "stream",
        host: HostInfo | None = None,
        session: Conversation | None = None,
        policy: HostPolicy | None = None,
    ) -> None:
        self._core = core
        self.prompt = prompt
        self.options = options
        self.kind = kind
        self.fixed_host = host
        self.session = session
        self.policy: HostPolicy = policy if policy is not None else core.policy
        self.request_id = uuid.uuid4().hex[:16]
        # Results, filled as the stream runs and complete when it ends.
        self.finish_reason: str | None = None
        self.usage: UsageRecord | None = None
        self.host: HostInfo | None = None
        self.model: str | None = None
        self.ttft: float | None = None
        self.attempts = 0
        self.error: FabstirError | None = None
        self.encrypted: bool | None = None
        self._attempt_encrypted: bool | None = None  # the current attempt's channel, once connected
        self._pinned_misses = 0  # attempts on a pinned host that could not reach it or got no answer
        self._broke: tuple[HostInfo, int, FabstirError] | None = None  # the first break after text
        self.records: list[UsageRecord] = []
        self._pieces: list[str] = []  # recent pieces, compacted into _chunks to keep memory near len(text)
        self._chunks: list[str] = []
        self._queue: asyncio.Queue[object] | None = None  # text pieces (str), then _END
        self._producer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished = False
        self._delivered = 0
        self._received_total = 0  # tokens delivered over all attempts (the client's max_tokens budget)
        self._reader: protocol.ResponseReader | None = None
        self._started_at = 0.0
        # Paid networks: the job of the current attempt, and the tokens each finished attempt billed.
        self._attempt_job: PaidJob | None = None
        self._billed: list[tuple[PaidJob, int]] = []
        self.events: list[StreamEvent] = []

    @property
    def job(self) -> PaidJob | None:
        """The paid job the current (or last) attempt is billed to; ``None`` when unpaid."""
        if self._attempt_job is not None:
            return self._attempt_job
        return self._billed[-1][0] if self._billed else None

    @property
    def job_ids(self) -> tuple[int, ...]:
        """Every job this stream was billed to, in order, without repeats."""
        jobs = [job.job_id for job, _ in self._billed]
        if self._attempt_job is not None:
            jobs.append(self._attempt_job.job_id)
        return tuple(dict.fromkeys(jobs))

    @property
    def running_cost(self) -> tuple[float, str] | None:
        """``(cost, unit)`` of the tokens received so far at their jobs' prices; ``None`` when unpaid.

        It counts the tokens the host generated, as hosts bill; a job's minimum billing (its first
        proof claims at least its proof interval) shows in the job's settlement, not here.
        """
        billed = list(self._billed)
        if self._attempt_job is not None and self._reader is not None:
            billed.append((self._attempt_job, self._reader.host_tokens))
        if not billed:
            return None
        unit = billed[-1][0].unit
        return sum(t * job.price_per_token / 1000 / 10**job.decimals for job, t in billed), unit

    def __repr__(self) -> str:
        state = "done" if self._finished else ("running" if self._producer else "new")
        host = self.host.api_url if self.host else None
        return f"<InferenceStream {self.request_id} {state} host={host} chars={len(self.text)}>"

    @property
    def text(self) -> str:
        """The text delivered so far (the whole answer once the stream has ended)."""
        if self._pieces or len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks + self._pieces)]  # one join: two copies at most, not three
            self._pieces.clear()
        return self._chunks[0] if self._chunks else ""

    def _append_text(self, piece: str) -> None:
        pieces = self._pieces
        pieces.append(piece)
        if len(pieces) >= _COMPACT_EVERY:
            self._chunks.append("".join(pieces))
            pieces.clear()
            if len(self._chunks) >= _COMPACT_EVERY:
                self._chunks = ["".join(self._chunks)]

    # ------------------------------------------------------------------ consumer side

    async def __aenter__(self) -> InferenceStream:
        await self._call_on_owner(self._start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> InferenceStream:
        return self

    async def __anext__(self) -> str:
        queue = self._queue
        if self._loop is None or self._loop is asyncio.get_running_loop():
            if queue is not None and not self._finished and not queue.empty():
                item = queue.get_nowait()  # a piece already handed over: no wait, no coroutine
                return item if isinstance(item, str) else self._end()  # not a str: _END
            return await self._next()
        return await self._call_on_owner(self._next)

    async def _call_on_owner(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return await self._core._call_on_owner(fn())

    async def _next(self) -> str:
        if self._producer is None:
            await self._start()
        if self._finished:
            raise StopAsyncIteration
        queue = self._queue
        assert queue is not None and self._producer is not None
        # The producer puts _END when it ends, unless the queue was full then: a drained queue
        # behind a finished producer ends the iteration too.
        item: str | object = _END if queue.empty() and self._producer.done() else await queue.get()
        if not isinstance(item, str):  # _END
            return self._end()
        return item

    def _end(self) -> NoReturn:
        """End the iteration: raise the stream's error, or StopAsyncIteration."""
        self._finished = True
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    async def read(self) -> str:
        """Consume the rest of the stream and return the whole text.

        Raises:
            FabstirError: the request failed.
        """
        async for _ in self:
            pass
        return self.text

    async def chunks(self, interval: float = 0.05) -> AsyncIterator[str]:
        """Yield the text coalesced: whatever arrived during each ``interval`` seconds, joined.

        Useful for UIs that redraw at a fixed rate instead of once per token.
        """
        if interval <= 0:
            raise InvalidOptions("interval must be positive", field="interval")
        while True:
            try:
                first = await self.__anext__()
            except StopAsyncIteration:
                return
            parts = [first]
            await asyncio.sleep(interval)
            parts.extend(self._drain_ready())
            yield "".join(parts)

    def _drain_ready(self) -> list[str]:
        parts: list[str] = []
        assert self._queue is not None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not isinstance(item, str):  # _END
                # Put it back so the next __anext__ ends the iteration (or raises the error).
                self._queue.put_nowait(_END)
                break
            parts.append(item)
        return parts

    async def aclose(self) -> None:
        """Stop the request (``stream_cancel`` if the host is still generating) and release its socket."""
        await self._call_on_owner(self._aclose)

    async def _aclose(self) -> None:
        producer = self._producer
        if producer is not None and not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
        self._finished = True

    async def _stop(self, reason: FabstirError) -> None:
        """End a running stream on purpose (its session ended): the host gets ``stream_cancel``,
        nothing fails over or retries, and the consumer's iteration raises ``reason`` after the
        text already delivered. Returns once the stream's cleanup is done; may be awaited from any
        loop. A stream not started yet is left alone (its first attempt checks its session)."""
        loop = self._loop
        if loop is None:
            return
        if loop is asyncio.get_running_loop():
            await self._stop_here(reason)
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._stop_here(reason), loop))

    async def _stop_here(self, reason: FabstirError) -> None:
        producer = self._producer
        if producer is None or producer.done():
            return
        self.error = reason  # set before the producer ends, so the consumer sees it with the end marker
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)

    def result(self) -> InferenceResult:
        """The request as an :class:`InferenceResult`: the whole answer once finished, or the partial
        text and the ``error`` of a request that failed."""
        return InferenceResult(
            text=self.text,
            finish_reason=self.finish_reason,
            usage=self.usage,
            host=self.host.api_url if self.host else None,
            model=self.model,
            ttft=self.ttft,
            request_id=self.request_id,
            error=self.error,
            records=tuple(self.records),
            encrypted=self.encrypted,
            job_ids=self.job_ids,
            events=tuple(self.events),
            cost=cost[0] if (cost := self.running_cost) else None,
            cost_unit=cost[1] if cost else None,
        )

    # ------------------------------------------------------------------ producer side

    async def _start(self) -> None:
        if self._producer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self._core.config.stream_buffer_size)
        self._started_at = time.perf_counter()
        self._producer = self._loop.create_task(self._produce(), name=f"fabstir-stream-{self.request_id}")
        self._core._running.add(self)  # so that ending its session (or closing the core) stops it

    async def _deliver(self, piece: str) -> None:
        """Add ``piece`` to :attr:`text` and hand it to the consumer (waiting while the queue is full)."""
        if self.ttft is None:
            self.ttft = time.perf_counter() - self._started_at
        self._delivered += 1
        self._append_text(piece)
        if self.options.stream:
            queue = self._queue
            assert queue is not None
            try:
                queue.put_nowait(piece)
            except asyncio.QueueFull:
                await queue.put(piece)

    async def _produce(self) -> None:
        try:
            await self._orchestrate()
            if not self.options.stream and self.text:
                assert self._queue is not None
                await self._queue.put(self.text)
        except FabstirError as exc:
            self.error = exc
            if self.finish_reason is None:
                self.finish_reason = "cancelled" if isinstance(exc, Cancelled) else "error"
        except asyncio.CancelledError:
            self.finish_reason = self.finish_reason or "cancelled"
            raise
        except Exception as exc:  # a bug: surface it as a coded error rather than a hang
            logger.exception("unexpected error in stream %s", self.request_id)
            self.error = FabstirError(f"internal error: {type(exc).__name__}: {exc}", code="HOST_ERROR",
                                      retryable=False)
            self.finish_reason = "error"
        finally:
            if self.error is not None and self.text:
                self.error.partial_text = self.text  # the answer so far is not lost with the error
            if self.session is not None and self.finish_reason == "cancelled":
                self.session.cancel_turn()
            self._core._running.discard(self)
            if self._queue is not None:
                with contextlib.suppress(asyncio.QueueFull):  # then _next sees the producer is done
                    self._queue.put_nowait(_END)

    async def _orchestrate(self) -> None:
        """The one attempt loop: choose a host → connect → stream → record; on a retryable failure,
        try again (another host where the policy has one), from scratch before the first token, as
        a continuation after it. At most ``1 + max_retries`` attempts."""
        config = self._core.config
        tried: list[HostInfo] = []
        refused: list[tuple[HostInfo, EncryptionUnavailable]] = []
        deadline = None if config.deadline is None else time.perf_counter() + config.deadline
        if self.session is not None and self.session.ended:  # created before the session ended
            raise SessionNotFound(f"no active session {self.session.id!r}: it has ended")
        while True:
            self.attempts += 1
            host: HostInfo | None = None
            attempt_started = time.time()
            self._reader = None
            self._attempt_encrypted = None
            self._attempt_job = None
            try:
                host = await self._choose_host(tried, refused)
                failed = False
                error: FabstirError | None = None
                try:
                    await self._describe(host)
                    await self._attempt(host, attempt_started, deadline)
                except FabstirError as exc:
                    failed, error = exc.retryable, exc
                    raise
                finally:
                    self.policy.release(host, failed=failed, error=error)
                return
            except FabstirError as exc:
                if isinstance(exc, EncryptionUnavailable) and host is not None:
                    # Refused before anything was sent (no key under encryption="required", or a key
                    # that is not the host's own): not an attempt, nor the host's failure; the other
                    # hosts are tried, and this one never again for this request.
                    logger.info("%s: %s", host.api_url, exc.message)
                    self.attempts -= 1
                    refused.append((host, exc))
                    continue
                reader = self._reader
                # A host counts as unreachable only when no connection could be opened. A stream that
                # broke mid-way says nothing sure about the next connection (the host may be
                # restarting, or gone), so it leaves the host's health as it was.
                opened = reader is not None
                failed_to_connect = isinstance(exc, ConnectionFailed) and not opened
                broke = isinstance(exc, ConnectionFailed) and opened
                self._record(host, attempt_started, error=exc,
                             reachable=None if broke else not failed_to_connect,
                             received_tokens=reader.received_tokens if reader else 0,
                             completion_tokens=reader.host_tokens if reader else None,
                             encrypted=self._attempt_encrypted, job=self._attempt_job)
                self._attempt_job = None
                if host is not None:
                    tried.append(host)
                    if reader is not None and reader.received_tokens and self._broke is None:
                        self._broke = (host, self._received_total, exc)
                retry = (
                    exc.retryable
                    and self.attempts <= config.max_retries
                    and (deadline is None or time.perf_counter() < deadline)
                    and not self._pinned_host_gives_up(exc, reader, time.time() - attempt_started)
                )
                if not retry:
                    raise self._final_error(exc) from None
                delay = backoff_delay(self.attempts, config, self._core.rng, exc.retry_after)
                logger.info("attempt %d of %s failed (%s); %s in %.2f s", self.attempts, self.request_id, exc,
                            "continuing elsewhere" if self._delivered else "retrying", delay)
                await asyncio.sleep(delay)

    def _final_error(self, exc: FabstirError) -> FabstirError:
        """The error the stream ends with: ``exc``, saying first that the answer broke off mid-way
        when an earlier attempt delivered text and no later one could continue it."""
        if self._broke is None or self._broke[2] is exc:
            return exc
        host, tokens, cause = self._broke
        exc.message = (f"the stream broke on {host.api_url} after {tokens} tokens ({cause.code}: {cause.message}) "
                       f"and no host could continue it: {exc.message}")
        exc.args = (exc.message,)
        return exc

    def _pinned_host_gives_up(self, exc: FabstirError, reader: protocol.ResponseReader | None,
                              elapsed: float) -> bool:
        """Whether a failed attempt on a pinned host (``host=``) ends the request.

        A pinned host that could not be reached, or did not answer, gets one more try, and only
        when it failed fast (refused, reset: it may be restarting). One that made us wait out a
        timeout gets none: no other host can take over, and waiting again on the same silent host
        only doubles the wait. A stream that broke after text keeps the usual retries.
        """
        if self.fixed_host is None:
            return False
        unanswered = (isinstance(exc, ConnectionFailed) and reader is None) or (
            isinstance(exc, InferenceTimeout) and (reader is None or reader.received_tokens == 0))
        if not unanswered:
            return False
        self._pinned_misses += 1
        gives_up = self._pinned_misses > 1 or elapsed >= self._core.config.connection_timeout / 2
        if gives_up:
            pinned = "the host is pinned (host=, --host), so no other host was tried"
            exc.hint = pinned if exc.hint is None else f"{exc.hint}; {pinned}"
        return gives_up

    async def _choose_host(self, tried: list[HostInfo],
                           refused: Sequence[tuple[HostInfo, EncryptionUnavailable]] = ()) -> HostInfo:
        """Ask the policy for the next host; a host refused for encryption is never taken again.

        Raises:
            EncryptionUnavailable: only refused hosts are left (the refusals, host by host).
            NoHostsAvailable, ModelNotAvailable: as the policy.
        """
        asked_at = time.monotonic()
        avoid = tried + [h for h, _ in refused]
        try:
            host = await self.policy.choose(self, avoid)
        except NoHostsAvailable:
            # Hosts marked unreachable stay so until something talks to them again: give them a
            # second look (a crashed host may be back) before giving up.
            if not await self._core._recheck_unreachable(asked_at):
                raise
            host = await self.policy.choose(self, avoid)
        if any(host is h for h, _ in refused):
            self.policy.release(host, failed=False)
            raise _refusals_error(refused)
        return host

    async def _describe(self, host: HostInfo) -> None:
        """Read the host's features and models (once per host) before the request is built.

        A pinned host's socket opens meanwhile (and waits in the pool for the attempt): a host that
        accepts TCP and never answers then costs ``connection_timeout`` once, not the description's
        probe timeout on top.
        """
        host_manager = self._core.host_manager
        if host is not self.fixed_host or self.session is not None:  # a session opens its own socket
            await host_manager.describe(host)
            return
        describing = asyncio.ensure_future(host_manager.describe(host))
        try:
            await self._core.connector.warm_up(host)
        except BaseException:
            describing.cancel()  # only this wait: the description itself is shared and goes on
            raise
        await describing

    def _request(self, prompt: str, messages: tuple[protocol.Message, ...], model: str,
                 max_tokens: int) -> protocol.GenerationRequest:
        options = self.options
        return protocol.GenerationRequest(
            prompt=prompt,
            model=model,
            max_tokens=max_tokens,
            temperature=options.temperature if options.temperature is not None else DEFAULT_TEMPERATURE,
            stream=options.stream,
            top_p=options.top_p,
            stop=options.stop_sequences,
            seed=options.seed,
            messages=messages,
        )

    def _stateless_request(self, host: HostInfo, model: str, max_tokens: int,
                           prefill: str | None) -> protocol.GenerationRequest:
        options = self.options
        prompt = self.prompt
        messages: tuple[protocol.Message, ...] = ()
        if options.messages or options.system_prompt or prefill:
            history = tuple((m["role"], m["content"]) for m in options.messages or ())
            prompt, messages = protocol.shape_transcript(
                protocol.transcript(self.prompt, history, options.system_prompt), host.features, prefill)
        return self._request(prompt, messages, model, max_tokens)

    async def _attempt(self, host: HostInfo, attempt_started: float, deadline: float | None) -> None:
        core = self._core
        config = core.config
        self.host = host
        model = resolve_model(self.options.model, host, config.default_model)
        self.model = model
        # A continuation (text already delivered by a failed host) sends that text as an assistant
        # prefill and asks only for the tokens still owed.
        prefill = self.text if self._delivered else None
        budget = self.options.max_tokens
        assert budget is not None  # resolve_options filled in the default
        max_tokens = budget - self._received_total
        if max_tokens <= 0:
            self.finish_reason = "length"
            return
        session = self.session
        request: protocol.GenerationRequest | None = None
        cache_key: tuple[str, protocol.GenerationRequest] | None = None
        if session is None:
            request = self._stateless_request(host, model, max_tokens, prefill)
            if core.cache is not None and self.options.is_deterministic and not self._delivered:
                cache_key = (host.key, request)
                hit = core.cache.get(cache_key)
                if hit is not None:
                    text, finish_reason, tokens = hit
                    await self._deliver(text)
                    self.finish_reason = finish_reason
                    self.usage = self._record(host, attempt_started, cached=True, received_tokens=tokens,
                                              finish_reason=finish_reason, ttft=0.0)
                    return
        wait = core.rate_limiter.reserve(host.key)
        if wait > 0:
            if wait > config.connection_timeout:
                raise RateLimitExceeded(f"client-side rate limit: next slot in {wait:.1f} s", host=host.api_url,
                                        retry_after=wait)
            await asyncio.sleep(wait)

        encryption = config.encryption if self.options.encryption is None else self.options.encryption  # resolved
        connection = await core.connector.connect(host, session_id=None if session is None else session.id,
                                                  request_id=self.request_id, encryption=encryption,
                                                  model=model, max_tokens=max_tokens)
        self._note_job(connection, prefill)
        job = connection.job
        channel = connection.channel
        self._attempt_encrypted = channel.encrypted
        self.encrypted = channel.encrypted and self.encrypted is not False
        if session is not None:
            prompt, messages = session.plan_turn(self.prompt, host, model, fresh_socket=connection.fresh,
                                                 prefill=prefill, max_tokens=max_tokens)
            request = self._request(prompt, messages, model, max_tokens)
        assert request is not None
        reader = self._reader = protocol.ResponseReader(
            request_id=self.request_id,
            features=host.features,
            stop_sequences=self.options.stop_sequences,
            max_tokens=max_tokens,
            prompt_nonempty=True,
        )
        clean = False
        timer = _ReadTimer(config, deadline)
        try:
            await channel.send_request(request, session_id=None if session is None else session.id,
                                       request_id=self.request_id)
            await self._read_answer(channel, reader, host, timer, job)
            if reader.cancel_needed:
                clean = await self._cancel_on_host(channel, reader)
            else:
                await asyncio.sleep(0)  # let frames already on the wire reach the socket's buffer
                # Frames after stream_end belong to no request: a socket holding some is not clean.
                clean = not channel.has_unread_frames()
            channel.finish(self.request_id)
        except asyncio.CancelledError:
            if not reader.done:
                clean = await asyncio.shield(self._cancel_on_host(channel, reader))
            self.finish_reason = self.finish_reason or "cancelled"
            self._finish_attempt(host, reader, attempt_started, timer, cancelled=True)
            raise
        finally:
            self._received_total += reader.received_tokens
            if job is not None:
                generated = reader.usage.completion_tokens if reader.usage is not None else reader.host_tokens
                job.cadence.answer(generated)  # what the host counts against the job, as it proves it
                if reader.usage is None:  # cut off: the host may have made tokens that never arrived
                    job.all_reported = False
                job.received_tokens += reader.received_tokens
            connection.release(clean=clean)
        self.finish_reason = reader.finish_reason
        self._finish_attempt(host, reader, attempt_started, timer)
        if cache_key is not None and core.cache is not None and self.finish_reason in ("stop", "length"):
            core.cache.put(cache_key, (self.text, self.finish_reason, reader.received_tokens))
        if session is not None:
            session.complete_turn(self.prompt, self.text, synced=clean, usage=reader.usage)

    async def _read_answer(self, channel: Channel, reader: protocol.ResponseReader, host: HostInfo,
                           timer: _ReadTimer, job: PaidJob | None = None) -> None:
        """Read frames into ``reader`` until it is done, handing its text to the consumer a batch at a time.

        A batch is a frame and the frames already waiting behind it in the socket's buffer: their
        text is delivered as one piece, so a consumer gets a piece per chunk while the client keeps
        up with the host, and fewer, longer pieces once frames queue up. A plaintext channel's
        text chunks take the reader's fast path; other frames are opened by the channel (parsed,
        decrypted), late frames of a request already over on the socket are dropped, and the rest
        go to :meth:`~fabstir_jupyter.protocol.ResponseReader.receive`. ``timer`` bounds the waits.
        A host refusal that ends the attempt's paid ``job`` (its deposit ran out) ends the read with
        a retryable error, so the answer continues on a new job.

        Raises:
            FirstTokenTimeout, IdleTimeout, DeadlineExceeded: ``timer`` expired.
            FabstirError: the socket failed, the host reported an error or broke the protocol. The
                text read before a failure is handed over first.
        """
        socket = channel.socket
        receive, unread = socket.frame_reader()
        take_text = None if channel.encrypted else reader.receive_text  # frames in clear only
        pieces: list[str] = []  # text read in this batch, not handed over yet
        progressed = answered = False
        timer.start(socket.abort)  # on expiry the pending receive fails, and the loop sees why
        try:
            while not reader.done:
                try:
                    data = await receive()
                except Exception as exc:
                    if timer.expired:
                        break
                    raise socket.receive_error(exc) from exc
                if timer.expired:
                    break  # a frame already buffered when the timer fired: too late
                if take_text is not None and take_text(data, pieces):
                    progressed = True
                else:
                    try:
                        event = channel.open_frame(data)  # (an encrypted init's refusal raises here)
                    except FabstirError as exc:
                        if job is None or exc.code not in JOB_REFUSALS:
                            raise
                        reader.done = True
                        raise _job_over(job, exc, host) from None
                    if event is not None and not channel.is_late(event):
                        if job is not None and isinstance(event, protocol.ErrorEvent) and event.code in JOB_REFUSALS:
                            reader.done = True
                            raise _job_over(job, event.error, host)
                        pieces += reader.receive(event)
                        # Pings, unknown frames and empty chunks are no progress: a host that
                        # floods them cannot keep a request waiting forever.
                        progressed = progressed or _is_progress(event)
                        answered = answered or isinstance(event, (protocol.Chunk, protocol.StreamEnd))
                if unread and not reader.done:
                    continue  # the next frame is already here: same batch
                if timer.first_at is None and (progressed or answered):
                    timer.first_at = time.perf_counter()
                    if self._delivered == 0:
                        host.record_latency(timer.first_at - timer.sent_at)
                if pieces:
                    timer.pause()  # a slow consumer is not a stalled host
                    await self._deliver(pieces[0] if len(pieces) == 1 else "".join(pieces))
                    pieces.clear()
                    timer.progress()  # text is progress; the idle wait starts after its delivery
                elif progressed:
                    timer.progress()
                progressed = False
        except FabstirError:
            timer.stop()
            if pieces:
                await self._deliver("".join(pieces))
            raise
        finally:
            timer.stop()
        if timer.expired:
            if pieces:
                await self._deliver("".join(pieces))
            raise self._timeout_error(host, timer)

    def _note_job(self, connection: Any, prefill: str | None) -> None:
        """Take the connection's paid job (if any) for this attempt, and report what happened to jobs."""
        self.events.extend(connection.notes)
        job = connection.job
        self._attempt_job = job
        previous = self._billed[-1][0] if self._billed else None
        if job is not None and prefill and previous is not None and previous is not job:
            from .payments import StreamEvent

            self.events.append(StreamEvent(
                "job_continued",
                f"the answer continues on job {job.job_id} ({job.host.api_url}) after {self._received_total} tokens "
                f"on job {previous.job_id}, which ended: {previous.ended or 'its connection closed'}",
                job.job_id, job.host.api_url))

    def _timeout_error(self, host: HostInfo, timer: _ReadTimer) -> InferenceTimeout:
        config = self._core.config
        if timer.deadline_passed:
            return DeadlineExceeded(f"request deadline of {config.deadline:g} s passed", host=host.api_url)
        if not timer.progressed:
            return FirstTokenTimeout(f"no answer within first_token_timeout={config.first_token_timeout:g} s",
                                     host=host.api_url)
        return IdleTimeout(f"stream stalled for idle_timeout={config.idle_timeout:g} s", host=host.api_url)

    async def _cancel_on_host(self, channel: Channel, reader: protocol.ResponseReader) -> bool:
        """Send ``stream_cancel`` and drain until ``stream_end``; return whether the socket is clean."""
        try:
            await channel.send_cancel(self.session.id if self.session is not None else None)
            async with _compat.timeout(min(_CANCEL_DRAIN_TIMEOUT, self._core.config.idle_timeout)):
                while not reader.end_seen:
                    event = await channel.receive(None)
                    if isinstance(event, protocol.ErrorEvent):
                        continue  # an error racing the cancel; stream_end follows
                    reader.done = True
                    reader.receive(event)
        except (FabstirError, asyncio.TimeoutError):
            return False
        return True

    def _finish_attempt(self, host: HostInfo, reader: protocol.ResponseReader, attempt_started: float,
                        timer: _ReadTimer, cancelled: bool = False) -> None:
        usage = reader.usage
        host.record_request(True)
        record = self._record(
            host,
            attempt_started,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else reader.host_tokens,
            received_tokens=reader.received_tokens,
            total_tokens=usage.total_tokens if usage else None,
            ttft=None if timer.first_at is None else timer.first_at - timer.sent_at,
            finish_reason="cancelled" if cancelled else reader.finish_reason,
            encrypted=self._attempt_encrypted,
            job=self._attempt_job,
        )
        if self._attempt_job is not None:
            self._billed.append((self._attempt_job, record.completion_tokens or 0))
            self._attempt_job = None
        self.usage = self._combined(self.records[:-1], record)

    def totals(self) -> UsageRecord | None:
        """The whole stream's usage, also for a stream that failed: :attr:`usage` once an attempt
        finished, else every attempt's records added up (``None`` before any attempt)."""
        if self.usage is not None:
            return self.usage
        if not self.records:
            return None
        return self._combined(self.records[:-1], self.records[-1], every=True)

    def _combined(self, earlier: list[UsageRecord], final: UsageRecord, *, every: bool = False) -> UsageRecord:
        """``final`` with the tokens, time and cost of ``earlier`` attempts added: those that delivered
        text (failover), or all of them with ``every``. The ledger keeps one record per attempt."""
        earlier = earlier if every else [r for r in earlier if r.received_tokens]
        if not earlier:
            return final if not every else dataclasses.replace(final, ttft=self.ttft, encrypted=self.encrypted)
        parts = [*earlier, final]
        completion = sum(r.completion_tokens or 0 for r in parts)
        costs = [r.cost for r in parts if r.cost is not None]
        units = {r.cost_unit for r in parts if r.cost is not None}
        return dataclasses.replace(
            final,
            time=parts[0].time,
            received_tokens=sum(r.received_tokens for r in parts),
            completion_tokens=completion,
            total_tokens=None if final.prompt_tokens is None else final.prompt_tokens + completion,
            ttft=self.ttft,
            duration=sum(r.duration for r in parts),
            cost=sum(costs) if costs and len(units) == 1 else (None if every else final.cost),
            cost_unit=units.pop() if len(units) == 1 else (None if every else final.cost_unit),
            encrypted=self.encrypted,
        )

    def _record(
        self,
        host: HostInfo | None,
        attempt_started: float,
        *,
        error: FabstirError | None = None,
        reachable: bool | None = True,
        cached: bool = False,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        received_tokens: int = 0,
        total_tokens: int | None = None,
        ttft: float | None = None,
        finish_reason: str | None = None,
        encrypted: bool | None = None,
        job: PaidJob | None = None,
    ) -> UsageRecord:
        if error is not None and host is not None:
            host.record_request(False, reachable=reachable, error=error)
        cost, unit = None, None
        if job is not None:  # what the job's own price makes of the tokens the host generated
            cost = (completion_tokens or 0) * job.price_per_token / 1000 / 10**job.decimals
            unit = job.unit
            if error is not None and completion_tokens:
                self._billed.append((job, completion_tokens))
        elif host is not None and self.model is not None and completion_tokens:
            cost, unit = host.cost(self.model, completion_tokens)
        record = UsageRecord(
            time=attempt_started,
            request_id=self.request_id,
            host=host.api_url if host else None,
            host_address=host.address if host else None,
            model=self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            received_tokens=received_tokens,
            total_tokens=total_tokens,
            ttft=ttft,
            duration=time.time() - attempt_started,
            finish_reason="error" if error is not None else finish_reason,
            cost=cost,
            cost_unit=unit,
            error_code=error.code if error is not None else None,
            cached=cached,
            session_id=self.session.id if self.session is not None else None,
            attempt=self.attempts,
            kind=self.kind,
            encrypted=encrypted,
            job_id=job.job_id if job is not None else None,
            tx_hash=(job.open_tx or None) if job is not None else None,
        )
        self.records.append(record)
        self._core.usage.record(record)
        return record



class InferenceCore:
    """What streams share, and the factory of streams: settings, hosts, connections, usage.

    Args:
        host_manager: where hosts come from (a :class:`HostManager`, or a list of host URLs).
        config: client-wide settings; defaults to :class:`InferenceConfig()`.
        usage: where usage records go; defaults to an SQLite :class:`UsageLedger` at
            ``config.usage_db``.
        rng: randomness for backoff jitter and tie-breaking (seed it for reproducible runs).
        connector: hands out connections (default: a :class:`~fabstir_jupyter.connections.PoolConnector`
            over :attr:`pool`); a payment provider's connector binds them to jobs.
        signer: the client's key that signs encrypted session inits (the SDK passes the
            authenticated user's key); ``None``: a fresh key, kept for the core's life.
        payments: pay for requests (spec/PROTOCOL.md §10): with it the default connector is a
            :class:`~fabstir_jupyter.paid_connector.PaidConnector`, and a registry network serves inference;
            closing the core settles its open jobs.

    The core belongs to one event loop: the first that uses it, or a private loop thread when it is
    first used through a blocking call. Streams can be consumed from other loops.
    """

    def __init__(
        self,
        host_manager: HostManager | list[str] | None = None,
        config: InferenceConfig | None = None,
        *,
        usage: UsageSink | None = None,
        rng: random.Random | None = None,
        connector: Connector | None = None,
        signer: PrivateKey | None = None,
        payments: Payments | None = None,
    ) -> None:
        self.config = config or InferenceConfig()
        if host_manager is None or isinstance(host_manager, list):
            host_manager = HostManager(host_manager or [], config=self.config)
        self.host_manager = host_manager
        self.pool = ConnectionPool(self.config, headers_for=self.config.auth_headers)
        self.payments = payments
        if connector is None and payments is not None:
            from .paid_connector import PaidConnector

            connector = PaidConnector(self.pool, self.config, payments, keys=host_manager.keys, signer=signer)
        self.connector: Connector = connector if connector is not None else PoolConnector(
            self.pool, self.config, keys=host_manager.keys, signer=signer)
        self.policy: HostPolicy = BestHostPolicy(self.host_manager, self.config)
        self._owns_usage = usage is None
        self.usage: UsageSink = usage if usage is not None else UsageLedger(self.config.usage_db)
        self.rng = rng or random.Random()
        self.rate_limiter = RateLimiter(self.config.rate_limit, self.config.rate_burst)
        self.cache = ResponseCache(self.config.cache_size) if self.config.cache_responses else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: LoopThread | None = None
        self._lock = threading.Lock()
        self._closed = False  # no new streams
        self._released = False  # sockets closed, paid jobs settled (aclose ran to its end)
        self._running: set[InferenceStream] = set()
        self._recheck: asyncio.Future[Any] | None = None
        self._recheck_at = float("-inf")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} hosts={len(self.host_manager.hosts)} pool={self.pool.stats()}>"

    def use_payments(self, payments: Payments) -> None:
        """Pay for later requests with ``payments`` (e.g. once a wallet and a budget are known): the
        default connector becomes a :class:`~fabstir_jupyter.paid_connector.PaidConnector` on the same pool.

        Raises:
            InvalidOptions: the core was given a connector of its own, or already pays.
        """
        from .paid_connector import PaidConnector

        if self.payments is not None or type(self.connector) is not PoolConnector:
            raise InvalidOptions("this manager already pays, or has a connector of its own", field="payments")
        old = self.connector
        self.payments = payments
        self.connector = PaidConnector(self.pool, self.config, payments, keys=old.keys, signer=old.signer)

    def use_signer(self, signer: PrivateKey | None) -> None:
        """Sign later encrypted session inits with ``signer`` (e.g. after ``FabstirSDK.authenticate``).

        Only the default connector signs; ``None`` goes back to a fresh key of the core's own.
        """
        if isinstance(self.connector, PoolConnector):
            self.connector.signer = signer

    # ------------------------------------------------------------------ loop ownership

    def bind_loop(self) -> asyncio.AbstractEventLoop:
        """Make the running event loop this core's owner, unless it has one; return the owner.

        Call it from the loop that should own the sockets (the notebook's loop thread does) before
        anything else uses the core, so that a later blocking call does not start a private loop.
        """
        return self._owner_loop()

    def _owner_loop(self, *, blocking: bool = False) -> asyncio.AbstractEventLoop:
        """Return the loop that owns this core, binding it on first use.

        An async first use binds the running loop; a blocking first use (``infer()``, possibly from a
        notebook cell whose loop is busy running that very cell) binds a private loop thread.
        """
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                running = None
                if not blocking:
                    try:
                        running = asyncio.get_running_loop()
                    except RuntimeError:
                        pass
                if running is None:
                    self._loop_thread = LoopThread()
                    running = self._loop_thread.loop
                self._loop = running
            return self._loop

    async def _call_on_owner(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the owning loop, from any loop."""
        loop = self._owner_loop()
        if loop is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def _run_blocking(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the owning loop and wait for it from this thread (Ctrl-C cancels it)."""
        loop = self._owner_loop(blocking=True)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError(
                f"this {type(self).__name__} belongs to the running event loop, so a blocking call would deadlock: "
                "use `await manager.ainfer(...)` here"
            )
        return wait_future(asyncio.run_coroutine_threadsafe(coro, loop), timeout)

    async def _recheck_unreachable(self, asked_at: float) -> bool:
        """Ping the hosts marked unreachable; return whether any host is reachable now.

        A round of pings that started after ``asked_at`` (a ``time.monotonic()`` reading taken when
        the caller began looking for a host) is fresh enough and is shared, so concurrent failing
        requests do not flood dead hosts with probes; any older round is not, so a request made
        after a host came back always looks again.
        """
        hosts = self.host_manager
        if self._recheck is None or (self._recheck.done() and self._recheck_at < asked_at):
            down = [h for h in hosts.hosts if not h.reachable]
            if not down:
                return False
            logger.info("no reachable host; checking the %d marked unreachable again", len(down))
            self._recheck_at = time.monotonic()
            self._recheck = asyncio.ensure_future(
                asyncio.gather(*(hosts.prober.ping(h) for h in down), return_exceptions=True))
        await asyncio.shield(self._recheck)
        return any(h.reachable for h in hosts.hosts)

    # ------------------------------------------------------------------ streams

    def _check_network(self) -> None:
        # Hosts found on a real registry expect paid sessions (spec/PROTOCOL.md §10): unpaid requests
        # would be freeloading on someone's GPU, so a registry network serves inference only with
        # payments (a wallet and a budget); the local network and static host lists need none.
        if self.config.network not in ("local", "static") and self.payments is None:
            raise PaymentRequired(
                f"inference on {self.config.network} is paid from your own wallet, within a budget: set "
                "FABSTIR_PRIVATE_KEY (or FABSTIR_KEY_FILE, a 0600 file holding the key) and a budget "
                "(FABSTIR_BUDGET, or budget=... in FabstirSDK) in whole USDC",
                hint="FabstirSDK(network=..., budget=5) with FABSTIR_PRIVATE_KEY set; discovery and probing work "
                     "without them",
            )

    def stream(self, prompt: str, options: InferenceOptions | Mapping[str, Any] | None = None, *,
               host: str | HostInfo | None = None, session: Conversation | None = None,
               policy: HostPolicy | None = None, kind: str | None = None, **kwargs: Any) -> InferenceStream:
        """Create a stream for ``prompt``, checked now, before any I/O; start it with ``async with``.

        Args:
            prompt: the prompt.
            options: an :class:`InferenceOptions`, a dict, or the same names as keyword arguments.
            host: pin a host (``host_address`` too): every attempt goes there.
            session: make the stream a turn of this session.
            policy: which host each attempt gets (default: :attr:`policy`, the best host).
            kind: recorded with the usage; default ``"stream"``, or ``"direct"`` for a pinned host.

        Raises:
            InvalidPrompt, InvalidOptions: bad input (``field`` says which).
            PaymentRequired: on a registry network without payments (no wallet or no budget).
            NoHostsAvailable: ``host`` is a registry address no discovered host has.
            ConnectionFailed: the core is closed.
        """
        if self._closed:
            raise ConnectionFailed("inference manager is closed")
        resolved = resolve_options(options, kwargs, self.config)
        prompt = validate_request(prompt, resolved, self.config)
        self._check_network()
        target = host if host is not None else resolved.host_address
        fixed = self.host_for(target) if target is not None else None
        kind = kind or ("stream" if fixed is None else "direct")
        return InferenceStream(self, prompt, resolved, kind=kind, host=fixed, session=session, policy=policy)

    def host_for(self, target: str | HostInfo) -> HostInfo:
        """Return the known host for a URL, registry address or :class:`HostInfo`, adding a new URL.

        Raises:
            NoHostsAvailable: a registry address that no discovered host has.
        """
        if isinstance(target, HostInfo):
            return self.host_manager.add_host(target)
        known = self.host_manager.find(target)
        if known is not None:
            return known
        if target.startswith("0x") and "://" not in target:
            raise NoHostsAvailable(f"no known host has address {target}", hint="run discovery first")
        return self.host_manager.add_host(target)

    async def stop_turns(self, session_id: str, reason: FabstirError) -> None:
        """Stop the running streams of a session (it ended): ``stream_cancel`` goes to the host, nothing
        fails over, and their consumers get ``reason`` after the text already delivered."""
        turns = [s for s in self._running if s.session is not None and s.session.id == session_id]
        await asyncio.gather(*(turn._stop(reason) for turn in turns))

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Settle open paid jobs, close sockets and the probe client, flush an owned ledger, stop a
        private loop thread. Idempotent; may be awaited from any loop; a call that was interrupted (a
        cancelled await, Ctrl-C) may be made again and finishes what the first did not reach."""
        if self._released:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed() and loop is not asyncio.get_running_loop():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._release_resources(), loop))
        else:
            await self._release_resources()
        self._released = True
        if self._owns_usage and isinstance(self.usage, UsageLedger):
            await asyncio.get_running_loop().run_in_executor(None, self.usage.close)
        await asyncio.get_running_loop().run_in_executor(None, self._stop_loop_thread)

    async def _release_resources(self) -> None:
        if self.payments is not None:
            await self.payments.aclose()  # settles open jobs: their sockets close first
        await self.pool.close()
        await self.host_manager.aclose()

    def _stop_loop_thread(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None

    def close(self) -> None:
        """Blocking :meth:`aclose`, for scripts; from a coroutine use ``await aclose()``."""
        if self._released:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("use `await manager.aclose()` from the manager's own loop")
            self._closed = True
            # Paid jobs settle first: a job still opening, then its host's last proof and the completion.
            limit = 30 + (self.payments.close_timeout if self.payments is not None else 0)
            wait_future(asyncio.run_coroutine_threadsafe(self._release_resources(), loop), limit)
        self._closed = self._released = True
        if self._owns_usage and isinstance(self.usage, UsageLedger):
            self.usage.close()
        self._stop_loop_thread()
