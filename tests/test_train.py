"""`resnetlab train`: a short run on real data learns and leaves a complete run folder."""

from __future__ import annotations

import csv
import io
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

import resnetlab
from resnetlab.cli import main
from resnetlab.engine import TrainingError

METRIC_FIELDS = {"epoch", "step", "lr", "train_loss", "train_err", "val_loss", "val_top1_err",
                 "val_top5_err", "images_per_s", "seconds"}


def test_short_run_learns_and_writes_every_file(quick: list[str], tmp_path: Path) -> None:
    result = resnetlab.train(None, [*quick, "run.name=r", "train.epochs=3", "train.tensorboard=true"])
    run = tmp_path / "runs" / "r"
    assert result.run_dir == run and result.epochs == 3 and result.interrupted is None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(set(r) >= METRIC_FIELDS for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    assert rows[-1]["step"] == 3 * (1258 // 128)  # digits: 1258 training images, drop_last
    with open(run / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and set(table[0]) >= METRIC_FIELDS
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["run"]["name"] == "r" and cfg["model"]["name"] == "resnet20"
    for name in ("last.pt", "best.pt"):
        assert (run / "checkpoints" / name).stat().st_size > 100_000
    doc = json.loads((run / "result.json").read_text())
    assert set(doc) >= {"val", "best", "test"}
    assert 0 <= doc["test"]["top1_err"] <= 100 and doc["test"]["weights"] == "best"
    assert doc["test"]["top1_acc"] == pytest.approx(100 - doc["test"]["top1_err"])
    assert doc["test"]["count"] == 359  # 20% of 1,797, rounded down
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_existing_run_is_never_overwritten(quick: list[str]) -> None:
    resnetlab.train(None, [*quick, "run.name=same", "train.epochs=1"])
    with pytest.raises(TrainingError, match="already holds a training run"):
        resnetlab.train(None, [*quick, "run.name=same", "train.epochs=1"])


def test_cli_train_prints_test_accuracy(quick: list[str], tmp_path: Path, capsys) -> None:
    code = main(["train", "-c", "digits_resnet20", *quick, "run.name=cli", "train.epochs=1"])
    assert code == 0
    assert "test: top-1 acc" in capsys.readouterr().out
    assert (tmp_path / "runs" / "cli" / "result.json").is_file()


def test_cli_config_error_is_one_line_naming_the_key(capsys) -> None:
    assert main(["train", "optim.lr_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "Traceback" not in err


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class _Kernel:  # what a Jupyter/Colab shell has and terminal IPython has not
    kernel = object()


@pytest.mark.parametrize(("tty", "notebook", "quiet", "shown"), [
    (True, False, False, True),    # a terminal
    (False, True, False, True),    # a notebook: stderr is no tty, yet someone watches
    (False, False, False, False),  # piped or redirected to a file
    (True, False, True, False),    # train.quiet
    (False, True, True, False),
])
def test_progress_bar_is_tqdm_auto_where_someone_watches(
        tty: bool, notebook: bool, quiet: bool, shown: bool, monkeypatch) -> None:
    import tqdm.auto

    from resnetlab.config import load
    from resnetlab.engine.dist import DistInfo
    from resnetlab.engine.runlog import Progress

    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    if notebook:
        monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=_Kernel))
    else:
        monkeypatch.delitem(sys.modules, "IPython", raising=False)
    progress = Progress(load(None, {"train.quiet": quiet}), DistInfo(), 0, 5, 0)
    assert (progress.bar is not None) == shown
    if shown:
        assert isinstance(progress.bar, tqdm.auto.tqdm)
    progress.close()
    assert Progress(load(None, {"train.quiet": quiet}), DistInfo(rank=1, world_size=2), 0, 5, 0).bar is None
