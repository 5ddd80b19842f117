"""Parse ``%%fabstir`` options, ``%fabstir`` line commands and prompt references; no IPython here.

Each parse returns a small frozen dataclass tagged by ``type`` (the subcommand), so the magic can
dispatch on it with one ``handle_<type>`` method per command::

    parse_cell_options("--model llama-2-7b --max-tokens 64")   # CellOptions(type="cell", ...)
    parse_line_command("end chat")                              # EndCommand(type="end", name="chat")

Bad input raises :class:`UsageError` with a one-line message; argparse never exits the process.
:func:`interpolate` replaces ``{name}``, ``{name.attr}`` and ``{name[key]}`` in a prompt.
"""

from __future__ import annotations

import argparse
import keyword
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from ..config import SELECTION_MODES
from ..settings import NETWORKS

__all__ = [
    "FORMATS",
    "MODES",
    "ENCRYPTION_CHOICES",
    "NETWORKS",
    "CONFIG_KEYS",
    "UsageError",
    "CellOptions",
    "HostsCommand",
    "UsageCommand",
    "SessionsCommand",
    "JobsCommand",
    "EndCommand",
    "ModelsCommand",
    "NetworkCommand",
    "ConfigCommand",
    "HelpCommand",
    "StatusCommand",
    "CancelCommand",
    "ManagerCommand",
    "WalletCommand",
    "LineCommand",
    "cell_parser",
    "line_parser",
    "parse_cell_options",
    "parse_line_command",
    "interpolate",
    "find_references",
]

#: ``--format`` values: how the finished answer is rendered.
FORMATS = ("markdown", "text", "code", "json")
#: ``--mode`` values: the host selection modes (spec/PROTOCOL.md §9).
MODES = SELECTION_MODES
#: ``--encryption`` values (``InferenceConfig.encryption``; ``off`` is ``False``).
ENCRYPTION_CHOICES = ("auto", "required", "off")
#: Settings ``%fabstir config`` shows and sets: the ``FabstirMagics`` traitlets.
CONFIG_KEYS = (
    "default_model",
    "max_tokens",
    "network",
    "hosts",
    "local_backend",
    "update_interval",
    "default_format",
    "usage_db",
)


class UsageError(ValueError):
    """Raised when magic arguments cannot be parsed; the message is one line."""


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, not {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, not {text!r}")
    return value


def _float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, not {text!r}")
        return value

    return convert


def _identifier(text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"expected a Python variable name, not {text!r}")
    return text


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(f"{self.prog}: {(message or 'exit requested').strip()}")


# --------------------------------------------------------------------------- %%fabstir options


@dataclass(frozen=True)
class CellOptions:
    """The options of one ``%%fabstir`` cell; ``None`` means "not given" (use the configured default)."""

    type: Literal["cell"] = "cell"
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    host: str | None = None
    session: str | None = None
    mode: str | None = None
    format: str | None = None
    out: str | None = None
    background: bool = False
    interpolate: bool = True
    network: str | None = None
    encryption: str | None = None
    deposit: str | None = None  # whole tokens, as typed: the payments layer reads and checks amounts
    budget: str | None = None

    def inference_options(self) -> dict[str, Any]:
        """The per-request options given in the cell, as ``InferenceOptions`` keyword arguments."""
        options: dict[str, Any] = {}
        for name, value in (("model", self.model), ("max_tokens", self.max_tokens),
                            ("temperature", self.temperature), ("top_p", self.top_p), ("seed", self.seed)):
            if value is not None:
                options[name] = value
        if self.stop:
            options["stop_sequences"] = list(self.stop)
        if self.encryption is not None:
            options["encryption"] = self.encryption
        return options


CELL_OPTION_HELP: dict[str, str] = {
    "model": "model to use: a host model id, alias, repo/file or repo:file (default: FabstirMagics.default_model, "
             "else the host's first model)",
    "max_tokens": "most tokens to generate (default: FabstirMagics.max_tokens, else 256)",
    "temperature": "sampling temperature, 0.0 to 2.0 (default 0.7)",
    "top_p": "nucleus sampling threshold, in (0, 1]",
    "stop": "stop sequence; generation ends before it (repeat the option for several)",
    "seed": "sampling seed, for reproducible answers",
    "host": "pin a host: its URL or registry address",
    "session": "continue the conversation NAME (created on first use); end it with %fabstir end NAME",
    "mode": "host selection mode: auto, cheapest, fastest or reliable (default auto)",
    "format": "final rendering: markdown (default), text, code or json",
    "out": "store the finished result (an InferenceResult: .text, .usage, .finish_reason, .host, .model, "
           ".ttft, .error) in the variable VAR; a request that fails keeps its partial .text and its .error",
    "background": "return at once and keep streaming into the output; %fabstir status lists such runs with "
                  "their state or error, the stop button or %fabstir cancel stops them",
    "no_interpolate": "send the cell text as is, without replacing {name} references",
    "network": "network for this cell: local, static or base-sepolia (default: FabstirMagics.network)",
    "encryption": "end-to-end encryption: auto (default: encrypt to every host whose key is known), required "
                  "(refuse hosts without one) or off",
    "deposit": "with --session, on a paid network: each of the session's jobs' deposit, in whole tokens of the "
               "payment token (USDC by default; default: sized from --max-tokens and the host's price). Set when "
               "the session is created; what the job does not spend comes back when it is settled "
               "(%fabstir end NAME)",
    "budget": "with --session, on a paid network: the most the session may hold in deposits and spend, in whole "
              "tokens (default: only the process budget, FABSTIR_BUDGET; the local network's is 1000 USDC). Set "
              "when the session is created",
}


def cell_parser() -> argparse.ArgumentParser:
    """Build the ``%%fabstir`` option parser (the help, :mod:`.help`, is built from it)."""
    parser = _Parser(prog="%%fabstir", add_help=False, allow_abbrev=False,
                     description="Stream the answer to the cell's text (the prompt) from the Fabstir network.")
    add = parser.add_argument
    h = {name: text.replace("%", "%%") for name, text in CELL_OPTION_HELP.items()}  # argparse %-formats help
    add("--model", "-m", metavar="MODEL", type=_name, help=h["model"])
    add("--max-tokens", metavar="N", type=_positive_int, help=h["max_tokens"])
    add("--temperature", metavar="T", type=_float_in(0.0, 2.0), help=h["temperature"])
    add("--top-p", metavar="P", type=_float_in(0.0, 1.0, low_open=True), help=h["top_p"])
    add("--stop", metavar="TEXT", action="append", default=[], type=_name, help=h["stop"])
    add("--seed", metavar="N", type=_seed, help=h["seed"])
    add("--host", metavar="URL_OR_ADDRESS", type=_name, help=h["host"])
    add("--session", metavar="NAME", type=_name, help=h["session"])
    add("--mode", choices=MODES, help=h["mode"])
    add("--format", choices=FORMATS, help=h["format"])
    add("--out", metavar="VAR", type=_identifier, help=h["out"])
    add("--background", action="store_true", help=h["background"])
    add("--no-interpolate", action="store_true", help=h["no_interpolate"])
    add("--network", choices=NETWORKS, help=h["network"])
    add("--encryption", choices=ENCRYPTION_CHOICES, help=h["encryption"])
    add("--deposit", metavar="X", help=h["deposit"])
    add("--budget", metavar="Y", help=h["budget"])
    return parser


def _split(line: str, prog: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{prog}: {str(exc).lower()}") from None


def parse_cell_options(line: str) -> CellOptions:
    """Parse the ``%%fabstir`` line.

    Raises:
        UsageError: an unknown option or a bad value (one line, naming the option).
    """
    args = cell_parser().parse_args(_split(line, "%%fabstir"))
    return CellOptions(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed,
        host=args.host,
        session=args.session,
        mode=args.mode,
        format=args.format,
        out=args.out,
        background=args.background,
        interpolate=not args.no_interpolate,
        network=args.network,
        encryption=args.encryption,
        deposit=args.deposit,
        budget=args.budget,
    )


# --------------------------------------------------------------------------- %fabstir commands


@dataclass(frozen=True)
class HostsCommand:
    """``%fabstir hosts [--refresh]``: the host dashboard (or a DataFrame of hosts)."""

    type: Literal["hosts"] = "hosts"
    refresh: bool = False
    frame: bool = False
    all_kernels: bool = False


@dataclass(frozen=True)
class UsageCommand:
    """``%fabstir usage [--by COLUMN] [--limit N]``: the usage ledger as a DataFrame."""

    type: Literal["usage"] = "usage"
    by: tuple[str, ...] = ()
    limit: int | None = None
    all_kernels: bool = False


@dataclass(frozen=True)
class SessionsCommand:
    """``%fabstir sessions``: the live named sessions as a DataFrame."""

    type: Literal["sessions"] = "sessions"


@dataclass(frozen=True)
class EndCommand:
    """``%fabstir end NAME``: end a named session."""

    name: str
    type: Literal["end"] = "end"


@dataclass(frozen=True)
class ModelsCommand:
    """``%fabstir models``: the models the discovered hosts serve, as a DataFrame."""

    type: Literal["models"] = "models"


@dataclass(frozen=True)
class NetworkCommand:
    """``%fabstir network [NAME]``: show or switch the network."""

    type: Literal["network"] = "network"
    name: str | None = None


@dataclass(frozen=True)
class ConfigCommand:
    """``%fabstir config [KEY [VALUE]]``: show all settings, show one, or set one."""

    type: Literal["config"] = "config"
    key: str | None = None
    value: str | None = None


@dataclass(frozen=True)
class HelpCommand:
    """``%fabstir help [TOPIC]``: the short usage, or the details of an option, a command or a topic."""

    type: Literal["help"] = "help"
    topic: str | None = None


@dataclass(frozen=True)
class StatusCommand:
    """``%fabstir status``: how the network's start went, and the ``--background`` runs."""

    type: Literal["status"] = "status"


@dataclass(frozen=True)
class CancelCommand:
    """``%fabstir cancel``: stop every ``--background`` stream still running."""

    type: Literal["cancel"] = "cancel"


@dataclass(frozen=True)
class ManagerCommand:
    """``%fabstir manager``: the ``InferenceManager`` the cells use, for the Python API."""

    type: Literal["manager"] = "manager"


@dataclass(frozen=True)
class WalletCommand:
    """``%fabstir wallet``: the paying wallet, its balances, open jobs, spending and budget."""

    type: Literal["wallet"] = "wallet"


@dataclass(frozen=True)
class JobsCommand:
    """``%fabstir jobs``: this kernel's paid jobs, open and settled, as a DataFrame."""

    type: Literal["jobs"] = "jobs"


LineCommand = (HostsCommand | UsageCommand | SessionsCommand | EndCommand | ModelsCommand | NetworkCommand
               | ConfigCommand | HelpCommand | StatusCommand | CancelCommand | ManagerCommand | WalletCommand
               | JobsCommand)

LINE_COMMAND_HELP: dict[str, str] = {
    "hosts": "the host dashboard: discovered hosts with latency, price, stake and usage (--refresh probes "
             "again; --frame returns the pandas DataFrame instead of the widget; --all counts every kernel's usage)",
    "usage": "this kernel's usage records as a DataFrame (--by host|model|... summarises; --limit N keeps the "
             "newest N; --all reads the whole ledger, which every kernel shares)",
    "sessions": "the named conversations started with --session, as a DataFrame",
    "end": "end the named session NAME (closes its socket); a paid session's job is settled and its receipt "
           "shown: tokens billed, cost, host earnings, treasury fee, refund, the transactions, and whether the "
           "usage ledger agrees with the chain",
    "models": "the models the discovered hosts serve, as a DataFrame",
    "network": "show the network, or switch to NAME (local, static, base-sepolia)",
    "config": "show the settings, show KEY, or set KEY to VALUE (also: %config FabstirMagics.KEY = VALUE)",
    "status": "how the network's start went (each step and its time) and the --background runs of this "
              "kernel, each with its state (running, done, failed, cancelled) and its error",
    "cancel": "stop every --background stream still running",
    "manager": "return the InferenceManager the %%fabstir cells use (same hosts, pool and usage ledger), for "
               "infer(), batch_blocking(prompts, progress=...) and select_best_host(mode=...); await its async "
               "methods (await manager.batch(...)) or call the blocking ones",
    "wallet": "the wallet that pays (its address, never its key), its balances, the open jobs with their "
              "deposits and what they have billed so far (an estimate until settled), what this kernel spent, "
              "the budget and what is left; on a network that pays nothing, it says so",
    "jobs": "this kernel's paid jobs, open and settled, as a DataFrame: job, host, model, deposit, tokens "
            "billed, billed, refund, status (an open job's figures are estimates until it settles); empty on a "
            "network that pays nothing",
    "help": "the short usage; %fabstir help OPTION (e.g. --model) or COMMAND (e.g. hosts) gives the details, "
            "%fabstir help settings how settings are found, %fabstir help all everything",
}


def line_parser() -> argparse.ArgumentParser:
    """Build the ``%fabstir`` command parser."""
    parser = _Parser(prog="%fabstir", add_help=False, allow_abbrev=False,
                     description="Fabstir network commands.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    h = LINE_COMMAND_HELP

    def command(name: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=h[name].replace("%", "%%"), description=h[name], add_help=False,
                                   allow_abbrev=False)

    hosts = command("hosts")
    hosts.add_argument("--refresh", action="store_true", help="discover and probe every host again")
    hosts.add_argument("--frame", action="store_true", help="return a DataFrame, not the dashboard widget")
    hosts.add_argument("--all", dest="all_kernels", action="store_true", help="count every kernel's usage")
    usage = command("usage")
    usage.add_argument("--by", metavar="COLUMN", action="append", default=[], help="summarise per COLUMN")
    usage.add_argument("--limit", metavar="N", type=_positive_int, help="only the newest N records")
    usage.add_argument("--all", dest="all_kernels", action="store_true",
                       help="the whole ledger (every kernel's records), not only this kernel's")
    command("sessions")
    command("end").add_argument("name", metavar="NAME", type=_name)
    command("models")
    command("network").add_argument("name", metavar="NAME", nargs="?", choices=NETWORKS)
    config = command("config")
    config.add_argument("key", metavar="KEY", nargs="?", choices=CONFIG_KEYS)
    config.add_argument("value", metavar="VALUE", nargs="?")
    command("status")
    command("cancel")
    command("manager")
    command("wallet")
    command("jobs")
    command("help").add_argument("topic", metavar="TOPIC", nargs="?")
    return parser


def parse_line_command(line: str) -> LineCommand:
    """Parse a ``%fabstir`` line into its command object (an empty line means ``help``).

    Raises:
        UsageError: an unknown command or bad arguments (one line).
    """
    words = _split(line, "%fabstir")
    if not words:
        return HelpCommand()
    if words[0] == "help":  # the topic may look like an option (--model): not for argparse
        return HelpCommand(topic=" ".join(words[1:]) or None)
    if words[0] == "config" and len(words) > 3:
        # A value may hold spaces without quotes: %fabstir config hosts ws://a:1 ws://b:2
        words = [*words[:2], " ".join(words[2:])]
    args = line_parser().parse_args(words)
    name = args.command
    if name == "hosts":
        return HostsCommand(refresh=args.refresh, frame=args.frame, all_kernels=args.all_kernels)
    if name == "usage":
        return UsageCommand(by=tuple(args.by), limit=args.limit, all_kernels=args.all_kernels)
    if name == "sessions":
        return SessionsCommand()
    if name == "jobs":
        return JobsCommand()
    if name == "end":
        return EndCommand(name=args.name)
    if name == "models":
        return ModelsCommand()
    if name == "network":
        return NetworkCommand(name=args.name)
    if name == "config":
        return ConfigCommand(key=args.key, value=args.value)
    if name == "status":
        return StatusCommand()
    if name == "cancel":
        return CancelCommand()
    if name == "manager":
        return ManagerCommand()
    if name == "wallet":
        return WalletCommand()
    return HelpCommand()


# --------------------------------------------------------------------------- prompt interpolation

_IDENT = r"[^\W\d]\w*"
_KEY = r"\[[^\[\]{}\n]*\]"
_REF = rf"{_IDENT}(?:\.{_IDENT}|{_KEY})*"
# Alternatives in priority order: an escaped reference {{ref}}, a reference {ref}, an escaped
# brace {{ or }}, and any other (lone) brace.
_TOKEN = re.compile(rf"\{{\{{(?P<escaped>{_REF})\}}\}}|\{{(?P<ref>{_REF})\}}|(?P<open>\{{\{{)|(?P<close>\}}\}})|[{{}}]")
_PART = re.compile(rf"\.(?P<attr>{_IDENT})|\[(?P<key>[^\[\]]*)\]")
_MISSING = object()


def _parse_key(text: str) -> list[Any]:
    """Candidate keys for ``[text]``: a quoted string, or an integer then the text as a string."""
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        return [stripped[1:-1]]
    if re.fullmatch(r"-?\d+", stripped):
        return [int(stripped), text]
    return [text]


def _resolve(ref: str, namespace: Mapping[str, Any]) -> Any:
    """Look ``ref`` up in ``namespace``; return ``_MISSING`` when any step fails."""
    name = re.match(_IDENT, ref)
    assert name is not None
    value = namespace.get(name.group(), _MISSING)
    if value is _MISSING:
        return _MISSING
    for part in _PART.finditer(ref, name.end()):
        if part.group("attr") is not None:
            try:
                value = getattr(value, part.group("attr"))
            except Exception:
                return _MISSING
            continue
        for key in _parse_key(part.group("key")):
            try:
                value = value[key]
                break
            except Exception:
                continue
        else:
            return _MISSING
    return value


def find_references(prompt: str) -> list[str]:
    """Return the ``{ref}`` references in ``prompt`` (escaped ones excluded), in order."""
    return [m.group("ref") for m in _TOKEN.finditer(prompt) if m.group("ref") is not None]


def interpolate(prompt: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{name}``, ``{name.attr}`` and ``{name[key]}`` with ``str()`` of their values.

    Rules:

    * a reference whose name (or attribute, or key) is not found is left exactly as written;
    * ``{{name}}`` is the literal text ``{name}``;
    * other ``{{`` and ``}}`` are literal ``{`` and ``}`` when every brace of the prompt belongs to
      a reference or an escape (a ``str.format``-style template); where the prompt also holds lone
      braces (code, JSON), they are left alone with everything else that is not a reference;
    * lone braces, and braces around anything that is not a reference (``{ x }``, ``{"a": 1}``,
      ``{x:.2f}``, ``{}``), are left alone.

    ``[key]`` is a quoted string, an integer (tried first, then as text), or bare text, as in
    ``str.format``.
    """
    tokens = list(_TOKEN.finditer(prompt))
    if not tokens:
        return prompt
    template = not any(m.lastgroup is None for m in tokens)
    out: list[str] = []
    last = 0
    for match in tokens:
        out.append(prompt[last:match.start()])
        last = match.end()
        kind = match.lastgroup
        if kind == "escaped":
            out.append("{" + match.group("escaped") + "}")
        elif kind == "ref":
            value = _resolve(match.group("ref"), namespace)
            out.append(match.group() if value is _MISSING else str(value))
        elif kind in ("open", "close") and template:
            out.append(match.group()[0])
        else:
            out.append(match.group())
    out.append(prompt[last:])
    return "".join(out)
