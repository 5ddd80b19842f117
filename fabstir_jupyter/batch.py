"""Batches: run many prompts over the known hosts and collect one row per prompt.

:func:`run_batch` spreads prompts over hosts. For each prompt it picks a host itself, with the
selection mode's scores (:func:`~fabstir_jupyter.hosts.selection.select_host`) among the hosts
that still have room under their per-host limit, and runs the prompt on that host as an
:class:`~fabstir_jupyter.inference.InferenceStream` (whose own retries stay on that host). When the
stream fails with a retryable error, the prompt starts again from scratch on another host, up to
``max_retries`` further hosts. A host whose last two prompts failed is used only when no other
host has room, so a broken host stops soaking up prompts. The hosts' counters (latency, success
rate, reachability) are updated by every request, so selection learns as the batch runs.

Every prompt gets a row, whatever happens: a bad prompt, a dead host or an exhausted retry budget
puts the error in the row and the batch goes on. Only misuse (bad options, a bad concurrency
limit, a string instead of a list of prompts) raises, before any I/O. Cancelling
:func:`run_batch` cancels every running prompt (``stream_cancel`` goes to the hosts).

pandas is imported only when the frame is built.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .config import HostRequirements, InferenceOptions, resolve_options, validate_mode, validate_prompt
from .errors import FabstirError, InvalidOptions, NoHostsAvailable
from .hosts.info import HostInfo
from .hosts.selection import eligible_hosts, select_host

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .inference import InferenceManager, InferenceStream

__all__ = ["BATCH_COLUMNS", "DEFAULT_PER_HOST_CONCURRENCY", "ProgressCallback", "run_batch"]

logger = logging.getLogger("fabstir_jupyter.batch")

#: The columns of :func:`run_batch`'s frame, in order.
BATCH_COLUMNS = (
    "prompt", "text", "host", "model", "tokens", "ttft", "duration", "cost", "cost_unit", "finish_reason",
    "error", "error_message",
)

_FLOAT_COLUMNS = frozenset({"ttft", "duration", "cost"})

#: Streams per host at once when neither the caller nor the host's metadata (``maxConcurrent``)
#: says otherwise; the reference host answers ``HOST_BUSY`` above 4 by default.
DEFAULT_PER_HOST_CONCURRENCY = 4

#: ``progress(done, total, errors)``, called after each prompt; may also return an awaitable.
ProgressCallback = Callable[[int, int, int], Any]

# A host whose last this-many prompts in the batch failed is used only when no other host has room.
_BENCH_AFTER = 2


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptions(f"{name} must be a positive integer or None, not {value!r}", field=name)
    return value


class _Batch:
    """The state of one batch: per-host streams in flight and recent failures."""

    def __init__(
        self,
        manager: InferenceManager,
        options: InferenceOptions,
        requirements: HostRequirements,
        per_host: int | None,
    ) -> None:
        self.manager = manager
        self.options = options
        self.requirements = requirements
        self.mode = validate_mode(options.mode)
        self.per_host = per_host
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.streak: collections.Counter[str] = collections.Counter()  # consecutive failed prompts
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ capacity

    def limit(self, host: HostInfo) -> int:
        """Streams this batch runs on ``host`` at once."""
        if self.per_host is not None:
            return self.per_host
        advertised = host.metadata.get("maxConcurrent")
        if isinstance(advertised, int) and not isinstance(advertised, bool) and advertised > 0:
            return min(advertised, self.manager.config.pool_max_per_host)
        return min(DEFAULT_PER_HOST_CONCURRENCY, self.manager.config.pool_max_per_host)

    def capacity(self) -> int:
        """Streams the batch can run at once on the hosts that fit now (at least 1)."""
        if self.options.host_address is not None:
            known = self.manager.host_manager.find(self.options.host_address)
            return self.limit(known) if known is not None else (self.per_host or DEFAULT_PER_HOST_CONCURRENCY)
        try:
            hosts = eligible_hosts(self.manager.host_manager.hosts, self.requirements)
        except FabstirError:
            return 1
        return max(1, sum(self.limit(h) for h in hosts))

    async def acquire(self, tried: set[str]) -> HostInfo | None:
        """Wait for room on a host not in ``tried`` and take it; ``None`` when every fitting host was tried.

        Raises:
            NoHostsAvailable, ModelNotAvailable: no host fits at all (all unreachable, say).
        """
        while True:
            fitting = eligible_hosts(self.manager.host_manager.hosts, self.requirements)
            fresh = [h for h in fitting if h.key not in tried]
            if not fresh:
                return None
            preferred = [h for h in fresh if self.streak[h.key] < _BENCH_AFTER] or fresh
            room = [h for h in preferred if self.in_flight[h.key] < self.limit(h)]
            if room:
                host = select_host(room, self.requirements, mode=self.mode, rng=self.manager.host_manager.rng)
                self.in_flight[host.key] += 1
                return host
            changed = self._changed
            await changed.wait()

    def release(self, host: HostInfo, *, failed: bool) -> None:
        """Give back a slot on ``host`` (synchronous, so it is safe in ``finally`` when cancelled)."""
        self.in_flight[host.key] -= 1
        self.streak[host.key] = self.streak[host.key] + 1 if failed else 0
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ one prompt

    async def run_prompt(self, prompt: Any) -> dict[str, Any]:
        """Run one prompt to a row; never raises except when cancelled."""
        try:
            validate_prompt(prompt, max_chars=self.manager.config.max_prompt_chars)
            if self.options.host_address is not None:
                stream = await self._run_stream(prompt, None)
                return _row(prompt, stream, stream.error)
            return await self._run_failing_over(prompt)
        except FabstirError as exc:
            return _row(prompt, None, exc)
        except Exception as exc:  # a bug: keep the batch going and say so in the row
            logger.exception("unexpected error in a batch prompt")
            return _row(prompt, None, FabstirError(f"internal error: {type(exc).__name__}: {exc}",
                                                   code="HOST_ERROR", retryable=False))

    async def _run_failing_over(self, prompt: str) -> dict[str, Any]:
        tried: set[str] = set()
        stream: InferenceStream | None = None
        error: FabstirError | None = None
        for _ in range(self.manager.config.max_retries + 1):
            try:
                host = await self.acquire(tried)
            except FabstirError as exc:
                error = error or exc
                break
            if host is None:
                break
            failed = False  # a stream that cannot even be created is not the host's fault
            try:
                stream = await self._run_stream(prompt, host)
                error = stream.error
                failed = error is not None and error.retryable
            finally:
                self.release(host, failed=failed)
            if error is None or not error.retryable:
                break
            tried.add(host.key)
            logger.info("batch prompt failed on %s (%s); trying another host", host.api_url, error)
        if error is None and stream is None:
            error = NoHostsAvailable("no host could take the prompt")
        return _row(prompt, stream, error)

    async def _run_stream(self, prompt: str, host: HostInfo | None) -> InferenceStream:
        """Run a stream to its end; its error (if any) is left in ``stream.error``.

        Raises:
            FabstirError: the stream could not be created (invalid input, refused network).
        """
        stream = self.manager.stream(prompt, self.options, host=host)
        stream.kind = "batch"
        try:
            async with stream:
                async for _ in stream:
                    pass
        except FabstirError:
            pass  # kept in stream.error
        return stream


def _row(prompt: Any, stream: InferenceStream | None, error: FabstirError | None) -> dict[str, Any]:
    usage = stream.usage if stream is not None else None
    records = stream.records if stream is not None else []
    if usage is not None:
        tokens, ttft, duration = usage.received_tokens, usage.ttft, usage.duration
        cost, unit = usage.cost, usage.cost_unit
    else:
        costs = [r.cost for r in records if r.cost is not None]
        units = {r.cost_unit for r in records if r.cost is not None}
        tokens = sum(r.received_tokens for r in records)
        ttft = stream.ttft if stream is not None else None
        duration = sum(r.duration for r in records) if records else None
        cost, unit = (sum(costs), units.pop()) if costs and len(units) == 1 else (None, None)
    return {
        "prompt": prompt,
        "text": stream.text if stream is not None else "",
        "host": stream.host.api_url if stream is not None and stream.host is not None else None,
        "model": stream.model if stream is not None else None,
        "tokens": tokens,
        "ttft": ttft,
        "duration": duration,
        "cost": cost,
        "cost_unit": unit,
        "finish_reason": "error" if error is not None else (stream.finish_reason if stream is not None else None),
        "error": error.code if error is not None else None,
        "error_message": str(error) if error is not None else None,
    }


async def _report(progress: ProgressCallback | None, done: int, total: int, errors: int) -> None:
    if progress is None:
        return
    try:
        result = progress(done, total, errors)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a broken progress bar must not sink the batch
        logger.warning("batch progress callback failed", exc_info=True)


async def run_batch(
    manager: InferenceManager,
    prompts: Iterable[str],
    options: InferenceOptions | Mapping[str, Any] | None = None,
    *,
    max_concurrency: int | None = None,
    per_host_concurrency: int | None = None,
    progress: ProgressCallback | None = None,
    requirements: HostRequirements | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Run every prompt on the manager's hosts and return one row per prompt, in input order.

    Options (an :class:`~fabstir_jupyter.config.InferenceOptions`, a dict, or keyword arguments)
    apply to every prompt; ``mode`` picks the selection mode and ``host_address`` sends every prompt
    to one host (no failover then).

    Args:
        manager: the :class:`~fabstir_jupyter.inference.InferenceManager` whose hosts, pool and
            usage sink are used.
        prompts: the prompts (a list, tuple, pandas Series...).
        max_concurrency: prompts in flight at once; default: the sum of the per-host limits of the
            hosts that fit after discovery.
        per_host_concurrency: streams per host at once; default: the host's ``maxConcurrent``
            metadata, else :data:`DEFAULT_PER_HOST_CONCURRENCY` (both capped by
            ``config.pool_max_per_host``).
        progress: ``progress(done, total, errors)`` after each prompt; its exceptions are logged
            and swallowed.
        requirements: hard requirements (``min_stake``, ``max_latency``) and ``region``
            preference for every prompt's host; ``model`` comes from the options when they name one.

    Returns:
        A pandas DataFrame with the columns of :data:`BATCH_COLUMNS`: ``prompt``, ``text`` (partial
        when the prompt failed mid-answer), ``host`` (the URL that answered, or last tried),
        ``model``, ``tokens`` (received), ``ttft`` and ``duration`` (seconds, over the answering
        stream's attempts, not counting time queued in the batch or on hosts given up),
        ``cost``, ``cost_unit``, ``finish_reason``, ``error`` (the error code or None) and
        ``error_message``.

    Raises:
        InvalidOptions: bad options or limits, or ``prompts`` is a single string; before any I/O.
    """
    if isinstance(prompts, (str, bytes)):
        raise InvalidOptions("prompts must be a list of prompts, not a single string", field="prompts")
    try:
        items = list(prompts)
    except TypeError:
        raise InvalidOptions(f"prompts must be an iterable of strings, not {type(prompts).__name__}",
                             field="prompts") from None
    max_concurrency = _positive_int("max_concurrency", max_concurrency)
    per_host = _positive_int("per_host_concurrency", per_host_concurrency)
    if progress is not None and not callable(progress):
        raise InvalidOptions("progress must be a callable progress(done, total, errors)", field="progress")
    if requirements is not None and not isinstance(requirements, HostRequirements):
        raise InvalidOptions("requirements must be a HostRequirements", field="requirements")
    resolved = resolve_options(options, kwargs, manager.config)
    requirements = requirements or HostRequirements()
    model = resolved.model or requirements.model
    resolved = resolved.replace(model=model)
    requirements = dataclasses.replace(requirements, model=model or manager.config.default_model)

    rows: list[dict[str, Any] | None] = [None] * len(items)
    if items:
        batch = _Batch(manager, resolved, requirements, per_host)
        if resolved.host_address is None:
            try:
                await manager.host_manager.discover_all_active_hosts()
            except FabstirError as exc:  # rows will say why no host fits
                logger.warning("batch discovery failed: %s", exc)
        limit = asyncio.Semaphore(max_concurrency or batch.capacity())
        done = errors = 0

        async def one(index: int, prompt: Any) -> None:
            nonlocal done, errors
            async with limit:
                row = await batch.run_prompt(prompt)
            rows[index] = row
            done += 1
            errors += row["error"] is not None
            await _report(progress, done, len(items), errors)

        tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(items)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    return _frame(rows)  # type: ignore[arg-type]


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Build the result frame: numbers as int/float columns (NaN when unknown), text columns keep None."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for name in BATCH_COLUMNS:
        values = [row[name] for row in rows]
        if name == "tokens":
            columns[name] = pd.Series(values, dtype="int64")
        elif name in _FLOAT_COLUMNS:
            columns[name] = pd.Series([float("nan") if v is None else v for v in values], dtype="float64")
        else:
            columns[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(columns, columns=list(BATCH_COLUMNS))
