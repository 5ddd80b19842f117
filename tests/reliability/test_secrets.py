"""Issue 5 / secrets: the private key and tokens used by the test suite never show up in reprs,
logs (DEBUG, trace=True), error messages, saved notebooks, docs or other files of the repo."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from fabstir_jupyter.config import InferenceConfig
from fabstir_jupyter.errors import FabstirError
from fabstir_jupyter.host.scripted import ScriptedBackend
from fabstir_jupyter.host.server import HostConfig, HostServer
from fabstir_jupyter.inference import InferenceManager
from fabstir_jupyter.usage import ListSink

ROOT = Path(__file__).resolve().parents[2]
# the suite's own secrets, read from the test sources so the scan follows them if they change
_KEY_RE = re.compile(r'^\s*(?:KEY|TOKEN|WRONG_TOKEN)\s*=\s*"([^"]{16,})"', re.M)
SUITE_SECRETS = sorted({m for p in ROOT.glob("tests/**/*.py") for m in _KEY_RE.findall(p.read_text())})
KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"  # tests/test_sdk.py
TOKEN = "tok-reliability-5e1f0c3a9d7b42e6"
BAD_KEY = "0xdeadbeef-not-a-key-91c2f7"


def _variants(secret: str) -> list[str]:
    out = [secret]
    if secret.startswith("0x"):
        out.append(secret[2:])
    return out


def _assert_clean(text: str, secrets) -> None:
    for secret in secrets:
        for v in _variants(secret):
            assert v not in text, f"secret {secret[:8]}... found"


def test_suite_secrets_were_found():
    assert KEY in SUITE_SECRETS


def test_sdk_authenticate_hides_key_in_repr_errors_and_logs(caplog):
    """authenticate(key): repr/str of the SDK and of AuthFailed for a bad key carry no key; DEBUG logs neither."""
    pytest.importorskip("eth_account")
    from fabstir_jupyter.sdk import FabstirSDK

    caplog.set_level(logging.DEBUG)
    sdk = FabstirSDK(network="static", hosts=["ws://127.0.0.1:9/v1/ws"])
    try:
        address = sdk.authenticate(KEY)
        assert address.startswith("0x")
        seen = [repr(sdk), str(sdk), repr(sdk.__dict__), repr(sdk.config)]
        with pytest.raises(FabstirError) as info:
            sdk.authenticate(BAD_KEY)
        seen += [str(info.value), repr(info.value), repr(info.value.__cause__), repr(info.value.__context__)]
        assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        sdk.close()
    _assert_clean("\n".join(seen) + caplog.text, [KEY, BAD_KEY])


async def test_auth_token_hidden_in_config_logs_and_errors(caplog):
    """InferenceConfig(auth_token, trace=True): repr, DEBUG logs (wire trace, websockets) and errors
    of good and refused requests carry no token."""
    if not hasattr(InferenceConfig(), "auth_token"):
        pytest.skip("InferenceConfig has no auth_token yet")
    caplog.set_level(logging.DEBUG)
    host_auth = "auth_token" in HostConfig.__dataclass_fields__
    server = HostServer(HostConfig(**({"auth_token": TOKEN} if host_auth else {})), ScriptedBackend())
    await server.start()
    seen: list[str] = []
    try:
        for token in (TOKEN, TOKEN + "-wrong"):
            config = InferenceConfig(connection_timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0,
                                     backoff_initial=0.0, backoff_max=0.01, usage_db=":memory:",
                                     auth_token=token, trace=True)
            seen += [repr(config), str(config)]
            manager = InferenceManager([server.ws_url], config, usage=ListSink())
            try:
                result = await manager.ainfer("secret scan", max_tokens=3)
                seen.append(repr(result))
            except FabstirError as exc:
                seen += [str(exc), repr(exc)]
            finally:
                seen.append(repr(manager))
                await manager.aclose()
    finally:
        await server.close()
    _assert_clean("\n".join(seen) + caplog.text, [TOKEN])


_SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv", "venv", ".mypy_cache", ".ruff_cache"}


def _artifacts() -> list[Path]:
    """Every text-ish file of the repo except test sources (which define the secrets)."""
    files = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or _SKIP_DIRS & set(path.relative_to(ROOT).parts):
            continue
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" and path.suffix == ".py":
            continue
        if path.stat().st_size > 20_000_000:
            continue
        files.append(path)
    return files


def test_notebooks_docs_and_artifacts_hold_no_suite_secret():
    """Saved notebooks (notebooks/*.ipynb, outputs included), docs, README, benchmarks results and any
    other file the suite may leave in the repo: none contains a secret used by the tests."""
    notebooks = list(ROOT.glob("notebooks/*.ipynb"))
    assert notebooks, "no saved notebooks to scan"
    secrets = [*SUITE_SECRETS, TOKEN]
    hits = []
    for path in _artifacts():
        data = path.read_bytes()
        for secret in secrets:
            if any(v.encode() in data for v in _variants(secret)):
                hits.append(f"{path.relative_to(ROOT)}: {secret[:8]}...")
    assert not hits, hits


def test_marketplace_client_hides_its_key_and_the_rpc_urls_secret(caplog):
    """MarketplaceClient(account=KEY) against an RPC URL with a token in its path: repr, vars, the
    ConnectionFailed error (its cause and context too) and DEBUG logs carry neither."""
    pytest.importorskip("web3")
    from fabstir_jupyter.crypto import PrivateKey
    from fabstir_jupyter.marketplace import MarketplaceClient

    caplog.set_level(logging.DEBUG)
    url_secret = "rpc-path-secret-7f3a9c"
    client = MarketplaceClient(f"http://127.0.0.1:9/v3/{url_secret}", "0x" + "11" * 20,
                               account=PrivateKey.from_hex(KEY), timeout=2)
    with pytest.raises(FabstirError) as info:
        client.complete_job(1)
    assert info.value.code == "CONNECTION_FAILED" and info.value.retryable
    assert info.value.__cause__ is None and info.value.__context__ is None
    seen = [repr(client), str(client), repr(vars(client)), str(info.value), repr(info.value)]
    _assert_clean("\n".join(seen) + caplog.text, [KEY, url_secret])
    assert client.address in repr(client)
