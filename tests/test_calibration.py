"""Calibration: ECE (15 bins), NLL, temperature scaling stored with a run, flip test-time
augmentation in eval, and the card's ECE before and after."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab.calibration import (
    apply_temperature,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from resnetlab.cli import main
from resnetlab.evaluate import evaluate_checkpoint
from resnetlab.export import export_model
from resnetlab.weights import get


def test_ece_of_a_known_miscalibration() -> None:
    # 10 images, all predicted with confidence 0.9 (one bin), 6 of them right: ECE = |0.6 - 0.9|
    probs = torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(30.0, abs=1e-9)
    # two bins: confidence 0.55 (bin 9, 2 right of 4) and 0.95 (bin 15, 6 right of 6)
    probs = torch.tensor([[0.55, 0.45]] * 4 + [[0.05, 0.95]] * 6, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1] + [1] * 6)
    rows = calibration_bins(probs, labels)
    assert [r["count"] for r in rows if r["count"]] == [4, 6] and rows[8]["count"] == 4 and rows[14]["count"] == 6
    want = 100 * (4 / 10 * abs(0.5 - 0.55) + 6 / 10 * abs(1.0 - 0.95))
    assert expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-9)


def test_fitted_temperature_minimises_nll_and_keeps_top1() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 5, generator=g, dtype=torch.float64)  # [n, k]
    labels = torch.multinomial(torch.softmax(base, 1), 1, generator=g).squeeze(1)  # drawn from softmax(base)
    logits = 3.0 * base  # over-confident by a factor 3
    t = fit_temperature(logits, labels)
    # the minimiser of a smooth convex function of 1/T: moving 1% either way cannot lower NLL
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 1.01), nll(logits, labels, t / 1.01))
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)
    ece_before = expected_calibration_error(torch.softmax(logits, 1), labels)
    ece_after = expected_calibration_error(torch.softmax(logits / t, 1), labels)
    assert ece_after < ece_before
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def test_temperature_folds_into_the_classifier() -> None:
    model = resnetlab.create_model("resnet20", num_classes=4, in_chans=1).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))  # [b, c, h, w]
    with torch.no_grad():
        raw = model(x)
        scaled = apply_temperature(model, 2.5)(x)
    # (W h + b) / T computed as (W / T) h + b / T: float32 rounding of the two divisions only
    assert torch.allclose(scaled, raw / 2.5, rtol=1e-5, atol=1e-6 * float(raw.abs().max()))


@pytest.fixture
def digits_copy(tmp_path: Path) -> Path:
    """The shipped digits weights copied to a folder calibrate may write into."""
    folder = tmp_path / "resnet20.digits"
    shutil.copytree(get("resnet20.digits").folder, folder)
    return folder


def test_calibrate_stores_a_temperature_predict_and_eval_use(digits_copy: Path, capsys) -> None:
    assert main(["calibrate", str(digits_copy)]) == 0
    assert "ECE" in capsys.readouterr().out
    doc = json.loads((digits_copy / "calibration.json").read_text())
    stored = dict(doc)
    assert stored["temperature"] == doc["temperature"] > 0 and stored["fitted_on"] == "val"
    assert doc["val"]["nll_after"] <= doc["val"]["nll_before"] + 1e-12  # fitted there: cannot be worse
    assert {"ece_before", "ece_after"} <= set(doc["test"])
    # a chosen temperature: predict's probabilities are softmax(logits / T)
    stored["temperature"] = 2.0
    (digits_copy / "calibration.json").write_text(json.dumps(stored))
    raw = resnetlab.load(get("resnet20.digits").folder, invert="no")
    calibrated = resnetlab.load(digits_copy, invert="no")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))  # [b, c, h, w]
    with torch.no_grad():
        want, got = raw.model(x) / 2.0, calibrated.model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exported = export_model(digits_copy, "safetensors", digits_copy / "exported.safetensors").path
    with torch.no_grad():  # the export carries the temperature in its classifier, applied once
        assert torch.allclose(resnetlab.load(exported, invert="no").model(x), want, rtol=1e-5,
                              atol=1e-5 * float(want.abs().max()))
    report = evaluate_checkpoint(digits_copy, "test", tta="flip", out_dir=digits_copy / "eval")
    m = report.metrics
    assert m["temperature"] == 2.0 and m["ece_calibrated"] >= 0 and m["nll_calibrated"] > 0
    assert (digits_copy / "eval" / "reliability-test.png").stat().st_size > 0
    assert m["top1_acc_flip_gain"] == pytest.approx(m["top1_acc_flip"] - m["top1_acc"], abs=1e-9)
    assert main(["eval", str(digits_copy), "--split", "test", "--tta", "flip", "--out", str(digits_copy / "e2")]) == 0
    out = capsys.readouterr().out
    assert "calibration: ECE" in out and "with T = 2.000" in out and "flip test-time augmentation" in out


def test_card_states_ece_before_and_after() -> None:
    card = get("resnet20.digits").meta
    test = card["metrics"]["test"]
    assert math.isfinite(test["ece"]) and math.isfinite(test["ece_before"])
    assert card["calibration"]["temperature"] > 0
