"""No orphans: host processes die with the process that started the local network, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fabstir_jupyter.local import HostProcess

from .conftest import PROCESS_DEADLINE, process_gone, wait_gone

# The parent: start a network (no `with`, no stop()), print the host PIDs, then end as told.
PARENT = textwrap.dedent("""
    import asyncio, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner ignores SIGINT
    how, end = sys.argv[1], sys.argv[2]
    if how == "sdk":  # the SDK's embedded default, started off the loop as the notebook bridge does
        from fabstir_jupyter import FabstirSDK, InferenceConfig
        sdk = FabstirSDK(network="local", local_backend="scripted", local_hosts=2,
                         config=InferenceConfig(usage_db=":memory:"))
        asyncio.run(sdk.astart())
        pids = [p.pid for p in sdk._processes]
    else:
        from fabstir_jupyter.local import LocalNetwork
        network = LocalNetwork(2, "scripted")
        pids = [h.pid for h in network.hosts]
    print(" ".join(map(str, pids)), flush=True)
    if end == "exit":
        sys.exit(0)
    if end == "raise":
        raise RuntimeError("the cell failed")
    time.sleep(60)  # waiting for SIGINT or SIGKILL
""")


def _start_parent(how: str, end: str) -> tuple[subprocess.Popen[str], list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how, end], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = parent.stdout.readline()  # type: ignore[union-attr]
    if not line.strip():
        parent.kill()
        pytest.fail(f"the parent did not start its network: {parent.communicate()[1][-2000:]}")
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2 and not any(process_gone(pid) for pid in pids)
    return parent, pids


@pytest.mark.parametrize("how, end, signum", [
    ("network", "exit", None),
    ("network", "raise", None),
    ("network", "sleep", signal.SIGINT),
    ("network", "sleep", signal.SIGKILL),
    ("sdk", "sleep", signal.SIGKILL),
], ids=["normal-exit", "exception", "ctrl-c", "sigkill", "sdk-sigkill"])
def test_hosts_die_with_their_parent(how, end, signum):
    """After the parent exits, raises, gets Ctrl-C or is SIGKILLed, every host is gone within 10 s."""
    parent, pids = _start_parent(how, end)
    try:
        if signum is not None:
            parent.send_signal(signum)
        parent.wait(PROCESS_DEADLINE)
        assert not wait_gone(pids), "host processes outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate()
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
    if end == "raise":
        assert parent.returncode == 1
    elif signum == signal.SIGINT:
        assert parent.returncode != 0


def _parent_thread(pid: int) -> int | None:
    """The thread of this process that forked ``pid`` (Linux's /proc/self/task/TID/children), or None."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as children:
                if str(pid) in children.read().split():
                    return int(tid)
        except OSError:  # the thread has just exited
            continue
    return None


def test_a_host_started_from_a_short_lived_thread_outlives_that_thread():
    """PR_SET_PDEATHSIG follows the forking thread; hosts are forked by a process-long thread instead:
    the host's parent thread is not the short-lived one, and the host runs on once that thread is gone."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children"):
        pytest.skip("this kernel has no /proc/PID/task/TID/children")
    hosts: list[HostProcess] = []
    forked_by: list[int | None] = []

    def start() -> None:
        host = HostProcess("scripted", start_timeout=30)
        hosts.append(host)
        host.start()
        assert host.pid is not None
        forked_by.append(_parent_thread(host.pid))  # read while this thread still lives

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    try:
        assert forked_by and forked_by[0] is not None and forked_by[0] != worker.native_id
        # once the kernel has ended the worker thread, a death signal bound to it would have been sent
        deadline = time.monotonic() + PROCESS_DEADLINE
        while os.path.exists(f"/proc/self/task/{worker.native_id}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/self/task/{worker.native_id}")
        assert hosts[0].running and _parent_thread(hosts[0].pid) == forked_by[0]
    finally:
        hosts[0].stop()
