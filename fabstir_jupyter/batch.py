"""Batches: run many prompts over the known hosts and collect one row per prompt.

:func:`run_batch` runs each prompt as one :class:`~fabstir_jupyter.streams.InferenceStream` whose
host policy is the batch (:class:`BatchPolicy`): each attempt of a prompt gets, with the selection
mode's scores (:func:`~fabstir_jupyter.hosts.selection.select_host`), a host that still has room
under its per-host limit, preferring hosts the prompt has not tried. The retry loop is the stream's
own, so ``max_retries`` means what it means for any stream: at most ``max_retries + 1`` attempts
per prompt, from scratch before the first token, continuing the partial answer after it. A host
whose last two attempts in the batch failed is used only when no other host has room, so a broken
host stops soaking up prompts. The hosts' counters (latency, success rate, reachability) are
updated by every request, so selection learns as the batch runs.

The batch schedules to each host's capacity rather than finding it by refusals: the streams a host
runs at once are what the host itself says (``max_concurrent_streams`` in its ``/v1/version``),
else what its registry metadata advertises (``maxConcurrent``), else
:data:`DEFAULT_PER_HOST_CONCURRENCY`. A host that still answers ``HOST_BUSY`` (another client took
the slot) gets fewer of the batch's streams for a while, AIMD-like (:class:`HostWindow`): its window
drops to the streams the batch was running there besides the refused one (at least 1), and climbs
back by one slot per window's worth of answers that end well there, up to its capacity; a climb that
is refused again makes the next one take twice as many answers, so a host kept busy by others is
probed less and less often.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import HostRequirements, InferenceOptions, resolve_options, validate_mode
from .errors import FabstirError, HostBusy, InvalidOptions
from .hosts.info import HostInfo
from .hosts.selection import eligible_hosts, select_host
from .streams import InferenceCore, InferenceStream

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "BATCH_COLUMNS", "DEFAULT_PER_HOST_CONCURRENCY", "BatchPolicy", "HostWindow", "ProgressCallback", "run_batch",
]

logger = logging.getLogger("fabstir_jupyter.batch")

#: The columns of :func:`run_batch`'s frame, in order.
BATCH_COLUMNS = (
    "prompt", "text", "host", "model", "tokens", "ttft", "duration", "cost", "cost_unit", "finish_reason",
    "error", "error_message",
)

_FLOAT_COLUMNS = frozenset({"ttft", "duration", "cost"})

#: Streams per host at once when neither the caller, nor the host (``/v1/version``), nor its registry
#: metadata (``maxConcurrent``) says otherwise; the reference host answers ``HOST_BUSY`` above 4 by default.
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


class HostWindow:
    """How many streams a batch runs on a host that answered ``HOST_BUSY``, below its capacity.

    A refusal lowers :attr:`allowed` to the streams the batch still ran there (at least 1). Each
    ``allowed * pace`` answers that end well there give one slot back; a refusal right after a slot
    came back doubles ``pace``, so a host kept busy by others is probed less and less often.

    Args:
        allowed: the streams allowed after the first refusal (at least 1).
    """

    def __init__(self, allowed: int) -> None:
        self.allowed = max(1, allowed)
        self.pace = 1  # answers per slot, per stream allowed
        self.answers = 0  # answers that ended well since the window last changed
        self.climbed = False  # the last change gave a slot back

    def __repr__(self) -> str:
        return f"<HostWindow allowed={self.allowed} pace={self.pace}>"

    def refused(self, running: int) -> None:
        """A stream was refused while ``running`` others of the batch ran on the host."""
        if self.climbed:  # the slot just given back was not there
            self.pace *= 2
        self.allowed = max(1, min(self.allowed, running))
        self.answers, self.climbed = 0, False

    def answered(self) -> None:
        """A stream ended well on the host."""
        self.answers += 1
        if self.answers >= self.allowed * self.pace:
            self.allowed += 1
            self.answers, self.climbed = 0, True


class BatchPolicy:
    """The host policy of one batch: per-host streams in flight and windows, and recent failures.

    It implements :class:`~fabstir_jupyter.streams.HostPolicy`: :meth:`choose` waits for room on a
    host and takes it, :meth:`release` gives it back. ``attempts`` and ``refused`` count the batch's
    attempts and those the hosts answered ``HOST_BUSY``.
    """

    def __init__(
        self,
        core: InferenceCore,
        options: InferenceOptions,
        requirements: HostRequirements,
        per_host: int | None,
    ) -> None:
        self.core = core
        self.options = options
        self.requirements = requirements
        self.mode = validate_mode(options.mode)
        self.per_host = per_host
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.streak: collections.Counter[str] = collections.Counter()  # consecutive failed attempts
        self.windows: dict[str, HostWindow] = {}  # by host key: hosts that answered HOST_BUSY
        self.attempts = 0
        self.refused = 0  # attempts answered HOST_BUSY
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ capacity

    async def prepare(self) -> None:
        """Discover the hosts and read each fitting host's description (``/v1/version``, its stream
        limit included) before the first prompt goes out; never raises (rows say why no host fits)."""
        host_manager = self.core.host_manager
        try:
            await host_manager.discover_all_active_hosts()
            fitting = eligible_hosts(host_manager.hosts, self.requirements)
        except FabstirError as exc:
            logger.warning("batch discovery failed: %s", exc)
            return
        await asyncio.gather(*(host_manager.describe(h) for h in fitting))  # cached: read once per host

    def capacity(self, host: HostInfo) -> int:
        """Streams this batch may run on ``host`` at once: ``per_host_concurrency`` when the caller
        gave it, else the host's own limit, else its metadata's ``maxConcurrent``, else
        :data:`DEFAULT_PER_HOST_CONCURRENCY` (the last three capped by ``config.pool_max_per_host``,
        the sockets the pool opens to one host)."""
        if self.per_host is not None:
            return self.per_host
        return min(host.stream_capacity or DEFAULT_PER_HOST_CONCURRENCY, self.core.config.pool_max_per_host)

    def limit(self, host: HostInfo) -> int:
        """Streams this batch runs on ``host`` at once now: its :meth:`capacity`, or less while the
        host's window is lowered by ``HOST_BUSY`` answers."""
        capacity = self.capacity(host)
        window = self.windows.get(host.key)
        return capacity if window is None else min(capacity, window.allowed)

    def total_capacity(self) -> int:
        """Streams the batch can run at once on the hosts that fit now (at least 1)."""
        if self.options.host_address is not None:
            known = self.core.host_manager.find(self.options.host_address)
            return self.limit(known) if known is not None else (self.per_host or DEFAULT_PER_HOST_CONCURRENCY)
        try:
            hosts = eligible_hosts(self.core.host_manager.hosts, self.requirements)
        except FabstirError:
            return 1
        return max(1, sum(self.limit(h) for h in hosts))

    async def choose(self, stream: InferenceStream, tried: Sequence[HostInfo]) -> HostInfo:
        """Wait for room on a fitting host and take it: one the prompt has not tried while there is
        one, and one not benched while another has room.

        Raises:
            NoHostsAvailable, ModelNotAvailable: no host fits at all (all unreachable, say).
        """
        tried_keys = {h.key for h in tried}
        while True:
            changed = self._changed
            fitting = eligible_hosts(self.core.host_manager.hosts, self.requirements)
            fresh = [h for h in fitting if h.key not in tried_keys] or fitting
            preferred = [h for h in fresh if self.streak[h.key] < _BENCH_AFTER] or fresh
            room = [h for h in preferred if self.in_flight[h.key] < self.limit(h)]
            if room:
                host = select_host(room, self.requirements, mode=self.mode, rng=self.core.host_manager.rng)
                self.in_flight[host.key] += 1
                return host
            await changed.wait()

    def release(self, host: HostInfo, *, failed: bool, error: FabstirError | None = None) -> None:
        """Give back a slot on ``host`` (synchronous, so it is safe in ``finally`` when cancelled).

        ``HOST_BUSY`` lowers the host's window to the streams the batch still runs there (at least
        1): the host had no room beside those. Answers that end well there raise it again, up to
        the host's capacity (see :class:`HostWindow`).
        """
        key = host.key
        others = self.in_flight[key] - 1  # the batch's other streams on the host
        self.in_flight[key] = others
        self.attempts += 1
        window = self.windows.get(key)
        if isinstance(error, HostBusy):
            self.refused += 1
            if window is None:
                window = self.windows[key] = HostWindow(min(self.capacity(host), others))
            else:
                window.refused(others)
            logger.debug("host %s busy beside %d of this batch's streams; window now %d", host.api_url, others,
                         window.allowed)
        elif error is None and window is not None:
            window.answered()
            if window.allowed >= self.capacity(host):
                del self.windows[key]
        self.streak[key] = self.streak[key] + 1 if failed else 0
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ one prompt

    async def run_prompt(self, prompt: Any) -> dict[str, Any]:
        """Run one prompt to a row; never raises except when cancelled."""
        try:
            # host_address pins every prompt to one host: the stream's own policy then applies.
            policy = None if self.options.host_address is not None else self
            stream = self.core.stream(prompt, self.options, kind="batch", policy=policy)
            try:
                async with stream:
                    async for _ in stream:
                        pass
            except FabstirError:
                pass  # kept in stream.error
            return _row(prompt, stream, stream.error)
        except FabstirError as exc:  # the prompt was refused before any I/O
            return _row(prompt, None, exc)
        except Exception as exc:  # a bug: keep the batch going and say so in the row
            logger.exception("unexpected error in a batch prompt")
            return _row(prompt, None, FabstirError(f"internal error: {type(exc).__name__}: {exc}",
                                                   code="HOST_ERROR", retryable=False))


def _row(prompt: Any, stream: InferenceStream | None, error: FabstirError | None) -> dict[str, Any]:
    usage = stream.totals() if stream is not None else None
    return {
        "prompt": prompt,
        "text": stream.text if stream is not None else "",
        "host": stream.host.api_url if stream is not None and stream.host is not None else None,
        "model": stream.model if stream is not None else None,
        "tokens": usage.received_tokens if usage is not None else 0,
        "ttft": usage.ttft if usage is not None else None,
        "duration": usage.duration if usage is not None else None,
        "cost": usage.cost if usage is not None else None,
        "cost_unit": usage.cost_unit if usage is not None else None,
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
    manager: InferenceCore,
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
        manager: the :class:`~fabstir_jupyter.inference.InferenceManager` (any
            :class:`~fabstir_jupyter.streams.InferenceCore`) whose hosts, connections and usage sink are used.
        prompts: the prompts (a list, tuple, pandas Series...).
        max_concurrency: prompts in flight at once; default: the sum of the per-host limits of the
            hosts that fit after discovery.
        per_host_concurrency: streams per host at once; default: the host's own limit
            (``max_concurrent_streams`` in its ``/v1/version``), else its registry metadata's
            ``maxConcurrent``, else :data:`DEFAULT_PER_HOST_CONCURRENCY` (capped by
            ``config.pool_max_per_host``). Either way a host that answers ``HOST_BUSY`` gets fewer
            streams for a while (see the module docstring).
        progress: ``progress(done, total, errors)`` after each prompt; its exceptions are logged
            and swallowed.
        requirements: hard requirements (``min_stake``, ``max_latency``) and ``region``
            preference for every prompt's host; ``model`` comes from the options when they name one.

    Returns:
        A pandas DataFrame with the columns of :data:`BATCH_COLUMNS`: ``prompt``, ``text`` (partial
        when the prompt failed mid-answer), ``host`` (the URL that answered, or last tried),
        ``model``, ``tokens`` (received), ``ttft`` and ``duration`` (seconds: the prompt's stream's
        totals, over the attempts that delivered text, or over every attempt of a prompt that failed;
        time queued in the batch is not counted),
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
        batch = BatchPolicy(manager, resolved, requirements, per_host)
        if resolved.host_address is None:
            await batch.prepare()
        limit = asyncio.Semaphore(max_concurrency or batch.total_capacity())
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
        logger.debug("batch of %d prompts: %d attempts, %d answered HOST_BUSY", len(items), batch.attempts,
                     batch.refused)

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
    frame: pd.DataFrame = pd.DataFrame(columns, columns=list(BATCH_COLUMNS))
    return frame
