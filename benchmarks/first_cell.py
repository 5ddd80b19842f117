"""The first cell: time to the first token of the first ``%%fabstir`` cell of a cold kernel.

For each of ``--kernels`` fresh kernels (default 3; starting the kernel is not counted), in a
private config and data dir with no ``FABSTIR_*`` settings (so the network is the embedded
default: a local chain and one ``fabstir-host`` with the SmolLM2 model), this script runs, as a
notebook front end would:

1. a harness cell that records when each later cell starts (an IPython ``pre_run_cell`` hook);
2. ``%load_ext fabstir_jupyter`` (which starts the local network in the background once it ends);
3. after ``--gap`` seconds (default 0: the user runs the next cell at once, the worst case), the
   first ``%%fabstir --max-tokens 16`` cell, with the live widget (the kernel has a comm manager;
   no browser renders it).

It reports the time from the start of that cell to its first token, seen from the client (the
kernel's ``execute_input`` to the first widget message carrying text) and from the kernel (the
widget's status: TTFT and the wait for the network, both counted from the cell's start), and
where the time went: each step of the network's start (from the extension's load), discovery,
and the request's own time to first token (``InferenceResult.ttft``: request sent to first
token). On a paid network (the default) it also shows, from the host's log (``--log-level info``)
and the stream's events, when the host listened, loaded its model, connected its chain client
(which loads in the background), and checked the first job, and when the client's job was mined;
the host's clock is the wall clock, the kernel's ``CLOCK_MONOTONIC``: the kernel reports both.
Then the load average and the verdict against the target: the first token within 3 s of
the cell's start, in every kernel.

Run:  python benchmarks/first_cell.py [--kernels 3] [--gap 0] [--backend llama-cpp] [--host-threads N] [--unpaid]
(~10 s per kernel).  ``--host-threads N`` passes ``--threads N`` to the host (through the config
file's ``local_host_args``), to compare llama.cpp thread counts; ``--unpaid`` starts the free local
network (``local_paid`` false in the config file), to see what paying adds.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common
from _common import median, verdict

TARGET_S = 3.0
PROMPT = "What is a river? Answer in one sentence."
CELL_TIMEOUT = 300.0

HARNESS = """\
import json as _json, time as _time
_cell_starts = {}
def _record_cell_start(info):
    _cell_starts[info.raw_cell.split("\\n", 1)[0]] = _time.monotonic()
get_ipython().events.register("pre_run_cell", _record_cell_start)
"""
CELL_LINE = "%%fabstir --max-tokens 16 --temperature 0 --out _first"
REPORT = f"""\
from fabstir_jupyter.notebook.bridge import get_bridge as _get_bridge
import ipywidgets as _ipw
_startup = _get_bridge().startup()
_widget = [w for w in list(_ipw.Widget.widgets.values()) if type(w).__name__ == "StreamOutput"][-1]
_network = _get_bridge().sdk().local_network
print("REPORT", _json.dumps({{
    "wall_minus_monotonic": _time.time() - _time.monotonic(),
    "host_log": list(_network.processes[0]._stderr) if _network is not None else [],
    "job_opened": [e.time for e in _first.events if e.kind == "job_opened"],
    "cell_start": _cell_starts[{CELL_LINE!r}],
    "load_start": _cell_starts["%load_ext fabstir_jupyter"],
    "startup_start": _startup.started_at,
    "steps": [[label, t] for label, t in _startup.steps],
    "ready_at": _startup.ended_at,
    "request_ttft": _first.ttft,
    "tokens": _first.usage.completion_tokens if _first.usage else None,
    "text": _first.text,
    "widget": {{k: _widget.status.get(k) for k in ("ttft", "network", "state")}},
}}))
"""


@dataclass
class Run:
    """One cold kernel's first cell."""

    load_cell_s: float
    first_token_s: float  # client side: execute_input of the cell to its first text message
    kernel: dict = field(default_factory=dict)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def cell_start(self) -> float:
        return self.kernel["cell_start"]

    def steps(self) -> list[tuple[str, float, float]]:
        """Each step of the network's start: label, start and end, in seconds from the cell's start."""
        steps = self.kernel["steps"]
        ends = [t for _, t in steps[1:]] + [self.kernel["ready_at"]]
        return [(label, t - self.cell_start, end - self.cell_start)
                for (label, t), end in zip(steps, ends, strict=True)]


class Kernel:
    """A kernel started with jupyter_client, and a way to run a cell and watch its messages."""

    def __init__(self, env: dict[str, str]) -> None:
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(kernel_name="python3", env=env, startup_timeout=120)

    def run(self, code: str) -> tuple[float, float | None, float, str, list[str]]:
        """Run ``code``; return (cell started, first text message, idle, stdout, errors), client times."""
        msg_id = self.client.execute(code)
        started = first = None
        out: list[str] = []
        errors: list[str] = []
        deadline = time.monotonic() + CELL_TIMEOUT
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no answer within {CELL_TIMEOUT:g} s to {code[:40]!r}") from None
            now = time.monotonic()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "execute_input":
                started = now
            elif kind == "comm_msg" and first is None:
                data = content.get("data", {})
                if data.get("method") == "custom" and _has_text(data.get("content")):
                    first = now
            elif kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                errors.append(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                return started or now, first, now, "".join(out), errors

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _has_text(message: object) -> bool:
    if isinstance(message, str):
        return bool(message)
    return isinstance(message, dict) and message.get("type") == "snapshot" and bool(message.get("text"))


#: Lines of the host's log (``--log-level info``) that mark its start and the first job.
HOST_MARKS = (
    ("listening on ws://", "host listening (model loading)"),
    ("loaded ", "host's model loaded (ready line)"),
    ("chain client loaded in", "host's chain client loaded (web3 imported)"),
    ("paid sessions on:", "host's chain client connected"),
    ("opened: deposit pays for", "host checked the first job on chain"),
)


def _host_marks(log: list[str], offset: float) -> list[tuple[str, float]]:
    """(label, kernel monotonic time) of each line of HOST_MARKS found in the host's log."""
    import datetime

    found = []
    for needle, label in HOST_MARKS:
        for line in log:
            if needle in line:
                try:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                found.append((label, stamp - offset))
                break
    return found


def _environment(home: Path, backend: str, host_threads: int | None, paid: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABSTIR_")}
    env.update({
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "IPYTHONDIR": str(home / "ipython"),
        "FABSTIR_USAGE_DB": ":memory:",
        "FABSTIR_LOCAL_BACKEND": backend,
    })
    env.pop("FABSTIR_NO_WIDGETS", None)
    # the host logs at info level: its start and first job are read back from its log
    host_args = ["--log-level", "info"] + (["--threads", str(host_threads)] if host_threads is not None else [])
    config = home / "config" / "fabstir-jupyter" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"local_host_args": host_args, "local_paid": paid}))
    return env


def one_kernel(env: dict[str, str], gap: float) -> Run:
    kernel = Kernel(env)
    try:
        for code in (HARNESS,):
            _, _, _, _, errors = kernel.run(code)
            if errors:
                raise RuntimeError(f"harness cell failed: {errors}")
        started, _, ended, _, errors = kernel.run("%load_ext fabstir_jupyter")
        if errors:
            raise RuntimeError(f"%load_ext failed: {errors}")
        load_cell = ended - started
        if gap > 0:
            time.sleep(gap)  # the user reading before running the next cell
        load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
        started, first, _, _, errors = kernel.run(f"{CELL_LINE}\n{PROMPT}")
        if errors or first is None:
            raise RuntimeError(f"the first cell failed: {errors or 'no text arrived'}")
        _, _, _, out, errors = kernel.run(REPORT)
        if errors:
            raise RuntimeError(f"report cell failed: {errors}")
        report = next((line for line in out.splitlines() if line.startswith("REPORT ")), None)
        if report is None:
            raise RuntimeError(f"report cell printed no report: {out!r}")
        return Run(load_cell_s=load_cell, first_token_s=first - started, kernel=json.loads(report[7:]), load=load)
    finally:
        kernel.close()


def describe(index: int, run: Run) -> list[str]:
    k = run.kernel
    widget = k["widget"]
    lines = [f"kernel {index}: first token {run.first_token_s:.2f} s after the cell started (client); "
             f"kernel: TTFT {widget['ttft']:.2f} s, "
             + (f"waited {widget['network']:.2f} s for the network" if widget["network"] is not None
                else "the network was ready before the cell")
             + f"; load average {run.load[0]:.2f}"]
    lines.append(f"    %load_ext cell {run.load_cell_s * 1000:.0f} ms; the network's start began "
                 f"{k['startup_start'] - k['load_start']:.2f} s after that cell started and "
                 f"{k['startup_start'] - run.cell_start:+.2f} s from the first cell's start")
    for label, began, ended in run.steps():
        lines.append(f"    {began:+6.2f} s .. {ended:+6.2f} s  {ended - began:5.2f} s  {label}")
    request_start = run.cell_start + widget["ttft"] - k["request_ttft"]
    lines.append(f"    {k['ready_at'] - run.cell_start:+6.2f} s  network ready; request sent at about "
                 f"{request_start - run.cell_start:+.2f} s; request TTFT (sent to first token) "
                 f"{k['request_ttft'] * 1000:.0f} ms")
    offset = k["wall_minus_monotonic"]
    marks = _host_marks(k["host_log"], offset)
    marks += [("client's first job opened (mined)", t - offset) for t in k["job_opened"][:1]]
    for label, t in sorted(marks, key=lambda mark: mark[1]):
        lines.append(f"    {t - run.cell_start:+6.2f} s  {label}")
    lines.append(f"    answer ({k['tokens']} tokens): {k['text'].strip()[:70]!r}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kernels", type=int, default=3, help="cold kernels to measure (default 3)")
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds between %%load_ext and the first cell (default 0: at once)")
    parser.add_argument("--backend", default="llama-cpp", choices=["llama-cpp", "scripted"])
    parser.add_argument("--host-threads", type=int, default=None, help="llama.cpp threads of the host")
    parser.add_argument("--unpaid", action="store_true",
                        help="a free local network (local_paid false), to see what paying adds")
    args = parser.parse_args()
    if args.backend == "llama-cpp":
        try:
            _common.gguf_path()
        except SystemExit as exc:
            print(f"skipped: {exc}")
            return
    _common.print_header(
        "first cell: time to first token of the first %%fabstir cell of a cold kernel",
        f"backend {args.backend}, {args.kernels} kernels, gap {args.gap:g} s after %load_ext"
        + (f", host --threads {args.host_threads}" if args.host_threads else ", host threads: the default")
        + (", unpaid network" if args.unpaid else ", paid network (the default)"),
        packages=("fabstir-jupyter", "ipykernel", "llama_cpp_python", "web3"),
    )
    runs: list[Run] = []
    for index in range(1, args.kernels + 1):
        with tempfile.TemporaryDirectory(prefix="fabstir-first-cell-") as home:
            run = one_kernel(_environment(Path(home), args.backend, args.host_threads, not args.unpaid), args.gap)
        runs.append(run)
        print("\n".join(describe(index, run)))
        sys.stdout.flush()
    worst = max(run.first_token_s for run in runs)
    print(f"first token after the cell's start: median {median(r.first_token_s for r in runs):.2f} s, "
          f"worst {worst:.2f} s (target <= {TARGET_S:g} s in every kernel): {verdict(worst <= TARGET_S)}")
    if hasattr(os, "getloadavg"):
        print("load average after the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
