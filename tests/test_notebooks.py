"""The notebooks run clean headlessly in small mode (MTL_NOTEBOOK_SMALL=1) and are stored without
outputs, with a first code cell tagged "parameters" that reads the small-mode switch."""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart.ipynb", "gradient_analysis.ipynb")
BUDGET_S = 60.0  # per notebook in small mode on a quiet machine; reported, not asserted


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """A kernelspec for the current interpreter (its venv and its installed ``mtl``)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "mtl-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "mtl test", "language": "python"})
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    yield "mtl-test"
    mp.undo()


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs_and_parametrised(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell: the parameters"
    assert "MTL_NOTEBOOK_SMALL" in code[0].source
    first_markdown = next(c for c in nb.cells if c.cell_type == "markdown")
    assert "without outputs" in first_markdown.source


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_small_mode(name, kernel_name, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("MTL_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    flags = os.environ.get("XLA_FLAGS", "").split()  # one CPU device, as a user runs it
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in flags if "device_count" not in f))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},  # any file a cell writes lands here
    )
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    print(f"{name}: {seconds:.1f} s in small mode (budget {BUDGET_S:.0f} s)")
