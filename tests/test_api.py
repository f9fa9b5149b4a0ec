"""Entry points: ``resnetlab.load`` opens trained networks and configs come from
``resnetlab.load_config`` (the old config form of ``load`` warns before it goes away);
predictions name their inputs; the use commands accept ``latest``; ``eval``'s usage line; a
failed start leaves no empty ``runs/``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from PIL import Image

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.cli import main
from resnetlab.config import Config
from resnetlab.data import DataError, DataMeta
from resnetlab.runtime import newest_run


def test_load_config_returns_a_config_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = resnetlab.load_config("digits_resnet20", ["train.epochs=3"])
    assert isinstance(cfg, Config) and cfg.train.epochs == 3


def test_load_of_a_recipe_still_works_but_warns_that_it_goes_away() -> None:
    with pytest.warns(FutureWarning, match="use resnetlab.load_config"):
        cfg = resnetlab.load("digits_resnet20")
    assert isinstance(cfg, Config) and cfg.model.name == "resnet20"


def _weights_only_run(tmp_path: Path) -> Path:
    """An untrained resnet20 for digits as a weights-only checkpoint: enough to predict with."""
    cfg = resnetlab.load_config(None, ["model.name=resnet20"])
    meta = DataMeta(name="digits", classes=tuple("0123456789"), in_chans=1, input_size=(8, 8),
                    mean=(0.5,), std=(0.25,))
    model = resnetlab.create_model("resnet20", num_classes=10, in_chans=1)
    return ckpt.write_weights(tmp_path / "w.pt", model.state_dict(), cfg, meta.to_dict())


def test_predictions_name_their_input_not_its_position(tmp_path: Path) -> None:
    p = resnetlab.load(_weights_only_run(tmp_path), invert="no")
    Image.new("L", (8, 8), 200).save(tmp_path / "grey.png")
    opened, made = Image.open(tmp_path / "grey.png"), Image.new("L", (8, 8), 30)
    files = [r.file for r in p.predict([opened, made, tmp_path / "grey.png"], topk=2)]
    assert files == [str(tmp_path / "grey.png"), None, str(tmp_path / "grey.png")]


def test_eval_usage_marks_only_the_run_as_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "[key=value ...]" in err
    assert "required: RUN|CKPT\n" in err  # key=value is optional: not listed as required


def test_latest_is_the_run_whose_checkpoint_was_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "latest"]) == 2
    assert "latest: no run with a checkpoint under runs/" in capsys.readouterr().err
    for name, mtime in {"old": 1000, "group/new": 3000, "older": 500}.items():  # a run inside a group too
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        f = tmp_path / "runs" / name / "checkpoints" / "last.pt"
        f.write_bytes(b"")
        os.utime(f, (mtime, mtime))
    assert newest_run("runs") == Path("runs/group/new")


def test_a_failed_start_leaves_no_runs_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        resnetlab.train(None, [f"run.root={tmp_path / 'runs'}", "data.name=folder",
                               f"data.root={tmp_path / 'missing'}", "train.quiet=true"])
    assert not (tmp_path / "runs").exists()
