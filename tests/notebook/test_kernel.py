"""The magic in a real ipykernel (jupyter_client): streaming, and a kernel interrupt during a stream."""

from __future__ import annotations

import os
import queue
import sys
import time

import pytest

from _hosts import CountingBackend
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text

from .conftest import wait_until

jupyter_client = pytest.importorskip("jupyter_client")

PROMPT = "Tell me about rivers"


def start_kernel(host, *, widgets: bool):
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "FABSTIR_HOSTS": host.ws_url, "FABSTIR_USAGE_DB": ":memory:"}
    if widgets:
        env.pop("FABSTIR_NO_WIDGETS", None)
    else:
        env["FABSTIR_NO_WIDGETS"] = "1"
    return start_new_kernel(kernel_name="python3", env=env, startup_timeout=60)


@pytest.fixture
def kernel(isolated_env, start_host):
    """A python3 kernel (text output) whose FABSTIR_HOSTS points at a slow scripted host in this process."""
    host = start_host(backend=CountingBackend(token_rate=100))
    manager, client = start_kernel(host, widgets=False)
    try:
        yield manager, client, host
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.fixture
def widget_kernel(isolated_env, start_host):
    """A python3 kernel with the widget outputs (the comm manager is there; no front end renders)."""
    host = start_host(backend=ScriptedBackend(token_rate=200))
    manager, client = start_kernel(host, widgets=True)
    try:
        yield manager, client, host
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def execute(client, code: str, timeout: float = 30.0, *, messages: list | None = None) -> tuple[dict, str, str]:
    """Run ``code``; return the reply content and the cell's stdout and stderr.

    Every iopub message seen meanwhile (of any cell) is appended to ``messages`` when given.
    """
    msg_id = client.execute(code)
    stdout, stderr = [], []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no idle status within {timeout} s") from None
        if messages is not None:
            messages.append(msg)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            (stdout if msg["content"]["name"] == "stdout" else stderr).append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    while True:  # skip the replies of cells started without waiting (--background above)
        reply = client.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"], "".join(stdout), "".join(stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="kernel interrupts are signals on POSIX")
def test_kernel_interrupt_cancels_the_stream_and_the_next_cell_runs(kernel):
    """Interrupting mid-stream stops the host's stream (well before its 3000 tokens); the next cell streams
    normally."""
    manager, client, host = kernel
    reply, _, err = execute(client, "%load_ext fabstir_jupyter")
    assert reply["status"] == "ok", err
    msg_id = client.execute("%%fabstir --max-tokens 3000 --out never\n" + PROMPT)
    assert wait_until(lambda: host.backend.tokens and host.backend.tokens[0] >= 50, 20.0)  # mid-stream
    manager.interrupt_kernel()
    reply = client.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert wait_until(lambda: host.active_streams == 0, 5.0)
    assert host.backend.tokens[0] < 3000  # the host stopped generating: the stream was cancelled there
    # ipykernel aborts requests that arrive just after an error (that is how queued cells stop), so
    # under load the next cell may be aborted once: send it again then.
    for _ in range(3):
        reply, out, err = execute(client, "%%fabstir --max-tokens 4 --out r\n" + PROMPT)
        if reply["status"] != "aborted":
            break
        time.sleep(0.2)
    assert reply["status"] == "ok", err
    assert out.startswith(scripted_text(PROMPT, 4)) and "[fabstir] host" in out
    reply, out, _ = execute(client, "print(r.text == " + repr(scripted_text(PROMPT, 4)) + ", 'never' in dir())")
    assert out.strip() == "True False"


def test_widget_output_in_a_kernel_streams_custom_messages_and_a_final_text(widget_kernel):
    """In a kernel the answer goes to the live widget: custom messages while streaming, then the final
    text as the display's text/plain; a background stream's messages belong to the cell that started it."""
    _, client, _ = widget_kernel
    assert execute(client, "%load_ext fabstir_jupyter")[0]["status"] == "ok"
    seen: list = []
    reply, _, err = execute(client, "%%fabstir --max-tokens 60\n" + PROMPT, messages=seen)
    assert reply["status"] == "ok", err
    kinds = [m["msg_type"] for m in seen]
    assert "comm_open" in kinds and "display_data" in kinds
    custom = [m for m in seen if m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "custom"]
    assert custom and custom[0]["content"]["data"]["content"]["type"] == "snapshot"
    final, = [m for m in seen if m["msg_type"] == "update_display_data"]
    assert final["content"]["data"]["text/plain"] == scripted_text(PROMPT, 60)

    background_id = client.execute("%%fabstir --background --max-tokens 100 --out later\n" + PROMPT)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply, out, _ = execute(client, "print('later' in dir())", messages=seen)
        if out.strip() == "True":
            break
        time.sleep(0.2)
    late = [m for m in seen if m["parent_header"].get("msg_id") == background_id]
    assert any(m["msg_type"] == "comm_msg" for m in late)
    assert any(m["msg_type"] == "update_display_data"
               and m["content"]["data"]["text/plain"] == scripted_text(PROMPT, 100) for m in late)


def test_bad_options_and_failed_requests_end_the_cell_with_an_error_reply(kernel):
    """In a real kernel a cell with bad options, and one whose request fails, each end with an
    ``error`` execute_reply (so the front end and nbconvert stop the cells queued after them), each
    shown as one line and nothing else on stderr. They used to reply ``ok``."""
    _, client, _ = kernel
    assert execute(client, "%load_ext fabstir_jupyter")[0]["status"] == "ok"
    reply, _, err = execute(client, "%%fabstir --max-tokens lots\n" + PROMPT)
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    assert err == ("UsageError: %%fabstir: argument --max-tokens: expected a positive integer, not 'lots' "
                   "(see %fabstir help)\n")
    seen: list = []
    reply, out, err = execute(client, "%%fabstir --model no-such-model --max-tokens 2\n" + PROMPT, messages=seen)
    assert reply["status"] == "error" and reply["ename"] == "ModelNotAvailable"
    line, = reply["traceback"]
    assert line.startswith("FabstirError [MODEL_NOT_AVAILABLE]: ") and "scripted-1" in line
    assert err == "" and out == ""
    assert [m["content"]["traceback"] for m in seen if m["msg_type"] == "error"] == [[line]]
