"""TLS: the host serves wss:// and https://; the client verifies by default and says why it refused."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys

import httpx
import pytest

from _hosts import CountingBackend
from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.errors import AuthFailed, ConnectionFailed
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.transport import WebSocketClient
from fabstir_jupyter.usage import ListSink

from .conftest import TOKEN

FAST = dict(connection_timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0,
            backoff_initial=0.0, backoff_max=0.01, usage_db=":memory:")


async def test_host_with_a_certificate_serves_wss_and_https(start_host, tls_files):
    """ws_url and http_url say wss/https, and /health answers over TLS to a client trusting the CA."""
    server = await start_host(certfile=tls_files.certfile, keyfile=tls_files.keyfile)
    assert server.ws_url.startswith("wss://127.0.0.1:")
    assert server.http_url.startswith("https://127.0.0.1:")
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls_files.certfile), timeout=5) as http:
        health = await http.get(server.http_url + "/health")
    assert health.status_code == 200


async def test_client_refuses_a_self_signed_host_by_default(start_host, tls_files):
    """Default verification fails with CONNECTION_FAILED naming the untrusted certificate and the way out."""
    server = await start_host(backend=CountingBackend(), certfile=tls_files.certfile, keyfile=tls_files.keyfile)
    with pytest.raises(ConnectionFailed) as info:
        await WebSocketClient(server.ws_url, InferenceConfig(**FAST)).connect()
    error = info.value
    assert "certificate is not trusted" in str(error)
    assert "verify_tls=<CA bundle path>" in error.hint and "verify_tls=False" in error.hint
    assert server.backend.generations == 0


async def test_manager_refuses_a_self_signed_host_by_default(start_host, tls_files):
    """Through InferenceManager the request fails with the same explained error; nothing is generated."""
    server = await start_host(backend=CountingBackend(), certfile=tls_files.certfile, keyfile=tls_files.keyfile)
    manager = InferenceManager([server.http_url], InferenceConfig(**FAST, max_retries=0), usage=ListSink())
    try:
        with pytest.raises(ConnectionFailed) as info:
            await manager.ainfer("hello there", max_tokens=2)
    finally:
        await manager.aclose()
    assert "certificate is not trusted" in str(info.value)
    assert "verify_tls=False" in info.value.hint
    assert server.backend.generations == 0


@pytest.mark.parametrize("verify", ["ca", "off"])
async def test_client_connects_with_the_ca_or_an_explicit_opt_out(start_host, tls_files, verify):
    """verify_tls=<CA path> and verify_tls=False both reach the host and run inference end to end."""
    server = await start_host(backend=CountingBackend(), certfile=tls_files.certfile, keyfile=tls_files.keyfile,
                              auth_token=TOKEN)
    verify_tls = tls_files.certfile if verify == "ca" else False
    manager = InferenceManager(
        [server.http_url], InferenceConfig(**FAST, verify_tls=verify_tls, auth_token=TOKEN), usage=ListSink()
    )
    try:
        result = await manager.ainfer("hello there", max_tokens=4)
    finally:
        await manager.aclose()
    assert result.text
    assert server.backend.generations == 1


async def test_tls_and_auth_combine(start_host, tls_files):
    """Over wss a trusted client without the token still gets AUTH_FAILED."""
    server = await start_host(backend=CountingBackend(), certfile=tls_files.certfile, keyfile=tls_files.keyfile,
                              auth_token=TOKEN)
    with pytest.raises(AuthFailed):
        await WebSocketClient(server.ws_url, InferenceConfig(**FAST, verify_tls=tls_files.certfile)).connect()
    assert server.backend.generations == 0


async def test_plain_ws_client_to_a_tls_host_fails_cleanly(start_host, tls_files):
    """A ws:// client to a TLS port gets CONNECTION_FAILED quickly; the host keeps serving wss clients."""
    server = await start_host(certfile=tls_files.certfile, keyfile=tls_files.keyfile)
    plain = f"ws://127.0.0.1:{server.port}/v1/ws"
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConnectionFailed) as info:
        await WebSocketClient(plain, InferenceConfig(**FAST)).connect()
    assert "wss://" in info.value.hint
    assert asyncio.get_running_loop().time() - started < 4.0
    async with WebSocketClient(server.ws_url, InferenceConfig(**FAST, verify_tls=tls_files.certfile)) as client:
        assert client.is_open


async def test_tls_host_refuses_a_plain_http_probe_and_keeps_serving(start_host, tls_files):
    """An http:// GET to a TLS port fails on the client side without harming the host."""
    server = await start_host(certfile=tls_files.certfile, keyfile=tls_files.keyfile)
    async with httpx.AsyncClient(timeout=3) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"http://127.0.0.1:{server.port}/health")
    async with httpx.AsyncClient(verify=False, timeout=5) as http:
        assert (await http.get(server.http_url + "/health")).status_code == 200


async def test_cli_serves_tls_with_a_token_file(tls_files, tmp_path):
    """fabstir-host --tls-cert --tls-key --auth-token-file announces wss:// and guards /v1/models."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {k: v for k, v in os.environ.items() if k != "FABSTIR_HOST_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabstir_jupyter.host", "--backend", "scripted", "--port", "0",
        "--tls-cert", tls_files.certfile, "--tls-key", tls_files.keyfile,
        "--auth-token-file", str(token_file), "--exit-with-parent", "--log-level", "debug",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("fabstir-host listening on wss://127.0.0.1:")
        ws_url = line.rsplit(" ", 1)[1]
        base = ws_url.replace("wss://", "https://").removesuffix("/v1/ws")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls_files.certfile), timeout=5) as http:
            assert (await http.get(base + "/health")).status_code == 200
            assert (await http.get(base + "/v1/models")).status_code == 401
            ok = await http.get(base + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
        config = InferenceConfig(**FAST, verify_tls=tls_files.certfile, auth_token=TOKEN)
        async with WebSocketClient(ws_url, config, headers=config.auth_headers(ws_url)) as client:
            assert client.is_open
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode()
    assert proc.returncode == 0
    assert TOKEN not in stderr
