"""The network's start: what the first cell waits for and shows, and the start as the extension loads.

The local network here is the real one (an in-process chain and scripted ``fabstir-host``
processes); where a test must see the start in progress, a gate holds ``LocalNetwork``'s
construction until the test opens it (no sleeping, no timing).
"""

from __future__ import annotations

import asyncio
import threading
from typing import ClassVar

import pytest
from traitlets.config import Config

from fabstir_jupyter.errors import ConnectionFailed, FabstirError
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.local import network as network_module
from fabstir_jupyter.notebook import magics as magics_module
from fabstir_jupyter.notebook.output import TextOutput
from fabstir_jupyter.notebook.startup import NetworkStartup

from .conftest import loop_thread_alive, wait_until

PROMPT = "Tell me about rivers"


# --------------------------------------------------------------------------- NetworkStartup


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


async def test_a_follower_hears_each_step_from_another_thread_then_the_end():
    """Steps reported from a worker thread reach a follower on this loop in order; follow() returns
    True (it waited) once the start ends."""
    startup = NetworkStartup()
    startup.step("first")
    heard: list[str] = []
    gate = threading.Event()

    def worker() -> None:
        gate.wait(5)
        startup.step("second")
        startup.step("third")
        startup.finish()

    thread = threading.Thread(target=worker)
    thread.start()
    follower = asyncio.ensure_future(startup.follow(heard.append))
    await asyncio.sleep(0)
    assert heard == ["first"] and not follower.done()  # the step in progress, at once
    gate.set()
    assert await asyncio.wait_for(follower, 5) is True
    thread.join(5)
    assert heard == ["first", "second", "third"]
    assert await startup.follow(heard.append) is False and len(heard) == 3  # ended: no wait, no steps


async def test_a_failed_start_raises_in_its_followers_and_is_marked_seen():
    startup = NetworkStartup()
    startup.step("starting host 1/1")
    startup.finish(ConnectionFailed("fabstir-host (scripted) exited with status 1"))
    startup.step("late")  # ignored once ended
    assert not startup.error_seen
    with pytest.raises(ConnectionFailed, match="exited with status 1"):
        await startup.follow()
    assert startup.error_seen and startup.failed and [label for label, _ in startup.steps] == ["starting host 1/1"]


def test_durations_run_to_the_next_step_and_to_the_end():
    clock = FakeClock()
    startup = NetworkStartup(clock)
    clock.now = 10.5
    startup.step("chain")
    clock.now = 11.0
    startup.step("host")
    clock.now = 12.5
    assert startup.current == "host" and startup.durations() == [("chain", 0.5), ("host", 1.5)]
    startup.finish()
    clock.now = 20.0
    assert startup.current is None and startup.seconds == 2.5 and startup.durations()[-1] == ("host", 1.5)


# --------------------------------------------------------------------------- through the magic


class RecordingOutput(TextOutput):
    """A text output that records what the cell's wait for the network showed."""

    made: ClassVar[list[RecordingOutput]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, rich=False, **kwargs)
        self.steps: list[str] = []
        self.ready_calls = 0
        RecordingOutput.made.append(self)

    def network_step(self, label: str) -> None:
        self.steps.append(label)
        super().network_step(label)

    def network_ready(self) -> None:
        self.ready_calls += 1
        super().network_ready()


@pytest.fixture
def recording(monkeypatch):
    RecordingOutput.made = []
    monkeypatch.setattr(magics_module, "make_output",
                        lambda format, background, **kw: RecordingOutput(format, background=background,
                                                                         started_at=kw.get("started_at")))
    return RecordingOutput.made


class Gate:
    """Hold every ``LocalNetwork`` construction until :meth:`open`; count them and their backends."""

    def __init__(self, monkeypatch) -> None:
        self.opened = threading.Event()
        self.waiting = threading.Event()
        self.backends: list[str] = []
        self.fail_with: BaseException | None = None
        original = network_module.LocalNetwork.__init__

        def gated(network, *args, **kwargs):
            self.backends.append(args[1] if len(args) > 1 else kwargs.get("backend", "scripted"))
            self.waiting.set()
            assert self.opened.wait(30), "the test never opened the gate"
            if self.fail_with is not None:
                raise self.fail_with
            original(network, *args, **kwargs)

        monkeypatch.setattr(network_module.LocalNetwork, "__init__", gated)

    def open(self) -> None:
        self.opened.set()


def autostart_shell(make_shell) -> object:
    config = Config()
    config.FabstirMagics.start_network_on_load = True
    return make_shell(config, load=False)


def test_load_ext_returns_at_once_and_the_network_starts_behind_it(make_shell, monkeypatch, recording):
    """The cell with %load_ext returns while the network's start is held; the start uses the settings
    of the whole cell (%config after %load_ext counts: one scripted network, no llama-cpp one); the
    first %%fabstir cell shows the steps it waited through, then the network's wait, then streams."""
    gate = Gate(monkeypatch)
    ip = autostart_shell(make_shell)
    assert ip.run_cell("%load_ext fabstir_jupyter\n%config FabstirMagics.local_backend = 'scripted'").success
    assert gate.waiting.wait(30)  # the start has begun, in the background...
    bridge = magics_module.get_bridge()
    startup = bridge.startup()
    assert startup is not None and not startup.done  # ...and the cell has returned while it is held
    assert startup.current == "preparing the local network"
    threading.Timer(0.2, gate.open).start()  # opened while the next cell waits
    assert ip.run_cell(f"%%fabstir --max-tokens 4 --out r\n{PROMPT}").success
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 4)
    assert gate.backends == ["scripted"]
    sink, = recording
    assert sink.steps[0] == "preparing the local network"
    assert sink.steps[1:] == ["starting the local chain and 1 host", "starting host 1/1", "registering host 1/1",
                              "discovering hosts"]
    assert sink.ready_calls == 1 and sink.network is not None and sink.network > 0
    assert startup.done and not startup.failed
    assert [label for label, _ in startup.steps] == sink.steps
    assert ip.run_cell(f"%%fabstir --max-tokens 2\n{PROMPT}").success
    assert recording[1].steps == [] and recording[1].ready_calls == 0  # started: nothing to wait for


def test_config_changing_the_network_starts_the_new_one_and_stops_the_old(make_shell, monkeypatch, recording,
                                                                           tmp_path):
    """A %config that changes the network (here the usage ledger, part of its identity) in a later
    cell starts the new network once that cell ends; the old one, still starting, is stopped once
    it has started, and the new one answers."""
    monkeypatch.setenv("FABSTIR_LOCAL_BACKEND", "scripted")
    gate = Gate(monkeypatch)
    ip = autostart_shell(make_shell)
    assert ip.run_cell("%load_ext fabstir_jupyter").success
    assert gate.waiting.wait(30)
    bridge = magics_module.get_bridge()
    old_sdk, = bridge._sdks.values()
    assert ip.run_cell(f"%config FabstirMagics.usage_db = {str(tmp_path / 'usage.sqlite3')!r}").success
    assert wait_until(lambda: len(gate.backends) == 2, 30)  # the new network's start has begun
    gate.open()
    assert ip.run_cell(f"%%fabstir --max-tokens 3 --out r\n{PROMPT}").success
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 3)
    new_sdk = bridge.sdk()
    assert new_sdk is not old_sdk and gate.backends == ["scripted", "scripted"]
    assert wait_until(lambda: old_sdk._closed and old_sdk.local_network is None, 30)
    assert len(bridge._sdks) == 1


def test_a_failed_start_fails_the_first_cell_with_its_code_and_the_next_cell_starts_again(
        make_shell, monkeypatch, recording, capsys):
    """A start that fails in the background fails the first cell that needs the network (one line,
    with the error's code); the next cell starts the network again."""
    monkeypatch.setenv("FABSTIR_LOCAL_BACKEND", "scripted")
    gate = Gate(monkeypatch)
    gate.fail_with = ConnectionFailed("fabstir-host (scripted) exited with status 1: no such flag")
    ip = autostart_shell(make_shell)
    assert ip.run_cell("%load_ext fabstir_jupyter").success
    gate.open()
    assert wait_until(lambda: (s := magics_module.get_bridge().startup()) is not None and s.done, 30)
    capsys.readouterr()
    result = ip.run_cell(f"%%fabstir --max-tokens 3\n{PROMPT}")
    assert not result.success and isinstance(result.error_in_exec, FabstirError)
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == (
        "FabstirError [CONNECTION_FAILED]: fabstir-host (scripted) exited with status 1: no such flag")
    assert "Traceback" not in captured.out + captured.err and captured.err == ""
    gate.fail_with = None
    assert ip.run_cell(f"%%fabstir --max-tokens 3 --out r\n{PROMPT}").success
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 3) and len(gate.backends) == 2


def test_background_cell_never_raises_and_status_lists_runs_and_the_start(make_shell, monkeypatch, recording,
                                                                         capsys):
    """--background returns at once even while the network starts; a background run that fails
    shows its error in its output and in %fabstir status, which also shows the start's steps."""
    monkeypatch.setenv("FABSTIR_LOCAL_BACKEND", "scripted")
    gate = Gate(monkeypatch)
    ip = autostart_shell(make_shell)
    assert ip.run_cell("%load_ext fabstir_jupyter").success
    assert gate.waiting.wait(30)
    assert ip.run_cell(f"%%fabstir --background --max-tokens 3 --out fine\n{PROMPT}").success
    assert ip.run_cell("%%fabstir --background --model nope\nWhich model?").success  # fails later, quietly
    magics = ip.magics_manager.registry["FabstirMagics"]
    capsys.readouterr()
    ip.run_line_magic("fabstir", "status")
    out = capsys.readouterr().out
    assert "[fabstir] network local (scripted): starting for " in out and "preparing the local network" in out
    assert "[fabstir] background runs: 2 (2 running)" in out
    gate.open()
    assert magics.last_background.wait(30)
    bridge = magics_module.get_bridge()
    first, second = bridge.runs
    assert first.wait(30) and first.state == "done" and ip.user_ns["fine"].text == scripted_text(PROMPT, 3)
    assert second.state == "failed" and second.error.code == "MODEL_NOT_AVAILABLE"
    err = capsys.readouterr().err
    assert err.count("FabstirError [MODEL_NOT_AVAILABLE]") == 1  # the background output's own line
    ip.run_line_magic("fabstir", "status")
    out = capsys.readouterr().out
    assert "[fabstir] network local (scripted): ready in " in out
    for step in ("starting the local chain and 1 host", "starting host 1/1", "registering host 1/1",
                 "discovering hosts"):
        assert f"    {step}" in out
    assert "[fabstir] background runs: 2\n" in out
    lines = out.splitlines()
    assert any(line.startswith("  #1 ") and " done " in line and "'Tell me about rivers'" in line for line in lines)
    assert any(line.startswith("  #2 ") and " failed " in line and "[MODEL_NOT_AVAILABLE]" in line for line in lines)


def test_unload_during_a_start_stops_the_network_once_it_has_started(make_shell, monkeypatch):
    """Unloading while the network starts waits for the start and stops its hosts: nothing outlives it."""
    monkeypatch.setenv("FABSTIR_LOCAL_BACKEND", "scripted")
    gate = Gate(monkeypatch)
    ip = autostart_shell(make_shell)
    assert ip.run_cell("%load_ext fabstir_jupyter").success
    assert gate.waiting.wait(30)
    sdk, = magics_module.get_bridge()._sdks.values()
    threading.Timer(0.2, gate.open).start()
    ip.run_line_magic("unload_ext", "fabstir_jupyter")
    assert sdk._closed and sdk.local_network is None
    assert not loop_thread_alive()


def test_ctrl_c_while_waiting_for_the_network_leaves_the_start_running(make_shell, monkeypatch, recording):
    """Ctrl-C while the first cell waits for the network re-raises KeyboardInterrupt and marks the
    output cancelled; the start goes on, and the next cell uses that same network."""
    monkeypatch.setenv("FABSTIR_LOCAL_BACKEND", "scripted")
    gate = Gate(monkeypatch)
    ip = autostart_shell(make_shell)
    assert ip.run_cell("%load_ext fabstir_jupyter").success
    assert gate.waiting.wait(30)

    interrupting = [True]
    original = RecordingOutput.network_step

    def step(self, label: str) -> None:  # the user presses Ctrl-C while the widget shows this step
        if interrupting:
            raise KeyboardInterrupt
        original(self, label)

    monkeypatch.setattr(RecordingOutput, "network_step", step)
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("fabstir", "--max-tokens 3", PROMPT)
    assert recording[0].state == "cancelled"
    interrupting.clear()
    gate.open()
    assert ip.run_cell(f"%%fabstir --max-tokens 3 --out r\n{PROMPT}").success
    assert ip.user_ns["r"].text == scripted_text(PROMPT, 3) and gate.backends == ["scripted"]
