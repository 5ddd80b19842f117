"""Fixtures for the chain tests: a fresh in-process chain, and one with three registered hosts."""

from __future__ import annotations

import pytest

pytest.importorskip("eth_tester", reason="the local chain needs eth-tester and py-evm (the 'chain' extra)")

from fabstir_jupyter.local.chain import LocalChain, LocalHost

TINY_VICUNA = ("CohereForAI/TinyVicuna-1B-32k-GGUF", "tiny-vicuna-1b.q4_k_m.gguf")
SMOLLM = ("bartowski/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct-Q4_1.gguf")


@pytest.fixture
def chain():
    """A fresh local chain with the three contracts deployed and no hosts."""
    with LocalChain(seed=11) as local:
        yield local


@pytest.fixture(scope="module")
def three_hosts() -> tuple[LocalChain, list[LocalHost]]:
    """A chain with three hosts of distinct stake, prices, region and models (read-only: do not mutate)."""
    local = LocalChain(seed=3)
    hosts = [
        local.register_host(
            "http://127.0.0.1:9001", models=[TINY_VICUNA], stake=1000, prices=(1_000, 2_000), region="us-east-1",
            metadata={"hardware": {"gpu": "RTX 4090", "vram": 24}},
        ),
        local.register_host(
            "https://h2.example:8443", models=[TINY_VICUNA, SMOLLM], stake=2500.5,
            prices={TINY_VICUNA: (500, 700), SMOLLM: (0, 300)}, metadata={"region": "eu-west-1", "name": "second"},
        ),
        local.register_host("http://127.0.0.1:9003", models=[SMOLLM], stake=10_000, region="ap-southeast-1"),
    ]
    yield local, hosts
    local.close()
