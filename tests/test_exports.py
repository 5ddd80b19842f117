"""The public API: lazy exports, and layers that do not import what they must not."""

from __future__ import annotations

import ast
import importlib
import os
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


@pytest.mark.parametrize("package", ["fabstir_jupyter", "fabstir_jupyter.local", "fabstir_jupyter.notebook"])
def test_type_checking_block_matches_the_lazy_table(package):
    """The TYPE_CHECKING imports name exactly the lazily exported names, each as an explicit re-export."""
    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If))
    aliases = [alias for stmt in block.body for alias in stmt.names]
    assert {alias.name for alias in aliases} == set(module._LAZY) <= set(module.__all__)
    assert all(alias.asname == alias.name for alias in aliases)


def test_type_checkers_see_the_public_names(tmp_path):
    """A user's `from fabstir_jupyter import <every name in __all__>` type-checks under mypy --strict
    (the package ships py.typed; lazy names must be explicit re-exports), as do the names of the host,
    hosts, local and notebook packages."""
    pytest.importorskip("mypy", reason="mypy comes with the test extra")
    import fabstir_jupyter.host
    import fabstir_jupyter.hosts
    import fabstir_jupyter.local
    import fabstir_jupyter.notebook

    user = tmp_path / "user.py"
    user.write_text("".join(
        f"from {package.__name__} import {', '.join(package.__all__)}\n"
        for package in (fabstir_jupyter, fabstir_jupyter.host, fabstir_jupyter.hosts, fabstir_jupyter.local,
                        fabstir_jupyter.notebook)
    ))
    (tmp_path / "mypy.ini").write_text("[mypy]\n")
    command = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--config-file", "mypy.ini",
               "--cache-dir", str(tmp_path / "cache"), "user.py"]
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    checked = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("module, forbidden", [
    ("fabstir_jupyter.urls", {"asyncio", "websockets", "httpx", "socket"}),
    ("fabstir_jupyter.protocol", {"asyncio", "websockets", "httpx", "socket"}),
    ("fabstir_jupyter.settings", {"asyncio", "websockets", "httpx", "socket", "web3"}),
    ("fabstir_jupyter.cache", {"asyncio", "websockets", "httpx", "socket"}),
    ("fabstir_jupyter.errors", {"asyncio", "websockets"}),
    ("fabstir_jupyter.config", {"websockets", "httpx"}),
    ("fabstir_jupyter.crypto", {"asyncio", "websockets", "httpx", "socket", "IPython", "web3"}),
    ("fabstir_jupyter.encryption", {"asyncio", "websockets", "httpx", "socket", "IPython", "web3"}),
    ("fabstir_jupyter.billing", {"asyncio", "websockets", "httpx", "socket", "IPython", "web3"}),
    ("fabstir_jupyter.wallet", {"asyncio", "websockets", "httpx", "socket", "IPython", "web3"}),
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


# --------------------------------------------------------------------------- the layers

#: The package's layers, lowest first (DESIGN.md): a module imports only from its own layer or
#: lower ones, never upwards. A name is a top-level module or a subpackage (all of its modules).
#: The client core reads: hosts → connections (a host's connection and the channel over it) →
#: streams (the stream and its one attempt loop) → sessions, batch (policies over that loop) →
#: inference (InferenceManager, the brief's API over all three).
LAYERS: list[set[str]] = [
    {"errors", "_compat", "_lazy", "runner"},
    {"urls", "chainlogs"},  # chainlogs: eth_getLogs in windows where an endpoint caps the range
    {"config", "limits", "cache", "billing"},  # billing: the proof cadence, deposits and budgets, no I/O
    {"networks"},
    {"settings"},
    {"protocol", "crypto"},
    {"encryption"},
    # the chain client for paid sessions (shared by the host and the client); the key that pays
    {"marketplace", "wallet"},
    {"transport"},
    {"usage"},
    {"hosts"},
    {"connections"},
    {"payments"},  # the client's paid sessions: jobs, budgets, settlement
    {"paid_connector"},  # requests over sockets bound to those jobs
    {"streams"},
    {"sessions"},
    {"batch"},
    {"inference"},
    {"local"},
    {"sdk"},
    {"notebook", "__main__"},
]
#: The reference host sits beside the client: it uses only these shared core modules (and its own).
HOST_ALLOWED = {"errors", "_compat", "urls", "config", "limits", "protocol", "crypto", "encryption", "marketplace",
                "host"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, wherever the import statement is (functions and
    TYPE_CHECKING blocks included): a type-only or deferred import is a dependency too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fabstir_jupyter")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("fabstir_jupyter"):
                module = node.module
            else:
                continue
            # "from . import protocol" imports the submodule protocol, not the package
            submodules = {f"{module}.{a.name}" for a in node.names}
            found |= {m for m in submodules if m in MODULES} or {module}
    return found - {name}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items() if name != "fabstir_jupyter"}


def _layer(module: str) -> int:
    top = module.split(".")[1]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if not m.startswith("fabstir_jupyter.host.")
                                          and m != "fabstir_jupyter.host"))
def test_no_module_imports_from_a_higher_layer(module):
    """Every client module imports only from its own layer or lower ones (LAYERS, lowest first)."""
    upward = {target for target in GRAPH[module] if target != "fabstir_jupyter" and _layer(target) > _layer(module)}
    assert not upward, f"{module} (layer {_layer(module)}) imports {sorted(upward)} from above"


def test_the_host_imports_only_the_shared_core():
    """fabstir-host imports nothing from the client layers (transport, streams, hosts, sdk...)."""
    for module, targets in GRAPH.items():
        if module == "fabstir_jupyter.host" or module.startswith("fabstir_jupyter.host."):
            outside = {t for t in targets if t.split(".")[1] not in HOST_ALLOWED}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_the_import_graph_has_no_cycles():
    """No chain of imports leads from a module back to itself (deferred imports included)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target):], target]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if target in GRAPH and target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_every_layer_is_used_and_names_real_modules():
    """LAYERS names exactly the package's top-level modules and subpackages, each once."""
    named = [name for layer in LAYERS for name in layer]
    assert len(named) == len(set(named))
    tops = {m.split(".")[1] for m in MODULES if m != "fabstir_jupyter"} - {"host"}
    assert set(named) == tops
