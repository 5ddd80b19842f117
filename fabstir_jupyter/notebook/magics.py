"""The ``%%fabstir`` cell magic and the ``%fabstir`` line commands.

One magic, one dispatch: the line is parsed by :mod:`.parsers` into a command object tagged by
``type``, and ``handle_<type>`` does the work. Settings are traitlets of :class:`FabstirMagics`, so
``%config FabstirMagics.max_tokens = 64``, ``ipython_config.py`` and ``%fabstir config`` take the
same path. The magic layers ``%config`` on the one settings resolver
(:func:`fabstir_jupyter.settings.load_settings`: environment, then the config file) and the cell's
options on top of that.

Expected failures print one line to stderr (``FabstirError [CODE]: message (hint: ...)``) with no
traceback; a kernel interrupt cancels the stream on the host and re-raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import datetime
import sys
from typing import TYPE_CHECKING, Any, Callable

from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Enum, Float, Integer, List, TraitError, Unicode, validate

from ..errors import FabstirError, InvalidOptions
from ..settings import LOCAL_BACKENDS, NETWORKS, SDKSettings, SettingsSources, load_settings
from .bridge import NetworkSettings, NotebookBridge, close_bridge, get_bridge
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
    ManagerCommand,
    ModelsCommand,
    NetworkCommand,
    SessionsCommand,
    UsageCommand,
    UsageError,
    cell_help,
    interpolate,
    line_help,
    parse_cell_options,
    parse_line_command,
)
from .tables import host_rows, hosts_dataframe, usage_rows

if TYPE_CHECKING:
    import pandas as pd

    from ..inference import InferenceManager, InferenceResult, InferenceStream

__all__ = ["FabstirMagics", "load_ipython_extension", "unload_ipython_extension", "format_error"]

def format_error(error: FabstirError) -> str:
    """The one line shown for an expected failure: ``FabstirError [CODE]: message (hint: ...)``."""
    message = error.message if getattr(error, "message", None) else str(error)
    if error.host:
        message = f"host {error.host}: {message}"
    line = f"FabstirError [{error.code}]: {message}"
    if error.hint:
        line += f" (hint: {error.hint})"
    return line.replace("\n", " ")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _print_error(error: FabstirError) -> None:
    print(format_error(error), file=sys.stderr)


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
        value = proposal["value"]
        if value is not None and value < 1:
            raise TraitError(f"FabstirMagics.max_tokens must be an integer >= 1 (or None), not {value!r}")
        return value

    @validate("hosts")
    def _check_hosts(self, proposal: Any) -> list[str]:
        from ..protocol import ws_url

        for url in proposal["value"]:
            try:
                ws_url(url)
            except InvalidOptions as exc:
                raise TraitError(f"FabstirMagics.hosts: {exc.message}") from None
        return proposal["value"]

    @validate("usage_db")
    def _check_usage_db(self, proposal: Any) -> str | None:
        value = proposal["value"]
        if value is not None and not value.strip():
            raise TraitError(f"FabstirMagics.usage_db must be a file path or ':memory:' (None for the default), "
                             f"not {value!r}")
        return value  # type: ignore[no-any-return]

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

    # ------------------------------------------------------------------ the magic

    @line_cell_magic
    def fabstir(self, line: str, cell: str | None = None) -> Any:
        # The docstring is built from the parsers below the class (see _DOC).
        try:
            command = parse_line_command(line) if cell is None else parse_cell_options(line)
            handler: Callable[..., Any] = getattr(self, f"handle_{command.type}")
            if cell is None:
                return handler(command)
            return handler(command, cell)
        except UsageError as exc:
            print(f"UsageError: {exc} (see %fabstir help)", file=sys.stderr)
        except FabstirError as exc:
            _print_error(exc)
        return None

    # ------------------------------------------------------------------ %%fabstir

    def handle_cell(self, options: CellOptions, cell: str) -> None:
        """Stream the answer to the cell's text into a live output; ``--out`` stores the result."""
        from ..config import InferenceConfig, validate_prompt

        shell: Any = self.shell
        prompt = interpolate(cell, shell.user_ns) if options.interpolate else cell
        prompt = prompt.strip("\n")
        # An empty prompt is refused before any output shows (the stream checks it again, with the
        # manager's own limit, when it is made on the loop thread).
        validate_prompt(prompt, max_chars=InferenceConfig.max_prompt_chars)
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
        sink = make_output(fmt, options.background, update_interval=self.update_interval)
        sink.start(host=options.host, model=model)
        if options.background:
            self.last_background = bridge.run_background(
                make_stream, sink, interval=self.update_interval,
                store=self._storer(options.out), on_error=_print_error,
            )
            return None
        # The sinks batch on their own (the widget per update_interval, stdout per its buffer), so
        # text is handed over as it arrives; idle polls let the widget send a held batch.
        poll = min(0.1, max(self.update_interval, 0.01))
        bridge.run_stream(make_stream, sink, poll=poll, interval=0.0, store=self._storer(options.out))
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
                                                     host=options.host)
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
                    return ledger.summary(by if isinstance(by, str) else tuple(by), **scope)
                except ValueError as exc:
                    raise UsageError(f"%fabstir usage: {exc}") from None
            return ledger.to_frame(limit=limit, **scope)
        finally:
            if owned:
                ledger.close()

    def _dashboard_source(self, refresh: bool) -> Callable[[], tuple[list[Any], Any]]:
        """The host dashboard's data source: ``(hosts, usage ledger)``; later calls probe again."""
        calls = [refresh]

        def source() -> tuple[list[Any], Any]:
            manager = self._discover(calls[-1])
            calls.append(True)
            return manager.host_manager.hosts, manager.usage

        return source

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
        return pd.DataFrame(rows, columns=columns)

    def handle_end(self, command: EndCommand) -> None:
        """End a named session; a turn still streaming in it is cancelled on its host."""
        session = self.bridge.end_session(command.name)
        line = f"[fabstir] ended session {command.name!r} after {_count(session.turns, 'turn')}"
        if session.cancelled_turns:
            line += f" ({_count(session.cancelled_turns, 'turn')} cancelled)"
        print(line)

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
        return pd.DataFrame(rows, columns=["model", "names", "hosts", "host_urls"])

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
        """Print what the magics do."""
        print(_DOC)


_DOC = "\n\n".join([
    "Use the Fabstir decentralised LLM network from a notebook.",
    "%%fabstir [options]: the cell's text is the prompt; the answer streams into a live output.\n"
    "{name}, {name.attr} and {name[key]} in the prompt are replaced from the notebook's variables;\n"
    "{{ and }} are literal braces; other braces (code, JSON) and unknown names are left alone.\n"
    "Settings: %config FabstirMagics.NAME = VALUE or %fabstir config NAME VALUE (" + ", ".join(CONFIG_KEYS) + ").\n"
    "Precedence: the cell's options, then %config, then the environment, then the config file.\n"
    "Environment: FABSTIR_NETWORK, FABSTIR_HOSTS, FABSTIR_LOCAL_BACKEND, FABSTIR_DEFAULT_MODEL, FABSTIR_MAX_TOKENS,\n"
    "FABSTIR_USAGE_DB; FABSTIR_NO_WIDGETS=1 streams as text instead of the live widget.\n"
    "Ctrl-C (interrupt) cancels the stream on the host and stops the cells queued after it.",
    cell_help(),
    line_help(),
])

FabstirMagics.fabstir.__doc__ = _DOC


# --------------------------------------------------------------------------- extension hooks

_LOADED: dict[int, FabstirMagics] = {}


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%fabstir``/``%fabstir`` on ``ipython`` and make the settings reachable by ``%config``."""
    magics = FabstirMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
    _LOADED[id(ipython)] = magics


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and close the bridge: background streams, sockets, local hosts, loop thread."""
    magics = _LOADED.pop(id(ipython), None)
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
