"""The SDK facade: settings precedence, the local network of host processes, authentication."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from fabstir_jupyter.errors import AuthFailed, ConnectionFailed, InvalidOptions, PaymentRequired
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.networks import NETWORKS as CHAIN_NETWORKS, NetworkPreset, resolve_network
from fabstir_jupyter.sdk import NETWORKS, FabstirSDK, FabstirSDKCore, load_settings

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


def test_bad_fabstir_hosts_is_refused_when_settings_load(tmp_path):
    """FABSTIR_HOSTS="not a url!!" is refused by load_settings and FabstirSDK, naming the variable
    (it used to become three hosts, failing only at the first request)."""
    env = {"FABSTIR_HOSTS": "not a url!!"}
    with pytest.raises(InvalidOptions) as info:
        load_settings(environ=env, config_file=tmp_path / "none.json")
    assert "$FABSTIR_HOSTS" in info.value.message and "'not a url!!'" in info.value.message


@pytest.mark.parametrize("hosts, says", [
    ("http://a:1 http://b:2", "must be a list of url strings"),
    (["http://a:1", "http://bad host:2"], "invalid host name"),
    ([1], "must be a list of url strings"),
])
def test_bad_hosts_in_the_config_file_name_the_file(tmp_path, hosts, says):
    """The config file's hosts must be a list of usable urls; the error names the file."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hosts": hosts}))
    with pytest.raises(InvalidOptions) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in info.value.message and says in info.value.message and info.value.field == "hosts"


def test_empty_usage_db_argument_is_refused(tmp_path):
    """InferenceConfig(usage_db="") is refused when built, saying where it came from (it used to
    resolve to the current directory)."""
    from fabstir_jupyter.config import InferenceConfig

    for value in ("", "  "):
        with pytest.raises(InvalidOptions) as info:
            InferenceConfig(usage_db=value)
        assert info.value.field == "usage_db" and "InferenceConfig(usage_db=...)" in info.value.message
    with pytest.raises(InvalidOptions):
        FabstirSDK(hosts=["http://127.0.0.1:9"], config=InferenceConfig(usage_db=":memory:").replace(usage_db=""))


def test_local_network_starts_hosts_and_stops_them_on_close():
    """FabstirSDK(local) registers scripted hosts on a local chain, infers through them, and stops them."""
    pytest.importorskip("eth_tester", reason="the local network needs eth-tester and py-evm (the 'chain' extra)")
    sdk = FabstirSDK(network="local", local_backend="scripted", local_hosts=2,
                     config=__import__("fabstir_jupyter").InferenceConfig(usage_db=":memory:"))
    try:
        manager = sdk.get_inference_manager()
        assert len(sdk.host_urls) == 2
        assert [h.url for h in sdk.local_network.hosts] == sdk.host_urls
        pids = [p.pid for p in sdk._processes]
        assert manager.infer("local hello", max_tokens=3).text == scripted_text("local hello", 3)
        assert {h.address for h in sdk.get_host_manager().hosts} == {h.address for h in sdk.local_network.hosts}
        assert sdk.get_session_manager() is manager.sessions
    finally:
        sdk.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_base_sepolia_refuses_inference():
    """On base-sepolia the SDK refuses inference with PAYMENT_REQUIRED."""
    with FabstirSDK(network="base-sepolia", hosts=["http://127.0.0.1:9"]) as sdk, pytest.raises(PaymentRequired):
        sdk.get_inference_manager().stream("hello")


def test_base_sepolia_without_rpc_url_names_fabstir_rpc_url(tmp_path):
    """base-sepolia with neither an RPC URL nor static hosts is refused with a pointer to FABSTIR_RPC_URL."""
    with pytest.raises(InvalidOptions) as info:
        load_settings(network="base-sepolia", environ={}, config_file=tmp_path / "none.json")
    assert info.value.field == "rpc_url" and "FABSTIR_RPC_URL" in str(info.value)


def test_base_sepolia_takes_its_rpc_url_from_argument_environment_then_file(tmp_path):
    """The RPC URL follows the settings precedence; the preset supplies the registry addresses."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"rpc_url": "https://file.example/rpc"}))
    env = {"FABSTIR_NETWORK": "base-sepolia", "FABSTIR_RPC_URL": "https://env.example/v2/SECRET"}
    assert load_settings(environ={"FABSTIR_NETWORK": "base-sepolia"}, config_file=path).rpc_url == \
        "https://file.example/rpc"
    settings = load_settings(environ=env, config_file=path)
    assert settings.chain.rpc_url == "https://env.example/v2/SECRET" and settings.chain.chain_id == 84532
    assert dict(settings.chain.addresses) == dict(CHAIN_NETWORKS["base-sepolia"].addresses)
    assert "SECRET" not in repr(settings) and "SECRET" not in repr(settings.chain)
    chosen = load_settings(rpc_url="https://arg.example", environ=env, config_file=path)
    assert chosen.chain.rpc_url == "https://arg.example"


def test_base_sepolia_discovers_through_its_rpc_url_and_refuses_inference(monkeypatch):
    """With an RPC URL, base-sepolia reads its registry there (errors hide the URL's key); inference is refused."""
    monkeypatch.delenv("FABSTIR_HOSTS", raising=False)
    with FabstirSDK(network="base-sepolia", rpc_url="http://127.0.0.1:9/v2/SECRETKEY") as sdk:
        manager = sdk.get_inference_manager()
        with pytest.raises(PaymentRequired):
            manager.stream("hello")
        with pytest.raises(ConnectionFailed) as info:
            asyncio.run(sdk.get_host_manager().discover_all_active_hosts(probe=False))
        assert "SECRETKEY" not in str(info.value)


def test_network_names_and_presets():
    """The SDK knows local, static and the chain presets; base-sepolia's addresses are spec/PROTOCOL.md §8's."""
    assert NETWORKS == ("local", "static", "base-sepolia")
    preset = CHAIN_NETWORKS["base-sepolia"]
    assert (preset.chain_id, preset.rpc_url) == (84532, None)
    assert preset.addresses["node_registry"] == "0x8BC0Af4aAa2dfb99699B1A24bA85E507de10Fd22"
    assert preset.addresses["stable_token"] == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


def test_dict_network_is_resolved_into_a_named_chain(tmp_path):
    """A dict with rpc_url, chain_id and addresses is a chain network of its own (default name 'custom')."""
    spec = {"rpc_url": "https://rpc.example", "chain_id": 31337,
            "addresses": {"node_registry": "0x" + "11" * 20, "multicall": "0x" + "22" * 20}}
    settings = load_settings(network=spec, environ={}, config_file=tmp_path / "none.json")
    assert settings.network == "custom"
    assert settings.chain == NetworkPreset(chain_id=31337, addresses=spec["addresses"], rpc_url="https://rpc.example")
    named = resolve_network({**spec, "name": "devnet", "rpc_url": None}, rpc_url="https://fallback.example")
    assert (named.name, named.rpc_url) == ("devnet", "https://fallback.example")


@pytest.mark.parametrize("spec, field", [
    ({"rpc_url": "https://r.example"}, "addresses"),
    ({"rpc_url": "https://r.example", "addresses": {"model_registry": "0x" + "11" * 20}}, "addresses"),
    ({"rpc_url": "https://r.example", "addresses": {"node_registry": "0x1234"}}, "addresses"),
    ({"rpc_url": "https://r.example", "addresses": {"node_registry": "0x" + "11" * 20, "token": "x"}}, "addresses"),
    ({"rpc_url": "ftp://r.example", "addresses": {"node_registry": "0x" + "11" * 20}}, "rpc_url"),
    ({"rpc_url": "https://r.example", "chain_id": -1, "addresses": {"node_registry": "0x" + "11" * 20}},
     "chain_id"),
    ({"name": "local", "rpc_url": "https://r.example", "addresses": {"node_registry": "0x" + "11" * 20}},
     "network"),
    ({"rpc": "https://r.example", "addresses": {"node_registry": "0x" + "11" * 20}}, "network"),
    ({"provider": "https://r.example", "addresses": {"node_registry": "0x" + "11" * 20}}, "provider"),
])
def test_bad_dict_networks_are_invalid_options(spec, field):
    """A malformed custom network is refused with the part at fault named."""
    with pytest.raises(InvalidOptions) as info:
        resolve_network(spec)
    assert info.value.field == field


def test_authenticate_never_shows_the_key():
    """The address is derived; the key appears in no repr, str or error."""
    with FabstirSDKCore(hosts=["http://127.0.0.1:9"]) as sdk:
        address = sdk.authenticate(KEY)
        assert address.startswith("0x") and sdk.address == address
        assert KEY[2:] not in repr(sdk) and KEY[2:] not in str(sdk.__dict__.get("settings"))
        with pytest.raises(AuthFailed) as info:
            sdk.authenticate(KEY[:-4] + "zzzz")
        assert KEY[2:-4] not in str(info.value) and KEY[2:-4] not in repr(info.value)


def test_the_authenticated_key_signs_encrypted_inits(fast_config):
    """The user's key signs the inference manager's encrypted inits (so a host can match a paid job's
    depositor), whether the SDK authenticated before or after the manager was made; the key stays hidden."""
    from fabstir_jupyter.connections import PoolConnector

    config = fast_config.replace(usage_db=":memory:")
    with FabstirSDKCore(hosts=["http://127.0.0.1:9"], config=config) as sdk:
        address = sdk.authenticate(KEY)
        connector = sdk.get_inference_manager().connector
        assert isinstance(connector, PoolConnector) and connector.signer.address == address
        assert KEY[2:] not in repr(connector) and KEY[2:] not in repr(connector.signer)
    with FabstirSDKCore(hosts=["http://127.0.0.1:9"], config=config) as later:
        connector = later.get_inference_manager().connector
        assert connector.signer is None  # a fresh key of the manager's own, made at the first encrypted request
        address = later.authenticate(KEY)
        assert connector.signer.address == address


def test_local_network_without_the_local_extra_says_what_to_install(monkeypatch):
    """Without web3/eth-tester, network='local' fails with InvalidOptions naming the extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "fabstir_jupyter.local.network", None)  # as if it could not import
    with FabstirSDK(network="local", local_backend="scripted") as sdk, pytest.raises(InvalidOptions) as info:
        sdk.get_host_manager()
    assert info.value.field == "network" and "fabstir-jupyter[local]" in (info.value.hint or "")
    assert sdk.local_network is None


def test_local_network_without_the_local_extra_names_the_extra_to_install(tmp_path):
    """FabstirSDK() on a machine without the 'local' extra says which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['eth_tester'] = None\n"  # as if eth-tester were not installed
        "from fabstir_jupyter import FabstirSDK\n"
        "from fabstir_jupyter.errors import InvalidOptions\n"
        "sdk = FabstirSDK()\n"
        "try:\n"
        "    sdk.get_inference_manager()\n"
        "except InvalidOptions as exc:\n"
        "    print(exc.code, '|', exc.message, '|', exc.hint)\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("FABSTIR_HOSTS", None)
    env.pop("FABSTIR_NETWORK", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout
    code_text, message, hint = (part.strip() for part in out.split("|"))
    assert code_text == "INVALID_OPTIONS"
    assert "eth_tester" in message and "fabstir-jupyter[local]" in message
    assert "fabstir-jupyter[local]" in hint
