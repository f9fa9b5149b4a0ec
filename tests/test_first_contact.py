"""First contact: what a new user types works, says what it did, and fails in one clear line.

Recipes by name from any folder, --print-config that creates nothing, the config key list,
hints for options other tools taught, a torch-free `--help`/`models`, failed starts that leave no
folder, the Python API (train with dict/keyword overrides, load -> Predictor), digits polarity,
a closed pipe, per-class precision/recall/F1 and grouped TensorBoard tags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import resnetlab
from resnetlab.cli import main
from resnetlab.config import ConfigError
from resnetlab.evaluate import evaluate_checkpoint
from resnetlab.predict import Predictor, light_ground

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(resnetlab.__file__).parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One epoch of resnet20 on digits at batch 64 (19 steps), TensorBoard on; keyword overrides."""
    root = tmp_path_factory.mktemp("runs")
    result = resnetlab.train(None, {"train.quiet": True, "optim.schedule": "constant"},
                             train={"epochs": 1, "batch_size": 64, "tensorboard": True},
                             run={"root": str(root), "name": "digits"}, optim={"warmup": "none"})
    return result.run_dir


def _digit(index: int = 7) -> Image.Image:
    """A scikit-learn digit as an 8-bit grey image: light ink on a dark ground."""
    from sklearn.datasets import load_digits

    img = load_digits().images[index]  # [8, 8] in 0..16
    return Image.fromarray((img * 255 / 16).astype(np.uint8), "L")


# ---------------------------------------------------------------------------------------------- the CLI


def test_help_and_models_import_no_torch() -> None:
    """`--help` and `models` answer from the shipped catalog: torch (seconds to import) is not loaded."""
    code = ("import sys, contextlib, io\n"
            "from resnetlab.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    assert main(['models', 'resnet*']) == 0\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'resnet1202' in out.getvalue() and 'COMMAND' in out.getvalue()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr


def test_print_config_creates_nothing_and_records_the_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # any folder: the recipe comes from the package
    assert main(["train", "--print-config", "-c", "cifar10_resnet56", "data.root=/nowhere",
                 "train.epochs=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["name"] == "resnet56" and cfg["train"]["epochs"] == 3
    assert cfg["run"]["recipe"] == "cifar10 <- cifar10_resnet56"
    assert main(["train", "--print-config"]) == 0
    bare = yaml.safe_load(capsys.readouterr().out)
    assert bare["run"]["recipe"] == "digits" and bare["data"]["augment"]["flip"] is False
    assert list(tmp_path.iterdir()) == []  # no runs/ folder


def test_recipes_and_config_keys(capsys) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "digits_resnet20" in out and "[default for data.name=digits]" in out
    assert main(["recipes", "cifar10_resnet110"]) == 0
    assert "warmup: constant" in capsys.readouterr().out
    assert main(["config", "keys", "optim.*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in rows} >= {"optim.lr", "optim.weight_decay"}
    assert all(r["key"].startswith("optim.") and "type" in r and "default" in r for r in rows)
    assert main(["train", "--help-keys"]) == 0
    assert "data.augment.flip" in capsys.readouterr().out
    assert main(["config", "keys", "nothing.*"]) == 1


def test_models_and_info_json_and_clean_errors(capsys) -> None:
    assert main(["models", "resnet2*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["resnet20"] and rows[0]["params"] == 269_722
    assert main(["info", "resnet20", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)
    assert stages[0]["stage"] == "stem" and sum(s["params"] for s in stages) == 269_722
    assert main(["models", "foo*"]) == 1
    assert "no model matches 'foo*'" in capsys.readouterr().err
    assert main(["info", "resnet21"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'resnet21'" in err and "resnet20" in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", "--epochs", "5"], "`train.epochs=5`"),
    (["train", "--lr=0.05"], "`optim.lr=0.05`"),
    (["train", "--batch-size", "64"], "`train.batch_size=64`"),
    (["train", "--model", "resnet56"], "`model.name=resnet56`"),
    (["train", "--pretrained"], "model.init_from"),
])
def test_options_other_tools_taught_get_a_key_value_hint(argv: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_config_key_from_timm_points_to_weights_loading(capsys) -> None:
    assert main(["train", "model.pretrained=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.init_from" in err and "drop_rate" not in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- failed starts


def test_failed_start_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    code = main(["train", "data.name=folder", f"data.root={tmp_path / 'no-such-folder'}",
                 f"run.root={root}", "run.name=bad", "train.quiet=true"])
    assert code == 2 and "no-such-folder" in capsys.readouterr().err
    assert not (root / "bad").exists()
    # a folder that was there before (a run to resume) is never removed
    (root / "kept").mkdir(parents=True)
    assert main(["train", "data.name=folder", f"data.root={tmp_path / 'no-such-folder'}",
                 f"run.root={root}", "run.name=kept", "train.quiet=true"]) == 2
    assert (root / "kept").is_dir()


def test_failed_reproduce_leaves_no_experiment_folder(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    code = main(["reproduce", "degradation", "--data", "cifar10", "--depths", "20", "--seeds", "0",
                 "--epochs", "1", "--jobs", "1", f"data.root={tmp_path / 'no-cifar'}", f"run.root={root}",
                 "run.name=deg"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert not (root / "deg").exists()


# ---------------------------------------------------------------------------------------------- Python API


def test_train_refuses_a_bare_string_and_unknown_keywords() -> None:
    with pytest.raises(ConfigError, match=r"not the string 'train.epochs=5'; write \['train.epochs=5'\]"):
        resnetlab.train(None, "train.epochs=5")
    with pytest.raises(ConfigError, match="epochs"):
        resnetlab.train(None, epochs=5)  # a keyword that is not a section: named, with the sections


def test_load_gives_model_classes_transforms_predict(run: Path) -> None:
    p = resnetlab.load(run)
    assert isinstance(p, Predictor) and p.classes == [str(i) for i in range(10)]
    digit = _digit(7)
    x = p.transforms(digit)
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(p.transforms(torch.from_numpy(np.array(digit))[None]), x)  # uint8 [c, h, w]
    with torch.no_grad():
        logits = p.model(x)
    top = p.predict(digit, topk=3)[0]
    assert top.indices[0] == int(logits.argmax()) and len(top.classes) == 3
    assert top.probs == sorted(top.probs, reverse=True) and top.inverted is False
    # the config loader stays reachable under its own name, and load(None) still gives a Config
    assert resnetlab.load_config("digits_resnet20").run.recipe == "digits <- digits_resnet20"
    assert resnetlab.load(None).run.recipe == "digits"


def test_dark_on_light_digit_is_detected_and_inverted(run: Path, tmp_path: Path, capsys) -> None:
    digit = _digit(7)
    # dark ink on white paper, RGB, 8x larger (nearest: each pixel a constant 8x8 block, so the
    # box filter back to 8x8 restores it exactly)
    scan = ImageOps.invert(digit).resize((64, 64), Image.Resampling.NEAREST).convert("RGB")
    assert not light_ground(digit) and light_ground(scan)
    p = resnetlab.load(run, centre=False)  # the polarity alone (the ink framing: test_serve.py)
    assert torch.equal(p.transforms(scan), p.transforms(digit))  # inverted back, then as trained
    as_is, flipped = p.predict([digit, scan], topk=1)
    assert flipped.inverted is True and as_is.inverted is False and flipped.indices == as_is.indices
    scan.save(tmp_path / "scan.png")
    assert main(["predict", str(run), str(tmp_path / "scan.png"), "--topk", "1"]) == 0
    assert "(dark on light: inverted)" in capsys.readouterr().out
    assert main(["predict", str(run), str(tmp_path / "scan.png"), "--topk", "1", "--invert", "no"]) == 0
    assert "inverted" not in capsys.readouterr().out


def test_predict_into_a_closed_pipe_is_quiet(run: Path, tmp_path: Path) -> None:
    """`resnetlab predict ... | head`: the reader has gone before anything is printed."""
    _digit().save(tmp_path / "d.png")
    proc = subprocess.Popen([sys.executable, "-m", "resnetlab", "predict", str(run), str(tmp_path / "d.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # like `head` exiting: the predictions' write meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err


# ---------------------------------------------------------------------------------------------- libraries


def test_eval_reports_per_class_precision_recall_f1(run: Path) -> None:
    report = evaluate_checkpoint(run, "test", write=False)
    cm = torch.tensor(report.confusion)
    for r in report.per_class:
        i = r["index"]
        tp, predicted, actual = int(cm[i, i]), int(cm[:, i].sum()), int(cm[i].sum())
        assert r["recall"] == pytest.approx(100 * tp / actual)
        assert r["precision"] == pytest.approx(100 * tp / predicted if predicted else 0.0)
        p, q = r["precision"], r["recall"]
        assert r["f1"] == pytest.approx(2 * p * q / (p + q) if p + q else 0.0)
    assert report.metrics["macro_f1"] == pytest.approx(np.mean([r["f1"] for r in report.per_class]))


def test_tensorboard_tags_are_grouped_with_hparams(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/err", "val/loss", "val/top1_err", "opt/lr", "train/loss_step"} <= tags
    assert not any("_" in t.split("/")[0] for t in tags)  # no ungrouped train_loss-style tags
    assert len(acc.Scalars("train/loss_step")) == 1  # 19 steps, one point every 10
    assert acc.PluginTagToContent("hparams")  # the experiment and session records of the HParams tab


def test_train_sets_up_logging_only_when_nothing_is_configured(monkeypatch) -> None:
    """Scripts and notebooks see progress; an application's own logging set-up is left alone."""
    import logging

    from resnetlab import _ensure_logging

    logger, root = logging.getLogger("resnetlab"), logging.getLogger()
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(root, "handlers", [])
    _ensure_logging()
    assert len(logger.handlers) == 1 and logger.level == logging.INFO
    _ensure_logging()
    assert len(logger.handlers) == 1  # idempotent
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # the application configured logging
    _ensure_logging()
    assert logger.handlers == []
