"""The ``%%fabstir`` cell magic and the ``%fabstir`` line commands.

One magic, one dispatch: the line is parsed by :mod:`.parsers` into a command object tagged by
``type``, and ``handle_<type>`` does the work. Settings are traitlets of :class:`FabstirMagics`, so
``%config FabstirMagics.max_tokens = 64``, ``ipython_config.py`` and ``%fabstir config`` take the
same path. The magic layers ``%config`` on the one settings resolver
(:func:`fabstir_jupyter.settings.load_settings`: environment, then the config file) and the cell's
options on top of that.

A failure raises, so "Run All" and ``nbconvert --execute`` stop at the cell that failed, and shows
once: an expected failure (a ``FabstirError``) is raised with a one-line traceback
(``FabstirError [CODE]: message (hint: ...)``, shorter when the live widget already shows the
error), bad options raise IPython's ``UsageError`` (one line too). A ``--background`` stream never
raises after its cell returned: its output shows the error and ``%fabstir status`` lists it. A
kernel interrupt cancels the stream on the host and re-raises ``KeyboardInterrupt``.

On a paid network (the local network by default) ``--session NAME --deposit X --budget Y`` set a
session's terms, ``%fabstir wallet`` shows the paying wallet (:mod:`.paying`), ``%fabstir end NAME``
returns a paid session's settlement receipt, and the dashboard lists this kernel's jobs.

As it loads (at the end of the cell that loads it), the extension starts the configured network in
the background, so the first ``%%fabstir`` cell finds it started or starting; its output shows the
step the network is at meanwhile (``FabstirMagics.start_network_on_load`` turns that off).
"""

from __future__ import annotations

import asyncio
import datetime
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Bool, Enum, Float, Integer, List, TraitError, Unicode, observe, validate

from ..errors import FabstirError, InvalidOptions
from ..settings import LOCAL_BACKENDS, NETWORKS, SDKSettings, SettingsSources, load_settings
from .bridge import NetworkSettings, NotebookBridge, close_bridge, get_bridge
from .help import HelpText, topic_help, usage
from .output import make_output, widgets_available
from .parsers import (
    CONFIG_KEYS,
    FORMATS,
    CancelCommand,
    CellOptions,
    ConfigCommand,
    EndCommand,
    HelpCommand,
    HostsCommand,
    JobsCommand,
    ManagerCommand,
    ModelsCommand,
    NetworkCommand,
    SessionsCommand,
    StatusCommand,
    UsageCommand,
    UsageError,
    WalletCommand,
    interpolate,
    parse_cell_options,
    parse_line_command,
)
from .rendering import format_error
from .tables import host_rows, hosts_dataframe, job_rows, jobs_dataframe, usage_rows

if TYPE_CHECKING:
    import pandas as pd

    from ..inference import InferenceManager, InferenceResult, InferenceStream
    from ..sdk import FabstirSDK
    from .paying import SettlementReceipt, WalletSummary

__all__ = ["FabstirMagics", "load_ipython_extension", "unload_ipython_extension", "format_error"]

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _one_line(error: FabstirError, shown: bool = False) -> FabstirError:
    """Make ``error`` show as one line when it ends a cell (IPython calls ``_render_traceback_``
    instead of printing a traceback): the error's line, or, where the cell's output already shows
    the error (``shown``), a line that only names its code."""
    line = format_error(error)
    if shown:
        line = f"FabstirError [{error.code}]: the request failed (the output above says why)"
    error._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
    return error


def _label(prompt: str, width: int = 40) -> str:
    """The start of a prompt's first line, for ``%fabstir status``."""
    first = prompt.strip().splitlines()[0] if prompt.strip() else ""
    return first if len(first) <= width else first[: width - 1] + "…"


@magics_class
class FabstirMagics(Magics):
    """``%%fabstir`` / ``%fabstir``; a ``Configurable`` (``Magics`` is one), so its traitlets are
    settable with ``%config FabstirMagics.NAME = VALUE`` and in ``ipython_config.py``."""

    default_model = Unicode(None, allow_none=True,
                            help="Model used when a cell names none (None: $FABSTIR_DEFAULT_MODEL, the config "
                                 "file's default_model, else the host's first model).").tag(config=True)
    max_tokens = Integer(None, allow_none=True,
                         help="max_tokens when a cell gives none (None: $FABSTIR_MAX_TOKENS, the config file's "
                              "max_tokens, else 256).").tag(config=True)
    network = Enum(NETWORKS, None, allow_none=True,
                   help="Network: local, static or base-sepolia (None: $FABSTIR_NETWORK, the config file, "
                        "else static when hosts are set, else local).").tag(config=True)
    hosts = List(Unicode(), help="Static host URLs (empty: $FABSTIR_HOSTS, then the config file).").tag(config=True)
    local_backend = Enum(LOCAL_BACKENDS, None, allow_none=True,
                         help="Backend of the local network's hosts: llama-cpp (the embedded model) or scripted "
                              "(None: $FABSTIR_LOCAL_BACKEND, the config file, else llama-cpp).").tag(config=True)
    update_interval = Float(0.05, help="Seconds between updates of a live output.").tag(config=True)
    default_format = Enum(FORMATS, "markdown", help="Final rendering when a cell gives no --format.").tag(config=True)
    usage_db = Unicode(None, allow_none=True,
                       help="Usage ledger file (None: $FABSTIR_USAGE_DB, the config file's usage_db, else the "
                            "user's data dir; ':memory:' keeps it in memory).").tag(config=True)
    start_network_on_load = Bool(True, help="Start the local network in the background when the extension loads "
                                            "(at the end of that cell) and when %config changes the network, so "
                                            "the first cell does not wait for all of it.").tag(config=True)

    # Class defaults: the traits' observers may run while the configuration is applied in __init__.
    _autostart = False  # the extension is loaded (load_ipython_extension): start networks early
    _start_scheduled = False
    _error_shown = False  # the cell's output has shown the error the cell raises

    def __init__(self, shell: Any = None, bridge: NotebookBridge | None = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._bridge = bridge
        self.last_background: Any = None

    @validate("update_interval")
    def _check_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0 <= value <= 10:
            raise TraitError(f"update_interval must be between 0 and 10 seconds, not {value!r}")
        return value

    # Validated when set (by %config, ipython_config.py or %fabstir config), so a bad value is
    # refused where it was typed instead of failing a later cell.

    @validate("max_tokens")
    def _check_max_tokens(self, proposal: Any) -> int | None:
        value: int | None = proposal["value"]  # the Integer trait has checked its type
        if value is not None and value < 1:
            raise TraitError(f"FabstirMagics.max_tokens must be an integer >= 1 (or None), not {value!r}")
        return value

    @validate("hosts")
    def _check_hosts(self, proposal: Any) -> list[str]:
        from ..protocol import ws_url

        hosts: list[str] = proposal["value"]  # the List(Unicode()) trait has checked its type
        for url in hosts:
            try:
                ws_url(url)
            except InvalidOptions as exc:
                raise TraitError(f"FabstirMagics.hosts: {exc.message}") from None
        return hosts

    @validate("usage_db")
    def _check_usage_db(self, proposal: Any) -> str | None:
        value: str | None = proposal["value"]  # the Unicode trait has checked its type
        if value is not None and not value.strip():
            raise TraitError(f"FabstirMagics.usage_db must be a file path or ':memory:' (None for the default), "
                             f"not {value!r}")
        return value

    @property
    def bridge(self) -> NotebookBridge:
        """The process's notebook bridge (or the one given at construction)."""
        if self._bridge is not None and not self._bridge.closed:
            return self._bridge
        return get_bridge()

    # ------------------------------------------------------------------ settings

    def _config_layer(self, network: str | None = None) -> dict[str, Any]:
        """The settings set with ``%config`` (``None``: not set there), ``network`` overriding."""
        return {
            "network": network or self.network,
            "hosts": tuple(self.hosts) or None,
            "local_backend": self.local_backend,
            "default_model": self.default_model,
            "max_tokens": self.max_tokens,
            "usage_db": self.usage_db,
        }

    def settings(self, network: str | None = None) -> SDKSettings:
        """Resolve the settings: ``%config`` (``network`` overriding it for one cell), then the
        environment, then the config file.

        Raises:
            InvalidOptions: a bad value, naming where it came from.
        """
        return load_settings(**self._config_layer(network), source="%config")

    def _resolved(self, key: str) -> tuple[Any, str]:
        """Return ``(value, source)`` of a setting as ``%fabstir config`` shows it."""
        if key in ("update_interval", "default_format"):
            return getattr(self, key), "%config"
        value, source = SettingsSources(self._config_layer(), explicit_source="%config").lookup(key)
        return (list(value) if key == "hosts" else value), source

    def network_settings(self, network: str | None = None) -> NetworkSettings:
        """What identifies the SDK for the resolved settings (``network`` overrides it for one cell).

        Raises:
            InvalidOptions: a bad value, naming where it came from.
        """
        return NetworkSettings.of(self.settings(network))

    # ------------------------------------------------------------------ starting the network early

    def schedule_network_start(self) -> None:
        """Start the configured network in the background once the running cell ends (so that
        ``%config`` lines after ``%load_ext`` in that cell count); does nothing when
        ``start_network_on_load`` is off or a start is already scheduled."""
        shell: Any = self.shell
        if not self.start_network_on_load or self._start_scheduled or shell is None:
            return
        self._start_scheduled = True
        shell.events.register("post_run_cell", self._start_network_now)

    def _cancel_scheduled_start(self) -> None:
        shell: Any = self.shell
        if self._start_scheduled:
            self._start_scheduled = False
            shell.events.unregister("post_run_cell", self._start_network_now)

    def _start_network_now(self, *_: Any) -> None:
        self._cancel_scheduled_start()
        try:
            settings = self.network_settings()
        except FabstirError:  # bad settings: the first cell that needs the network reports them
            return
        if settings.network != "local":  # only the local network has a start worth doing early
            return
        bridge = self.bridge
        bridge.configure(settings)
        bridge.start_network(settings)

    @observe("network", "hosts", "local_backend", "usage_db")
    def _network_changed(self, _change: Any) -> None:
        if self._autostart:
            self.schedule_network_start()

    # ------------------------------------------------------------------ the magic

    @line_cell_magic
    def fabstir(self, line: str, cell: str | None = None) -> Any:
        # The docstring is the short usage (see the end of this module).
        try:
            command = parse_line_command(line) if cell is None else parse_cell_options(line)
        except UsageError as exc:
            raise IPythonUsageError(f"{exc} (see %fabstir help)") from None
        handler: Callable[..., Any] = getattr(self, f"handle_{command.type}")
        self._error_shown = False  # set when the cell's output has shown the error it raises
        try:
            if cell is None:
                return handler(command)
            return handler(command, cell)
        except UsageError as exc:
            raise IPythonUsageError(f"{exc} (see %fabstir help)") from None
        except FabstirError as exc:
            raise _one_line(exc, shown=self._error_shown) from None

    # ------------------------------------------------------------------ %%fabstir

    def handle_cell(self, options: CellOptions, cell: str) -> None:
        """Stream the answer to the cell's text into a live output; ``--out`` stores the result.

        Raises:
            FabstirError: the request failed (shown once: by the output where it shows errors,
                else by the error's one-line traceback); never for ``--background``.
        """
        from ..config import InferenceConfig, validate_prompt

        started = time.monotonic()  # the output's times (TTFT, the wait for the network) count from here
        shell: Any = self.shell
        prompt = interpolate(cell, shell.user_ns) if options.interpolate else cell
        prompt = prompt.strip("\n")
        # An empty prompt is refused before any output shows (the stream checks it again, with the
        # manager's own limit, when it is made on the loop thread); so are a session's terms that
        # cannot be amounts (create_session checks them against the token and the budgets).
        validate_prompt(prompt, max_chars=InferenceConfig.max_prompt_chars)
        _check_session_terms(options)
        bridge = self.bridge
        if options.network is None:
            resolved = self.settings()
            bridge.configure(NetworkSettings.of(resolved))
        else:
            try:
                bridge.configure(self.network_settings())
            except FabstirError:  # the configured network is unusable; this cell names another
                pass
            resolved = self.settings(options.network)  # the configured SDK when it is the same network
        settings = NetworkSettings.of(resolved)
        bridge.sdk(settings)  # an SDK that cannot start fails here, before any output is shown
        request = options.inference_options()
        model = options.model or resolved.default_model
        if model is not None:
            request["model"] = model
        max_tokens = options.max_tokens or resolved.max_tokens
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if options.mode is not None:
            request["mode"] = options.mode
        fmt = options.format or self.default_format
        make_stream = self._stream_factory(prompt, options, settings, request)
        sink = make_output(fmt, options.background, update_interval=self.update_interval, started_at=started)
        sink.start(host=options.host, model=model)
        if options.background:
            self.last_background = bridge.run_background(
                make_stream, sink, interval=self.update_interval, store=self._storer(options.out),
                network=settings, label=_label(prompt),
            )
            return None
        # The sinks batch on their own (the widget per update_interval, stdout per its buffer), so
        # text is handed over as it arrives; idle polls let the widget send a held batch.
        poll = min(0.1, max(self.update_interval, 0.01))
        try:
            bridge.run_stream(make_stream, sink, poll=poll, interval=0.0, store=self._storer(options.out),
                              network=settings)
        except FabstirError:
            self._error_shown = bool(getattr(sink, "shows_errors", False))
            raise
        return None

    def _storer(self, name: str | None) -> Callable[[InferenceResult], None]:
        """Store a cell's result in ``name`` (``--out``): the answer, or the partial answer and the
        error of a request that failed after it had started."""
        shell: Any = self.shell

        def store(result: InferenceResult) -> None:
            if name is not None:
                shell.user_ns[name] = result

        return store

    def _stream_factory(self, prompt: str, options: CellOptions, settings: NetworkSettings,
                        request: dict[str, Any]) -> Callable[[], Any]:
        bridge = self.bridge

        async def make() -> InferenceStream:
            manager = await bridge.manager(settings)
            pinned = options.host
            if pinned is not None and "://" not in pinned and manager.host_manager.find(pinned) is None:
                await manager.host_manager.discover_all_active_hosts()  # maybe a registry address: look it up
            if options.session is not None:
                session = await bridge.named_session(options.session, settings, model=request.get("model"),
                                                     host=options.host, deposit=options.deposit,
                                                     budget=options.budget)
                return manager.sessions.stream(session.id, prompt, **request)
            return manager.stream(prompt, host=options.host, **request)

        return make

    # ------------------------------------------------------------------ %fabstir commands

    def _manager(self) -> InferenceManager:
        bridge = self.bridge
        bridge.configure(self.network_settings())
        return bridge.run(bridge.manager())

    def _discover(self, refresh: bool = False) -> InferenceManager:
        bridge = self.bridge
        bridge.configure(self.network_settings())

        async def discover() -> InferenceManager:
            manager = await bridge.manager()
            await manager.host_manager.discover_all_active_hosts(refresh=refresh)
            return manager

        return bridge.run(discover())

    def hosts_frame(self, refresh: bool = False, all_kernels: bool = False) -> pd.DataFrame:
        """The discovered hosts as a DataFrame: the dashboard's table (:data:`.tables.HOST_COLUMNS`)."""
        manager = self._discover(refresh)
        return hosts_dataframe(host_rows(manager.host_manager.hosts,
                                         usage_rows(manager.usage, all_kernels=all_kernels)))

    def usage_frame(self, by: tuple[str, ...] | str = ("host", "model"), limit: int | None = None,
                    all_kernels: bool = False) -> pd.DataFrame:
        """The usage ledger: this kernel's records (every kernel's with ``all_kernels``), or a summary
        grouped ``by`` columns (``()`` for records)."""
        from ..usage import UsageLedger, current_client_id

        bridge = self.bridge
        bridge.configure(self.network_settings())
        sdk = bridge.sdk()
        manager = sdk.inference_manager
        ledger: Any
        if manager is not None and hasattr(manager.usage, "to_frame"):
            ledger = manager.usage
            owned = False
        else:  # nothing ran yet on this network: read the ledger without starting hosts
            ledger = UsageLedger(bridge.settings.usage_db)
            owned = True
        scope = {} if all_kernels or not isinstance(ledger, UsageLedger) else {"client_id": current_client_id()}
        try:
            if hasattr(ledger, "flush"):
                ledger.flush()
            if by:
                try:
                    summary: pd.DataFrame = ledger.summary(by if isinstance(by, str) else tuple(by), **scope)
                except ValueError as exc:
                    raise UsageError(f"%fabstir usage: {exc}") from None
                return summary
            records: pd.DataFrame = ledger.to_frame(limit=limit, **scope)
            return records
        finally:
            if owned:
                ledger.close()

    def _dashboard_source(self, refresh: bool) -> Callable[[], tuple[list[Any], Any, list[dict[str, Any]] | None]]:
        """The host dashboard's data source: ``(hosts, usage ledger, job rows)`` (job rows ``None`` on an
        unpaid network); later calls probe again."""
        calls = [refresh]

        def source() -> tuple[list[Any], Any, list[dict[str, Any]] | None]:
            manager = self._discover(calls[-1])
            calls.append(True)
            return manager.host_manager.hosts, manager.usage, self._job_rows(manager)

        return source

    def _job_rows(self, manager: InferenceManager) -> list[dict[str, Any]] | None:
        """This kernel's paid jobs (:func:`.tables.job_rows`, read on the loop that owns them); ``None``
        where nothing is paid."""
        payments = manager.payments
        if payments is None:
            return None

        async def read() -> list[dict[str, Any]]:
            return job_rows(payments)

        return self.bridge.run(read())

    def jobs_frame(self) -> pd.DataFrame:
        """This kernel's paid jobs as a DataFrame (:data:`.tables.JOB_COLUMNS`; empty where nothing is paid)."""
        return jobs_dataframe(self._job_rows(self._manager()) or [])

    def handle_jobs(self, command: JobsCommand) -> pd.DataFrame:
        """This kernel's paid jobs, open and settled, as a DataFrame (the dashboard's jobs table)."""
        return self.jobs_frame()

    def handle_hosts(self, command: HostsCommand) -> Any:
        """The host dashboard widget, or (without a widget front end, or with --frame) a DataFrame."""
        if not command.frame and widgets_available():
            try:
                from .widgets import HostDashboard

                return HostDashboard(self._dashboard_source(command.refresh), all_kernels=command.all_kernels)
            except FabstirError:
                raise
            except Exception as exc:  # the frame is always there as a fallback
                print(f"[fabstir] host dashboard unavailable ({type(exc).__name__}: {exc}); showing a DataFrame",
                      file=sys.stderr)
        return self.hosts_frame(command.refresh, command.all_kernels)

    def handle_usage(self, command: UsageCommand) -> pd.DataFrame:
        """The usage ledger as a DataFrame (``--by`` summarises)."""
        return self.usage_frame(command.by, command.limit, command.all_kernels)

    def handle_sessions(self, command: SessionsCommand) -> pd.DataFrame:
        """The live named sessions as a DataFrame."""
        import pandas as pd

        rows = []
        for name, entry in self.bridge.sessions.items():
            session = entry.session
            if session.ended:
                continue
            rows.append({
                "name": name,
                "session_id": session.id,
                "network": entry.settings.network or self.bridge.sdk(entry.settings).settings.network,
                "model": session.model,
                "host": session.host.api_url if session.host else None,
                "turns": session.turns,
                "messages": len(session.transcript),
                "created": datetime.datetime.fromtimestamp(session.created_at),
            })
        columns = ["name", "session_id", "network", "model", "host", "turns", "messages", "created"]
        frame: pd.DataFrame = pd.DataFrame(rows, columns=columns)
        return frame

    def handle_end(self, command: EndCommand) -> SettlementReceipt | None:
        """End a named session; a turn still streaming in it is cancelled on its host.

        A paid session's jobs are settled first (the host's last proof, then the job completed by
        this wallet); the returned :class:`~.paying.SettlementReceipt` shows what the chain settled
        and whether the usage ledger agrees. An unpaid session returns nothing.

        Raises:
            SessionNotFound: no live session has that name.
            TransactionFailed, ConnectionFailed: a job could not be settled (the session is ended; the
                job stays Active on chain, its deposit held until it is settled).
        """
        from .paying import LedgerCheck, SettlementReceipt

        bridge = self.bridge
        entry = bridge.sessions.get(command.name)
        session = bridge.end_session(command.name)
        line = f"[fabstir] ended session {command.name!r} after {_count(session.turns, 'turn')}"
        if session.cancelled_turns:
            line += f" ({_count(session.cancelled_turns, 'turn')} cancelled)"
        print(line)
        if not session.settlements:
            return None
        checks: dict[int, LedgerCheck] = {}
        manager = bridge.sdk(entry.settings if entry is not None else None).inference_manager
        payments = manager.payments if manager is not None else None
        if payments is not None:
            try:
                frame = payments.reconcile()
            except FabstirError as exc:  # a sink that keeps no jobs: the receipt uses the client's count
                print(f"[fabstir] the usage ledger cannot be compared with the chain: {format_error(exc)}",
                      file=sys.stderr)
            else:
                ours = {settled.job_id for settled in session.settlements}
                for row in frame[frame["job_id"].isin(ours) & frame["billed_tokens"].notna()].to_dict("records"):
                    checks[int(row["job_id"])] = LedgerCheck(
                        int(row["ledger_tokens"]), int(row["expected_tokens"]), int(row["billed_tokens"]),
                        bool(row["agrees"]), str(row["reason"]))
        return SettlementReceipt(command.name, session.turns, list(session.settlements), checks)

    def handle_wallet(self, command: WalletCommand) -> WalletSummary:
        """The paying wallet: address (never the key), balances, open jobs, this kernel's spending and
        budget (:class:`~.paying.WalletSummary`); starts the network if it is not running (the local
        network's wallet is its funded test account). On a network that pays nothing it says why."""
        from .paying import wallet_summary

        bridge = self.bridge
        bridge.configure(self.network_settings())

        async def summary() -> WalletSummary:
            manager = await bridge.manager()
            sdk = bridge.sdk()
            payments = manager.payments
            balances = error = None
            if payments is not None:
                try:
                    balances = await asyncio.wait_for(asyncio.to_thread(payments.balance),
                                                      payments.config.read_timeout)
                except FabstirError as exc:
                    error = format_error(exc)
                except asyncio.TimeoutError:
                    error = f"the chain did not answer within {payments.config.read_timeout:g} s"
            return wallet_summary(sdk.settings.network, sdk.wallet, payments, note=_unpaid_note(sdk, payments),
                                  balances=balances, balance_error=error)

        return bridge.run(summary())

    def handle_models(self, command: ModelsCommand) -> pd.DataFrame:
        """The models served by the discovered hosts, one row per model."""
        import pandas as pd

        manager = self._discover()
        served: dict[str, list[str]] = {}
        names: dict[str, set[str]] = {}
        for host in manager.host_manager.hosts:
            if not host.reachable:
                continue
            for model in host.models:
                served.setdefault(model, []).append(host.api_url)
            for alias, model in host.model_names.items():
                names.setdefault(model, set()).add(alias)
        rows = [{"model": model, "names": ", ".join(sorted(names.get(model, ()))), "hosts": len(urls),
                 "host_urls": ", ".join(urls)} for model, urls in sorted(served.items())]
        frame: pd.DataFrame = pd.DataFrame(rows, columns=["model", "names", "hosts", "host_urls"])
        return frame

    def handle_network(self, command: NetworkCommand) -> None:
        """Show the network, or switch to another one (the SDK is recreated on next use)."""
        bridge = self.bridge
        if command.name is not None:
            previous = self.network
            self.network = command.name
            try:
                bridge.configure(self.network_settings())
                bridge.sdk()
            except FabstirError:
                self.network = previous
                raise
        else:
            bridge.configure(self.network_settings())
        sdk = bridge.sdk()
        where = {"local": f"{sdk.settings.local_hosts} local {sdk.settings.local_backend} host(s)",
                 "static": f"{len(sdk.settings.hosts)} static host(s)",
                 "base-sepolia": "the Base Sepolia registry"}.get(sdk.settings.network, "")
        print(f"[fabstir] network {sdk.settings.network}: {where}")

    def handle_config(self, command: ConfigCommand) -> None:
        """Show the settings, show one, or set one (like ``%config FabstirMagics.KEY = VALUE``)."""
        if command.key is not None and command.value is not None:
            self._set(command.key, command.value)
        keys = CONFIG_KEYS if command.key is None else (command.key,)
        width = max(len(k) for k in keys)
        for key in keys:
            value, source = self._resolved(key)
            print(f"{key:<{width}} = {value!r}  ({source})")

    def _set(self, key: str, text: str) -> None:
        trait = self.traits()[key]
        raw = text.strip()
        try:
            if key == "hosts":
                value: Any = [] if raw.lower() in ("", "none", "[]") else raw.replace(",", " ").split()
            elif raw.lower() == "none" and trait.allow_none:
                value = None
            else:
                value = trait.from_string(raw)
            setattr(self, key, value)
        except (TraitError, ValueError) as exc:
            message = str(exc).splitlines()[0]
            raise UsageError(f"%fabstir config {key}: {message}") from None

    def handle_status(self, command: StatusCommand) -> None:
        """Print how the network's start went (each step with its time) and the background runs."""
        bridge = self.bridge
        try:
            bridge.configure(self.network_settings())
        except FabstirError as exc:
            print(f"[fabstir] network: {format_error(exc)}")
        else:
            print(self._network_status(bridge))
        runs = list(bridge.runs)
        running = sum(run.state == "running" for run in runs)
        print(f"[fabstir] background runs: {len(runs)}" + (f" ({running} running)" if running else ""))
        for number, run in enumerate(runs, 1):
            when = datetime.datetime.fromtimestamp(run.started).strftime("%H:%M:%S")
            detail = f"{len(run.text):,} chars"
            if run.state == "failed" and run.error is not None:
                detail = format_error(run.error) if isinstance(run.error, FabstirError) else repr(run.error)
            print(f"  #{number} {when} {run.state:<9} {run.label!r}: {detail}")

    def _network_status(self, bridge: NotebookBridge) -> str:
        settings = bridge.settings
        name = settings.network or "?"
        if settings.network == "local":
            name += f" ({settings.local_backend})"
        startup = bridge.startup()
        if startup is None:
            return f"[fabstir] network {name}: not started (the first cell that needs it starts it)"
        if not startup.done:
            state = f"starting for {startup.seconds:.1f} s, now {startup.current or 'loading the SDK'}"
        elif startup.failed:
            error = startup.error
            why = format_error(error) if isinstance(error, FabstirError) else repr(error)
            state = f"failed after {startup.seconds:.1f} s: {why}"
        else:
            state = f"ready in {startup.seconds:.1f} s"
        lines = [f"[fabstir] network {name}: {state}"]
        steps = startup.durations()
        if steps:
            width = max(len(label) for label, _ in steps)
            lines += [f"    {label:<{width}}  {seconds:.2f} s" for label, seconds in steps]
        return "\n".join(lines)

    def handle_cancel(self, command: CancelCommand) -> None:
        """Stop every background stream."""
        count = self.bridge.cancel_background()
        print(f"[fabstir] cancelled {count} background stream{'s' if count != 1 else ''}")

    def handle_manager(self, command: ManagerCommand) -> InferenceManager:
        """The :class:`~fabstir_jupyter.inference.InferenceManager` the ``%%fabstir`` cells use.

        It lives on the bridge's loop thread (starting the network on first use) and shares the
        cells' hosts, connection pool and usage ledger. Its blocking methods (``infer``,
        ``batch_blocking``) work from a cell, and so does awaiting ``batch``, which runs on the
        manager's own loop. ``batch_blocking(prompts, progress=bar.update)`` with
        ``bar = BatchProgress(len(prompts))`` drives a progress bar.
        """
        return self._manager()

    def handle_help(self, command: HelpCommand) -> None:
        """Show the short usage, or the details of ``command.topic`` (an option, a command, a topic)."""
        from IPython.display import display

        display(HelpText(usage() if command.topic is None else topic_help(command.topic)))


def _check_session_terms(options: CellOptions) -> None:
    """Refuse ``--deposit``/``--budget`` that cannot be amounts, or that come without ``--session``,
    before any output shows (``create_session`` checks the rest: the token's decimals, the minimum
    deposit, the budgets).

    Raises:
        InvalidOptions: a value that is not a number above 0, or no ``--session``.
    """
    from ..billing import base_units

    given = [(name, value) for name, value in (("deposit", options.deposit), ("budget", options.budget))
             if value is not None]
    for name, value in given:
        base_units(value, 18, name)
    if given and options.session is None:
        name = given[0][0]
        raise InvalidOptions(
            f"--{name} is a paid session's term: give --session NAME with it", field=name,
            hint="cells without --session share the process's jobs, within the process budget (FABSTIR_BUDGET)")


def _unpaid_note(sdk: FabstirSDK, payments: Any) -> str:
    """Why nothing is paid on ``sdk``'s network, or what it needs to pay (``""`` when it pays)."""
    if payments is not None:
        return ""
    settings = sdk.settings
    if settings.network == "static":
        return "a list of hosts with no chain, so nothing is paid"
    if settings.network == "local":
        return "its hosts run free (FABSTIR_LOCAL_PAID=0, or FabstirSDK(paid=False)), so nothing is paid"
    unit = "USDC" if settings.payment_token == "stable" else "native tokens"
    if sdk.wallet is None:
        return (f"answers here are paid from your own wallet: set FABSTIR_PRIVATE_KEY (or FABSTIR_KEY_FILE, a file "
                f"only you may read) and FABSTIR_BUDGET (whole {unit}); until then inference is refused "
                f"(PAYMENT_REQUIRED)")
    return (f"no budget: set FABSTIR_BUDGET (whole {unit}) to pay; until then inference is refused "
            f"(PAYMENT_REQUIRED)")


# %%fabstir? and %fabstir? show the short usage (IPython prints it once, under "Docstring:").
FabstirMagics.fabstir.__doc__ = usage()


# --------------------------------------------------------------------------- extension hooks

_LOADED: dict[int, FabstirMagics] = {}


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%fabstir``/``%fabstir`` on ``ipython`` and make the settings reachable by ``%config``."""
    magics = FabstirMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
    _LOADED[id(ipython)] = magics
    magics._autostart = True
    magics.schedule_network_start()  # in the background, once this cell ends: %load_ext returns at once


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and close the bridge: background streams, sockets, local hosts, loop thread."""
    magics = _LOADED.pop(id(ipython), None)
    if magics is not None:
        magics._autostart = False
        magics._cancel_scheduled_start()
    manager = ipython.magics_manager
    for kind in ("line", "cell"):
        registered = manager.magics[kind].get("fabstir")
        if registered is not None and getattr(registered, "__self__", None) is magics:
            del manager.magics[kind]["fabstir"]
    if manager.registry.get("FabstirMagics") is magics:
        del manager.registry["FabstirMagics"]
    if magics is not None and magics in ipython.configurables:
        ipython.configurables.remove(magics)
    close_bridge()
