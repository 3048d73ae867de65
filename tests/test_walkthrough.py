"""walkthrough.ipynb: it runs top to bottom in a fresh kernel, and its outputs, the saved ones a code host shows
and a fresh run's, name no path of the machine that made them."""

import json
import os
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "walkthrough.ipynb")
HOME = os.path.expanduser("~")
MACHINE_PATHS = ["/work", "/tmp", "/root", ROOT, tempfile.gettempdir()] + ([HOME] if len(HOME) > 1 else [])


def outputs_text(cells):
    """The text of every output: streams, tracebacks and each data type except images (base64 can spell
    "/tmp" by chance)."""
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            parts += [out.get("text", ""), "\n".join(out.get("traceback", []))]
            parts += [v for k, v in out.get("data", {}).items() if not k.startswith("image/")]
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


def machine_paths(text):
    return [p for p in MACHINE_PATHS if p in text]


def test_saved_notebook_has_its_outputs_and_no_machine_paths():
    nb = json.load(open(NOTEBOOK))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["execution_count"] is not None for c in code), "saved without running"
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert sum(any(k.startswith("image/") for o in c["outputs"] for k in o.get("data", {})) for c in code) >= 3
    assert not machine_paths(outputs_text(code))
    assert os.path.getsize(NOTEBOOK) < 400_000, "outputs too large to read on a code host"


def test_notebook_runs_in_a_fresh_kernel():
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("gguf")
    from checkpoint import find_embedded_gguf
    try:
        find_embedded_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, naming the cell, on any error
    nbclient.NotebookClient(nb, timeout=600, resources={"metadata": {"path": ROOT}}).execute()
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs for c in ran[:2]) and "ran in" in outputs_text(ran[-1:])
    assert not machine_paths(outputs_text(ran))
