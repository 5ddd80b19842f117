"""Run a ``fabstir-host`` as a child process that dies with its parent.

The child gets ``--exit-with-parent``: it exits when its stdin pipe reaches EOF (which happens
however the parent dies, SIGKILL included) and asks the kernel for ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import Sequence

from ..errors import ConnectionFailed

__all__ = ["HostProcess"]

_READY = re.compile(r"fabstir-host listening on (ws://\S+)")


class HostProcess:
    """A ``fabstir-host`` child process on a free loopback port.

    Args:
        backend: ``llama-cpp``, ``scripted`` or ``openai``.
        args: further command-line flags for the host.
        start_timeout: seconds to wait for the ready line (model loading included).
    """

    def __init__(self, backend: str = "llama-cpp", args: Sequence[str] = (), *, start_timeout: float = 120.0) -> None:
        self.backend = backend
        self.args = list(args)
        self.start_timeout = start_timeout
        self.url: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: list[str] = []

    def __repr__(self) -> str:
        return f"<HostProcess {self.backend} {self.url or 'not started'}>"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> str:
        """Start the host and return its WebSocket URL once it listens.

        Raises:
            ConnectionFailed: the host exited or did not get ready within ``start_timeout``.
        """
        cmd = [sys.executable, "-m", "fabstir_jupyter.host", "--backend", self.backend, "--port", "0",
               "--exit-with-parent", *self.args]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._collect_stderr, daemon=True).start()
        found: list[str] = []
        reader = threading.Thread(target=self._wait_ready, args=(found,), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        if not found:
            self.stop()
            tail = "".join(self._stderr[-20:]).strip()
            raise ConnectionFailed(f"fabstir-host ({self.backend}) did not start within {self.start_timeout:g} s"
                                   + (f": {tail[-800:]}" if tail else ""))
        self.url = found[0]
        return self.url

    def _wait_ready(self, found: list[str]) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            match = _READY.search(line)
            if match:
                found.append(match.group(1))
                break
        # Keep draining so the child never blocks on a full stdout pipe.
        threading.Thread(target=lambda: [None for _ in self._proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def _collect_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the host: close its stdin (it exits), then terminate, then kill. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
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

    def __enter__(self) -> HostProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
