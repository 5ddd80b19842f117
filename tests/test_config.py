"""Option objects and validation: every bad input is refused before any I/O, naming its field."""

import pytest

from fabstir_jupyter import InferenceManager
from fabstir_jupyter.config import (
    HostRequirements,
    InferenceConfig,
    InferenceOptions,
    resolve_options,
    validate_prompt,
)
from fabstir_jupyter.errors import InvalidOptions, InvalidPrompt
from fabstir_jupyter.usage import ListSink

CONFIG = InferenceConfig(max_prompt_chars=1000, max_tokens_cap=512)

BAD_PROMPTS = [
    ("", "prompt"),
    ("   \n\t", "prompt"),
    (None, "prompt"),
    (42, "prompt"),
    (b"bytes prompt", "prompt"),
    (["a", "list"], "prompt"),
    ("nul \x00 inside", "prompt"),
    ("bell \x07 inside", "prompt"),
    ("escape \x1b[31m", "prompt"),
    ("vertical tab \x0b", "prompt"),
    ("lone surrogate \ud800", "prompt"),
    ("x" * 1001, "prompt"),
]

BAD_OPTIONS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 513}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "100"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.2}, "top_p"),
    ({"top_p": -1}, "top_p"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stop_sequences": [3]}, "stop_sequences"),
    ({"stop_sequences": ["ok", "\x00"]}, "stop_sequences"),
    ({"stop_sequences": ["s"] * 17}, "stop_sequences"),
    ({"stop_sequences": ["x" * 201]}, "stop_sequences"),
    ({"stop_sequences": 5}, "stop_sequences"),
    ({"seed": -1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"model": ""}, "model"),
    ({"model": 7}, "model"),
    ({"host_address": ""}, "host_address"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages"),
    ({"system_prompt": ""}, "system_prompt"),
    ({"temprature": 0.5}, "temprature"),
    ({"max_token": 10}, "max_token"),
]


@pytest.mark.parametrize("prompt, field", BAD_PROMPTS)
def test_bad_prompt_is_invalid_prompt(prompt, field):
    """A bad prompt raises INVALID_PROMPT naming the prompt."""
    with pytest.raises(InvalidPrompt) as info:
        validate_prompt(prompt, max_chars=CONFIG.max_prompt_chars)
    assert info.value.code == "INVALID_PROMPT"
    assert info.value.field == field
    assert not info.value.retryable


@pytest.mark.parametrize("options, field", BAD_OPTIONS)
def test_bad_option_is_invalid_options(options, field):
    """A bad option value or unknown name raises INVALID_OPTIONS/INVALID_PROMPT naming the field."""
    with pytest.raises((InvalidOptions, InvalidPrompt)) as info:
        resolve_options(None, options, CONFIG)
    assert info.value.field == field
    assert field.split("[")[0].split(".")[0] in str(info.value)


@pytest.mark.parametrize("prompt, field", BAD_PROMPTS[:6])
def test_manager_refuses_bad_prompt_before_any_io(prompt, field):
    """The manager validates synchronously: nothing is connected, nothing recorded."""
    sink = ListSink()
    manager = InferenceManager(["ws://127.0.0.1:9/v1/ws"], CONFIG, usage=sink)
    with pytest.raises(InvalidPrompt):
        manager.stream(prompt)
    assert manager.pool.stats() == {"idle": 0, "in_use": 0}
    assert sink.records == []


def test_manager_refuses_unknown_keyword_before_any_io():
    """An unknown keyword option is refused when the stream is created."""
    manager = InferenceManager(["ws://127.0.0.1:9/v1/ws"], CONFIG, usage=ListSink())
    with pytest.raises(InvalidOptions) as info:
        manager.stream("hello", temprature=0.2)
    assert info.value.field == "temprature"


def test_messages_count_toward_the_prompt_limit():
    """Prompt plus messages over max_prompt_chars is INVALID_PROMPT."""
    manager = InferenceManager(["ws://127.0.0.1:9/v1/ws"], CONFIG, usage=ListSink())
    with pytest.raises(InvalidPrompt):
        manager.stream("x" * 600, messages=[{"role": "user", "content": "y" * 600}])


def test_options_object_and_keywords_merge_with_keywords_winning():
    """InferenceOptions and keyword arguments are interchangeable; keywords override."""
    options = InferenceOptions(model="m", max_tokens=10, temperature=0.1)
    resolved = resolve_options(options, {"max_tokens": 20}, CONFIG)
    assert (resolved.model, resolved.max_tokens, resolved.temperature) == ("m", 20, 0.1)


def test_camel_case_aliases_of_the_brief_are_accepted():
    """maxTokens, topP, stopSequences and hostAddress map to their snake_case names."""
    resolved = resolve_options(None, {"maxTokens": 7, "topP": 0.5, "stopSequences": ["x"], "hostAddress": "h:1"},
                               CONFIG)
    assert (resolved.max_tokens, resolved.top_p, resolved.stop_sequences, resolved.host_address) == (
        7, 0.5, ("x",), "h:1")


def test_defaults_fill_max_tokens_and_temperature():
    """Missing max_tokens and temperature take the configured defaults."""
    resolved = resolve_options(None, {}, InferenceConfig())
    assert resolved.max_tokens == 256
    assert resolved.temperature == 0.7
    assert resolved.stream is True


def test_tab_newline_and_carriage_return_are_allowed():
    """Whitespace controls are ordinary prompt text."""
    assert validate_prompt("a\tb\nc\r\n", max_chars=100) == "a\tb\nc\r\n"


def test_deterministic_requests_are_recognised():
    """Temperature 0 or a seed make a request deterministic (cacheable)."""
    assert InferenceOptions(temperature=0).is_deterministic
    assert InferenceOptions(seed=3).is_deterministic
    assert not InferenceOptions(temperature=0.5).is_deterministic


@pytest.mark.parametrize("changes, field", [
    ({"max_retries": -1}, "max_retries"),
    ({"connection_timeout": 0}, "connection_timeout"),
    ({"idle_timeout": -1}, "idle_timeout"),
    ({"stream_buffer_size": 0}, "stream_buffer_size"),
    ({"default_max_tokens": 600, "max_tokens_cap": 500}, "default_max_tokens"),
    ({"deadline": 0}, "deadline"),
])
def test_bad_config_is_refused(changes, field):
    """InferenceConfig validates its own fields."""
    with pytest.raises(InvalidOptions) as info:
        InferenceConfig(**changes)
    assert info.value.field == field


def test_host_requirements_defaults_are_open():
    """HostRequirements() constrains nothing."""
    assert HostRequirements() == HostRequirements(model=None, min_stake=None, max_latency=None, region=None)
