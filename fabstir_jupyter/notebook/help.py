"""The help of ``%%fabstir`` and ``%fabstir``: a short usage block, and the details of each topic.

``%fabstir help`` (and ``%%fabstir?``, whose docstring it is) shows :func:`usage`: the most used
options and one line per command. ``%fabstir help TOPIC`` shows :func:`topic_help`: an option
(``--model``, ``model`` or ``-m``), a command (``hosts``), ``settings``, ``paying``, or ``all``. The details
come from the parsers (:mod:`.parsers`), so they never drift from what is accepted.

Lines are wrapped at word boundaries to :data:`WIDTH` columns, and :class:`HelpText` is shown as a
preformatted block that scrolls rather than wraps (a notebook's plain output wraps long lines
anywhere, even mid-word). Nothing here imports IPython.
"""

from __future__ import annotations

import argparse
import html
import textwrap
from typing import Any

from .parsers import CELL_OPTION_HELP, CONFIG_KEYS, LINE_COMMAND_HELP, UsageError, cell_parser, line_parser

__all__ = ["WIDTH", "HelpText", "usage", "topic_help", "TOPICS"]

#: Columns the help text fits in.
WIDTH = 88
_INDENT = "    "

#: The options the short usage shows (the others are named on one line).
MAIN_OPTIONS = ("model", "max_tokens", "temperature", "session", "out", "format", "background")
_OPTION_SUMMARY = {
    "model": "model to use (default: the host's first)",
    "max_tokens": "most tokens to generate (default 256)",
    "temperature": "sampling temperature, 0.0 to 2.0 (default 0.7)",
    "session": "continue the conversation NAME across cells",
    "out": "store the result (.text, .usage, .error...) in VAR",
    "format": "final rendering: markdown (default), text, code or json",
    "background": "return at once; the answer streams on (%fabstir status)",
}
#: One line per ``%fabstir`` command in the short usage.
COMMAND_SUMMARY = {
    "hosts": "the host dashboard (--frame: a DataFrame)",
    "models": "the models the hosts serve",
    "usage": "this kernel's usage records (--by COLUMN summarises)",
    "sessions": "the live named sessions",
    "end NAME": "end the named session NAME (paid: settle it, show the receipt)",
    "status": "the network's start and the --background runs",
    "cancel": "stop every --background stream",
    "network [NAME]": "show the network, or switch to NAME",
    "config [KEY [VALUE]]": "show the settings, or set KEY to VALUE",
    "wallet": "the paying wallet: balances, open jobs, spent, budget",
    "jobs": "this kernel's paid jobs, open and settled (a DataFrame)",
    "manager": "the InferenceManager the cells use (Python API)",
    "help [TOPIC]": "this help, or the details of TOPIC",
}
#: Topics besides the options and commands.
TOPICS = ("settings", "paying", "all")


class HelpText:
    """Help text for display: plain text in a terminal, a block that scrolls in a notebook."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text)

    def _repr_html_(self) -> str:
        style = "white-space: pre; overflow-x: auto; word-break: normal; overflow-wrap: normal; max-width: 100%"
        return f'<pre class="fabstir-help" style="{style}">{html.escape(self.text)}</pre>'


def _wrap(text: str, indent: str = _INDENT) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def _columns(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(left) for left, _ in rows) + 2
    return [f"{indent}{left:<{width}}{right}".rstrip() for left, right in rows]


def _cell_options() -> dict[str, argparse.Action]:
    return {action.dest: action for action in cell_parser()._actions if action.option_strings}


def _flag(action: argparse.Action) -> str:
    """``--model MODEL`` (the long form, with its value)."""
    long = max(action.option_strings, key=len)
    if action.nargs == 0:
        return long
    return f"{long} {action.metavar or action.dest.upper()}"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = line_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def usage() -> str:
    """The short usage: the most used options, one line per command, where the details are."""
    options = _cell_options()
    lines = ["%%fabstir [OPTIONS]: the cell's text is the prompt; the answer streams in live."]
    lines += _columns([(_flag(options[name]), _OPTION_SUMMARY[name]) for name in MAIN_OPTIONS])
    others = ", ".join(_flag(action) for name, action in options.items() if name not in MAIN_OPTIONS)
    lines += _wrap(f"other options: {others}", "  ")
    lines += ["", "%fabstir COMMAND:"]
    lines += _columns(list(COMMAND_SUMMARY.items()))
    lines += [""]
    lines += _wrap("{name}, {name.attr} and {name[key]} in the prompt are replaced from the notebook's "
                   "variables. A failed cell raises, so Run All stops there; Ctrl-C stops the stream on the host.", "")
    lines += _wrap("Details: %fabstir help OPTION (e.g. %fabstir help --model), %fabstir help COMMAND "
                   "(e.g. %fabstir help hosts), %fabstir help settings, %fabstir help paying, "
                   "%fabstir help all.", "")
    return "\n".join(lines)


def _option_help(action: argparse.Action) -> str:
    name = _flag(action)
    short = [flag for flag in action.option_strings if not flag.startswith("--")]
    head = f"%%fabstir {name}" + (f"   (also {short[0]} {action.metavar})" if short else "")
    lines = [head, *_wrap(CELL_OPTION_HELP[action.dest])]
    if action.choices:
        lines += _wrap("one of: " + ", ".join(map(str, action.choices)))
    return "\n".join(lines)


def _command_help(name: str, parser: argparse.ArgumentParser) -> str:
    usage_line = parser.format_usage().strip().removeprefix("usage: ")
    lines = [usage_line, *_wrap(LINE_COMMAND_HELP[name])]
    rows = [(_flag(action), action.help or "") for action in parser._actions if action.option_strings]
    if rows:
        lines += _columns(rows, _INDENT)
    return "\n".join(lines)


def settings_help() -> str:
    """How settings are set and found."""
    paragraphs = [
        "Settings: %config FabstirMagics.NAME = VALUE, or %fabstir config NAME VALUE; the names: "
        + ", ".join(CONFIG_KEYS) + ".",
        "Precedence: the cell's options, then %config, then the environment, then the config file "
        "(config.json in the user config directory; %fabstir config shows where each value comes from).",
        "Environment: FABSTIR_NETWORK, FABSTIR_HOSTS, FABSTIR_LOCAL_BACKEND, FABSTIR_DEFAULT_MODEL, "
        "FABSTIR_MAX_TOKENS, FABSTIR_USAGE_DB; FABSTIR_NO_WIDGETS=1 streams as text instead of the live widget; "
        "paying: FABSTIR_PRIVATE_KEY or FABSTIR_KEY_FILE, FABSTIR_BUDGET, FABSTIR_PAYMENT_TOKEN, "
        "FABSTIR_LOCAL_PAID (%fabstir help paying).",
        "The extension starts the local network in the background as it loads, and again when %config "
        "changes the network; FabstirMagics.start_network_on_load = False (in ipython_config.py) leaves "
        "the start to the first cell that needs it.",
    ]
    return "\n".join(line for paragraph in paragraphs for line in _wrap(paragraph, ""))


def paying_help() -> str:
    """How answers are paid for, and the options and commands about it."""
    paragraphs = [
        "Paying: on a paid network every answer is billed to a job on the chain's JobMarketplace, opened "
        "from your wallet with a deposit; the host proves the tokens it streamed, and settling the job "
        "pays the host (less the treasury fee) and refunds the rest of the deposit.",
        "The local network pays by default from its funded test account (test money, a budget of 1000 "
        "USDC); FABSTIR_LOCAL_PAID=0 (or FabstirSDK(paid=False)) starts free hosts instead. base-sepolia "
        "needs your key (FABSTIR_PRIVATE_KEY, or FABSTIR_KEY_FILE naming a 0600 file) and a budget "
        "(FABSTIR_BUDGET, whole USDC); without them inference there is refused (PAYMENT_REQUIRED).",
        "%%fabstir --session NAME --deposit X --budget Y: the session's deposit per job and its own cap, in "
        "whole tokens (they apply when the session is created). Cells without --session share a few jobs "
        "per host, settled when the kernel closes them.",
        "While an answer streams its status line shows its job and its cost so far (est.: the bill is "
        "fixed at settlement), and 🔒 when it is end-to-end encrypted (🔓 plaintext when not).",
        "%fabstir wallet: the address (never the key), balances, open jobs, what this kernel spent, the "
        "budget and what is left. %fabstir end NAME: settle a paid session and show its receipt. "
        "%fabstir hosts: the dashboard's jobs table (dashboard.jobs_frame).",
    ]
    return "\n\n".join("\n".join(_wrap(paragraph, "")) for paragraph in paragraphs)


def topic_help(topic: str) -> str:
    """The details of ``topic``: an option (``--max-tokens``, ``max-tokens``, ``-m``), a command
    (``hosts``, ``%fabstir hosts``), ``settings``, ``paying`` or ``all``.

    Raises:
        UsageError: no option, command or topic has that name (the message lists them).
    """
    word = topic.strip().removeprefix("%fabstir").strip()
    options = _cell_options()
    commands = _commands()
    if word == "all":
        parts = [usage(), settings_help(), paying_help()]
        parts += [_option_help(action) for action in options.values()]
        parts += [_command_help(name, parser) for name, parser in commands.items()]
        return "\n\n".join(parts)
    if word == "settings":
        return settings_help()
    if word == "paying":
        return paying_help()
    if word in commands:
        return _command_help(word, commands[word])
    for action in options.values():
        names = {flag.lstrip("-").replace("-", "_") for flag in action.option_strings} | {action.dest}
        if word.lstrip("-").replace("-", "_") in names:
            return _option_help(action)
    known = ", ".join([_flag(a).split()[0] for a in options.values()] + list(commands) + list(TOPICS))
    raise UsageError(f"%fabstir help: no option, command or topic {topic.strip()!r}; choose one of {known}")
