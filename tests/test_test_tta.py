"""Flip test-time augmentation in the final test (``train.test_tta=flip``): the mean softmax of
each image and its left-right mirror, scored beside the plain top-1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab.cli import main
from resnetlab.config import ConfigError
from resnetlab.engine.loop import evaluate


class _Batches:
    """The loader interface ``evaluate`` reads: ``iterate(epoch)`` yields (images, labels)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int) -> None:
        self.x, self.y, self.size = x, y, size

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.y), self.size):
            yield self.x[i:i + self.size], self.y[i:i + self.size]


class _LeftRight(nn.Module):
    """Logits from the left and right halves' sums: a mirror swaps what each half contributes."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        halves = torch.stack([x[..., :w].sum((1, 2, 3)), x[..., w:].sum((1, 2, 3))], 1)  # [b, 2]
        return self.head(halves)


def test_flip_metrics_are_those_of_the_mean_softmax() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(50, 1, 4, 6), torch.randint(0, 3, (50,))
    model = _LeftRight()
    out = evaluate(model, _Batches(x, y, 16), device=torch.device("cpu"), tta_flip=True)
    with torch.no_grad():
        probs = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2  # [50, 3]
        plain = model(x).argmax(1)
    assert out["top1_acc_flip"] == pytest.approx(100.0 * float((probs.argmax(1) == y).double().mean()))
    assert out["top1_acc"] == pytest.approx(100.0 * float((plain == y).double().mean()))
    assert out["top1_err_flip"] == pytest.approx(100.0 - out["top1_acc_flip"])
    assert out["loss_flip"] == pytest.approx(float(nn.functional.nll_loss(probs.log(), y)), rel=1e-6)
    # the model is not mirror-symmetric: the flipped pass is a different prediction somewhere
    assert not torch.equal(probs.argmax(1), plain)


def test_without_flip_no_flip_metrics() -> None:
    x, y = torch.randn(8, 1, 4, 6), torch.randint(0, 3, (8,))
    out = evaluate(_LeftRight(), _Batches(x, y, 4), device=torch.device("cpu"))
    assert not any(k.endswith("_flip") for k in out)


def test_train_scores_the_test_split_with_and_without_flips(quick, tmp_path, capsys) -> None:
    assert main(["train", "-c", "digits", *quick, "run.name=flip", "train.epochs=1", "train.test_tta=flip"]) == 0
    saved = json.loads((tmp_path / "runs" / "flip" / "result.json").read_text())["test"]
    assert {"top1_acc", "top1_acc_flip", "top5_acc_flip", "loss_flip"} <= set(saved)
    assert 0.0 <= saved["top1_acc_flip"] <= 100.0
    assert saved["top1_err_flip"] == pytest.approx(100.0 - saved["top1_acc_flip"])
    out = capsys.readouterr().out  # both scores printed, as result.json has them
    assert f"test: top-1 acc {saved['top1_acc']:.2f}%" in out
    assert f"test with flips: top-1 acc {saved['top1_acc_flip']:.2f}% (err {saved['top1_err_flip']:.2f}%)" in out


def test_an_unknown_tta_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="train.test_tta"):
        resnetlab.load_config("digits", ["train.test_tta=rotate"])
