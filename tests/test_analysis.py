"""Analysis: degradation experiment, gradient flow, plots, multi-seed summaries, Table 6.

Every training here is 1 epoch of resnet20/plain20 on digits (or on a 60-image CIFAR fixture),
so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import pickle
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.analysis import (
    AnalysisError,
    cifar_table,
    degradation,
    mean_std,
    parse_seeds,
    summarize,
)
from resnetlab.analysis.gradients import CSV_COLUMNS, gradient_flow, measure
from resnetlab.analysis.seeds import final_metrics, format_pm
from resnetlab.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.quiet=true", "train.tensorboard=false"]


# ----------------------------------------------------------------------------------------------
# helpers


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_png_panels(path: Path, panels: int, min_size: tuple[int, int] = (600, 300)) -> None:
    """A real PNG, at least ``min_size`` pixels, whose every vertical panel holds coloured curves."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)  # [h, w, 3]
    h, w, _ = img.shape
    assert w >= min_size[0] and h >= min_size[1], f"{path}: {w}x{h} is too small"
    assert img.std() > 10, f"{path} is blank"
    # Curve pixels are saturated (tab10 colours); text, axes and grid are grey.
    coloured = (img.max(axis=2) - img.min(axis=2)) > 60  # [h, w]
    for i in range(panels):
        strip = coloured[:, i * w // panels:(i + 1) * w // panels]
        assert strip.sum() > 200, f"{path}: panel {i + 1} of {panels} has no curves"


# ----------------------------------------------------------------------------------------------
# statistics on hand-made rows


def test_mean_and_sample_std_on_hand_made_rows() -> None:
    rows = [{"train_err": 1.0, "test_err": 10.0, "note": "x"},
            {"train_err": 3.0, "test_err": 14.0},
            {"train_err": 5.0}]
    s = summarize(rows)
    assert list(s) == ["train_err", "test_err"]  # strings are not metrics
    assert s["train_err"]["mean"] == pytest.approx(3.0)
    assert s["train_err"]["std"] == pytest.approx(2.0)  # sqrt(((1-3)^2 + 0 + (5-3)^2) / (3-1))
    assert s["train_err"]["n"] == 3 and s["train_err"]["values"] == [1.0, 3.0, 5.0]
    assert s["test_err"]["mean"] == pytest.approx(12.0)
    assert s["test_err"]["std"] == pytest.approx(math.sqrt(8.0)) and s["test_err"]["n"] == 2
    # one seed: the sample std is undefined and shown as n/a, never as 0
    assert mean_std([7.5]) == (7.5, None)
    assert format_pm(7.5, None) == "7.50 ± n/a"
    assert format_pm(3.0, 2.0) == "3.00 ± 2.00"


def test_degradation_table_groups_runs_per_model() -> None:
    runs = [{"model": "resnet20", "family": "resnet", "depth": 20, "train_err": e, "val_err": v,
             "test_err": t} for e, v, t in [(1.0, 2.0, 3.0), (2.0, 4.0, 5.0)]]
    runs += [{"model": "plain20", "family": "plain", "depth": 20, "train_err": 9.0, "val_err": 9.0,
              "test_err": None}]
    rows = degradation.table_rows(runs)
    assert [r["model"] for r in rows] == ["plain20", "resnet20"]  # by depth, plain first
    res = rows[1]
    assert res["seeds"] == 2 and res["train_err_mean"] == pytest.approx(1.5)
    assert res["train_err_std"] == pytest.approx(statistics.stdev([1.0, 2.0]))
    assert res["test_err_mean"] == pytest.approx(4.0)
    assert rows[0]["train_err_std"] is None and rows[0]["test_err_mean"] is None
    md = degradation.table_markdown(rows)
    assert "| plain20 | 20 | 1 | 9.00 ± n/a | 9.00 ± n/a | n/a |" in md
    assert "| resnet20 | 20 | 2 | 1.50 ± 0.71 | 3.00 ± 1.41 | 4.00 ± 1.41 |" in md


def test_cifar_table_rows_compare_with_the_paper() -> None:
    rows = cifar_table.table_rows({"resnet56": [7.0, 8.0, 9.0], "resnet20": [10.0]})
    assert [r["model"] for r in rows] == ["resnet20", "resnet56"]
    assert rows[0]["paper_test_err"] == 8.75 and rows[0]["difference"] == pytest.approx(1.25)
    assert rows[0]["test_err_std"] is None
    assert rows[1]["test_err_mean"] == pytest.approx(8.0) and rows[1]["test_err_std"] == pytest.approx(1.0)
    assert rows[1]["difference"] == pytest.approx(8.0 - 6.97)


@pytest.mark.parametrize(("text", "match"), [("0,x", "integers"), ("1,1", "repeated"), ("", "at least one")])
def test_bad_seeds_are_refused(text: str, match: str) -> None:
    with pytest.raises(AnalysisError, match=match):
        parse_seeds(text)


def test_bad_depth_names_the_valid_ones(capsys) -> None:
    assert parse_seeds("2, 0") == (2, 0)
    assert main(["reproduce", "degradation", "--depths", "20,21"]) == 2
    err = capsys.readouterr().err
    assert "21" in err and "20, 32, 44, 56, 110" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# the degradation experiment, on a tiny budget (trained once for the tests below)


@pytest.fixture(scope="module")
def degradation_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("deg")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["reproduce", "degradation", "--depths", "20", "--seeds", "0,1", "--epochs", "2",
                     "--jobs", "1", f"run.root={root}", "run.name=deg", *FAST])
    assert code == 0
    return root / "deg", out.getvalue()


def test_degradation_writes_table_figure_and_runs(degradation_run: tuple[Path, str]) -> None:
    out_dir, printed = degradation_run
    cols, rows = read_csv(out_dir / "table.csv")
    assert cols == list(degradation.TABLE_COLUMNS)
    assert [(r["model"], r["family"], r["depth"], r["seeds"]) for r in rows] == [
        ("plain20", "plain", "20", "2"), ("resnet20", "resnet", "20", "2")]
    _, runs = read_csv(out_dir / "runs.csv")
    assert sorted((r["model"], r["seed"]) for r in runs) == [
        ("plain20", "0"), ("plain20", "1"), ("resnet20", "0"), ("resnet20", "1")]
    # the table's mean and std are those of the run folders' own final numbers
    for row in rows:
        errs = [final_metrics(out_dir / f"{row['model']}-seed{s}")["train_err"] for s in (0, 1)]
        assert float(row["train_err_mean"]) == pytest.approx(statistics.mean(errs))
        assert float(row["train_err_std"]) == pytest.approx(statistics.stdev(errs))
        tests = [final_metrics(out_dir / f"{row['model']}-seed{s}")["test_top1_err"] for s in (0, 1)]
        assert float(row["test_err_mean"]) == pytest.approx(statistics.mean(tests))
    md = (out_dir / "table.md").read_text()
    assert md in printed + "\n" and "| plain20 | 20 | 2 |" in md and "| resnet20 | 20 | 2 |" in md
    assert_png_panels(out_dir / "degradation.png", panels=2)
    assert (out_dir / "degradation.svg").read_text().lstrip().startswith("<?xml")
    assert_png_panels(out_dir / "depth.png", panels=2)  # error against depth: training | test
    assert "depth.png" in printed
    doc = json.loads((out_dir / "experiment.json").read_text())
    assert doc["depths"] == [20] and doc["seeds"] == [0, 1] and doc["epochs"] == 2
    assert doc["extra_models"] == []


def test_extra_models_are_checked_and_placed_at_their_weighted_depth() -> None:
    assert degradation.parse_extra_models("densenet_bc100, lesson_resnet18") == (
        "densenet_bc100", "lesson_resnet18")
    with pytest.raises(AnalysisError, match="unknown model"):
        degradation.parse_extra_models("densenet_bc99")
    with pytest.raises(AnalysisError, match=r"^extra_models names 'resnet56', a plain/resnet twin; choose twins by their depth instead$"):
        degradation.parse_extra_models("resnet56")
    # the papers' depths: weighted layers on the main path, shortcut projections not counted
    assert [degradation.weighted_depth(n) for n in ("resnet20", "plain56", "densenet_bc100", "densenet121")] \
        == [20, 56, 100, 121]
    assert degradation.family_depth("densenet_bc100", extra=True) == ("densenet_bc100", 100)


def test_degradation_figure_solid_curves_are_test_when_every_run_has_it(tmp_path: Path) -> None:
    import matplotlib

    from resnetlab.analysis import plot_degradation

    def rows(start: float, test: bool) -> list[dict]:
        return [{"epoch": e, "train_err": start / e, "val_top1_err": start / e + 5,
                 **({"test_top1_err": start / e + 6} if test else {})} for e in range(1, 6)]

    for test, label in ((True, "test error (solid)"), (False, "validation error (solid)")):
        curves = [{"family": f, "depth": d, "rows": rows(40 + d, test)}
                  for f in ("plain", "resnet") for d in (20, 56) for _seed in (0, 1)]
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep text as text in the SVG
            png, svg = plot_degradation(curves, tmp_path / f"f{test}.png", formats=("png", "svg"))
        text = svg.read_text()
        assert label in text and "plain-56 (2 seeds)" in text and "ResNet-20 (2 seeds)" in text
        assert_png_panels(png, panels=2)


def test_plot_cli_writes_png_and_svg(degradation_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    out_dir, _ = degradation_run
    runs = [str(out_dir / "plain20-seed0"), str(out_dir / "resnet20-seed0")]
    assert main(["plot", *runs, "--metric", "loss", "--output", str(tmp_path / "fig.png")]) == 0
    assert str(tmp_path / "fig.svg") in capsys.readouterr().out
    assert_png_panels(tmp_path / "fig.png", panels=2)  # curves panel and learning-rate panel
    assert (tmp_path / "fig.svg").stat().st_size > 5_000
    assert main(["plot", runs[0]]) == 0  # default: into the run folder
    assert (Path(runs[0]) / "curves_err.png").is_file()


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and str(tmp_path) in err and "Traceback" not in err


def test_two_worker_processes_train_the_same_as_one(tmp_path: Path) -> None:
    """The default on CPU: spawned single-thread workers; same recipe, same numbers."""
    base = degradation.base_config("digits", [f"run.root={tmp_path}", *FAST], epochs=1)
    cfgs = degradation.plan(base, [20], [0], tmp_path / "par", jobs=2)
    results = degradation.run_trainings(cfgs, jobs=2)
    assert [Path(r["run_dir"]).name for r in results] == ["plain20-seed0", "resnet20-seed0"]
    assert all(r["interrupted"] is None and r["error"] is None for r in results)
    assert all(c.train.threads == 1 for c in cfgs)
    solo = degradation.run_trainings(degradation.plan(base, [20], [0], tmp_path / "solo", jobs=1)[1:], jobs=1)
    a = final_metrics(results[1]["run_dir"])
    b = final_metrics(solo[0]["run_dir"])
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# train --seeds


def test_train_seeds_writes_summary_beside_the_runs(tmp_path: Path, capsys) -> None:
    code = main(["train", "--seeds", "0,1", f"run.root={tmp_path}", "run.name=grp", "train.epochs=1", *FAST])
    assert code == 0
    group = tmp_path / "grp"
    assert (group / "seed0" / "metrics.jsonl").is_file() and (group / "seed1" / "metrics.jsonl").is_file()
    doc = json.loads((group / "summary.json").read_text())
    assert doc["seeds"] == [0, 1]
    finals = [final_metrics(group / f"seed{s}") for s in (0, 1)]
    assert finals[0]["val_top1_err"] != finals[1]["val_top1_err"] or finals[0]["train_loss"] != finals[1]["train_loss"]
    for key in ("train_err", "train_loss", "val_top1_err", "test_top1_err", "test_loss"):
        m = doc["metrics"][key]
        assert m["n"] == 2
        assert m["mean"] == pytest.approx(statistics.mean(f[key] for f in finals))
        assert m["std"] == pytest.approx(statistics.stdev(f[key] for f in finals))
    md = (group / "summary.md").read_text()
    assert "| test_top1_err |" in md and "seed 0" in md and "seed 1" in md
    assert "| test_top1_err |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# gradient flow


def test_block_output_gradients_match_autograd() -> None:
    from resnetlab.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    rows, loss = measure(model, x, y)
    assert model.conv1.weight.grad is None  # measured on a copy
    blocks = list(model.blocks())
    outs = []
    handles = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in blocks]
    ref = torch.nn.functional.cross_entropy(model.train()(x), y)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(ref, outs)
    measured = [r["grad_norm"] for r in rows if r["kind"] == "block"]
    assert measured == pytest.approx([float(g.norm()) for g in grads], rel=1e-4)
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    assert sum(r["kind"] == "conv" for r in rows) == 19  # stem + 2 per block, option A: no 1x1


def test_gradients_cli_writes_csv_figure_and_ratios(tmp_path: Path, capsys) -> None:
    code = main(["gradients", "--models", "plain20,resnet20", "--steps", "2",
                 f"run.root={tmp_path}", "run.name=g", "train.batch_size=64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "plain20: gradient norm block 1 / block 9 =" in out and "resnet20:" in out
    cols, rows = read_csv(tmp_path / "g" / "gradients.csv")
    assert cols == list(CSV_COLUMNS)
    for model in ("plain20", "resnet20"):
        for phase in ("init", "after 2 steps"):
            sel = [r for r in rows if r["model"] == model and r["phase"] == phase]
            assert sorted(int(r["index"]) for r in sel if r["kind"] == "conv") == list(range(1, 20))
            assert sorted(int(r["index"]) for r in sel if r["kind"] == "block") == list(range(1, 10))
            assert all(0 < float(r["grad_norm"]) < math.inf for r in sel)
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    blocks = [float(r["grad_norm"]) for r in rows
              if r["model"] == "plain20" and r["phase"] == "init" and r["kind"] == "block"]
    assert summary["ratio_first_to_last_block"]["plain20"]["init"] == pytest.approx(blocks[0] / blocks[-1], rel=1e-6)
    assert_png_panels(tmp_path / "g" / "gradients.png", panels=2, min_size=(600, 600))


def test_gradient_flow_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="resnet21"):
        gradient_flow(["resnet21"], overrides=[f"run.root={tmp_path}"])


# ----------------------------------------------------------------------------------------------
# Table 6 on a tiny CIFAR-10 in the official python format


@pytest.fixture
def tiny_cifar10(tmp_path: Path) -> Path:
    """``cifar-10-batches-py/`` with 5 x 12 training and 10 test images, pickled as the original."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int, label: str) -> dict:
        return {b"batch_label": label.encode(), b"labels": [int(i % 10) for i in range(n)],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"filenames": [f"{label}_{i}.png".encode() for i in range(n)]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(12, f"training batch {i}"), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(10, "testing batch"), protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return tmp_path / "cifar"


def _table_args(root: Path, tmp_path: Path) -> list[str]:
    return ["reproduce", "cifar-table", "--depths", "20", "--estimate-steps", "1", f"data.root={root}", "train.epochs=1", "train.batch_size=16",
            "train.eval_batch_size=64", f"run.root={tmp_path / 'runs'}", "run.name=t6", *FAST]


def test_cifar_table_on_cpu_asks_for_yes(tiny_cifar10: Path, tmp_path: Path, capsys) -> None:
    assert main(_table_args(tiny_cifar10, tmp_path)) == 1
    captured = capsys.readouterr()
    assert "| resnet20 | cpu | 1 | 3 |" in captured.out and "estimated total" in captured.out
    assert "--yes" in captured.err
    assert not (tmp_path / "runs" / "t6").exists()  # nothing trained


def test_cifar_table_writes_ours_vs_paper(tiny_cifar10: Path, tmp_path: Path, capsys) -> None:
    assert main([*_table_args(tiny_cifar10, tmp_path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert out.index("estimated total") < out.index("ours vs He et al.")  # estimate first
    cols, rows = read_csv(tmp_path / "runs" / "t6" / "table.csv")
    assert cols == list(cifar_table.TABLE_COLUMNS)
    assert len(rows) == 1 and rows[0]["model"] == "resnet20" and rows[0]["seeds"] == "1"
    ours = final_metrics(tmp_path / "runs" / "t6" / "resnet20-seed0")["test_top1_err"]
    assert float(rows[0]["test_err_mean"]) == pytest.approx(ours)
    assert float(rows[0]["paper_test_err"]) == 8.75
    assert float(rows[0]["difference"]) == pytest.approx(ours - 8.75)
    assert rows[0]["test_err_std"] == ""  # one seed: undefined, left empty
    assert "| resnet20 | 20 | 1 |" in (tmp_path / "runs" / "t6" / "table.md").read_text()
