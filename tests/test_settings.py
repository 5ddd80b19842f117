"""The one settings resolver: layers, sources, and validation naming where a bad value came from."""

from __future__ import annotations

import json

import pytest

from fabstir_jupyter.errors import InvalidOptions
from fabstir_jupyter.settings import SETTINGS, SettingsSources, load_settings


def test_every_setting_records_the_layer_it_came_from(tmp_path):
    """Arguments (or %config), the environment, the config file and defaults each show as the source."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"max_tokens": 7, "local_backend": "scripted", "local_host_args": ["--x"]}))
    env = {"FABSTIR_HOSTS": "http://env:1", "FABSTIR_DEFAULT_MODEL": "env-model"}
    settings = load_settings(usage_db=":memory:", source="%config", environ=env, config_file=path)
    assert dict(settings.sources) == {
        "hosts": "$FABSTIR_HOSTS",
        "network": "default",
        "rpc_url": "default",
        "local_backend": "config file",
        "local_hosts": "default",
        "local_host_args": "config file",
        "default_model": "$FABSTIR_DEFAULT_MODEL",
        "max_tokens": "config file",
        "usage_db": "%config",
        "budget": "default",
        "payment_token": "default",
        "key_file": "default",
        "local_paid": "default",
    }
    assert (settings.network, settings.hosts, settings.max_tokens, settings.default_model, settings.usage_db) == (
        "static", ("http://env:1",), 7, "env-model", ":memory:")
    assert set(settings.sources) == {s.name for s in SETTINGS}


@pytest.mark.parametrize("name, env, value, says", [
    ("max_tokens", "FABSTIR_MAX_TOKENS", "-3", "max_tokens from $FABSTIR_MAX_TOKENS must be an integer >= 1, not '-3'"),
    ("max_tokens", "FABSTIR_MAX_TOKENS", "lots", "max_tokens from $FABSTIR_MAX_TOKENS must be an integer >= 1"),
    ("local_backend", "FABSTIR_LOCAL_BACKEND", "gpt", "unknown local backend 'gpt'"),
    ("network", "FABSTIR_NETWORK", "mainnet", "unknown network 'mainnet'"),
    ("budget", "FABSTIR_BUDGET", "0", "budget from $FABSTIR_BUDGET must be an amount above 0"),
    ("budget", "FABSTIR_BUDGET", "-5", "budget from $FABSTIR_BUDGET must be an amount above 0"),
    ("budget", "FABSTIR_BUDGET", "lots", "budget from $FABSTIR_BUDGET must be an amount above 0"),
    ("payment_token", "FABSTIR_PAYMENT_TOKEN", "doge", "payment_token from $FABSTIR_PAYMENT_TOKEN must be"),
    ("local_paid", "FABSTIR_LOCAL_PAID", "maybe", "local_paid from $FABSTIR_LOCAL_PAID must be true or false"),
])
def test_a_bad_environment_value_is_refused_naming_it(tmp_path, name, env, value, says):
    """A bad FABSTIR_* value is InvalidOptions with the setting as its field and the variable named."""
    with pytest.raises(InvalidOptions) as info:
        load_settings(environ={env: value}, config_file=tmp_path / "none.json")
    assert info.value.field == name and says in info.value.message


def test_bad_file_values_name_the_file(tmp_path):
    """max_tokens, usage_db and default_model from the config file are refused naming the file."""
    path = tmp_path / "config.json"
    for stored, says in (({"max_tokens": 0}, "max_tokens from config file"),
                         ({"usage_db": ""}, "usage_db from config file"),
                         ({"default_model": 5}, "default_model from config file")):
        path.write_text(json.dumps(stored))
        with pytest.raises(InvalidOptions) as info:
            load_settings(environ={}, config_file=path)
        assert info.value.message.startswith(f"{says} {path} must be"), info.value.message


def test_lookup_shows_the_winning_raw_value_without_validating(tmp_path):
    """SettingsSources.lookup is what %fabstir config shows: the value and its layer, unvalidated."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"max_tokens": 2, "network": "static"}))
    layers = SettingsSources({"max_tokens": 5, "network": None}, explicit_source="%config",
                             environ={"FABSTIR_NETWORK": "  "}, config_file=path)
    assert layers.lookup("max_tokens") == (5, "%config")
    assert layers.lookup("network") == ("static", "config file")  # a blank variable is not set
    assert layers.lookup("local_hosts") == (1, "default")
    assert layers.where("config file") == f"config file {path}"
