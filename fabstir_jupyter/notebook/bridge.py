"""The bridge between notebook cells and the async SDK: one loop thread per process.

ipykernel runs its own event loop in the main thread, so a cell magic cannot ``asyncio.run()``
(see DESIGN.md, "Running async code from a cell magic"). The bridge owns a private event loop in a
daemon thread (:class:`~fabstir_jupyter.runner.LoopThread`) and the SDKs whose managers, sockets
and pools belong to that loop: they are created and used only from coroutines running there.

A blocking cell (:meth:`NotebookBridge.run_stream`) submits a coroutine that consumes the stream
and hands text to the main thread through a ``queue.Queue``; the main thread updates the output,
so display calls stay on the main thread. Ctrl-C cancels the coroutine (the stream's exit sends
``stream_cancel``), waits for its cleanup, marks the output cancelled and re-raises
``KeyboardInterrupt`` so queued cells stop.

Coroutines run in a copy of the submitting thread's ``contextvars`` context, so in a kernel the
output a ``--background`` stream writes from the loop thread lands in the cell that started it.

The first use of an SDK starts its network (on ``network="local"``: a chain and host processes,
then discovery) in a task of its own, recorded as a :class:`~.startup.NetworkStartup`; the
extension starts it as it loads (:meth:`NotebookBridge.start_network`). A cell waits for it and
its output shows the step in progress (the sink's optional ``network_step``/``network_ready``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union

from ..errors import Cancelled, FabstirError, InvalidOptions, SessionNotFound
from ..runner import LoopThread
from .rendering import LiveStatus
from .startup import NetworkStartup

if TYPE_CHECKING:
    from ..inference import InferenceManager, InferenceResult, InferenceStream
    from ..sdk import FabstirSDK
    from ..sessions import Session
    from ..settings import SDKSettings
    from .output import OutputSink

__all__ = ["NotebookBridge", "NetworkSettings", "LoopTask", "BackgroundRun", "get_bridge", "close_bridge"]

logger = logging.getLogger("fabstir_jupyter.notebook")

T = TypeVar("T")

StreamFactory = Callable[[], Union["InferenceStream", Awaitable["InferenceStream"]]]

LOOP_THREAD_NAME = "fabstir-notebook-loop"
_END = object()  # queue sentinel: the consumer coroutine has finished
_READY = object()  # queue item: the network the stream waited for is ready
_CLOSE_TIMEOUT = 30.0
_START_WAIT_ON_CLOSE = 60.0  # a network still starting when the bridge closes: wait this long, then stop it
MAX_RUNS_KEPT = 100  # background runs remembered for %fabstir status


@dataclass(frozen=True)
class _Step:
    """Queue item: the network the stream waits for is at step ``label``."""

    label: str


@dataclass(frozen=True)
class NetworkSettings:
    """What identifies one SDK; ``None`` and ``()`` leave the setting to the SDK's own resolution
    (environment, then config file). The magic passes resolved values (:meth:`of`)."""

    network: str | None = None
    hosts: tuple[str, ...] = ()
    local_backend: str | None = None
    usage_db: str | None = None

    @classmethod
    def of(cls, settings: SDKSettings) -> NetworkSettings:
        """The identity of the SDK for resolved settings."""
        return cls(network=settings.network, hosts=settings.hosts, local_backend=settings.local_backend,
                   usage_db=settings.usage_db)


@dataclass
class _NamedSession:
    name: str
    settings: NetworkSettings
    session: Session
    terms: tuple[Decimal | None, Decimal | None] = (None, None)  # the --deposit and --budget it was made with


class LoopTask(Generic[T]):
    """A coroutine running on the bridge's loop, seen from another thread.

    Unlike the future of ``run_coroutine_threadsafe`` (which is marked cancelled as soon as the
    cancel is requested), :attr:`done` is set only once the coroutine has really finished,
    its cleanup (``stream_cancel``, socket release) included.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T],
                 context: contextvars.Context | None = None) -> None:
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.done = threading.Event()
        self._loop = loop
        self._task: asyncio.Task[T] | None = None
        self._cancel_requested = False
        context = context if context is not None else contextvars.copy_context()
        try:
            loop.call_soon_threadsafe(self._start, coro, context)
        except RuntimeError:  # the loop is closed
            coro.close()
            self.future.cancel()
            self.done.set()
            raise

    def _start(self, coro: Coroutine[Any, Any, T], context: contextvars.Context) -> None:
        if self._cancel_requested:
            coro.close()
            self.future.cancel()
            self.done.set()
            return
        self._task = context.run(self._loop.create_task, coro)
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[T]) -> None:
        if task.cancelled():
            self.future.cancel()
        elif task.exception() is not None:
            self.future.set_exception(task.exception())
        else:
            self.future.set_result(task.result())
        self.done.set()

    def _cancel_on_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def cancel(self) -> None:
        """Ask the coroutine to stop; returns at once (wait on :attr:`done` for its cleanup)."""
        self._cancel_requested = True
        try:
            self._loop.call_soon_threadsafe(self._cancel_on_loop)
        except RuntimeError:  # the loop is gone: nothing runs any more
            self.done.set()

    def wait(self, poll: float = 0.1) -> T:
        """Wait for the result in short slices (so Ctrl-C stays responsive); re-raise its error.

        Raises:
            concurrent.futures.CancelledError: the coroutine was cancelled.
        """
        while True:
            try:
                return self.future.result(poll)
            except concurrent.futures.TimeoutError:
                continue


class BackgroundRun:
    """A ``--background`` stream: it keeps running on the loop thread after the cell returns.

    Attributes:
        sink: the output it streams into.
        label: what it answers (the start of its prompt), for ``%fabstir status``.
        started: when it started (epoch seconds).
        result_value: the :class:`~fabstir_jupyter.inference.InferenceResult` once finished.
        error: the error it failed with, if any.
    """

    def __init__(self, task: LoopTask[InferenceResult] | None, sink: OutputSink, label: str = "") -> None:
        # None only until run_background sets it, right after building the coroutine the task runs
        self._task: LoopTask[InferenceResult] = task  # type: ignore[assignment]
        self.sink = sink
        self.label = label
        self.started = time.time()
        self.stream: InferenceStream | None = None
        self.result_value: InferenceResult | None = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<BackgroundRun {self.state} chars={len(self.text)}>"

    @property
    def state(self) -> str:
        """``running``, ``done``, ``failed`` or ``cancelled``."""
        if not self.done():
            return "running"
        if self.cancelled():
            return "cancelled"
        return "failed" if self.error is not None else "done"

    @property
    def text(self) -> str:
        """The text so far."""
        return self.stream.text if self.stream is not None else ""

    def done(self) -> bool:
        """Whether the stream has ended (finished, failed or cancelled), cleanup included."""
        return self._task.done.is_set()

    def cancelled(self) -> bool:
        return self._task.future.cancelled()

    def cancel(self) -> None:
        """Stop the stream (``stream_cancel`` is sent); returns at once, safe from any thread."""
        self._task.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the stream has ended; return whether it did within ``timeout``."""
        return self._task.done.wait(timeout)

    def result(self, timeout: float | None = None) -> InferenceResult:
        """Wait for and return the result.

        Raises:
            FabstirError: the stream failed.
            concurrent.futures.CancelledError: it was cancelled.
            TimeoutError: not finished within ``timeout``.
        """
        return self._task.future.result(timeout)


class NotebookBridge:
    """One per process (see :func:`get_bridge`): the loop thread, the SDKs, the named sessions.

    SDKs are keyed by their :class:`NetworkSettings` and created lazily; :meth:`configure` sets the
    default network and closes the SDKs of other settings (with their sessions and local hosts).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loop: LoopThread | None = None
        self._sdks: dict[NetworkSettings, FabstirSDK] = {}
        self._startups: dict[FabstirSDK, NetworkStartup] = {}
        self._start_tasks: set[asyncio.Task[None]] = set()  # on the loop thread
        self.settings = NetworkSettings()
        self.sessions: dict[str, _NamedSession] = {}
        self.background: set[BackgroundRun] = set()
        self.runs: list[BackgroundRun] = []  # every background run, newest last (MAX_RUNS_KEPT at most)
        self._streams: set[LoopTask[Any]] = set()  # blocking streams in progress
        self.closed = False
        atexit.register(self.close)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("running" if self.running else "idle")
        return f"<NotebookBridge {state} sdks={len(self._sdks)} sessions={len(self.sessions)}>"

    # ------------------------------------------------------------------ the loop thread

    @property
    def running(self) -> bool:
        """Whether the loop thread is alive."""
        return self._loop is not None and self._loop.running

    @property
    def loop_thread(self) -> LoopThread:
        """The loop thread, started on first use."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the notebook bridge is closed")
            if self._loop is None or not self._loop.running:
                self._loop = LoopThread(LOOP_THREAD_NAME)
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> LoopTask[T]:
        """Schedule ``coro`` on the loop thread, in a copy of this thread's context."""
        return LoopTask(self.loop_thread.loop, coro, contextvars.copy_context())

    def run(self, coro: Coroutine[Any, Any, T], *, poll: float = 0.1, cancel_grace: float = 5.0) -> T:
        """Run ``coro`` on the loop thread and wait for its result.

        Raises:
            KeyboardInterrupt: re-raised after the coroutine was cancelled and had up to
                ``cancel_grace`` seconds to clean up.
            Exception: whatever the coroutine raised.
        """
        task = self.submit(coro)
        try:
            return task.wait(poll)
        except KeyboardInterrupt:
            task.cancel()
            task.done.wait(cancel_grace)
            raise

    # ------------------------------------------------------------------ SDKs and managers

    def configure(self, settings: NetworkSettings) -> None:
        """Make ``settings`` the default network; SDKs of other settings are closed (their named
        sessions end and local hosts stop)."""
        with self._lock:
            if settings == self.settings:
                return
            self.settings = settings
            stale = {key: sdk for key, sdk in self._sdks.items() if key != settings}
        for key, sdk in stale.items():
            self._close_sdk(key, sdk)

    def sdk(self, settings: NetworkSettings | None = None) -> FabstirSDK:
        """The SDK for ``settings`` (default: the configured ones), created on first use.

        Raises:
            InvalidOptions: the settings are invalid (unknown network, static without hosts...).
        """
        key = self.settings if settings is None else settings
        with self._lock:
            sdk = self._sdks.get(key)
            if sdk is None:
                from ..config import InferenceConfig
                from ..sdk import FabstirSDK

                def progress(label: str) -> None:  # called while `sdk` (below) starts its network
                    startup = None if sdk is None else self._startups.get(sdk)
                    if startup is not None:
                        startup.step(label)

                sdk = FabstirSDK(network=key.network, hosts=list(key.hosts) or None,
                                 config=InferenceConfig(usage_db=key.usage_db), local_backend=key.local_backend,
                                 progress=progress)
                self._sdks[key] = sdk
            return sdk

    def startup(self, settings: NetworkSettings | None = None) -> NetworkStartup | None:
        """How far the network of ``settings`` (default: the configured one) has started; None
        before its first use."""
        sdk = self._sdks.get(self.settings if settings is None else settings)
        return None if sdk is None else self._startups.get(sdk)

    def start_network(self, settings: NetworkSettings | None = None) -> None:
        """Start the network of ``settings`` (default: the configured one) in the background and
        return at once. A failure is kept for the first cell that needs the network, which
        raises it (:meth:`ready`)."""
        key = self.settings if settings is None else settings

        async def start() -> None:
            sdk = await asyncio.to_thread(self.sdk, key)  # imports the SDK off the loop
            self._begin_startup(sdk)

        task = self.submit(start())
        task.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # the cell reports it

    def _begin_startup(self, sdk: FabstirSDK) -> NetworkStartup:
        """Start ``sdk``'s network in a task of its own on this (the loop) thread, unless it has
        started, is starting, or failed without anyone seeing why yet."""
        with self._lock:
            startup = self._startups.get(sdk)
            if startup is not None and not (startup.failed and startup.error_seen):
                return startup
            startup = self._startups[sdk] = NetworkStartup()
        task = asyncio.get_running_loop().create_task(self._start(sdk, startup), name="fabstir-network-start")
        self._start_tasks.add(task)
        task.add_done_callback(self._start_tasks.discard)
        return startup

    async def _start(self, sdk: FabstirSDK, startup: NetworkStartup) -> None:
        """Start the network (in a worker thread), then discover its hosts; record how it ended.
        An SDK closed meanwhile (another network configured) is closed once its start is over."""
        error: BaseException | None = None
        try:
            if sdk.settings.network == "local":  # the chain's libraries load first (web3, py-evm): a while
                startup.step("preparing the local network")
            await asyncio.to_thread(sdk.get_inference_manager)
            manager = sdk.get_inference_manager()
            manager.bind_loop()  # this loop (the loop thread) owns it, not a private one
            if sdk.settings.network == "local":
                startup.step("discovering hosts")
                await manager.host_manager.discover_all_active_hosts()
        except BaseException as exc:  # the cells waiting for it raise it
            error = exc
        with self._lock:
            stale = self._startups.get(sdk) is not startup  # closed (or superseded) meanwhile
            startup.finish(error)
        if stale:
            await self._aclose_sdk(sdk)
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            raise error

    async def ready(self, settings: NetworkSettings | None = None,
                    on_step: Callable[[str], None] | None = None) -> bool:
        """Wait until the network of ``settings`` has started (starting it if nothing has yet);
        ``on_step(label)`` hears the step in progress and each later one. Await it on the loop.
        Return whether it had to wait.

        Raises:
            FabstirError: the start failed (a local host did not start, bad settings...); the
                next call starts it again.
        """
        return await self._begin_startup(self.sdk(settings)).follow(on_step)

    async def _wait_showing_steps(self, settings: NetworkSettings, on_step: Callable[[str], None]) -> bool:
        """:meth:`ready`, passing each step to ``on_step``; return whether any step was shown (a
        network with steps worth showing was still starting)."""
        shown: list[str] = []

        def step(label: str) -> None:
            shown.append(label)
            on_step(label)

        await self.ready(settings, step)
        return bool(shown)

    async def manager(self, settings: NetworkSettings | None = None, *,
                      on_step: Callable[[str], None] | None = None) -> InferenceManager:
        """The inference manager for ``settings``, bound to the loop thread. Await it there.

        The first call starts the network (see :meth:`ready`; local hosts start in a worker thread,
        so the loop stays free).
        """
        sdk = self.sdk(settings)
        await self._begin_startup(sdk).follow(on_step)
        manager = sdk.get_inference_manager()  # made by now: this returns it (or says the SDK was closed)
        manager.bind_loop()
        return manager

    async def _aclose_sdk(self, sdk: FabstirSDK) -> None:
        try:
            await asyncio.wait_for(sdk.aclose(), _CLOSE_TIMEOUT)
        except Exception as exc:  # closing must not fail the caller
            logger.warning("fabstir: closing %r failed: %s", sdk, exc)

    def _close_sdk(self, key: NetworkSettings, sdk: FabstirSDK) -> None:
        with self._lock:
            if self._sdks.get(key) is sdk:
                del self._sdks[key]
            startup = self._startups.pop(sdk, None)
            for name in [n for n, s in self.sessions.items() if s.settings == key]:
                del self.sessions[name]
            if startup is not None and not startup.done:
                return  # still starting: its start task closes it once the start is over
        try:
            if self.running and sdk.inference_manager is not None:
                self.run(asyncio.wait_for(sdk.aclose(), _CLOSE_TIMEOUT))
            else:
                sdk.close()
        except Exception as exc:  # closing must not fail the caller
            logger.warning("fabstir: closing %r failed: %s", sdk, exc)

    # ------------------------------------------------------------------ named sessions

    async def named_session(self, name: str, settings: NetworkSettings | None = None, *,
                            model: str | None = None, host: str | None = None, deposit: Any = None,
                            budget: Any = None) -> Session:
        """Return the live session called ``name``, creating it on first use. Await it on the loop.

        ``deposit`` and ``budget`` (whole tokens of the payment token, as
        :meth:`~fabstir_jupyter.sessions.SessionManager.create_session` takes them) are the paid
        session's terms: they apply when it is created, and a later cell may repeat them but not
        change them.

        Raises:
            InvalidOptions: ``name`` lives on another network than ``settings``, or other terms are
                given for a session that exists (or bad ones for a new session, as ``create_session``).
            BudgetExceeded, InsufficientFunds, PaymentRequired, TransactionFailed: as ``create_session``.
        """
        key = self.settings if settings is None else settings
        entry = self.sessions.get(name)
        terms = (_amount(deposit), _amount(budget))
        if entry is not None and not entry.session.ended:
            if entry.settings != key:
                raise InvalidOptions(f"session {name!r} lives on another network; end it first",
                                     field="session", hint=f"%fabstir end {name}")
            for what, given, held in zip(("deposit", "budget"), terms, entry.terms, strict=True):
                if given is not None and given != held:
                    was = f"{held.normalize():f}" if held is not None else "none"
                    raise InvalidOptions(f"session {name!r} exists with {what} {was}: --{what} applies when a "
                                         f"session is created", field=what,
                                         hint=f"end it first (%fabstir end {name}), or leave --{what} out")
            return entry.session
        manager = await self.manager(key)
        session = await manager.sessions.create_session(model=model, host=host, deposit=deposit, budget=budget)
        self.sessions[name] = _NamedSession(name, key, session, terms)
        return session

    def end_session(self, name: str) -> Session:
        """End the named session ``name``: a turn still streaming is cancelled on its host, then its
        socket closes; return it (``turns`` completed, ``cancelled_turns``).

        Raises:
            SessionNotFound: no live session has that name.
        """
        entry = self.sessions.get(name)
        if entry is None or entry.session.ended:
            raise SessionNotFound(f"no session named {name!r}", hint="%fabstir sessions lists them")

        async def end() -> Session:
            manager = await self.manager(entry.settings)
            return await manager.sessions.end_session(entry.session.id)

        session = self.run(end())
        self.sessions.pop(name, None)
        return session

    # ------------------------------------------------------------------ streams

    def run_stream(self, make_stream: StreamFactory, sink: OutputSink, *, poll: float = 0.1,
                   interval: float = 0.0, cancel_grace: float = 5.0,
                   store: Callable[[InferenceResult], None] | None = None,
                   network: NetworkSettings | None = None) -> InferenceResult:
        """Stream into ``sink`` from this (main) thread; return the finished result.

        With ``network``, the stream first waits for that network to start (:meth:`ready`); while
        it waits, a sink with ``network_step(label)`` hears each step and then ``network_ready()``.
        ``make_stream`` is called on the loop thread and returns an
        :class:`~fabstir_jupyter.inference.InferenceStream` (or an awaitable of one). Text reaches
        ``sink.append`` on this thread, batched: at most one call per ``interval`` seconds (0: as
        it arrives), and none lost; a sink with ``live(status)`` hears the stream's
        :class:`~.rendering.LiveStatus` (paid job, cost so far, encryption) each time it changes,
        no later than the text it came with. Then ``sink.finish(result)``. ``store`` gets the
        result however the stream ended, except by Ctrl-C: finished, or failed (its ``error`` and
        partial ``text`` set).

        Raises:
            FabstirError: the request failed (after ``sink.failed(error)``, or ``sink.cancelled()``
                for :class:`~fabstir_jupyter.errors.Cancelled`: its session was ended).
            KeyboardInterrupt: Ctrl-C (or one raised by the sink): the stream was cancelled on the
                host (``stream_cancel``), its cleanup awaited up to ``cancel_grace`` seconds, and
                ``sink.cancelled(result)`` called with the stopped request (host, usage so far).
        """
        pieces: queue.Queue[Any] = queue.Queue()
        made: list[InferenceStream] = []

        async def consume() -> InferenceResult:
            try:
                if network is not None and await self._wait_showing_steps(
                        network, lambda label: pieces.put(_Step(label))):
                    pieces.put(_READY)
                stream = await _make(make_stream)
                made.append(stream)
                live = None
                async with stream:
                    async for piece in stream:
                        now = LiveStatus.of(stream)
                        if now != live:
                            live = now
                            pieces.put(now)
                        pieces.put(piece)
                return stream.result()
            finally:
                pieces.put(_END)

        task = self.submit(consume())
        with self._lock:
            self._streams.add(task)
        try:
            self._pump(pieces, sink, poll=poll, interval=interval, task=task)
            result: InferenceResult = task.wait(poll)
        except KeyboardInterrupt:
            task.cancel()
            try:
                task.done.wait(cancel_grace)
            finally:
                sink.cancelled(made[0].result() if made else None)
            raise
        except FabstirError as exc:
            if made and store is not None:
                store(made[0].result())  # the stream has ended: its partial text and error are final
            _end_failed(sink, exc)
            raise
        except concurrent.futures.CancelledError:
            # Cancelled from elsewhere (the bridge closing): report it as a coded error.
            sink.cancelled()
            raise Cancelled("the stream was cancelled (the notebook bridge closed)") from None
        except BaseException:
            task.cancel()
            task.done.wait(cancel_grace)
            raise
        finally:
            with self._lock:
                self._streams.discard(task)
        sink.finish(result)
        if store is not None:
            store(result)
        return result

    @staticmethod
    def _pump(pieces: queue.Queue[Any], sink: OutputSink, *, poll: float, interval: float,
              task: LoopTask[Any]) -> None:
        """Move text from the queue to ``sink.append`` until the consumer ends.

        When the queue stays empty for ``poll`` seconds after text was appended, ``append("")`` is
        called once: a sink that batches (the widget) sends what it holds, so a pause in the stream
        does not hold back the last tokens.
        """
        buffer: list[str] = []
        last = 0.0
        ended = False
        idle_tick_due = False
        while not ended:
            wait = poll
            if buffer:
                wait = min(poll, max(0.0, last + interval - time.monotonic()))
            try:
                item = pieces.get(timeout=wait) if wait > 0 else pieces.get_nowait()
            except queue.Empty:
                item = None
                if not buffer:
                    if idle_tick_due:
                        idle_tick_due = False
                        sink.append("")
                    if task.done.is_set() and pieces.empty():
                        return  # the consumer never got to put its end marker
            while item is not None:
                if item is _END:
                    ended = True
                    break
                if isinstance(item, LiveStatus):
                    _call_extra(sink, "live", item)
                elif isinstance(item, _Step):
                    _call_extra(sink, "network_step", item.label)
                elif item is _READY:
                    _call_extra(sink, "network_ready")
                else:
                    buffer.append(item)
                try:
                    item = pieces.get_nowait()
                except queue.Empty:
                    item = None
            if buffer and (ended or time.monotonic() - last >= interval):
                text = "".join(buffer)
                buffer.clear()
                last = time.monotonic()
                idle_tick_due = True
                sink.append(text)

    def run_background(self, make_stream: StreamFactory, sink: OutputSink, *, interval: float = 0.05,
                       on_result: Callable[[InferenceResult], None] | None = None,
                       on_error: Callable[[FabstirError], None] | None = None,
                       store: Callable[[InferenceResult], None] | None = None,
                       network: NetworkSettings | None = None, label: str = "") -> BackgroundRun:
        """Start a stream that keeps running on the loop thread; return its handle at once.

        With ``network``, the stream first waits for that network to start, as in :meth:`run_stream`
        (the sink's ``network_step``/``network_ready`` are then called from the loop thread).
        ``label`` names the run in :attr:`runs` (``%fabstir status``).

        The sink is updated from the loop thread: ``append`` per piece (and ``live(status)`` before
        a piece that changed the stream's :class:`~.rendering.LiveStatus`), plus ``append("")`` every
        ``interval`` seconds (so a batching sink sends what it holds during a pause), then
        ``finish``/``failed``/``cancelled``; ``on_result`` or ``on_error`` runs after that. ``store``
        gets the result however the stream ended, except by cancelling the run: finished, or failed
        (its ``error`` and partial ``text`` set; also :attr:`BackgroundRun.result_value`). A sink
        with ``set_cancel(callback)`` gets the handle's :meth:`BackgroundRun.cancel` (a stop button).
        """
        run = BackgroundRun(None, sink, label)

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval)
                sink.append("")

        async def consume() -> InferenceResult:
            ticker = asyncio.get_running_loop().create_task(tick()) if interval > 0 else None
            try:
                if network is not None and await self._wait_showing_steps(
                        network, functools.partial(_call_extra, sink, "network_step")):
                    _call_extra(sink, "network_ready")
                stream = await _make(make_stream)
                run.stream = stream
                live = None
                async with stream:
                    async for piece in stream:
                        now = LiveStatus.of(stream)
                        if now != live:
                            live = now
                            _call_extra(sink, "live", now)
                        sink.append(piece)
                result = stream.result()
            except asyncio.CancelledError:
                _quietly(sink.cancelled, run.stream.result() if run.stream is not None else None)
                raise
            except Exception as exc:  # a FabstirError, or a bug: either way the output says so
                run.error = exc
                if not isinstance(exc, FabstirError):
                    logger.error("fabstir: background stream failed", exc_info=exc)
                if run.stream is not None:
                    run.result_value = run.stream.result()
                    if store is not None:
                        _quietly(store, run.result_value)
                _quietly(_end_failed, sink, exc)
                if on_error is not None and isinstance(exc, FabstirError):
                    _quietly(on_error, exc)
                raise
            finally:
                if ticker is not None:
                    ticker.cancel()
            run.result_value = result
            sink.finish(result)
            if store is not None:
                store(result)
            if on_result is not None:
                on_result(result)
            return result

        set_cancel = getattr(sink, "set_cancel", None)
        if callable(set_cancel):
            set_cancel(run.cancel)
        run._task = LoopTask(self.loop_thread.loop, consume(), contextvars.copy_context())
        with self._lock:
            self.background.add(run)
            self.runs.append(run)
            del self.runs[:-MAX_RUNS_KEPT]
        run._task.future.add_done_callback(lambda _: self._forget(run))
        return run

    def _forget(self, run: BackgroundRun) -> None:
        with self._lock:
            self.background.discard(run)

    def cancel_background(self, wait: float = 5.0) -> int:
        """Cancel every running background stream; wait up to ``wait`` s for each; return how many."""
        with self._lock:
            runs = [r for r in self.background if not r.done()]
        for run in runs:
            run.cancel()
        for run in runs:
            run.wait(wait)
        return len(runs)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Cancel background streams, close every SDK (sockets, ledgers, local hosts), stop the loop
        thread. Idempotent; registered with :mod:`atexit` and called when the extension unloads."""
        with self._lock:
            if self.closed:
                return
            sdks = list(self._sdks.items())
        try:
            if self.running:
                self.cancel_background()
                with self._lock:
                    streams = list(self._streams)
                for task in streams:
                    task.cancel()
                for task in streams:
                    task.done.wait(5.0)
            for key, sdk in sdks:
                self._close_sdk(key, sdk)
            if self.running:  # networks still starting are stopped once started (by their start task)
                self.run(self._wait_for_starts(_START_WAIT_ON_CLOSE))
        finally:
            with self._lock:
                self.closed = True
                self.sessions.clear()
                loop, self._loop = self._loop, None
            if loop is not None:
                loop.stop()
            atexit.unregister(self.close)


    async def _wait_for_starts(self, timeout: float) -> None:
        tasks = list(self._start_tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def _amount(value: Any) -> Decimal | None:
    """A --deposit or --budget as a number, to compare a session's terms (``None``: not given or not a
    number; ``create_session`` refuses what is not one)."""
    if value is None:
        return None
    try:
        return Decimal(str(value).strip())
    except InvalidOperation:
        return None


async def _make(make_stream: StreamFactory) -> InferenceStream:
    stream = make_stream()
    if inspect.isawaitable(stream):
        stream = await stream
    return stream


def _call_extra(sink: OutputSink, name: str, *args: Any) -> None:
    """Call the sink's optional method ``name`` (see ``OutputSink``), if it has one."""
    method = getattr(sink, name, None)
    if callable(method):
        method(*args)


def _end_failed(sink: OutputSink, error: BaseException) -> None:
    """Mark the output failed, or cancelled when the stream was stopped on purpose (its session ended)."""
    if isinstance(error, Cancelled):
        sink.cancelled()
    else:
        sink.failed(error)


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # an output's failure must not hide the stream's own outcome
        logger.exception("fabstir: output callback failed")


_bridge: NotebookBridge | None = None
_bridge_lock = threading.Lock()


def get_bridge() -> NotebookBridge:
    """Return this process's bridge, creating it (again, after :func:`close_bridge`) if needed."""
    global _bridge
    with _bridge_lock:
        if _bridge is None or _bridge.closed:
            _bridge = NotebookBridge()
        return _bridge


def close_bridge() -> None:
    """Close this process's bridge, if one exists (the loop thread stops; sockets and hosts close)."""
    global _bridge
    with _bridge_lock:
        bridge, _bridge = _bridge, None
    if bridge is not None:
        bridge.close()
