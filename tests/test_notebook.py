"""docs/lesson.ipynb runs top to bottom (FAST mode) and measures what it says it does.

Its prose types no measured number: sentences with numbers are printed by the code cells from the
values they describe (``resnetlab.analysis.findings``), and the tests recompute them from the
run's lesson.json; in FAST mode every figure and table says it is a smoke test.

The notebook is executed with nbclient in a kernel that runs *this* interpreter (a kernelspec
written to a temporary folder), so it sees the same resnetlab as the tests (PYTHONPATH is
inherited) and never a Jupyter kernel installed elsewhere on the machine.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "lesson.ipynb"
KERNEL = "resnetlab-test"
FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
# A measured number typed into prose: a percentage, "N times"/"N-fold", or a decimal after a
# word naming a measured quantity. Code spans are removed first; facts (lr 0.05, 8x8, ln 10) pass.
TYPED_MEASUREMENT = re.compile(
    r"\d+(\.\d+)?\s*%|\b\d+(\.\d+)?\s*(times|-?fold)\b|\b(ratio|loss|error|std|probability|accuracy)\b"
    r"[^.;:]*?\b(is|of|to|at|near|about|falls to|rises to)\s+\d+\.\d+")


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
    # papermill-style parameters: one cell tagged "parameters" that sets DATA, OVERRIDES and FAST
    (params,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert all(f"\n{name} = " in "\n" + params.source for name in ("DATA", "OVERRIDES", "FAST"))


def typed_measurements(markdown: str) -> list[str]:
    """The measured-looking numbers of a markdown cell outside code spans."""
    prose = re.sub(r"```.*?```|`[^`]*`", "", markdown, flags=re.S)
    return [m.group(0) for m in TYPED_MEASUREMENT.finditer(prose)]


def test_notebook_prose_types_no_measured_number():
    """Numbers a run measures are printed by code cells (and checked below), never typed in prose,
    where they drift from what the cells compute (0.4 in the text while the run gave 1.01)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    found = {i: typed_measurements(c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"}
    assert not {i: f for i, f in found.items() if f}, found
    # the pattern does catch what the old prose typed
    assert typed_measurements("the ratio falls to 0.4 after 100 steps")
    assert typed_measurements("read as a 7 with about 90% probability")
    assert typed_measurements("about two thousand times, 2000 times")


def _execute(tmp_path: Path, monkeypatch, **env: str) -> tuple[nbformat.NotebookNode, dict, Path, Path]:
    """Run the notebook in FAST mode with ``env`` set; returns (executed notebook, lesson.json,
    run folder, working directory)."""
    monkeypatch.setenv("RESNETLAB_FAST", "1")
    monkeypatch.setenv("RESNETLAB_LESSON_RUNS", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as conftest: one thread per process on 2 shared cores
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
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
    return nb, json.loads((run / "lesson.json").read_text()), run, work


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def check_sentences_and_fast_notes(nb: nbformat.NotebookNode, summary: dict) -> None:
    """Every printed sentence with a number is the one findings makes from lesson.json's values,
    and every code cell that shows a figure or prints a table also prints the FAST-mode note."""
    from resnetlab.analysis import findings

    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "\n".join(_stdout(c) for c in code)
    sentences = summary["sentences"]
    for key, sentence in sentences.items():
        assert sentence in printed, key
    train_err, epochs = summary["final_train_err"], summary["epochs"]
    assert sentences["plain"] == findings.compare_training(train_err, "plain20", "plain56", epochs)
    assert sentences["residual"] == findings.compare_training(train_err, "resnet20", "resnet56", epochs)
    grad = findings.gradient_ratio_sentences(summary["gradient_ratios"], summary["gradient_blocks"])
    assert [sentences[f"gradients{i}"] for i in range(len(grad))] == grad
    assert set(summary["gradient_ratios"]["plain56"]) == {"init", f"after {summary['gradient_steps']} steps"}
    assert summary["gradient_blocks"] == {"plain20": 9, "plain56": 27, "resnet20": 9, "resnet56": 27}
    assert sentences["responses"] == findings.responses_sentence(
        summary["responses"], [("plain20", "resnet20"), ("plain56", "resnet56")])
    assert sentences["landscape"] == findings.landscape_sentence(summary["landscape"], classes=10)
    shows = 0
    for c in code:
        figure = any("image/png" in o.get("data", {}) for o in c.outputs)
        table = "|---" in _stdout(c)
        if figure or table:
            shows += 1
            assert "FAST mode" in _stdout(c), c.source.splitlines()[0]
    assert shows >= 7  # curves, degradation, gradients, landscape, responses, confusion, drawing


@pytest.mark.slow
def test_notebook_runs_in_fast_mode(tmp_path, monkeypatch):
    nb, summary, run, work = _execute(tmp_path, monkeypatch)
    assert summary["fast"] is True and summary["epochs"] == 1 and summary["data"] == "digits"
    check_sentences_and_fast_notes(nb, summary)
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
    assert summary["gradient_ratios"]["plain56"]["init"] > summary["gradient_ratios"]["resnet56"]["init"]
    # figures went to the output folder, nothing into the working directory
    assert not any(work.iterdir())
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert not any(o.get("output_type") == "error" for o in outputs)


def _fashion_subset(root: Path, train_per_class: int, test_per_class: int) -> None:
    """The first N images per class of the real Fashion-MNIST files, written as IDX files: the
    notebook then reads real images through the fashion_mnist source, in seconds."""
    import numpy as np

    from resnetlab.data.sources.idx import read_pair, write_idx

    root.mkdir()
    for split, n in (("train", train_per_class), ("t10k", test_per_class)):
        x, y = read_pair(FASHION / f"{split}-images-idx3-ubyte.gz", FASHION / f"{split}-labels-idx1-ubyte.gz", 10)
        keep = np.concatenate([np.flatnonzero(y == k)[:n] for k in range(10)])
        write_idx(root / f"{split}-images-idx3-ubyte", x[keep])
        write_idx(root / f"{split}-labels-idx1-ubyte", y[keep].astype(np.uint8))


@pytest.mark.slow
def test_notebook_runs_on_fashion_mnist(tmp_path, monkeypatch):
    """DATA=fashion_mnist: every section runs on it (28x28 grey clothing), figures and sentences
    included; data.train_per_class draws from a small copy of the real files."""
    # 160 training images, 16 of them held out for validation: one full batch of 128 per epoch
    _fashion_subset(tmp_path / "fashion", train_per_class=20, test_per_class=2)
    nb, summary, run, _work = _execute(
        tmp_path, monkeypatch, RESNETLAB_LESSON_DATA="fashion_mnist",
        RESNETLAB_LESSON_OVERRIDES=f"data.root={tmp_path / 'fashion'} data.train_per_class=16")
    assert summary["data"] == "fashion_mnist"
    check_sentences_and_fast_notes(nb, summary)
    cfg = (run / "resnet20" / "config.yaml").read_text()
    assert "name: fashion_mnist" in cfg and "train_per_class: 16" in cfg
    printed = "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert "DATA=fashion_mnist" in printed and "input 1x28x28" in printed
    assert "Trouser" in printed  # the confusion report names Fashion-MNIST's classes
    for figure in ("degradation.png", "gradients/gradients.png", "landscape.png", "responses/responses.png"):
        assert (run / figure).stat().st_size > 1000, figure
    # the gradients ran on the same data: its 28x28 images went through the nets
    assert json.loads((run / "gradients" / "summary.json").read_text())["data"] == "fashion_mnist"


def test_notebook_refuses_an_unknown_data_source(monkeypatch):
    """A DATA the experiments do not take stops the setup cell with one line naming it (the
    parameters and setup cells run here in-process: no kernel needed to reach the check)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params, setup = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    monkeypatch.setenv("RESNETLAB_LESSON_DATA", "fashion")
    namespace: dict = {}
    exec(params, namespace)
    with pytest.raises(ValueError, match="DATA='fashion': did you mean 'fashion_mnist'\\? the lesson takes one of .*digits"):
        exec(setup, namespace)
    assert "RUNS" not in namespace  # refused before any folder was made
