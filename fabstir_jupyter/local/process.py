"""Run a ``fabstir-host`` as a child process that dies with its parent.

The child gets ``--exit-with-parent``: it exits when its stdin pipe reaches EOF (which happens
however the parent dies, SIGKILL included) and asks the kernel for ``PR_SET_PDEATHSIG``.

Two details make that hold in practice:

- Linux delivers ``PR_SET_PDEATHSIG`` when the *thread* that forked the child exits, not the
  process. A host started from a short-lived thread (``asyncio.to_thread``, a worker pool) would be
  signalled as soon as that thread ended, so every host is forked by one daemon thread that lives as
  long as this process (:func:`_spawn`).
- Each host runs in its own session, so a Ctrl-C in a terminal or a Jupyter kernel interrupt (which
  signals the kernel's whole process group) interrupts the parent, not its hosts; they still die
  with the parent through the two mechanisms above.

A host that dies on its own (a crash, the OOM killer, a ``kill -9``) is noticed at once: the thread
that reads its stdout sees the pipe close, reaps the process (no zombie is left) and tells the
listeners. With ``max_restarts`` it is started again on the same port, so its URL (and its
registration) stay valid.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConnectionFailed

__all__ = ["HostProcess"]

logger = logging.getLogger("fabstir_jupyter.local")

_READY = re.compile(r"fabstir-host listening on (ws://\S+)")

# ---------------------------------------------------------------------------- the spawner thread

_SpawnRequest = tuple["concurrent.futures.Future[subprocess.Popen[str]]", list[str], dict[str, Any]]
_spawn_lock = threading.Lock()
_spawn_queue: queue.SimpleQueue[_SpawnRequest] | None = None
_spawn_pid: int | None = None


def _spawner(requests: queue.SimpleQueue[_SpawnRequest]) -> None:
    while True:
        future, cmd, kwargs = requests.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(subprocess.Popen(cmd, **kwargs))
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)


def _forget_spawner() -> None:
    # in a forked child the spawner thread does not exist (and the lock may have been held)
    global _spawn_lock, _spawn_queue, _spawn_pid
    _spawn_lock, _spawn_queue, _spawn_pid = threading.Lock(), None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spawner)


def _spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``cmd`` from the process-wide spawner thread (see the module docstring)."""
    global _spawn_queue, _spawn_pid
    with _spawn_lock:
        if _spawn_queue is None or _spawn_pid != os.getpid():  # first use (or a fork not seen)
            _spawn_queue = queue.SimpleQueue()
            _spawn_pid = os.getpid()
            threading.Thread(target=_spawner, args=(_spawn_queue,), name="fabstir-host-spawner", daemon=True).start()
        requests = _spawn_queue
    future: concurrent.futures.Future[subprocess.Popen[str]] = concurrent.futures.Future()
    requests.put((future, cmd, kwargs))
    return future.result()


# ---------------------------------------------------------------------------- one host process


def _exit_status(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


class HostProcess:
    """A ``fabstir-host`` child process on a free loopback port.

    Args:
        backend: ``llama-cpp``, ``scripted`` or ``openai``.
        args: further command-line flags for the host.
        start_timeout: seconds to wait for the ready line (model loading included).
        max_restarts: how many times, over its life, a host that exits on its own is started again
            on the same port (0: never; it stays down). :meth:`stop` and :meth:`kill` are never
            followed by a restart.

    Listeners added with :meth:`add_listener` are called as ``callback(process, event)`` from a
    watcher thread: ``"down"`` (it exited on its own and was reaped; a restart follows),
    ``"up"`` (restarted, listening on the same URL) or ``"failed"`` (down for good).
    """

    def __init__(self, backend: str = "llama-cpp", args: Sequence[str] = (), *, start_timeout: float = 120.0,
                 max_restarts: int = 0) -> None:
        self.backend = backend
        self.args = list(args)
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.restarts = 0  # restarts done so far
        self.exit_status: int | None = None  # of the last exit it was not asked for
        self.url: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: list[str] = []
        self._ready: threading.Event = threading.Event()
        self._found: list[str] = []
        self._lock = threading.Lock()
        self._closed = False  # stopped or killed on purpose: an exit now is no crash
        self._listeners: list[Callable[[HostProcess, str], None]] = []

    def __repr__(self) -> str:
        return f"<HostProcess {self.backend} {self.url or 'not started'}>"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the child was started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def add_listener(self, callback: Callable[[HostProcess, str], None]) -> None:
        """Call ``callback(process, event)`` when the host goes down, comes back, or stays down."""
        self._listeners.append(callback)

    def launch(self) -> None:
        """Start the child without waiting for it to listen; :meth:`wait_ready` waits.

        Several hosts can boot (and load their models) at once: launch them all, then wait.
        """
        with self._lock:
            if self._proc is not None:
                return
            self._closed = False
            self._launch(0)

    def _launch(self, port: int) -> None:
        # with self._lock held
        cmd = [sys.executable, "-m", "fabstir_jupyter.host", "--backend", self.backend, "--port", str(port),
               "--exit-with-parent", *self.args]
        self._proc = proc = _spawn(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
        threading.Thread(target=self._collect_stderr, args=(proc,), daemon=True).start()
        threading.Thread(target=self._watch, args=(proc,), daemon=True, name=f"fabstir-host-{proc.pid}").start()

    def wait_ready(self) -> str:
        """Wait for the ready line of a launched host and return its WebSocket URL.

        Raises:
            ConnectionFailed: the host exited or did not get ready within ``start_timeout``
                (it is stopped; the message ends with its last stderr lines).
        """
        if self._proc is None:
            raise ConnectionFailed(f"fabstir-host ({self.backend}) was not launched")
        self._ready.wait(self.start_timeout)
        if not self._found:
            proc = self._proc
            self.stop()
            tail = "".join(self._stderr[-20:]).strip()
            why = (f"exited with status {proc.returncode}" if proc.returncode is not None
                   else f"did not start within {self.start_timeout:g} s")
            raise ConnectionFailed(f"fabstir-host ({self.backend}) {why}" + (f": {tail[-800:]}" if tail else ""))
        self.url = self._found[0]
        return self.url

    def start(self) -> str:
        """Start the host and return its WebSocket URL once it listens.

        Raises:
            ConnectionFailed: the host exited or did not get ready within ``start_timeout``.
        """
        self.launch()
        return self.wait_ready()

    def _watch(self, proc: subprocess.Popen[str]) -> None:
        """Read the ready line, drain stdout until the child is gone, reap it, handle a crash."""
        assert proc.stdout is not None
        ready = False
        try:
            for line in proc.stdout:
                match = _READY.search(line)
                if match:
                    self._found.append(match.group(1))
                    ready = True
                    break
        finally:
            self._ready.set()  # found, or stdout closed: the child is gone
        # Keep draining so the child never blocks on a full stdout pipe.
        for _line in proc.stdout:
            pass
        proc.wait()  # reap it: a dead host must not linger as a zombie
        if ready:  # one that never got ready is reported by whoever waits for it
            self._exited(proc)

    def _exited(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            if self._proc is not proc or self._closed:
                return  # stop() or kill() ended it: an exit we asked for
            self._proc = None
        self.exit_status = proc.returncode
        logger.warning("fabstir-host %s (pid %d) exited on its own with %s", self.url, proc.pid,
                       _exit_status(proc.returncode))
        self._emit("down")
        while True:
            with self._lock:
                if self._closed:
                    return
                if self.restarts >= self.max_restarts:
                    break
                self.restarts += 1
                attempt = self.restarts
            time.sleep(0.5 * (attempt - 1))  # a host that keeps crashing is not restarted in a tight loop
            logger.warning("restarting fabstir-host on %s (restart %d of %d)", self.url, attempt, self.max_restarts)
            try:
                self._relaunch()
            except ConnectionFailed as exc:
                logger.warning("restart %d of fabstir-host on %s failed: %s", attempt, self.url, exc)
                continue
            logger.warning("fabstir-host is back on %s (pid %s)", self.url, self.pid)
            self._emit("up")
            return
        logger.error("fabstir-host on %s is down and stays down (%s)", self.url,
                     f"{self.max_restarts} restarts used" if self.max_restarts else "restarts are off")
        self._emit("failed")

    def _relaunch(self) -> None:
        """Start the host again on the port it had, and wait until it listens.

        Raises:
            ConnectionFailed: it was stopped meanwhile, exited, or did not get ready in time.
        """
        port = urlsplit(self.url).port if self.url else None
        with self._lock:
            if self._closed or port is None:
                raise ConnectionFailed("fabstir-host was stopped")
            self._ready.clear()
            self._found.clear()
            self._launch(port)
            proc = self._proc
        assert proc is not None
        self._ready.wait(self.start_timeout)
        if not self._found:
            with self._lock:
                if self._proc is proc:
                    self._proc = None
            _terminate(proc)
            tail = "".join(self._stderr[-5:]).strip()
            why = (f"exited with {_exit_status(proc.returncode)}" if proc.returncode is not None
                   else f"did not start within {self.start_timeout:g} s")
            raise ConnectionFailed(f"fabstir-host {why}" + (f": {tail[-400:]}" if tail else ""))
        with self._lock:
            if self._closed:  # stopped while it booted: stop() has taken care of the process
                raise ConnectionFailed("fabstir-host was stopped")
        self.url = self._found[0]

    def _emit(self, event: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(self, event)
            except Exception:  # a listener's failure must not stop the supervision
                logger.exception("fabstir-host listener failed on %r", event)

    def _collect_stderr(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    @property
    def stderr_tail(self) -> str:
        """The last lines the host wrote to stderr (its logs)."""
        return "".join(self._stderr[-20:])

    def request_stop(self) -> None:
        """Close the host's stdin, which makes it exit; returns at once (:meth:`stop` waits)."""
        with self._lock:
            self._closed = True
            proc = self._proc
        if proc is not None and proc.stdin and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the host: close its stdin (it exits), then terminate, then kill. Idempotent."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, timeout)

    def kill(self) -> None:
        """SIGKILL the host (a crash, for failover tests) and reap it; it is then stopped, not restarted,
        and listeners hear ``"failed"``."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:  # the pipe is broken: the reader is gone
                pass
        self._emit("failed")

    def __enter__(self) -> HostProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    """Stop a host process: close its stdin (it exits), then terminate, then kill; reap it."""
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout / 2)
    except (subprocess.TimeoutExpired, OSError):
        proc.terminate()
        try:
            proc.wait(timeout / 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
