"""The operator key of ``fabstir-host``: where it is read from, what is refused, and where it never goes.

The key comes from ``--key-file PATH`` or ``FABSTIR_HOST_PRIVATE_KEY``, never from a flag value. It
must not appear in a log line (at DEBUG), ``repr(HostConfig)``, an error text or the process's
stderr; the host shows its address and public key instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect

from fabstir_jupyter.crypto import PrivateKey
from fabstir_jupyter.encryption import EncryptedSession
from fabstir_jupyter.errors import InvalidOptions
from fabstir_jupyter.host import HostConfig, HostServer
from fabstir_jupyter.host.cli import KEY_ENV, build_parser, make_config, read_operator_key
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.protocol import encode, parse_host_frame

from .test_cli import READY

SECRET_HEX = "c7" * 16 + "a9" * 16  # no printable byte: its repr form cannot turn up in unrelated log text
KEY = PrivateKey.from_hex("0x" + SECRET_HEX)


def forms_of_the_secret() -> list[str]:
    """Every spelling of the key a leak could take."""
    return [SECRET_HEX, SECRET_HEX.upper(), SECRET_HEX[:24], repr(bytes.fromhex(SECRET_HEX))[2:26],
            str(int(SECRET_HEX, 16))]


def assert_no_secret(text: str) -> None:
    for form in forms_of_the_secret():
        assert form not in text, f"the operator key leaked: {form[:6]}..."


def key_file(tmp_path, content: str = "0x" + SECRET_HEX + "\n", mode: int = 0o600):
    path = tmp_path / "operator.key"
    path.write_text(content)
    path.chmod(mode)
    return path


def args(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def test_no_key_means_no_encryption():
    """Neither flag nor variable: the config has no key."""
    assert make_config(args()).operator_key is None


def test_key_file_is_read(tmp_path):
    """A 0600 file with 0x and 64 hex characters (and a newline) gives the operator key."""
    config = make_config(args("--key-file", str(key_file(tmp_path))))
    assert config.operator_key.address == KEY.address


def test_key_file_without_0x_prefix_is_read(tmp_path):
    """The 0x may be left out, as in many key files."""
    assert read_operator_key(args("--key-file", str(key_file(tmp_path, SECRET_HEX)))).address == KEY.address


def test_environment_variable_is_read(monkeypatch):
    """FABSTIR_HOST_PRIVATE_KEY is used when there is no --key-file; an empty one means no key."""
    monkeypatch.setenv(KEY_ENV, "0x" + SECRET_HEX)
    assert read_operator_key(args()).address == KEY.address
    monkeypatch.setenv(KEY_ENV, "")
    assert read_operator_key(args()) is None


def test_key_file_wins_over_the_environment(tmp_path, monkeypatch):
    """Both given: the file is used (as for the auth token)."""
    monkeypatch.setenv(KEY_ENV, "0x" + "11" * 32)
    assert read_operator_key(args("--key-file", str(key_file(tmp_path)))).address == KEY.address


def test_there_is_no_flag_for_the_key_value():
    """A key must never be a flag value (other users read command lines in ps): no --key or abbreviation."""
    for flag in ("--key", "--private-key", "--key-f", "--operator-key"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([flag, "0x" + SECRET_HEX])


@pytest.mark.parametrize(("case", "content", "mode", "says"), [
    ("missing", None, 0o600, "cannot read --key-file"),
    ("empty", "", 0o600, "does not hold a usable key"),
    ("short", "0x" + SECRET_HEX[:-2], 0o600, "does not hold a usable key"),
    ("not hex", "0x" + "zz" * 32, 0o600, "does not hold a usable key"),
    ("zero", "0x" + "00" * 32, 0o600, "does not hold a usable key"),
    ("a TLS key", "-----BEGIN PRIVATE KEY-----\n" + SECRET_HEX + "\n-----END PRIVATE KEY-----\n", 0o600,
     "does not hold a usable key"),
    ("binary", None, 0o600, "cannot read --key-file"),
    ("group readable", "0x" + SECRET_HEX, 0o640, "may be read by group or others (mode 0640)"),
    ("world readable", "0x" + SECRET_HEX, 0o644, "chmod 600"),
])
def test_a_bad_key_file_is_refused_with_a_clear_error(tmp_path, case, content, mode, says):
    """Each gets InvalidOptions naming the file and the fix; no message holds the file's content."""
    path = tmp_path / "operator.key"
    if case == "binary":
        path.write_bytes(b"\xff\xfe" + bytes.fromhex(SECRET_HEX))
        path.chmod(mode)
    elif content is not None:
        key_file(tmp_path, content, mode)
    with pytest.raises(InvalidOptions) as info:
        make_config(args("--key-file", str(path)))
    assert says in info.value.message and str(path) in info.value.message
    assert info.value.code == "INVALID_OPTIONS" and info.value.field == "operator_key"
    assert_no_secret(str(info.value) + repr(info.value))


def test_a_bad_environment_variable_is_refused_without_its_value(monkeypatch):
    """The variable's error names the variable, never the value."""
    monkeypatch.setenv(KEY_ENV, "0x" + SECRET_HEX[:-1])
    with pytest.raises(InvalidOptions) as info:
        read_operator_key(args())
    assert KEY_ENV in info.value.message
    assert_no_secret(str(info.value))


def test_host_config_repr_and_equality_hide_the_key():
    """repr(HostConfig) shows no key (not even its address); a non-key value is refused without echo."""
    config = HostConfig(operator_key=KEY)
    assert_no_secret(repr(config) + str(config))
    assert "operator_key" not in repr(config)
    with pytest.raises(InvalidOptions) as info:
        HostConfig(operator_key="0x" + SECRET_HEX)  # type: ignore[arg-type]
    assert_no_secret(str(info.value))


async def test_no_key_in_debug_logs_of_an_encrypted_exchange(caplog):
    """A whole encrypted exchange, a bad init and a bad message, logged at DEBUG: the key appears
    nowhere; the address and public key are logged at start."""
    caplog.set_level(logging.DEBUG)
    async with HostServer(HostConfig(operator_key=KEY)) as server, connect(server.ws_url) as ws:
        await ws.recv()
        session = EncryptedSession(KEY.public_key, session_id="5", job_id="5", chain_id=1, model="scripted-1")
        await ws.send(encode(session.init_frame()))
        assert json.loads(await ws.recv())["type"] == "session_init_ack"
        await ws.send(encode(session.message_frame("hi", model="scripted-1", max_tokens=2, temperature=0,
                                                   request_id="a")))
        while json.loads(await ws.recv())["type"] != "stream_end":
            pass
        bad = session.init_frame()
        bad["payload"]["ciphertextHex"] = "00" + bad["payload"]["ciphertextHex"][2:]
        await ws.send(encode(bad))
        assert json.loads(await ws.recv())["code"] == "DECRYPTION_FAILED"
        await ws.send(json.dumps({"type": "encrypted_message", "session_id": "5", "payload": {}}))
        assert json.loads(await ws.recv())["code"] == "INVALID_PAYLOAD"
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert_no_secret(text)
    assert KEY.address in text and str(KEY.public_key) in text


async def test_the_cli_serves_encrypted_sessions_and_logs_no_key(tmp_path):
    """fabstir-host --key-file as a subprocess at --log-level debug: an encrypted answer decrypts, the
    address is on stderr, the key is not."""
    path = key_file(tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabstir_jupyter.host", "--backend", "scripted", "--port", "0",
        "--key-file", str(path), "--log-level", "debug",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != KEY_ENV},
    )
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().rstrip("\n")
        match = READY.match(line)
        assert match, line
        session = EncryptedSession(KEY.public_key, session_id="7", job_id="7", chain_id=1, model="scripted-1")
        async with connect(match.group(1)) as ws:
            await ws.recv()
            await ws.send(encode(session.init_frame()))
            assert json.loads(await ws.recv())["client_address"] == session.signer_address
            await ws.send(encode(session.message_frame("secret words", model="scripted-1", max_tokens=3,
                                                       temperature=0, request_id="c")))
            text = ""
            while True:
                raw = await asyncio.wait_for(ws.recv(), 10)
                event = session.decrypt(parse_host_frame(raw))
                text += getattr(event, "content", "") or ""
                if json.loads(raw)["type"] == "stream_end":
                    break
        assert text == scripted_text("secret words", 3)
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    log = stderr.decode()
    assert KEY.address in log
    assert_no_secret(log)
    assert "secret words" not in log


async def test_the_cli_refuses_a_world_readable_key_file(tmp_path):
    """The process exits with status 2 and says why, before it listens."""
    path = key_file(tmp_path, mode=0o644)
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabstir_jupyter.host", "--backend", "scripted", "--port", "0", "--key-file", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(done.communicate(), 20)
    assert done.returncode == 2 and stdout == b""
    assert "may be read by group or others" in stderr.decode() and "chmod 600" in stderr.decode()
    assert_no_secret(stderr.decode())
