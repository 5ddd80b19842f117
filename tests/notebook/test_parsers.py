"""The notebook parsers: %%fabstir options, %fabstir commands and prompt interpolation (no IPython)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabstir_jupyter.notebook import parsers
from fabstir_jupyter.notebook.parsers import (
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
    StatusCommand,
    UsageCommand,
    UsageError,
    WalletCommand,
    find_references,
    interpolate,
    parse_cell_options,
    parse_line_command,
)

NAMESPACE = {
    "name": "World",
    "topic": "rivers",
    "doc": SimpleNamespace(title="Dune", author=SimpleNamespace(name="Herbert")),
    "d": {"key": "value", 1: "one", "two words": "spaced", "nested": {"k": "deep"}},
    "items": ["zero", "one", "two"],
    "n": 42,
    "x": "X",
}

INTERPOLATION = [
    ("Hello {name}!", "Hello World!"),
    ("{topic} and {n}", "rivers and 42"),
    ("{doc.title} by {doc.author.name}", "Dune by Herbert"),
    ("{d[key]}", "value"),
    ("{d['key']} {d[\"key\"]}", "value value"),
    ("{d[1]}", "one"),
    ("{items[0]} {items[-1]}", "zero two"),
    ("{d[nested][k]}", "deep"),
    ("{d[two words]}", "spaced"),
    ("{{name}}", "{name}"),
    ("{{{name}}}", "{World}"),
    ("a {{ b }} c {name}", "a { b } c World"),
    ("{unknown} stays", "{unknown} stays"),
    ("{doc.missing} {d[nokey]} {items[9]}", "{doc.missing} {d[nokey]} {items[9]}"),
    ('{"a": 1, "b": [1, 2]}', '{"a": 1, "b": [1, 2]}'),
    ('{"a": {"b": {"c": 2}}}', '{"a": {"b": {"c": 2}}}'),
    ('{"greeting": "{name}"}', '{"greeting": "World"}'),
    ("def f(x):\n    return {x: 1 for x in range(3)}", "def f(x):\n    return {x: 1 for x in range(3)}"),
    ("int main() { if (x) { return 0; }}", "int main() { if (x) { return 0; }}"),
    ("f'{{x}}' vs {x}", "f'{x}' vs X"),
    ("{ name } {name:>10} {name!r} {} {0}", "{ name } {name:>10} {name!r} {} {0}"),
    ("lone { and } braces {name}", "lone { and } braces World"),
    ("no braces at all", "no braces at all"),
]


@pytest.mark.parametrize("prompt, expected", INTERPOLATION)
def test_interpolation_replaces_references_and_leaves_the_rest(prompt, expected):
    """References resolve from the namespace; escapes, code, JSON and unknown names behave as documented."""
    assert interpolate(prompt, NAMESPACE) == expected


def test_interpolation_with_an_empty_namespace_changes_only_escapes():
    """Without variables only {{ }} escapes of a pure template change."""
    assert interpolate("{a} {{b}} {c.d}", {}) == "{a} {b} {c.d}"


def test_a_failing_property_leaves_the_reference_alone():
    """An attribute whose getter raises is treated like a missing one."""

    class Broken:
        @property
        def value(self):
            raise RuntimeError("boom")

    assert interpolate("{b.value}", {"b": Broken()}) == "{b.value}"


def test_find_references_lists_unescaped_references():
    """find_references names what interpolation would look up."""
    assert find_references("{a} {{b}} {c.d[0]} {not one}") == ["a", "c.d[0]"]


def test_cell_options_parse_every_option():
    """Each %%fabstir option lands in its typed field."""
    options = parse_cell_options(
        "-m scripted-1 --max-tokens 12 --temperature 0.5 --top-p 0.9 --stop 'end here' --stop STOP "
        "--seed 7 --host ws://h:1 --session chat --mode cheapest --format json --out answer "
        "--background --no-interpolate --network static --deposit 1.5 --budget 10"
    )
    assert options == CellOptions(
        model="scripted-1", max_tokens=12, temperature=0.5, top_p=0.9, stop=("end here", "STOP"), seed=7,
        host="ws://h:1", session="chat", mode="cheapest", format="json", out="answer", background=True,
        interpolate=False, network="static", deposit="1.5", budget="10",
    )
    assert options.type == "cell"
    assert options.inference_options() == {
        "model": "scripted-1", "max_tokens": 12, "temperature": 0.5, "top_p": 0.9, "seed": 7,
        "stop_sequences": ["end here", "STOP"],
    }


def test_cell_options_default_to_not_given():
    """An empty line gives None/empty everywhere, so configured defaults apply."""
    options = parse_cell_options("")
    assert options == CellOptions()
    assert options.inference_options() == {}


def test_encryption_option_parses_to_the_request_option():
    """--encryption takes auto, required or off, and becomes the request's encryption option."""
    assert parse_cell_options("--encryption required").inference_options() == {"encryption": "required"}
    assert parse_cell_options("--encryption off").encryption == "off"
    assert parse_cell_options("").encryption is None
    with pytest.raises(UsageError) as info:
        parse_cell_options("--encryption maybe")
    assert "invalid choice: 'maybe'" in str(info.value)
    from fabstir_jupyter.notebook.help import topic_help

    assert "--encryption" in topic_help("--encryption")


@pytest.mark.parametrize("line, fragment", [
    ("--max-tokens abc", "argument --max-tokens: expected a positive integer, not 'abc'"),
    ("--max-tokens 0", "--max-tokens"),
    ("--temperature 2.5", "argument --temperature: expected a number in [0, 2]"),
    ("--top-p 0", "argument --top-p: expected a number in (0, 1]"),
    ("--seed -1", "--seed"),
    ("--mode fast", "invalid choice: 'fast'"),
    ("--format html", "invalid choice: 'html'"),
    ("--network mainnet", "invalid choice: 'mainnet'"),
    ("--out 1x", "expected a Python variable name"),
    ("--out class", "expected a Python variable name"),
    ("--bogus", "unrecognized arguments: --bogus"),
    ("--max", "unrecognized arguments: --max"),
    ("--model", "expected one argument"),
    ("--stop 'unclosed", "no closing quotation"),
    ("-h", "unrecognized arguments: -h"),
])
def test_bad_cell_options_are_one_line_usage_errors(line, fragment):
    """argparse errors become a UsageError with one line naming the problem; nothing exits."""
    with pytest.raises(UsageError) as info:
        parse_cell_options(line)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message and message.startswith("%%fabstir")


@pytest.mark.parametrize("line, expected", [
    ("", HelpCommand()),
    ("help", HelpCommand()),
    ("hosts", HostsCommand()),
    ("hosts --refresh --frame", HostsCommand(refresh=True, frame=True)),
    ("usage", UsageCommand()),
    ("usage --by host --by model --limit 5", UsageCommand(by=("host", "model"), limit=5)),
    ("usage --all", UsageCommand(all_kernels=True)),
    ("hosts --all", HostsCommand(all_kernels=True)),
    ("sessions", SessionsCommand()),
    ("end chat", EndCommand(name="chat")),
    ("end 'my chat'", EndCommand(name="my chat")),
    ("models", ModelsCommand()),
    ("network", NetworkCommand()),
    ("network base-sepolia", NetworkCommand(name="base-sepolia")),
    ("config", ConfigCommand()),
    ("config max_tokens", ConfigCommand(key="max_tokens")),
    ("config max_tokens 64", ConfigCommand(key="max_tokens", value="64")),
    ("config hosts ws://a:1 ws://b:2", ConfigCommand(key="hosts", value="ws://a:1 ws://b:2")),
    ("cancel", CancelCommand()),
    ("manager", ManagerCommand()),
    ("wallet", WalletCommand()),
])
def test_line_commands_parse_to_typed_objects(line, expected):
    """Each %fabstir command is a dataclass tagged by its subcommand."""
    command = parse_line_command(line)
    assert command == expected
    assert command.type == (line.split() or ["help"])[0]


@pytest.mark.parametrize("line, fragment", [
    ("bogus", "invalid choice: 'bogus'"),
    ("end", "the following arguments are required: NAME"),
    ("network mainnet", "invalid choice: 'mainnet'"),
    ("config colour red", "invalid choice: 'colour'"),
    ("usage --limit x", "expected a positive integer"),
    ("hosts extra", "unrecognized arguments: extra"),
    ("manager --frame", "unrecognized arguments: --frame"),
    ("wallet 0xabc", "unrecognized arguments: 0xabc"),
])
def test_bad_line_commands_are_one_line_usage_errors(line, fragment):
    """Unknown commands and bad arguments raise a one-line UsageError."""
    with pytest.raises(UsageError) as info:
        parse_line_command(line)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_help_documents_every_option_and_command():
    """The help texts, built from the parsers, name every option and command."""
    from fabstir_jupyter.notebook.help import topic_help, usage

    text = topic_help("all")
    for flag in ("--model", "-m", "--max-tokens", "--temperature", "--top-p", "--stop", "--seed", "--host",
                 "--session", "--mode", "--format", "--out", "--background", "--no-interpolate", "--network",
                 "--deposit", "--budget"):
        assert flag in text and flag in usage()
    for name in ("hosts", "usage", "sessions", "end NAME", "models", "network", "config", "status", "cancel",
                 "manager", "wallet", "help"):
        assert f"%fabstir {name}" in text
    paying = topic_help("paying")
    for words in ("FABSTIR_LOCAL_PAID=0", "FabstirSDK(paid=False)", "FABSTIR_PRIVATE_KEY", "FABSTIR_BUDGET",
                  "--deposit X --budget Y", "%fabstir wallet", "%fabstir end NAME", "🔒", "est."):
        assert words in paying and words in text, words


@pytest.mark.parametrize("line, command", [
    ("help", HelpCommand()),
    ("help --model", HelpCommand(topic="--model")),
    ("help hosts", HelpCommand(topic="hosts")),
    ("status", StatusCommand()),
])
def test_help_topics_and_status_parse(line, command):
    """`help` takes any topic, an option's flag included (argparse would take it for an option)."""
    assert parse_line_command(line) == command


def test_networks_match_the_sdk():
    """The parser's network list is the SDK's."""
    from fabstir_jupyter.sdk import NETWORKS

    assert parsers.NETWORKS == NETWORKS


def test_parsers_import_nothing_from_ipython_or_the_network_stack():
    """parsers.py stays apart from IPython and the SDK (checked on its source)."""
    source = Path(importlib.util.find_spec("fabstir_jupyter.notebook.parsers").origin).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert not imported & {"IPython", "traitlets", "websockets", "pandas", "..sdk", "..inference"}


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1e400", "-0.5"])
def test_deposit_and_budget_are_kept_as_typed_for_the_payments_layer(value):
    """--deposit and --budget keep the text as typed (a negative number included): the payments layer
    reads amounts and gives the coded error (INVALID_OPTIONS, BUDGET_EXCEEDED), not argparse."""
    options = parse_cell_options(f"--session s --deposit {value} --budget={value}")
    assert (options.deposit, options.budget) == (value, value)
    assert "deposit" not in options.inference_options() and "budget" not in options.inference_options()
