"""docs/lesson.ipynb runs top to bottom (FAST mode) and measures what it says it does.

The notebook is executed with nbclient in a kernel that runs *this* interpreter (a kernelspec
written to a temporary folder), so it sees the same resnetlab as the tests (PYTHONPATH is
inherited) and never a Jupyter kernel installed elsewhere on the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "lesson.ipynb"
KERNEL = "resnetlab-test"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel running ``sys.executable -m ipykernel_launcher``, whatever is installed globally."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "resnetlab tests", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    source = "\n".join(c.source for c in code)
    # The figures come from the library's functions, never from plotting code in the notebook.
    assert "matplotlib" not in source and "plt." not in source


@pytest.mark.slow
def test_notebook_runs_in_fast_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNETLAB_FAST", "1")
    monkeypatch.setenv("RESNETLAB_LESSON_RUNS", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as conftest: one thread per process on 2 shared cores
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / "cwd"  # the notebook's working directory: it must not need the checkout's paths
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    km = _kernel_manager(tmp_path)
    client = NotebookClient(nb, km=km, timeout=300,
                            resources={"metadata": {"path": str(work)}})
    # raises CellExecutionError, naming the cell, on any error; cleanup_kc: our km's kernel is shut
    # down here too (nbclient leaves a kernel it did not start running otherwise)
    client.execute(cleanup_kc=True)
    assert not km.has_kernel

    (run,) = (tmp_path / "out").iterdir()  # one timestamped folder per execution
    summary = json.loads((run / "lesson.json").read_text())
    assert summary["fast"] is True and summary["epochs"] == 1
    assert set(summary["final_train_err"]) == {"plain20", "plain56", "resnet20", "resnet56"}
    # The drawing is dark ink on white paper: the predictor must have inverted it (digits are light on dark).
    assert summary["drawn_digit"]["inverted"] is True
    # Fused-BN ONNX against the fused PyTorch model: the same float32 arithmetic in another order;
    # export_model itself refuses more than 1e-4, so anything above it means a different network.
    assert summary["onnx_max_abs_diff"] <= 1e-4
    for figure in ("plain-curves.png", "degradation.png", "gradients/gradients.png", "landscape.png",
                   "responses/responses.png", "resnet20/confusion-test.png"):
        assert (run / figure).stat().st_size > 1000, figure
    # the gradient analysis found plain56's first block gradient far above its last one at init
    assert summary["gradient_ratio_init"]["plain56"] > summary["gradient_ratio_init"]["resnet56"]
    # figures went to the output folder, nothing into the working directory
    assert not any(work.iterdir())
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert not any(o.get("output_type") == "error" for o in outputs)
