"""Bearer-token authentication of private hosts, from both sides, on loopback."""

from __future__ import annotations

import logging

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from _hosts import CountingBackend
from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.errors import AuthFailed, InvalidOptions
from fabstir_jupyter.host import HostConfig
from fabstir_jupyter.host.cli import build_parser, make_config
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.transport import ConnectionPool, WebSocketClient
from fabstir_jupyter.usage import ListSink

from .conftest import TOKEN, WRONG_TOKEN

FAST = dict(connection_timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0,
            backoff_initial=0.0, backoff_max=0.01, usage_db=":memory:")


def manager_for(url: str, **config) -> InferenceManager:
    return InferenceManager([url], InferenceConfig(**FAST, **config), usage=ListSink())


@pytest.mark.parametrize("token", [None, WRONG_TOKEN, TOKEN + "x", TOKEN[:-1]],
                         ids=["missing", "wrong", "extended", "truncated"])  # ids never show a token
async def test_client_without_the_right_token_gets_auth_failed_and_no_inference(start_host, token):
    """A missing or wrong token fails with AUTH_FAILED and the host starts no generation."""
    server = await start_host(backend=CountingBackend(), auth_token=TOKEN)
    manager = manager_for(server.http_url, auth_token=token)
    try:
        with pytest.raises(AuthFailed) as info:
            await manager.ainfer("hello there", max_tokens=4)
    finally:
        await manager.aclose()
    assert info.value.code == "AUTH_FAILED"
    assert not info.value.retryable
    assert server.backend.generations == 0
    assert server.active_streams == 0


async def test_client_with_the_token_runs_inference_end_to_end(start_host):
    """The right token (per host) opens the socket and the answer streams through InferenceManager."""
    server = await start_host(backend=CountingBackend(), auth_token=TOKEN)
    manager = manager_for(server.http_url, auth_tokens={server.ws_url: TOKEN}, auth_token=WRONG_TOKEN)
    try:
        result = await manager.ainfer("hello there", max_tokens=4)
        tokens = [t async for t in manager.stream_inference("and again", {"max_tokens": 3})]
    finally:
        await manager.aclose()
    assert result.text
    assert len(tokens) >= 1
    assert server.backend.generations == 2


async def test_host_without_a_token_ignores_client_tokens(start_host):
    """A public host serves clients whether they send a token or not."""
    server = await start_host()
    manager = manager_for(server.http_url, auth_token=TOKEN)
    try:
        result = await manager.ainfer("hello there", max_tokens=4)
    finally:
        await manager.aclose()
    assert result.text
    assert "auth-bearer" not in server.features


@pytest.mark.parametrize("header", [None, f"Bearer {WRONG_TOKEN}", f"Basic {TOKEN}", TOKEN, "Bearer "],
                         ids=["missing", "wrong-bearer", "basic", "bare-token", "empty-bearer"])  # no token in ids
async def test_host_refuses_the_upgrade_with_401(start_host, header):
    """Without exactly 'Bearer <token>' the upgrade is answered 401 before any frame."""
    server = await start_host(backend=CountingBackend(), auth_token=TOKEN)
    headers = {"Authorization": header} if header is not None else None
    with pytest.raises(InvalidStatus) as info:
        await connect(server.ws_url, additional_headers=headers, open_timeout=5)
    assert info.value.response.status_code == 401
    assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"AUTH_FAILED" in info.value.response.body
    assert TOKEN.encode() not in info.value.response.body
    assert server.backend.generations == 0


async def test_pool_sends_the_token_per_host(start_host):
    """ConnectionPool with the config's auth_headers opens sockets to a private host."""
    server = await start_host(auth_token=TOKEN)
    config = InferenceConfig(**FAST, auth_tokens={server.http_url: TOKEN})
    async with ConnectionPool(config, headers_for=config.auth_headers) as pool:
        client = await pool.checkout(server.http_url)
        assert client.is_open
        pool.checkin(client)


async def test_public_endpoints_stay_public_and_models_need_the_token(start_host):
    """/health and /v1/version answer anyone (version lists auth-bearer); /v1/models needs the token."""
    server = await start_host(auth_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
        health = await http.get("/health")
        version = await http.get("/v1/version")
        anonymous = await http.get("/v1/models")
        wrong = await http.get("/v1/models", headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
        right = await http.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert version.status_code == 200 and "auth-bearer" in version.json()["features"]
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "AUTH_FAILED"
    assert wrong.status_code == 401
    assert right.status_code == 200 and right.json()["models"]
    for response in (anonymous, wrong):
        assert TOKEN not in response.text


async def test_token_never_appears_in_reprs_logs_or_errors(start_host, caplog):
    """The token is absent from config reprs, error text and every log record, even at DEBUG."""
    caplog.set_level(logging.DEBUG)
    server = await start_host(auth_token=TOKEN)
    good = manager_for(server.http_url, auth_token=TOKEN, trace=True)
    bad = manager_for(server.http_url, auth_tokens={server.http_url: WRONG_TOKEN}, trace=True)
    try:
        await good.ainfer("hello there", max_tokens=2)
        with pytest.raises(AuthFailed) as info:
            await bad.ainfer("hello there", max_tokens=2)
        raw = WebSocketClient(server.ws_url, good.config, headers=good.config.auth_headers(server.ws_url))
        async with raw:
            texts = [repr(raw)]
    finally:
        await good.aclose()
        await bad.aclose()
    error = info.value
    texts += [repr(good.config), str(good.config), repr(bad.config), repr(server.config), repr(server),
              repr(good), repr(good.pool), str(error), repr(error), error.hint or "", caplog.text]
    texts += [str(r.args) for r in caplog.records]
    for text in texts:
        assert TOKEN not in text
        assert WRONG_TOKEN not in text
    # the handshake debug lines were logged, with the header value redacted
    assert any("[redacted]" in r.getMessage() for r in caplog.records if r.name == "websockets.client")
    assert any("[redacted]" in r.getMessage() for r in caplog.records
               if r.name == "fabstir_jupyter.host.websockets")


def test_config_rejects_bad_tokens_without_echoing_them():
    """Tokens with spaces or newlines are refused by both configs, and the message omits them."""
    for bad in ("", "two words", "line\nbreak", "tab\t"):
        with pytest.raises(InvalidOptions) as client_info:
            InferenceConfig(auth_token=bad)
        with pytest.raises(InvalidOptions) as host_info:
            HostConfig(auth_token=bad)
        for info in (client_info, host_info):
            assert bad not in str(info.value) or bad == ""
    with pytest.raises(InvalidOptions):
        InferenceConfig(auth_tokens={"ftp://nope": TOKEN})
    with pytest.raises(InvalidOptions):
        HostConfig(keyfile="key.pem")


def test_config_matches_tokens_by_host_in_any_url_form():
    """auth_tokens keys in http, ws or bare form all match the pool's ws:// URL."""
    config = InferenceConfig(auth_tokens={"http://10.0.0.1:8080": "a", "wss://h.example:443/v1/ws": "b"},
                             auth_token="c")
    assert config.auth_headers("ws://10.0.0.1:8080/v1/ws") == {"Authorization": "Bearer a"}
    assert config.auth_headers("10.0.0.1:8080") == {"Authorization": "Bearer a"}
    assert config.auth_headers("https://h.example:443") == {"Authorization": "Bearer b"}
    assert config.auth_headers("ws://other:1/v1/ws") == {"Authorization": "Bearer c"}
    assert InferenceConfig().auth_headers("ws://other:1/v1/ws") is None
    assert config.replace(trace=True).auth_headers("10.0.0.1:8080") == {"Authorization": "Bearer a"}
    assert InferenceConfig(auth_token="x") == InferenceConfig()


def test_cli_reads_the_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """--auth-token-file wins over FABSTIR_HOST_TOKEN; neither set means no auth; no flag takes a value."""
    parser = build_parser()
    monkeypatch.delenv("FABSTIR_HOST_TOKEN", raising=False)
    assert make_config(parser.parse_args([])).auth_token is None
    monkeypatch.setenv("FABSTIR_HOST_TOKEN", WRONG_TOKEN)
    assert make_config(parser.parse_args([])).auth_token == WRONG_TOKEN
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert make_config(parser.parse_args(["--auth-token-file", str(path)])).auth_token == TOKEN
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InvalidOptions):
        make_config(parser.parse_args(["--auth-token-file", str(tmp_path / "empty")]))
    with pytest.raises(InvalidOptions) as info:
        make_config(parser.parse_args(["--auth-token-file", str(tmp_path / "missing")]))
    assert "missing" in str(info.value)
    with pytest.raises(SystemExit):
        parser.parse_args(["--auth-token", TOKEN])


async def test_connect_to_host_and_a_default_pool_send_the_configured_token(start_host):
    """connect_to_host and a ConnectionPool built from the config authenticate without extra wiring."""
    server = await start_host(auth_token=TOKEN)
    manager = manager_for(server.http_url, auth_token=TOKEN)
    try:
        client = await manager.connect_to_host(server.ws_url)
        assert client.is_open
        await client.close()
    finally:
        await manager.aclose()
    async with ConnectionPool(InferenceConfig(**FAST, auth_token=TOKEN)) as pool:
        conn = await pool.checkout(server.ws_url)
        assert conn.is_open
        pool.checkin(conn)
