"""Top-k accuracy, running sums that stay on the device, and the metrics.jsonl writer."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (0-dim tensors).

    logits: [b, classes], target: [b]. k is capped at the number of classes, so top-5 on a
    3-class problem counts every sample as correct, as torchvision's references do.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [b, kmax]
    hit = top.eq(target[:, None])  # [b, kmax]
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def mirror_log_probs(logits: torch.Tensor, logits_flip: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: ``log`` of the mean softmax of each image and its mirror.

    ``[b, k]`` in, ``[b, k]`` out (float64). Its argmax is the TTA prediction and, fed to
    ``CrossEntropyLoss`` (whose log-softmax leaves log-probabilities as they are), its loss is the
    NLL of the averaged probabilities.
    """
    probs = (torch.softmax(logits.double(), 1) + torch.softmax(logits_flip.double(), 1)) / 2
    return probs.log()


class SumMeter:
    """Sums of loss, top-1/top-5 hits and sample count, kept as device tensors.

    No ``.item()`` per step: the host reads the totals once, when a value is needed, so the GPU
    never waits on the Python loop.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        c1, c5 = topk_correct(logits.detach(), target)
        self.sums[:3] += torch.stack([loss.detach().double() * n, c1.double(), c5.double()])
        # The count is a Python int: an in-place add of a scalar is a kernel argument, whereas
        # torch.tensor(n, device=cuda) would be a blocking host-to-device copy every step.
        self.sums[3] += n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums.copy_(state["sums"])

    def summary(self) -> dict[str, float]:
        """Mean loss and top-1/top-5 error and accuracy in percent (NaN when empty)."""
        loss_sum, c1, c5, n = self.sums.tolist()
        if n == 0:
            return {"loss": math.nan, "top1_err": math.nan, "top5_err": math.nan,
                    "top1_acc": math.nan, "top5_acc": math.nan, "count": 0}
        acc1, acc5 = 100.0 * c1 / n, 100.0 * c5 / n
        return {"loss": loss_sum / n, "top1_err": 100.0 - acc1, "top5_err": 100.0 - acc5,
                "top1_acc": acc1, "top5_acc": acc5, "count": int(n)}


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl; a half-written last line (crash mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows with the union of their keys as columns (first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
