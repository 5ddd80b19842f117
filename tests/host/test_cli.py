"""``fabstir-host`` as a subprocess: the ready line, serving, and clean exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect

from fabstir_jupyter.host.cli import build_parser, make_config
from fabstir_jupyter.host.scripted import scripted_text

READY = re.compile(r"^fabstir-host listening on (ws://127\.0\.0\.1:(\d+)/v1/ws)$")


async def start_host(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``python -m fabstir_jupyter.host`` and return it with the URL from its ready line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabstir_jupyter.host", "--port", "0", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().rstrip("\n")
    match = READY.match(line)
    assert match, f"unexpected ready line {line!r}"
    assert int(match.group(2)) > 0
    return process, match.group(1)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_cli_prints_ready_line_and_serves():
    """With --port 0 the host prints one ready line with its URL and answers there."""
    process, url = await start_host("--backend", "scripted", "--token-rate", "0")
    try:
        async with connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(json.dumps({"type": "inference", "request": {
                "prompt": "cli", "model": "scripted-1", "max_tokens": 3, "temperature": 0}}))
            text = ""
            while (frame := json.loads(await ws.recv()))["type"] != "stream_end":
                text += frame["content"]
            assert text == scripted_text("cli", 3)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    assert process.stdout is not None
    assert await process.stdout.read() == b""  # nothing but the ready line on stdout


async def test_cli_exits_on_stdin_eof_with_exit_with_parent():
    """With --exit-with-parent, closing the host's stdin makes it exit cleanly."""
    process, _ = await start_host("--backend", "scripted", "--exit-with-parent")
    try:
        assert process.stdin is not None
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        await stop(process)


async def test_cli_keeps_running_without_exit_with_parent_on_stdin_eof():
    """Without --exit-with-parent, stdin EOF does not stop the host; SIGINT does."""
    process, _ = await start_host("--backend", "scripted")
    try:
        assert process.stdin is not None
        process.stdin.close()
        await asyncio.sleep(0.3)
        assert process.returncode is None
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        await stop(process)


async def test_cli_reports_a_bad_backend_setting():
    """The openai backend without --upstream-url exits 2 with a one-line error."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabstir_jupyter.host", "--backend", "openai", "--port", "0",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2 and out == b""
    assert b"--upstream-url" in err


def test_cli_flags_reach_the_config():
    """Limit flags map onto HostConfig fields."""
    args = build_parser().parse_args([
        "--backend", "scripted", "--port", "0", "--max-tokens-cap", "200000", "--rate-limit", "0",
        "--legacy", "--no-compression", "--max-concurrent-streams", "9",
    ])
    config = make_config(args)
    assert config.max_tokens_cap == 200_000 and config.rate_limit_per_connection == 0
    assert config.legacy and not config.compression and config.max_concurrent_streams == 9


@pytest.mark.parametrize("cert, key", [("--tls-cert", "--tls-key"), ("--certfile", "--keyfile")])
def test_cli_tls_flags_and_their_ssl_style_aliases_reach_the_config(cert, key):
    """--tls-cert/--tls-key (hard to mistake for the operator's --key-file) and the older
    --certfile/--keyfile set the same TLS files; neither is the operator key."""
    args = build_parser().parse_args(["--backend", "scripted", cert, "/tmp/cert.pem", key, "/tmp/key.pem"])
    assert (args.certfile, args.keyfile, args.operator_key_file) == ("/tmp/cert.pem", "/tmp/key.pem", None)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_cli_help_and_version_exit_zero(flag, capsys):
    """--help and --version print and exit 0."""
    from fabstir_jupyter.host.cli import main

    with pytest.raises(SystemExit) as info:
        main([flag])
    assert info.value.code == 0
    assert "fabstir-host" in capsys.readouterr().out


def test_cli_help_describes_every_option_and_its_default(capsys):
    """Every option of --help has a description and states its default."""
    parser = build_parser()
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.default is not argparse.SUPPRESS]  # all but --help, --version
    assert len(options) > 30
    for action in options:
        assert action.help, f"{action.option_strings} has no description"
        assert "(default: " in formatter._expand_help(action), f"{action.option_strings} shows no default"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert shown.count("(default: ") == len(options)
    assert "the largest max_tokens a request may ask for (default: 4096)" in shown
    assert "--legacy imitate a production node" in shown and "(default: off)" in shown


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
async def test_cli_dies_with_its_parent_even_if_stdin_stays_open():
    """With --exit-with-parent, SIGKILLing the parent stops the host although its stdin is still open."""
    import os

    read_end, write_end = os.pipe()  # the host's stdin; this test keeps the write end open
    parent_code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'fabstir_jupyter.host', '--backend', 'scripted',"
        " '--port', '0', '--exit-with-parent'], stdin=int(sys.argv[1]), stdout=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "print(child.stdout.readline().decode().strip(), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", parent_code, str(read_end), stdout=subprocess.PIPE, pass_fds=(read_end,),
    )
    try:
        assert parent.stdout is not None
        host_pid = int(await asyncio.wait_for(parent.stdout.readline(), 20))
        ready = (await asyncio.wait_for(parent.stdout.readline(), 20)).decode()
        assert ready.startswith("fabstir-host listening on ")
        assert _alive(host_pid)
        parent.kill()
        await parent.wait()
        for _ in range(100):
            if not _alive(host_pid):
                break
            await asyncio.sleep(0.05)
        assert not _alive(host_pid)
    finally:
        os.close(read_end)
        os.close(write_end)
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


MARKETPLACE = "0x" + "ab" * 20
REGISTRY_ID = "0x" + "cd" * 32


def _paid_args(*extra: str, key_file: str | None = None) -> argparse.Namespace:
    args = ["--backend", "scripted", *extra]
    if key_file is not None:
        args += ["--key-file", key_file]
    return build_parser().parse_args(args)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "operator.key"
    path.write_text("0x" + "4c" * 32 + "\n")
    path.chmod(0o600)
    return str(path)


def test_cli_chain_flags_make_a_paid_config(key_file, monkeypatch):
    """--rpc-url, --marketplace and --model-registry-id (hex, or REPO/FILE hashed as the ModelRegistry
    does) reach PaymentConfig; FABSTIR_HOST_RPC_URL stands in for --rpc-url; the URL is not in the repr."""
    from fabstir_jupyter.local.chain import model_id

    config = make_config(_paid_args("--rpc-url", "http://127.0.0.1:8545/key/SECRET", "--marketplace", MARKETPLACE,
                                    "--model-registry-id", REGISTRY_ID.upper().replace("0X", "0x"),
                                    "--chain-retry-window", "12", "--shutdown-settle-timeout", "3",
                                    "--chain-connect-timeout", "7", "--chain-gas-limit", "3000000",
                                    key_file=key_file))
    payment = config.payment
    assert payment is not None and payment.model_registry_id == REGISTRY_ID and payment.marketplace == MARKETPLACE
    assert payment.retry_window == 12 and payment.shutdown_timeout == 3
    assert payment.connect_timeout == 7 and payment.gas_limit == 3_000_000
    assert "SECRET" not in repr(config) and "SECRET" not in repr(payment)
    monkeypatch.setenv("FABSTIR_HOST_RPC_URL", "https://rpc.example/v2/KEY")
    derived = make_config(_paid_args("--marketplace", MARKETPLACE, "--model-registry-id",
                                     "CohereForAI/TinyVicuna-1B-32k-GGUF/tiny-vicuna-1b.q4_k_m.gguf",
                                     key_file=key_file)).payment
    assert derived.rpc_url == "https://rpc.example/v2/KEY"
    assert derived.model_registry_id == model_id("CohereForAI/TinyVicuna-1B-32k-GGUF", "tiny-vicuna-1b.q4_k_m.gguf")
    assert derived.model_registry_id == "0x0b75a2061e70e736924a30c0a327db7ab719402129f76f631adbd7b7a5a5bced"
    assert derived.gas_limit is None and derived.connect_timeout == 30  # estimates, by default
    assert make_config(_paid_args(key_file=key_file)).payment is None  # no chain flags: unpaid


@pytest.mark.parametrize("extra, with_key, says", [
    (["--rpc-url", "http://127.0.0.1:1", "--marketplace", MARKETPLACE, "--model-registry-id", REGISTRY_ID], False,
     "needs the operator key"),
    (["--rpc-url", "http://127.0.0.1:1", "--model-registry-id", REGISTRY_ID], True, "both --rpc-url"),
    (["--marketplace", MARKETPLACE], True, "both --rpc-url"),
    (["--rpc-url", "http://127.0.0.1:1", "--marketplace", MARKETPLACE], True, "needs --model-registry-id"),
    (["--model-registry-id", REGISTRY_ID], True, "needs --rpc-url and --marketplace"),
    (["--rpc-url", "http://127.0.0.1:1", "--marketplace", MARKETPLACE, "--model-registry-id", "scripted-1"], True,
     "0x and 64 hex digits, or REPO/FILE"),
    (["--rpc-url", "ftp://127.0.0.1:1", "--marketplace", MARKETPLACE, "--model-registry-id", REGISTRY_ID], True,
     "http(s):// URL"),
    (["--rpc-url", "http://127.0.0.1:1", "--marketplace", "0x12", "--model-registry-id", REGISTRY_ID], True,
     "0x address"),
    (["--rpc-url", "http://127.0.0.1:1", "--marketplace", MARKETPLACE, "--model-registry-id", REGISTRY_ID,
      "--chain-gas-limit", "20999"], True, "gas_limit must be an integer >= 21000"),
    (["--rpc-url", "http://127.0.0.1:1", "--marketplace", MARKETPLACE, "--model-registry-id", REGISTRY_ID,
      "--chain-connect-timeout", "0"], True, "connect_timeout must be positive"),
])
def test_cli_refuses_incomplete_chain_flags(extra, with_key, says, key_file, monkeypatch):
    """Chain flags without the operator key, half of the pair, no model registry id or malformed values
    are refused with a message that says what to set."""
    from fabstir_jupyter.errors import InvalidOptions

    monkeypatch.delenv("FABSTIR_HOST_PRIVATE_KEY", raising=False)
    monkeypatch.delenv("FABSTIR_HOST_RPC_URL", raising=False)
    with pytest.raises(InvalidOptions) as refused:
        make_config(_paid_args(*extra, key_file=key_file if with_key else None))
    assert says in str(refused.value)


async def test_cli_paid_host_without_a_key_or_a_chain_exits_with_one_line(key_file):
    """A paid host with no operator key exits 2 before it listens; with an RPC endpoint nobody answers it
    serves (its ready line comes first: the chain client connects in the background) and exits 1 once
    --chain-connect-timeout has passed; each prints one error line."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    chain = ["--rpc-url", dead, "--marketplace", MARKETPLACE, "--model-registry-id", REGISTRY_ID,
             "--chain-connect-timeout", "1"]
    for extra, status, says in (([], 2, b"operator key"), (["--key-file", key_file], 1, b"CONNECTION_FAILED")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fabstir_jupyter.host", "--backend", "scripted", "--port", "0", *chain, *extra,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", **_python_env()},
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == status, err
        if status == 2:
            assert out == b""
        else:
            assert out.startswith(b"fabstir-host listening on ws://127.0.0.1:") and out.count(b"\n") == 1
        assert says in err and err.count(b"fabstir-host: error:") == 1


def _python_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV", "LANG")}
