"""The SDK facade: settings precedence, the local network of host processes, authentication."""

from __future__ import annotations

import json
import os

import pytest

from fabstir_jupyter.errors import AuthFailed, InvalidOptions, PaymentRequired
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.sdk import FabstirSDK, FabstirSDKCore, load_settings

KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def test_settings_take_arguments_then_environment_then_file(tmp_path):
    """Arguments win over FABSTIR_* variables, which win over config.json."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"network": "static", "hosts": ["http://file:1"], "local_backend": "scripted"}))
    from_file = load_settings(environ={}, config_file=path)
    assert (from_file.network, from_file.hosts, from_file.local_backend) == ("static", ("http://file:1",), "scripted")
    env = {"FABSTIR_HOSTS": "http://env:1", "FABSTIR_NETWORK": "static"}
    assert load_settings(environ=env, config_file=path).hosts == ("http://env:1",)
    assert load_settings(hosts=["http://arg:1"], environ=env, config_file=path).hosts == ("http://arg:1",)
    assert load_settings(network="local", environ=env, config_file=path).network == "local"


def test_defaults_are_the_embedded_local_network(tmp_path):
    """With nothing configured the network is local with the embedded model."""
    settings = load_settings(environ={}, config_file=tmp_path / "missing.json")
    assert (settings.network, settings.local_backend, settings.local_hosts) == ("local", "llama-cpp", 1)


@pytest.mark.parametrize("kwargs, field", [
    ({"network": "mainnet"}, "network"),
    ({"network": "static"}, "hosts"),
    ({"local_backend": "gpt"}, "local_backend"),
    ({"local_hosts": 0}, "local_hosts"),
])
def test_bad_settings_are_invalid_options(tmp_path, kwargs, field):
    """Unknown networks, missing hosts and bad local settings are refused with the field named."""
    with pytest.raises(InvalidOptions) as info:
        load_settings(environ={}, config_file=tmp_path / "none.json", **kwargs)
    assert info.value.field == field


def test_broken_config_file_is_a_clear_error(tmp_path):
    """An unreadable config file names itself instead of failing deep inside."""
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(InvalidOptions) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value)


def test_local_network_starts_hosts_and_stops_them_on_close():
    """FabstirSDK(local) starts scripted host processes, infers through them, and stops them."""
    sdk = FabstirSDK(network="local", local_backend="scripted", local_hosts=2,
                     config=__import__("fabstir_jupyter").InferenceConfig(usage_db=":memory:"))
    try:
        manager = sdk.get_inference_manager()
        assert len(sdk.host_urls) == 2
        pids = [p.pid for p in sdk._processes]
        assert manager.infer("local hello", max_tokens=3).text == scripted_text("local hello", 3)
        assert sdk.get_session_manager() is manager.sessions
    finally:
        sdk.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_base_sepolia_refuses_inference():
    """On base-sepolia the SDK refuses inference with PAYMENT_REQUIRED."""
    with FabstirSDK(network="base-sepolia", hosts=["http://127.0.0.1:9"]) as sdk:
        with pytest.raises(PaymentRequired):
            sdk.get_inference_manager().stream("hello")


def test_authenticate_never_shows_the_key():
    """The address is derived; the key appears in no repr, str or error."""
    with FabstirSDKCore(hosts=["http://127.0.0.1:9"]) as sdk:
        address = sdk.authenticate(KEY)
        assert address.startswith("0x") and sdk.address == address
        assert KEY[2:] not in repr(sdk) and KEY[2:] not in str(sdk.__dict__.get("settings"))
        with pytest.raises(AuthFailed) as info:
            sdk.authenticate(KEY[:-4] + "zzzz")
        assert KEY[2:-4] not in str(info.value) and KEY[2:-4] not in repr(info.value)
