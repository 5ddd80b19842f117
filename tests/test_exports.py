"""The public API: lazy exports, and layers that do not import what they must not."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import fabstir_jupyter

PACKAGE = Path(fabstir_jupyter.__file__).parent


def _imports_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.strip().split(","))


def test_importing_the_package_is_cheap():
    """import fabstir_jupyter loads neither websockets, httpx, pandas nor llama_cpp."""
    loaded = _imports_after("import fabstir_jupyter")
    assert not {"websockets", "httpx", "pandas", "llama_cpp", "IPython"} & loaded


def test_using_the_client_does_not_import_pandas_or_the_model():
    """The inference core works without pandas or llama_cpp loaded."""
    loaded = _imports_after("from fabstir_jupyter import InferenceManager")
    assert "websockets" in loaded
    assert not {"pandas", "llama_cpp", "IPython"} & loaded


@pytest.mark.parametrize("name", fabstir_jupyter.__all__)
def test_every_exported_name_resolves(name):
    """Each name in __all__ is importable from the package root."""
    assert getattr(fabstir_jupyter, name) is not None


def test_dir_lists_the_public_names():
    """dir() shows every lazy name."""
    assert set(fabstir_jupyter.__all__) <= set(dir(fabstir_jupyter))


def test_unknown_attribute_is_an_attribute_error():
    """A missing name raises AttributeError, not ImportError."""
    with pytest.raises(AttributeError):
        fabstir_jupyter.NoSuchThing  # noqa: B018


def test_type_checking_block_matches_the_lazy_table():
    """The TYPE_CHECKING imports name exactly the lazily exported names."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If))
    names = {alias.asname or alias.name for stmt in block.body for alias in stmt.names}
    assert names == set(fabstir_jupyter.__all__)


@pytest.mark.parametrize("module, forbidden", [
    ("fabstir_jupyter.protocol", {"asyncio", "websockets", "httpx", "socket"}),
    ("fabstir_jupyter.errors", {"asyncio", "websockets"}),
    ("fabstir_jupyter.config", {"websockets", "httpx"}),
    ("fabstir_jupyter.crypto", {"asyncio", "websockets", "httpx", "socket", "IPython", "web3"}),
    ("fabstir_jupyter.encryption", {"asyncio", "websockets", "httpx", "socket", "IPython", "web3"}),
])
def test_lower_layers_stay_free_of_io(module, forbidden):
    """The sans-I/O layers import no networking (checked on their source)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & forbidden


def test_encryption_loads_no_io_at_run_time():
    """The encrypted protocol layer (and the libraries under it) loads no asyncio, sockets, web3 or IPython."""
    loaded = _imports_after("import fabstir_jupyter.encryption")
    assert not {"asyncio", "socket", "websockets", "httpx", "web3", "IPython"} & loaded


def test_host_package_uses_only_the_shared_core_layers():
    """fabstir-host imports nothing from the client layers (transport, inference, hosts...);
    the pure token bucket in limits.py, the encrypted protocol (encryption.py, crypto.py) and the
    payment contracts' client (marketplace.py, which imports only errors and crypto) are shared."""
    allowed = {"errors", "config", "protocol", "encryption", "crypto", "limits", "marketplace", "host", "_compat"}
    for path in (PACKAGE / "host").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                assert node.module.split(".")[0] in allowed, (path.name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("fabstir_jupyter."):
                assert node.module.split(".")[1] in allowed, (path.name, node.module)
