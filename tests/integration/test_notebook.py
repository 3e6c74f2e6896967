"""tpu/colab_quickstart.ipynb runs headless on CPU with the tiny config (every mode, end to end).

The install cell is skipped (SGT_NOTEBOOK_SKIP_INSTALL=1: the package is already importable here) and no
BAGEL folder exists, so the notebook builds the tiny model, runs understand / generate / segment, trains a
few more steps and exports. A failing cell fails the test with the cell's source and its error.
"""

import os

import pytest

import ipykernel  # noqa: F401  (the [test] extra; the kernel nbclient starts)
import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "tpu", "colab_quickstart.ipynb")


@pytest.mark.slow
def test_colab_quickstart_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SGT_NOTEBOOK_SKIP_INSTALL", "1")
    monkeypatch.setenv("SGT_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SGT_BAGEL_DIR", str(tmp_path / "no_bagel_here"))
    monkeypatch.setenv("SGT_NOTEBOOK_TRAIN_STEPS", "3")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel must not try (or wait for) a TPU
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"notebook cell failed:\n{err}")
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "-> the tiny model" in outputs
    for mode in ("train", "understand", "generate", "segment", "export"):
        assert f"[--mode {mode}:" in outputs, mode
    export = tmp_path / "runs" / "export_tiny"
    assert (export / "ema.safetensors").exists()
    # the images generate/segment wrote were displayed inline
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the input picture + at least one generated + one segmentation image
