"""%%fabstir and %fabstir driven through a real IPython shell against scripted hosts on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pandas as pd
import pytest
from traitlets.config import Config

from _hosts import CountingBackend, GatedBackend
from fabstir_jupyter.errors import Cancelled, FabstirError
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text
from fabstir_jupyter.inference import InferenceResult, InferenceStream
from fabstir_jupyter.local import HostProcess
from fabstir_jupyter.notebook import magics as magics_module
from fabstir_jupyter.notebook.magics import FabstirMagics
from fabstir_jupyter.notebook.output import TextOutput
from fabstir_jupyter.notebook.tables import HOST_COLUMNS, JOB_COLUMNS

from .conftest import loop_thread_alive, wait_until

PROMPT = "Tell me about rivers"


def cell(ip, line: str, body: str = PROMPT):
    """Run one %%fabstir cell; return what the magic returned."""
    return ip.run_cell_magic("fabstir", line, body)


def stream_options(monkeypatch) -> list:
    """Record the resolved InferenceOptions of every stream the magic creates."""
    seen = []
    original = InferenceStream.__init__

    def spy(self, manager, prompt, options, **kwargs):
        seen.append((prompt, options))
        original(self, manager, prompt, options, **kwargs)

    monkeypatch.setattr(InferenceStream, "__init__", spy)
    return seen


def one_line_error(capsys) -> str:
    """What the last failed cell printed (stdout and stderr), which must be exactly one line with no
    traceback."""
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert shown.count("\n") == 1 and "Traceback" not in shown, shown
    return shown.strip()


def failing(ip, source: str) -> BaseException:
    """Run ``source`` as a cell that must fail, as a notebook runs it; return its exception."""
    result = ip.run_cell(source)
    assert not result.success, "the cell did not fail"
    error = result.error_in_exec or result.error_before_exec
    assert error is not None
    return error


def failing_cell(ip, line: str, body: str = PROMPT) -> BaseException:
    """Run a ``%%fabstir`` cell that must fail; return its exception."""
    return failing(ip, f"%%fabstir {line}\n{body}")


# --------------------------------------------------------------------------- loading


def test_load_ext_registers_the_line_and_cell_magic(make_shell):
    """%load_ext fabstir_jupyter registers %fabstir and %%fabstir and a %config-able object."""
    ip = make_shell()
    assert ip.find_line_magic("fabstir") is not None and ip.find_cell_magic("fabstir") is not None
    assert any(isinstance(c, FabstirMagics) for c in ip.configurables)


def test_loading_the_extension_stays_cheap():
    """%load_ext imports neither pandas, websockets nor the widgets, and starts no thread itself (the
    network starts in the background once the loading cell ends: test_startup.py)."""
    code = (
        "import sys, threading\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "from traitlets.config import Config\n"
        "c = Config(); c.HistoryManager.hist_file = ':memory:'\n"
        "ip = InteractiveShell.instance(config=c)\n"
        "ip.run_line_magic('load_ext', 'fabstir_jupyter')\n"
        "print(','.join(sorted(sys.modules)))\n"
        "print(','.join(t.name for t in threading.enumerate()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules, threads = out.strip().split("\n")
    loaded = set(modules.split(","))
    assert "fabstir_jupyter.notebook.magics" in loaded
    assert not {"pandas", "websockets", "httpx", "fabstir_jupyter.notebook.widgets", "anywidget"} & loaded
    assert "fabstir-notebook-loop" not in threads


def test_cell_magic_help_is_the_short_usage_once(make_shell):
    """%%fabstir? shows the short usage once: every option named, one line per command, where the
    details are; lines fit 88 columns (the whole help used to be ~1 400 px of text, shown twice)."""
    ip = make_shell()
    doc = ip.find_cell_magic("fabstir").__doc__
    for text in ("--model", "--max-tokens", "--temperature", "--top-p", "--stop", "--seed", "--host", "--session",
                 "--mode", "--format", "--out", "--background", "--no-interpolate", "--network", "--deposit",
                 "--budget", "%fabstir help paying", "{name.attr}",
                 "%fabstir help OPTION", "%fabstir help COMMAND"):
        assert text in doc
    commands = ("hosts", "models", "usage", "sessions", "end NAME", "status", "cancel", "network [NAME]",
                "config [KEY [VALUE]]", "wallet", "jobs", "manager", "help [TOPIC]")
    lines = doc.splitlines()
    for command in commands:
        assert sum(line.startswith(f"  {command}  ") for line in lines) == 1, command
    assert len(lines) <= 32 and max(len(line) for line in lines) <= 88
    assert "%%fabstir end" not in doc and "usage:" not in doc  # no argparse dump, no magic that does not exist
    inspected = ip.object_inspect_text("%%fabstir")
    assert inspected.count("%fabstir COMMAND:") == 1


# --------------------------------------------------------------------------- %%fabstir


def test_cell_streams_the_answer_and_returns_nothing(ip, capsys):
    """The answer streams to stdout with a status line; the cell returns None (no duplicate output).
    A static network has nothing to start, so no network line is shown."""
    assert cell(ip, "--max-tokens 10") is None
    out = capsys.readouterr().out
    expected = scripted_text(PROMPT, 10)
    assert out.startswith(expected)
    assert "[fabstir] host http://127.0.0.1:" in out and "model scripted-1" in out and "10 tokens" in out
    assert "network ready" not in out


def test_out_stores_the_result_object(ip):
    """--out VAR holds the InferenceResult with text, usage, host, model and ttft."""
    cell(ip, "--max-tokens 6 --out answer")
    answer = ip.user_ns["answer"]
    assert isinstance(answer, InferenceResult)
    assert answer.text == str(answer) == scripted_text(PROMPT, 6)
    assert answer.usage.received_tokens == 6 and answer.finish_reason == "length"
    assert answer.model == "scripted-1" and answer.ttft is not None and answer.host.startswith("http://127.0.0.1")


def test_sampling_options_reach_the_request(ip, monkeypatch):
    """--model, --max-tokens, --temperature, --top-p, --stop and --seed become the request's options."""
    seen = stream_options(monkeypatch)
    cell(ip, "-m scripted-1 --max-tokens 9 --temperature 0.3 --top-p 0.8 --stop 'zzz' --stop qqq --seed 5 --out r")
    (_, options), = seen
    assert (options.model, options.max_tokens, options.temperature, options.top_p, options.seed) == \
        ("scripted-1", 9, 0.3, 0.8, 5)
    assert options.stop_sequences == ("zzz", "qqq")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 9, seed=5)


def test_stop_sequence_cuts_the_answer(ip):
    """--stop ends the answer right before the stop text."""
    full = scripted_text(PROMPT, 20)
    stop = full.split(" ")[4]
    cell(ip, f"--max-tokens 20 --stop {stop} --out r")
    assert ip.user_ns["r"].text == full[: full.index(stop)]
    assert ip.user_ns["r"].finish_reason == "stop"


def test_seed_changes_the_answer_reproducibly(ip):
    """--seed gives the scripted answer for that seed, twice the same."""
    cell(ip, "--max-tokens 5 --seed 11 --out a")
    cell(ip, "--max-tokens 5 --seed 11 --out b")
    assert ip.user_ns["a"].text == ip.user_ns["b"].text == scripted_text(PROMPT, 5, seed=11)
    assert ip.user_ns["a"].text != scripted_text(PROMPT, 5)


def test_host_option_pins_a_host(make_shell, start_host):
    """--host sends the request to that host, by URL."""
    first, second = start_host(), start_host()
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{first.ws_url!r}, {second.ws_url!r}]")
    for _ in range(2):
        cell(ip, f"--max-tokens 3 --host {second.http_url} --out r")
        assert ip.user_ns["r"].host == second.http_url


def test_host_option_accepts_host_and_port(ip, host):
    """--host also takes the bare host:port form."""
    cell(ip, f"--max-tokens 2 --host 127.0.0.1:{host.port} --out r")
    assert ip.user_ns["r"].host == host.http_url and ip.user_ns["r"].text == scripted_text(PROMPT, 2)


def test_sessions_continue_across_cells(ip, capsys):
    """--session NAME creates a conversation in one cell and continues it in the next."""
    cell(ip, "--session chat --max-tokens 4 --out one", "first question")
    cell(ip, "--session chat --max-tokens 4 --out two", "second question")
    assert ip.user_ns["one"].text == scripted_text("first question", 4)
    assert ip.user_ns["two"].text == scripted_text("second question", 4)
    frame = ip.run_line_magic("fabstir", "sessions")
    assert list(frame["name"]) == ["chat"] and list(frame["turns"]) == [2] and list(frame["messages"]) == [4]
    assert ip.run_line_magic("fabstir", "end chat") is None  # unpaid: no receipt
    assert "ended session 'chat' after 2 turns" in capsys.readouterr().out
    assert ip.run_line_magic("fabstir", "sessions").empty


def test_ending_a_session_cancels_its_background_turn(make_shell, start_host, capsys):
    """%fabstir end NAME while that session's --background cell streams: the turn is cancelled on its
    host (no failover to the spare host), --out keeps the partial answer, and no usage row follows."""
    slow, spare = start_host(backend=ScriptedBackend(token_rate=50)), start_host()
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}, {spare.ws_url!r}]")
    cell(ip, f"--session s --host {slow.http_url} --background --max-tokens 1000 --out partial", "a long story")
    run = ip.magics_manager.registry["FabstirMagics"].last_background
    assert wait_until(lambda: len(run.text.split()) >= 3)
    session_id = magics_module.get_bridge().sessions["s"].session.id
    ip.run_line_magic("fabstir", "end s")
    captured = capsys.readouterr()
    assert "[fabstir] ended session 's' after 0 turns (1 turn cancelled)" in captured.out
    assert run.wait(5) and isinstance(run.error, Cancelled)
    partial = ip.user_ns["partial"]
    assert partial.finish_reason == "cancelled" and partial.error is run.error
    assert partial.text == run.text == scripted_text("a long story", partial.usage.received_tokens)
    assert wait_until(lambda: slow.active_streams == 0)
    rows = ip.run_line_magic("fabstir", "usage")
    rows = rows[rows["session_id"] == session_id]
    assert list(rows["finish_reason"]) == ["cancelled"] and list(rows["host"]) == [slow.http_url]
    assert "s" not in magics_module.get_bridge().sessions


def test_mode_reaches_host_selection(ip, capsys, monkeypatch):
    """--mode cheapest is passed to the request, and so to host selection."""
    from fabstir_jupyter.hosts import discovery

    modes = []
    original = discovery.HostManager.select_best_host

    async def spy(self, requirements=None, *, mode="auto", exclude=()):
        modes.append(mode)
        return await original(self, requirements, mode=mode, exclude=exclude)

    monkeypatch.setattr(discovery.HostManager, "select_best_host", spy)
    cell(ip, "--max-tokens 2 --mode cheapest")
    assert "not supported" not in capsys.readouterr().out
    assert modes[-1] == "cheapest"


@pytest.mark.parametrize("fmt", ["markdown", "text", "code", "json"])
def test_format_selects_the_rendering(ip, monkeypatch, fmt):
    """--format reaches the output; the default comes from FabstirMagics.default_format."""
    made = []
    original = magics_module.make_output

    def spy(format, background, **kwargs):
        made.append(format)
        return original(format, background, **kwargs)

    monkeypatch.setattr(magics_module, "make_output", spy)
    cell(ip, f"--max-tokens 2 --format {fmt}")
    ip.run_line_magic("config", f"FabstirMagics.default_format = {fmt!r}")
    cell(ip, "--max-tokens 2")
    assert made == [fmt, fmt]


def test_json_format_with_a_non_json_answer_still_shows_the_text(ip, capsys, monkeypatch):
    """--format json on an answer that is not JSON keeps the streamed text and does not fail."""
    monkeypatch.setattr(magics_module, "make_output",
                        lambda format, background, **kw: TextOutput(format, rich=False))
    cell(ip, "--max-tokens 3 --format json")
    captured = capsys.readouterr()
    assert captured.out.startswith(scripted_text(PROMPT, 3)) and "[fabstir] host" in captured.out
    assert captured.err == ""


def test_interpolation_through_the_magic(ip):
    """{name}, {obj.attr} and {d[key]} come from the user namespace; --no-interpolate sends text as is."""
    ip.run_cell("topic = 'rivers'\nclass Doc: title = 'Dune'\ndoc = Doc()\nd = {'k': 'v'}")
    cell(ip, "--max-tokens 4 --out a", "Tell me about {topic} in {doc.title} {d[k]} {missing} {{topic}}")
    assert ip.user_ns["a"].text == scripted_text("Tell me about rivers in Dune v {missing} {topic}", 4)
    cell(ip, "--max-tokens 4 --no-interpolate --out b", "Tell me about {topic}")
    assert ip.user_ns["b"].text == scripted_text("Tell me about {topic}", 4)


def test_network_option_applies_to_one_cell(ip, capsys):
    """--network base-sepolia refuses inference for that cell only; the next cell uses the default."""
    failing_cell(ip, "--network base-sepolia --max-tokens 2")
    assert one_line_error(capsys).startswith("FabstirError [PAYMENT_REQUIRED]:")
    cell(ip, "--max-tokens 2 --out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 2)


def test_network_option_naming_the_default_reuses_its_sdk(ip):
    """--network with the network already in use does not build a second SDK."""
    cell(ip, "--network static --max-tokens 2")
    cell(ip, "--max-tokens 2")
    assert len(magics_module.get_bridge()._sdks) == 1
    assert len(ip.run_line_magic("fabstir", "usage")) == 2


def test_background_returns_at_once_and_stores_the_result(make_shell, start_host):
    """--background returns before the stream ends; --out is set when it finishes."""
    gated = GatedBackend(token_rate=100)
    slow = start_host(backend=gated)
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}]")
    assert cell(ip, "--background --max-tokens 30 --out later") is None
    magics = ip.magics_manager.registry["FabstirMagics"]
    run = magics.last_background
    assert not run.done() and "later" not in ip.user_ns  # the cell returned while the host held the answer
    gated.gate.set()
    assert run.wait(5) and not run.cancelled()
    assert ip.user_ns["later"].text == scripted_text(PROMPT, 30) == run.text


def test_cancel_stops_background_streams(make_shell, start_host, capsys):
    """%fabstir cancel stops a running background stream; the host stops generating."""
    slow = start_host(backend=ScriptedBackend(token_rate=50))
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}]")
    cell(ip, "--background --max-tokens 1000 --out never")
    run = ip.magics_manager.registry["FabstirMagics"].last_background
    assert wait_until(lambda: len(run.text) > 0)
    ip.run_line_magic("fabstir", "cancel")
    assert "cancelled 1 background stream" in capsys.readouterr().out
    assert run.done() and run.cancelled()
    assert wait_until(lambda: slow.active_streams == 0)
    assert "never" not in ip.user_ns


# --------------------------------------------------------------------------- errors


def test_unknown_model_raises_one_line_with_the_code(ip, capsys):
    """An unknown model fails the cell (it raises) and shows 'FabstirError [MODEL_NOT_AVAILABLE]: ...'
    once: one line, no traceback, nothing else on stderr (the cell used to print it and not raise)."""
    error = failing_cell(ip, "--model no-such-model")
    assert isinstance(error, FabstirError) and error.code == "MODEL_NOT_AVAILABLE"
    line = one_line_error(capsys)
    assert line.startswith("FabstirError [MODEL_NOT_AVAILABLE]:") and "scripted-1" in line


def test_encryption_option_reaches_the_request_and_required_refuses_a_keyless_host(ip, capsys, monkeypatch):
    """--encryption off|auto|required becomes the request's encryption; the scripted host here publishes
    no key, so "required" is one ENCRYPTION_NOT_SUPPORTED line and "off" streams in clear."""
    seen = stream_options(monkeypatch)
    cell(ip, "--encryption off --max-tokens 3 --out clear")
    assert seen[-1][1].encryption is False and ip.user_ns["clear"].encrypted is False
    capsys.readouterr()  # the streamed answer
    error = failing_cell(ip, "--encryption required --max-tokens 3")
    assert seen[-1][1].encryption == "required" and error.code == "ENCRYPTION_NOT_SUPPORTED"
    line = one_line_error(capsys)
    assert line.startswith("FabstirError [ENCRYPTION_NOT_SUPPORTED]:") and "encryption='required'" in line


def test_a_failed_cell_stops_the_cells_after_it(ip, capsys):
    """A cell that fails ends with an error, so a run of cells stops there (Run All, nbconvert)."""
    ip.run_cell("ran = []")
    sources = ["ran.append(1)", "%%fabstir --model no-such-model\nhi", "ran.append(3)"]
    for source in sources:
        if not ip.run_cell(source).success:
            break
    assert ip.user_ns["ran"] == [1]
    assert one_line_error(capsys).startswith("FabstirError [MODEL_NOT_AVAILABLE]:")


def test_empty_prompt_is_one_line(ip, capsys):
    """An empty cell is INVALID_PROMPT, refused before any request."""
    failing_cell(ip, "", "\n  \n")
    assert one_line_error(capsys).startswith("FabstirError [INVALID_PROMPT]:")


def test_bad_options_are_one_usage_line(ip, capsys):
    """A parser error is IPython's UsageError: one line, the cell fails, and nothing is sent."""
    from IPython.core.error import UsageError

    assert isinstance(failing_cell(ip, "--max-tokens lots"), UsageError)
    line = one_line_error(capsys)
    assert line == ("UsageError: %%fabstir: argument --max-tokens: expected a positive integer, not 'lots' "
                    "(see %fabstir help)")


def test_hint_is_shown_when_the_error_has_one(make_shell, capsys):
    """A static network without hosts names the fix in the hint."""
    ip = make_shell()
    failing(ip, "%fabstir network static")
    line = one_line_error(capsys)
    assert line.startswith("FabstirError [INVALID_OPTIONS]: network 'static' needs hosts")
    assert ip.magics_manager.registry["FabstirMagics"].network is None  # the switch was not kept


def test_unreachable_host_is_one_line(make_shell, capsys):
    """No reachable host gives NO_HOSTS_AVAILABLE in one line."""
    ip = make_shell()
    ip.run_line_magic("config", "FabstirMagics.hosts = ['ws://127.0.0.1:9/v1/ws']")
    failing_cell(ip, "--max-tokens 2")
    assert one_line_error(capsys).startswith("FabstirError [NO_HOSTS_AVAILABLE]:")


# --------------------------------------------------------------------------- interrupt


class InterruptingOutput(TextOutput):
    """A text output that raises KeyboardInterrupt on the main thread after ``after`` appends."""

    def __init__(self, *args, after: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.after = after
        self.appends = 0
        self.threads = set()

    def append(self, text: str) -> None:
        self.threads.add(threading.current_thread().name)
        super().append(text)
        self.appends += 1
        if self.appends == self.after:
            raise KeyboardInterrupt


def test_keyboard_interrupt_cancels_the_stream_and_propagates(make_shell, start_host, monkeypatch):
    """Ctrl-C during a stream sends stream_cancel, marks the output cancelled, re-raises, and the kernel
    stays usable."""
    slow = start_host(backend=CountingBackend(token_rate=200))
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}]")
    sinks = []

    def make(format, background, **kwargs):
        sinks.append(InterruptingOutput(format, rich=False))
        return sinks[-1]

    monkeypatch.setattr(magics_module, "make_output", make)
    with pytest.raises(KeyboardInterrupt):
        cell(ip, "--max-tokens 2000 --out never")
    sink = sinks[0]
    assert sink.state == "cancelled" and sink.threads == {"MainThread"}
    assert wait_until(lambda: slow.active_streams == 0)
    assert 0 < slow.backend.tokens[0] < 2000  # the host stopped generating: the stream was cancelled there
    pool = magics_module.get_bridge().sdk().inference_manager.pool
    assert pool.stats() == {"idle": 1, "in_use": 0}  # stream_cancel drained the stream: the socket is reusable
    assert "never" not in ip.user_ns
    monkeypatch.undo()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}]")
    cell(ip, "--max-tokens 3 --out again")
    assert ip.user_ns["again"].text == scripted_text(PROMPT, 3)


def test_interrupt_in_a_session_keeps_the_conversation_usable(make_shell, start_host, monkeypatch):
    """A cancelled session turn stops the host stream; the session answers the next turn."""
    slow = start_host(backend=ScriptedBackend(token_rate=200))
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}]")
    monkeypatch.setattr(magics_module, "make_output",
                        lambda format, background, **kw: InterruptingOutput(format, rich=False, after=2))
    with pytest.raises(KeyboardInterrupt):
        cell(ip, "--session s --max-tokens 2000", "long question")
    assert wait_until(lambda: slow.active_streams == 0, 3.0)
    session = magics_module.get_bridge().sessions["s"].session
    pinned = magics_module.get_bridge().sdk().inference_manager.sessions.pinned_socket(session.id)
    assert pinned is not None and pinned.is_open  # cancel is not close: the pinned socket stays
    monkeypatch.setattr(magics_module, "make_output",
                        lambda format, background, **kw: TextOutput(format, rich=False))
    cell(ip, "--session s --max-tokens 3 --out r", "short question")
    assert ip.user_ns["r"].text == scripted_text("short question", 3)


# --------------------------------------------------------------------------- a host killed mid-stream


class KillingOutput(TextOutput):
    """A text output that SIGKILLs the process ``pid()`` names after ``after`` appends."""

    def __init__(self, *args, pid, after: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.pid, self.after, self.appends = pid, after, 0

    def append(self, text: str) -> None:
        super().append(text)
        if text:
            self.appends += 1
            if self.appends == self.after:
                os.kill(self.pid(), signal.SIGKILL)


def reaped(pid: int) -> bool:
    """Whether ``pid`` has exited and been reaped (a zombie keeps its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def test_killing_the_only_host_keeps_the_partial_answer_and_a_later_cell_works(make_shell, monkeypatch, capsys):
    """The only (static) host SIGKILLed mid-stream: one error line, --out holds the partial answer and
    the error; once a host listens on that URL again, the next cell is answered."""
    host = HostProcess("scripted", ["--token-rate", "100"], start_timeout=30)
    host.start()
    try:
        ip = make_shell()
        ip.run_line_magic("config", f"FabstirMagics.hosts = [{host.url!r}]")
        killed = host.pid
        monkeypatch.setattr(magics_module, "make_output",
                            lambda format, background, **kw: KillingOutput(format, rich=False, pid=lambda: killed))
        failing_cell(ip, "--max-tokens 500 --out partial")
        captured = capsys.readouterr()
        _streamed, error_line = captured.out.rstrip("\n").rsplit("\n", 1)  # the partial answer, then the error
        assert error_line.startswith("FabstirError [") and "Traceback" not in captured.out + captured.err
        assert captured.err == ""
        partial = ip.user_ns["partial"]
        assert partial.error is not None and partial.finish_reason == "error"
        assert partial.text == partial.error.partial_text
        assert len(partial.text.split()) >= 5 and partial.text == scripted_text(PROMPT, len(partial.text.split()))
        assert wait_until(lambda: reaped(killed), 10.0)
        port = host.url.split(":")[2].split("/")[0]
        host.stop()
        host = HostProcess("scripted", ["--port", port], start_timeout=30)  # back on the same URL
        host.start()
        monkeypatch.undo()
        cell(ip, "--max-tokens 4 --out again")
        assert ip.user_ns["again"].text == scripted_text(PROMPT, 4)
    finally:
        host.stop()


def test_a_local_host_killed_mid_stream_is_restarted_and_the_next_cell_works(make_shell, monkeypatch, isolated_env):
    """network local: SIGKILL its only host mid-stream; the process is reaped and restarted on the same
    URL, the cell keeps whatever it streamed (complete if the answer continued on the restarted
    host, else partial with the error), and the next cell is answered by the restarted host."""
    config_dir = isolated_env / "config" / "fabstir-jupyter"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps({"local_host_args": ["--token-rate", "100"]}))
    ip = make_shell()
    ip.run_line_magic("fabstir", "config local_backend scripted")
    ip.run_line_magic("fabstir", "network local")
    bridge = magics_module.get_bridge()
    cell(ip, "--max-tokens 2 --out warm")
    (process,) = bridge.sdk()._processes
    killed, url = process.pid, process.url
    events: list[str] = []
    process.add_listener(lambda _process, event: events.append(event))
    monkeypatch.setattr(magics_module, "make_output",
                        lambda format, background, **kw: KillingOutput(format, rich=False, pid=lambda: killed))
    try:
        cell(ip, "--max-tokens 300 --out first")
    except FabstirError as exc:  # the restarted host was not back in time: the cell fails, once
        raised: FabstirError | None = exc
    else:
        raised = None
    first = ip.user_ns["first"]
    assert len(first.text.split()) >= 5 and first.text == scripted_text(PROMPT, len(first.text.split()))
    if first.error is None:
        assert raised is None
        assert first.text == scripted_text(PROMPT, 300)  # continued on the restarted host, nothing lost
    else:
        assert raised is not None and raised.code == first.error.code
        assert first.error.partial_text == first.text
    assert wait_until(lambda: events == ["down", "up"], 30.0), events  # restarted, and listening again
    assert process.restarts == 1 and process.running
    assert reaped(killed) and process.url == url and process.pid != killed
    monkeypatch.undo()
    cell(ip, "--max-tokens 4 --out again")
    assert ip.user_ns["again"].text == scripted_text(PROMPT, 4)
    frame = ip.run_line_magic("fabstir", "hosts --frame")
    assert list(frame["status"]) == ["ok"]


# --------------------------------------------------------------------------- line commands


def test_hosts_returns_a_frame_of_hosts(make_shell, start_host):
    """%fabstir hosts (no widget front end) is a DataFrame with one row per host and the documented columns."""
    hosts = [start_host(), start_host()]
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = {[h.ws_url for h in hosts]!r}")
    cell(ip, f"--max-tokens 5 --host {hosts[0].ws_url}")
    frame = ip.run_line_magic("fabstir", "hosts")
    assert isinstance(frame, pd.DataFrame) and tuple(frame.columns) == HOST_COLUMNS
    assert sorted(frame["url"]) == sorted(h.http_url for h in hosts)
    row = frame.set_index("url").loc[hosts[0].http_url]
    assert (row["models"], row["status"], row["requests"], row["tokens"], row["failed"], row["retried"]) == \
        ("scripted-1", "ok", 1, 5, 0, 0)
    assert row["latency_ms"] > 0
    assert len(ip.run_line_magic("fabstir", "hosts --refresh --frame")) == 2


def test_usage_returns_the_ledger(ip):
    """%fabstir usage is one row per request; --by summarises."""
    cell(ip, "--max-tokens 3")
    cell(ip, "--max-tokens 4")
    frame = ip.run_line_magic("fabstir", "usage")
    assert list(frame["received_tokens"]) == [3, 4] and set(frame["model"]) == {"scripted-1"}
    assert list(ip.run_line_magic("fabstir", "usage --limit 1")["received_tokens"]) == [4]
    summary = ip.run_line_magic("fabstir", "usage --by model")
    assert summary.loc["scripted-1", "requests"] == 2 and summary.loc["scripted-1", "received_tokens"] == 7


def test_usage_and_hosts_show_this_kernels_records_unless_all(make_shell, host, tmp_path):
    """The default ledger is shared by every kernel: %fabstir usage and the hosts table count this
    kernel's records; --all counts the records another kernel wrote to the same file."""
    from fabstir_jupyter.usage import UsageLedger, UsageRecord

    path = tmp_path / "shared.sqlite3"
    with UsageLedger(path) as other:  # another kernel's request, on a host this kernel never used
        other.record(UsageRecord(time=1.0, request_id="theirs", host="http://other-kernel:9", model="scripted-1",
                                 received_tokens=9, client_id="another-kernel"))
        other.record(UsageRecord(time=1.0, request_id="theirs-too", host=host.http_url, model="scripted-1",
                                 received_tokens=50, client_id="another-kernel"))
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.usage_db = {str(path)!r}")
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{host.ws_url!r}]")
    cell(ip, "--max-tokens 3")
    assert list(ip.run_line_magic("fabstir", "usage")["received_tokens"]) == [3]
    assert sorted(ip.run_line_magic("fabstir", "usage --all")["received_tokens"]) == [3, 9, 50]
    assert list(ip.run_line_magic("fabstir", "usage --by host").index) == [host.http_url]
    assert set(ip.run_line_magic("fabstir", "usage --by host --all").index) == {host.http_url,
                                                                                "http://other-kernel:9"}
    mine = ip.run_line_magic("fabstir", "hosts --frame").set_index("url").loc[host.http_url]
    everyone = ip.run_line_magic("fabstir", "hosts --frame --all").set_index("url").loc[host.http_url]
    assert (mine["requests"], mine["tokens"]) == (1, 3) and (everyone["requests"], everyone["tokens"]) == (2, 53)


def test_usage_before_any_request_is_empty_and_starts_nothing(make_shell, capsys):
    """%fabstir usage works before the first request, without starting hosts or the loop thread."""
    ip = make_shell()
    ip.run_line_magic("config", "FabstirMagics.local_backend = 'scripted'")
    frame = ip.run_line_magic("fabstir", "usage")
    assert frame.empty and "received_tokens" in frame.columns
    assert not loop_thread_alive()
    failing(ip, "%fabstir usage --by colour")
    assert "cannot group usage by 'colour'" in one_line_error(capsys)


def test_models_lists_what_hosts_serve(ip):
    """%fabstir models is one row per model with its hosts."""
    frame = ip.run_line_magic("fabstir", "models")
    assert list(frame["model"]) == ["scripted-1"] and list(frame["hosts"]) == [1]


def test_a_plaintext_host_shows_the_open_lock_and_no_job(ip, capsys):
    """The scripted host publishes no key, so the answer goes in clear: the status line says
    🔓 plaintext; nothing is paid on a static network, so no job and no estimate."""
    cell(ip, "--max-tokens 3 --out r")
    status = capsys.readouterr().out.splitlines()[-1]
    assert status.startswith("[fabstir] host ") and "| 🔓 plaintext |" in status
    assert "job" not in status and "est." not in status
    assert ip.user_ns["r"].encrypted is False and ip.user_ns["r"].job_ids == ()


def test_session_terms_on_an_unpaid_network_are_one_coded_line(ip, capsys):
    """--deposit on a network that pays nothing is the Python API's INVALID_OPTIONS, shown once; no
    session is made."""
    failing_cell(ip, "--session s --deposit 1 --max-tokens 2")
    assert one_line_error(capsys) == ("FabstirError [INVALID_OPTIONS]: deposit is for paid networks; network static "
                                      "is not paid")
    assert "s" not in magics_module.get_bridge().sessions


def test_wallet_on_a_static_network_says_nothing_is_paid(ip):
    """%fabstir wallet on a list of hosts: no wallet, and why."""
    from fabstir_jupyter.notebook.paying import WalletSummary

    wallet = ip.run_line_magic("fabstir", "wallet")
    assert isinstance(wallet, WalletSummary) and not wallet.paid and wallet.address is None
    assert repr(wallet) == ("[fabstir] no wallet on network static: a list of hosts with no chain, so nothing is "
                            "paid")
    assert "nothing is paid" in wallet._repr_html_() and wallet.jobs_frame.empty
    jobs = ip.run_line_magic("fabstir", "jobs")
    assert jobs.empty and list(jobs.columns) == list(JOB_COLUMNS)


def test_wallet_on_a_registry_network_says_what_to_set(make_shell, monkeypatch):
    """%fabstir wallet on base-sepolia without a key names the variables to set; with a key but no
    budget, it shows the address (never the key) and asks for FABSTIR_BUDGET. Nothing is read from
    the (unreachable) RPC endpoint for it."""
    monkeypatch.setenv("FABSTIR_RPC_URL", "http://127.0.0.1:9")
    ip = make_shell()
    ip.run_line_magic("config", "FabstirMagics.network = 'base-sepolia'")
    wallet = ip.run_line_magic("fabstir", "wallet")
    assert not wallet.paid and wallet.address is None
    assert "FABSTIR_PRIVATE_KEY" in repr(wallet) and "FABSTIR_BUDGET" in repr(wallet)
    assert "PAYMENT_REQUIRED" in repr(wallet)
    key = "0x" + "5a" * 32
    monkeypatch.setenv("FABSTIR_PRIVATE_KEY", key)
    magics_module.close_bridge()  # the SDK reads the key when it is made
    wallet = ip.run_line_magic("fabstir", "wallet")
    from fabstir_jupyter.wallet import Wallet

    address = Wallet.from_hex(key).address
    assert wallet.address == address and wallet.source == "$FABSTIR_PRIVATE_KEY" and not wallet.paid
    assert repr(wallet).startswith(f"[fabstir] wallet {address} ($FABSTIR_PRIVATE_KEY) on base-sepolia: no budget")
    for text in (repr(wallet), wallet._repr_html_()):
        assert key[2:] not in text.lower()


def test_wallet_on_a_free_local_network_says_so(make_shell, monkeypatch):
    """FABSTIR_LOCAL_PAID=0: the local network starts free hosts; %fabstir wallet says nothing is paid,
    and a cell's answer carries no job."""
    monkeypatch.setenv("FABSTIR_LOCAL_PAID", "0")
    ip = make_shell()
    ip.run_line_magic("fabstir", "config local_backend scripted")
    wallet = ip.run_line_magic("fabstir", "wallet")
    assert not wallet.paid and wallet.address is None
    assert repr(wallet) == ("[fabstir] no wallet on network local: its hosts run free (FABSTIR_LOCAL_PAID=0, or "
                            "FabstirSDK(paid=False)), so nothing is paid")
    cell(ip, "--max-tokens 3 --out r")
    assert ip.user_ns["r"].job_ids == () and ip.user_ns["r"].text == scripted_text(PROMPT, 3)


def test_end_unknown_session_is_one_line(ip, capsys):
    """Ending a session that does not exist is SESSION_NOT_FOUND."""
    failing(ip, "%fabstir end nobody")
    assert one_line_error(capsys).startswith("FabstirError [SESSION_NOT_FOUND]: no session named 'nobody'")


def test_network_shows_and_switches(ip, capsys):
    """%fabstir network shows the network; %fabstir network NAME switches it (SDK recreated)."""
    ip.run_line_magic("fabstir", "network")
    assert capsys.readouterr().out == "[fabstir] network static: 1 static host(s)\n"
    bridge = magics_module.get_bridge()
    old = bridge.sdk()
    ip.run_line_magic("fabstir", "network base-sepolia")
    assert "network base-sepolia" in capsys.readouterr().out
    assert bridge.sdk() is not old and bridge.sdk().settings.network == "base-sepolia"
    failing_cell(ip, "--max-tokens 2")
    assert one_line_error(capsys).startswith("FabstirError [PAYMENT_REQUIRED]")
    ip.run_line_magic("fabstir", "network static")
    cell(ip, "--max-tokens 2 --out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 2)


def test_config_shows_and_sets_settings(ip, capsys):
    """%fabstir config lists every setting with its source; KEY VALUE sets it like %config."""
    ip.run_line_magic("fabstir", "config")
    out = capsys.readouterr().out
    for key in ("default_model", "max_tokens", "network", "hosts", "local_backend", "update_interval",
                "default_format", "usage_db"):
        assert f"{key} " in out
    ip.run_line_magic("fabstir", "config max_tokens 4")
    assert capsys.readouterr().out == "max_tokens = 4  (%config)\n"
    cell(ip, "--out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 4)
    ip.run_line_magic("fabstir", "config max_tokens none")
    ip.run_line_magic("fabstir", "config default_format code")
    assert ip.magics_manager.registry["FabstirMagics"].default_format == "code"
    capsys.readouterr()
    failing(ip, "%fabstir config default_format html")
    assert one_line_error(capsys).startswith("UsageError: %fabstir config default_format:")
    failing(ip, "%fabstir config update_interval -1")
    assert "update_interval must be between 0 and 10" in one_line_error(capsys)


def test_help_shows_the_short_usage(make_shell, capsys):
    """%fabstir help (and a bare %fabstir) show the short usage; in a notebook it is a block that
    scrolls instead of wrapping lines mid-word."""
    ip = make_shell()
    ip.run_line_magic("fabstir", "help")
    out = capsys.readouterr().out
    assert out == ip.find_line_magic("fabstir").__doc__ + "\n"
    ip.run_line_magic("fabstir", "")
    assert capsys.readouterr().out == out
    shown = []
    ip.display_formatter.formatters["text/html"].for_type_by_name(
        "fabstir_jupyter.notebook.help", "HelpText", lambda h: shown.append(h._repr_html_()))
    ip.run_line_magic("fabstir", "help")
    html, = shown
    assert html.startswith('<pre class="fabstir-help" style="white-space: pre; overflow-x: auto;')
    assert "&lt;" not in out and "%fabstir help OPTION" in html


@pytest.mark.parametrize("topic, says", [
    ("--model", ["%%fabstir --model MODEL   (also -m MODEL)", "repo/file or repo:file"]),
    ("max-tokens", ["%%fabstir --max-tokens N", "FabstirMagics.max_tokens"]),
    ("-m", ["%%fabstir --model MODEL"]),
    ("mode", ["one of: auto, cheapest, fastest, reliable"]),
    ("hosts", ["%fabstir hosts [--refresh] [--frame] [--all]", "--refresh  discover and probe every host again"]),
    ("end", ["%fabstir end NAME"]),
    ("status", ["%fabstir status", "--background runs"]),
    ("settings", ["Precedence: the cell's options, then %config", "FABSTIR_NO_WIDGETS=1"]),
])
def test_help_topic_gives_the_details(make_shell, capsys, topic, says):
    """%fabstir help OPTION / COMMAND / settings shows the details, wrapped at word boundaries."""
    ip = make_shell()
    ip.run_line_magic("fabstir", f"help {topic}")
    out = capsys.readouterr().out
    for text in says:
        assert text in out, out
    assert max(len(line) for line in out.splitlines()) <= 88


def test_help_all_and_an_unknown_topic(make_shell, capsys):
    """%fabstir help all has every option and command; an unknown topic is one UsageError line."""
    ip = make_shell()
    ip.run_line_magic("fabstir", "help all")
    out = capsys.readouterr().out
    for text in ("--no-interpolate", "%fabstir manager", "%fabstir config [KEY] [VALUE]", "Environment:"):
        assert text in out
    failing(ip, "%fabstir help --colour")
    line = one_line_error(capsys)
    assert line.startswith("UsageError: %fabstir help: no option, command or topic '--colour'; choose one of")


def test_unknown_line_command_is_one_usage_line(make_shell, capsys):
    """A bad %fabstir command is one UsageError line, and the cell fails."""
    ip = make_shell()
    failing(ip, "%fabstir frobnicate")
    assert one_line_error(capsys).startswith("UsageError: %fabstir: argument COMMAND: invalid choice")


# --------------------------------------------------------------------------- settings precedence


def test_settings_precedence_option_then_config_then_env_then_file(ip, monkeypatch, isolated_env):
    """max_tokens: the cell option beats %config, which beats the environment, which beats the config file."""
    config_dir = isolated_env / "config" / "fabstir-jupyter"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps({"max_tokens": 2}))
    cell(ip, "--out r")
    assert ip.user_ns["r"].usage.received_tokens == 2
    monkeypatch.setenv("FABSTIR_MAX_TOKENS", "3")
    cell(ip, "--out r")
    assert ip.user_ns["r"].usage.received_tokens == 3
    ip.run_line_magic("config", "FabstirMagics.max_tokens = 4")
    cell(ip, "--out r")
    assert ip.user_ns["r"].usage.received_tokens == 4
    cell(ip, "--max-tokens 5 --out r")
    assert ip.user_ns["r"].usage.received_tokens == 5


def test_bad_settings_are_refused_when_set(ip, capsys, caplog):
    """%config and %fabstir config validate when set: max_tokens < 1, an empty usage_db and host
    entries that are not urls are refused where typed, and the previous values stay (they used to be
    accepted and fail a later cell)."""
    magics = ip.magics_manager.registry["FabstirMagics"]
    hosts = list(magics.hosts)
    ip.run_line_magic("config", "FabstirMagics.max_tokens = -5")
    ip.run_line_magic("config", "FabstirMagics.usage_db = ''")
    ip.run_line_magic("config", "FabstirMagics.hosts = ['not a url!!']")
    assert (magics.max_tokens, magics.usage_db, magics.hosts) == (None, ":memory:", hosts)
    logged = caplog.text
    assert "FabstirMagics.max_tokens must be an integer >= 1 (or None), not -5" in logged
    assert "FabstirMagics.usage_db must be a file path or ':memory:'" in logged
    assert "FabstirMagics.hosts: host url 'not a url!!' has an invalid host name" in logged
    capsys.readouterr()
    for line, says in (("max_tokens -7", "max_tokens must be an integer >= 1 (or None), not -7"),
                       ("max_tokens 0", "not 0"),
                       ("usage_db ''", "usage_db must be a file path"),
                       ("hosts not a url!!", "host url 'url!!' has an invalid host name")):
        failing(ip, f"%fabstir config {line}")
        error = one_line_error(capsys)
        assert error.startswith(f"UsageError: %fabstir config {line.split()[0]}: ") and says in error, error
    assert (magics.max_tokens, magics.usage_db, magics.hosts) == (None, ":memory:", hosts)
    cell(ip, "--max-tokens 2 --out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 2)


@pytest.mark.parametrize("where", ["env", "file"])
def test_bad_max_tokens_from_env_or_file_names_its_source(ip, monkeypatch, isolated_env, capsys, where):
    """FABSTIR_MAX_TOKENS=-3 or max_tokens 0 in the config file: the cell prints one coded line saying
    where the value came from, and nothing is sent."""
    if where == "env":
        monkeypatch.setenv("FABSTIR_MAX_TOKENS", "-3")
        source, shown = "$FABSTIR_MAX_TOKENS", "'-3'"
    else:
        config_dir = isolated_env / "config" / "fabstir-jupyter"
        config_dir.mkdir(parents=True)
        (config_dir / "config.json").write_text(json.dumps({"max_tokens": 0}))
        source, shown = f"config file {config_dir / 'config.json'}", "0"
    failing_cell(ip, "--out r")
    assert one_line_error(capsys) == (
        f"FabstirError [INVALID_OPTIONS]: max_tokens from {source} must be an integer >= 1, not {shown}")
    assert "r" not in ip.user_ns


def test_empty_usage_db_in_the_config_file_is_named(make_shell, host, isolated_env, capsys):
    """usage_db "" in config.json is refused naming the file (it used to fall back silently); a
    cell prints one coded line."""
    config_dir = isolated_env / "config" / "fabstir-jupyter"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps({"usage_db": ""}))
    config = Config()
    config.FabstirMagics.usage_db = None
    ip = make_shell(config)
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{host.ws_url!r}]")
    failing_cell(ip, "--max-tokens 2 --out r")
    error = one_line_error(capsys)
    assert error.startswith("FabstirError [INVALID_OPTIONS]: usage_db from config file ")
    assert str(config_dir / "config.json") in error and "not ''" in error
    assert "r" not in ip.user_ns


def test_bad_fabstir_hosts_is_one_line_naming_the_variable(make_shell, monkeypatch, capsys):
    """FABSTIR_HOSTS="not a url!!" is one coded line naming $FABSTIR_HOSTS and the value (it used to
    become the three hosts http://not, http://a and http://url!!)."""
    monkeypatch.setenv("FABSTIR_HOSTS", "not a url!!")
    ip = make_shell()
    failing_cell(ip, "--max-tokens 2")
    error = one_line_error(capsys)
    assert error.startswith("FabstirError [INVALID_OPTIONS]: $FABSTIR_HOSTS: ") and "'not a url!!'" in error
    assert "(hint: FABSTIR_HOSTS holds host urls" in error


def test_ipython_config_reaches_the_magics(make_shell, host):
    """Values from the shell's config (ipython_config.py) apply when the extension loads."""
    config = Config()
    config.FabstirMagics.max_tokens = 3
    config.FabstirMagics.hosts = [host.ws_url]
    config.FabstirMagics.default_model = "scripted-1"
    ip = make_shell(config)
    cell(ip, "--out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 3)


def test_default_model_from_config_is_used(ip, capsys):
    """%config FabstirMagics.default_model applies when the cell names no model."""
    ip.run_line_magic("config", "FabstirMagics.default_model = 'missing-model'")
    failing_cell(ip, "--max-tokens 2")
    assert "missing-model" in one_line_error(capsys)
    cell(ip, "--max-tokens 2 -m scripted-1 --out r")
    assert ip.user_ns["r"].model == "scripted-1"


# --------------------------------------------------------------------------- lifecycle


def test_unload_stops_the_loop_thread_and_removes_the_magics(ip):
    """%unload_ext closes the bridge: the loop thread stops and the magics are gone."""
    cell(ip, "--max-tokens 2")
    assert loop_thread_alive()
    ip.run_line_magic("unload_ext", "fabstir_jupyter")
    assert wait_until(lambda: not loop_thread_alive())
    assert ip.find_line_magic("fabstir") is None and ip.find_cell_magic("fabstir") is None
    assert not any(isinstance(c, FabstirMagics) for c in ip.configurables)


def test_reload_ext_gives_a_working_magic(ip):
    """%reload_ext closes the old bridge and the reloaded magic streams again."""
    cell(ip, "--max-tokens 2")
    old = magics_module.get_bridge()
    ip.run_line_magic("reload_ext", "fabstir_jupyter")
    assert old.closed
    ip.run_line_magic("config", "FabstirMagics.usage_db = ':memory:'")
    cell(ip, "--max-tokens 3 --out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 3)
    assert sum(isinstance(c, FabstirMagics) for c in ip.configurables) == 1


def test_local_network_starts_a_host_process_and_unload_stops_it(make_shell, capsys):
    """network local with the scripted backend starts a host process; unloading stops it."""
    ip = make_shell()
    ip.run_line_magic("fabstir", "config local_backend scripted")
    ip.run_line_magic("fabstir", "network local")
    assert "network local: 1 local scripted host(s)" in capsys.readouterr().out
    cell(ip, "--max-tokens 4 --out r")
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 4)
    processes = list(magics_module.get_bridge().sdk()._processes)
    assert len(processes) == 1 and processes[0]._proc.poll() is None
    proc = processes[0]._proc
    ip.run_line_magic("unload_ext", "fabstir_jupyter")
    assert proc.poll() is not None
    assert not loop_thread_alive()


# --------------------------------------------------------------------------- %fabstir manager and batches


def manager_of_streams(monkeypatch) -> list:
    """Record the InferenceManager behind every stream created from now on."""
    seen = []
    original = InferenceStream.__init__

    def spy(self, manager, prompt, options, **kwargs):
        seen.append(manager)
        original(self, manager, prompt, options, **kwargs)

    monkeypatch.setattr(InferenceStream, "__init__", spy)
    return seen


def test_manager_is_the_one_the_cells_use(ip, monkeypatch):
    """%fabstir manager returns the InferenceManager behind %%fabstir: same object, same usage ledger."""
    from fabstir_jupyter.inference import InferenceManager

    managers = manager_of_streams(monkeypatch)
    cell(ip, "--max-tokens 3 --out r")
    manager = ip.run_line_magic("fabstir", "manager")
    assert isinstance(manager, InferenceManager)
    assert managers == [manager]
    assert ip.run_line_magic("fabstir", "manager") is manager
    magics = ip.magics_manager.registry["FabstirMagics"]
    assert magics.bridge.sdk().inference_manager is manager
    assert list(manager.usage.to_frame()["request_id"].notna()) == [True]
    result = manager.infer(PROMPT, max_tokens=3)  # blocking, from this (the cell's) thread
    assert result.text == ip.user_ns["r"].text == scripted_text(PROMPT, 3)
    cell(ip, "--max-tokens 2")
    assert managers[-1] is manager and len(manager.usage.to_frame()) == 3


def test_manager_before_any_cell_starts_the_network(ip):
    """%fabstir manager works first thing in a notebook, and the cells then use that manager."""
    manager = ip.run_line_magic("fabstir", "manager")
    assert manager.infer("first", max_tokens=2).text == scripted_text("first", 2)
    cell(ip, "--max-tokens 2")
    assert len(manager.usage.to_frame()) == 2


def test_manager_batch_blocking_runs_on_the_test_hosts(make_shell, start_host):
    """batch_blocking through the magics' manager spreads prompts over the hosts, one row per prompt."""
    hosts = [start_host(), start_host()]
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = {[h.ws_url for h in hosts]!r}")
    manager = ip.run_line_magic("fabstir", "manager")
    prompts = [f"Name river number {i}" for i in range(8)]
    for mode in ("auto", "cheapest", "fastest", "reliable"):
        frame = manager.batch_blocking(prompts, max_tokens=4, mode=mode)
        assert list(frame["prompt"]) == prompts
        assert list(frame["text"]) == [scripted_text(p, 4) for p in prompts]
        assert frame["error"].isna().all() and (frame["tokens"] == 4).all()
        assert set(frame["host"]) <= {h.http_url for h in hosts}
    records = manager.usage.to_frame()
    assert records["error_code"].isna().sum() == 4 * len(prompts)  # HOST_BUSY retries add rows
    assert sum(h.active_streams for h in hosts) == 0


def test_batch_drives_a_progress_bar_to_the_end(ip):
    """batch_blocking(prompts, progress=bar.update) with bar = BatchProgress(len(prompts)) ends at done == total."""
    pytest.importorskip("anywidget")
    from fabstir_jupyter.notebook.widgets import BatchProgress

    manager = ip.run_line_magic("fabstir", "manager")
    prompts = [f"Prompt {i}" for i in range(6)] + [""]  # the empty prompt gives an error row, not an exception
    bar = BatchProgress(len(prompts), description="batch")
    calls = []
    update = bar.update

    def recording_update(done, total=None, errors=None):
        calls.append((done, total, errors))
        update(done, total, errors)

    frame = manager.batch_blocking(prompts, progress=recording_update, max_tokens=3)
    assert len(frame) == len(prompts) and frame["error"].notna().sum() == 1
    assert [done for done, _, _ in calls] == list(range(1, len(prompts) + 1))
    assert {total for _, total, _ in calls} == {len(prompts)}
    assert bar.done == bar.total == len(prompts) and bar.errors == 1
    assert repr(bar) == f"BatchProgress: batch: {len(prompts)}/{len(prompts)} done, 1 error"

    again = BatchProgress(3)
    manager.batch_blocking(prompts[:3], progress=again.update, max_tokens=3)  # the bound method itself
    assert again.done == again.total == 3 and again.errors == 0


def test_awaiting_the_managers_batch_from_a_cell(ip):
    """`await manager.batch(...)` in a cell runs on the manager's own loop and reports progress."""
    pytest.importorskip("anywidget")
    from fabstir_jupyter.notebook.widgets import BatchProgress

    ip.user_ns["manager"] = ip.run_line_magic("fabstir", "manager")
    ip.user_ns["prompts"] = ["one", "two", "three"]
    result = ip.run_cell(
        "from fabstir_jupyter.notebook.widgets import BatchProgress\n"
        "bar = BatchProgress(len(prompts))\n"
        "frame = await manager.batch(prompts, progress=bar.update, max_tokens=2, mode='cheapest')\n"
        "best = await manager.select_best_host(mode='reliable')\n"
    )
    assert result.success, result.error_in_exec
    frame, bar = ip.user_ns["frame"], ip.user_ns["bar"]
    assert isinstance(bar, BatchProgress) and bar.done == bar.total == 3
    assert list(frame["text"]) == [scripted_text(p, 2) for p in ("one", "two", "three")]
    assert ip.user_ns["best"].api_url == frame["host"][0]


def test_manager_on_a_bad_network_is_one_line(make_shell, capsys):
    """Where no network can start, `manager = %fabstir manager` fails with one error line and
    assigns nothing."""
    ip = make_shell()
    ip.run_line_magic("config", "FabstirMagics.network = 'static'")
    failing(ip, "manager = %fabstir manager")
    assert one_line_error(capsys).startswith("FabstirError [")
    assert "manager" not in ip.user_ns


# --------------------------------------------------------------------------- with the widgets


@pytest.fixture
def widget_front_end(monkeypatch):
    """Pretend a widget front end is there, so the magic picks the anywidget outputs."""
    pytest.importorskip("anywidget")
    from fabstir_jupyter.notebook import output

    monkeypatch.setattr(output, "widgets_available", lambda: True)
    monkeypatch.setattr(magics_module, "widgets_available", lambda: True)
    made = []
    original = magics_module.make_output

    def spy(format, background, **kwargs):
        made.append(original(format, background, **kwargs))
        return made[-1]

    monkeypatch.setattr(magics_module, "make_output", spy)
    return made


def test_cell_streams_into_the_live_widget(ip, widget_front_end):
    """With a widget front end the answer goes to StreamOutput, which ends done with the whole text."""
    from fabstir_jupyter.notebook.widgets import StreamOutput

    cell(ip, "--max-tokens 40 --out r")
    widget, = widget_front_end
    assert isinstance(widget, StreamOutput)
    assert widget.state == "done" and widget.text == ip.user_ns["r"].text == scripted_text(PROMPT, 40)
    assert widget.status["model"] == "scripted-1" and widget.status["tokens"] == 40
    assert widget.batcher.messages >= 1 and repr(widget) == widget.text


def test_widget_stop_button_cancels_a_background_stream(make_shell, start_host, widget_front_end):
    """In --background mode the widget's stop button cancels the stream on the host."""
    slow = start_host(backend=ScriptedBackend(token_rate=100))
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = [{slow.ws_url!r}]")
    cell(ip, "--background --max-tokens 1000")
    widget, = widget_front_end
    run = ip.magics_manager.registry["FabstirMagics"].last_background
    assert widget.background and wait_until(lambda: len(run.text) > 0)
    widget._handle_message(widget, {"type": "stop"}, [])  # what the view sends on a click
    assert run.wait(3) and run.cancelled() and widget.state == "cancelled"
    assert wait_until(lambda: slow.active_streams == 0)


def test_hosts_returns_the_dashboard_widget(make_shell, start_host, widget_front_end):
    """%fabstir hosts returns the HostDashboard with one row per host; --frame still gives a DataFrame."""
    from fabstir_jupyter.notebook.widgets import HostDashboard

    hosts = [start_host(), start_host()]
    ip = make_shell()
    ip.run_line_magic("config", f"FabstirMagics.hosts = {[h.ws_url for h in hosts]!r}")
    cell(ip, "--max-tokens 3")
    dashboard = ip.run_line_magic("fabstir", "hosts")
    assert isinstance(dashboard, HostDashboard)
    assert sorted(dashboard.hosts_frame["url"]) == sorted(h.http_url for h in hosts)
    assert dashboard.usage_frame["tokens"].sum() == 3
    dashboard._handle_message(dashboard, {"type": "refresh"}, [])  # the refresh button probes again
    assert dashboard.error == "" and len(dashboard.rows) == 2
    assert isinstance(ip.run_line_magic("fabstir", "hosts --frame"), pd.DataFrame)
