"""Calibration: how far the softmax probabilities are from the accuracy they claim, and the fix.

- expected calibration error (ECE, Guo et al. 2017, Sec. 2): 15 equal-width confidence bins,
  ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|``, in percent;
- negative log-likelihood (the cross-entropy of the true class, nats per image);
- the reliability diagram (accuracy against confidence per bin);
- temperature scaling (Guo et al. 2017, Sec. 4.2): one scalar ``T > 0`` fitted on the validation
  split by minimising NLL of ``softmax(logits / T)``; it never changes the arg-max, so top-1 is
  untouched. ``resnetlab calibrate RUN`` stores ``T`` in ``RUN/calibration.json``;
  :func:`apply_calibration` divides the classifier's weight and bias by ``T``, so every
  consumer of the loaded model (predict, serve, explain, export) reports calibrated probabilities.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

ECE_BINS = 15  # Guo et al. 2017 use M = 15 bins
CALIBRATION_FILE = "calibration.json"  # in the run folder, beside checkpoints/


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names it."""


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width confidence bin ``(lo, hi]``: count, mean confidence, accuracy (0..1).

    ``probs`` ``[n, k]`` softmax rows, ``labels`` ``[n]``. Bins without images have count 0 and
    confidence/accuracy NaN.
    """
    conf, pred = probs.max(dim=1)  # [n] top-1 probability and class
    correct = (pred == labels).double()
    # bin b holds lo_b < conf <= hi_b; confidence 0 cannot occur with k >= 1 classes
    index = (conf.double() * bins).ceil().clamp(1, bins).long() - 1  # [n] in 0..bins-1
    rows = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                     "confidence": float(conf[mask].double().mean()) if n else math.nan,
                     "accuracy": float(correct[mask].mean()) if n else math.nan})
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent: the count-weighted mean of |accuracy - confidence| over the bins."""
    n = len(labels)
    rows = calibration_bins(probs, labels, bins)
    return 100.0 * sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under ``softmax(logits / T)``, nats."""
    return float(nn.functional.cross_entropy(logits.double() / temperature, labels))


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """``{"ece": percent, "nll": nats}`` of ``softmax(logits / temperature)``."""
    probs = torch.softmax(logits.double() / temperature, dim=1)
    return {"ece": expected_calibration_error(probs, labels), "nll": nll(logits, labels, temperature)}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The ``T > 0`` minimising NLL of ``softmax(logits / T)`` (L-BFGS on ``log T`` from 0).

    NLL is convex in ``1/T`` for fixed logits, so the minimum is unique; a split the network
    gets entirely right drives ``T`` towards 0 (sharper is always better), hence the clamp to
    [0.05, 20].
    """
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def plot_reliability(rows: list[dict[str, float]], path: str | Path, title: str = "") -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal (atomic PNG write)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from resnetlab.outputs import write_output

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = rows[0]["hi"] - rows[0]["lo"]
    filled = [r for r in rows if r["count"]]
    ax.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=width, align="edge",
           edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar([r["lo"] for r in filled], [r["confidence"] - r["accuracy"] for r in filled], width=width,
           bottom=[r["accuracy"] for r in filled], align="edge", color="tab:red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_output(path, lambda f: f.write(buf.getvalue()))


# ----------------------------------------------------------------------------------------------
# the stored temperature


def calibration_path(run_or_file: str | Path) -> Path:
    """``calibration.json`` for a run folder, or for a checkpoint in its ``checkpoints/`` folder."""
    p = Path(run_or_file).expanduser()
    if p.is_dir():
        return p / CALIBRATION_FILE
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run / CALIBRATION_FILE


def read_temperature(run_or_file: str | Path, checkpoint: str | Path | None = None) -> float | None:
    """The stored temperature for ``run_or_file``, or None when it was never calibrated.

    With ``checkpoint``, a temperature fitted for another checkpoint file (say last.pt before
    best.pt was written) is not applied.
    """
    path = calibration_path(run_or_file)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        t = float(doc["temperature"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{path}: unreadable calibration file ({e}); run `resnetlab calibrate` "
                               "again or delete it") from None
    if not (math.isfinite(t) and t > 0):
        raise CalibrationError(f"{path}: temperature must be a positive number, got {t}")
    if checkpoint is not None and doc.get("checkpoint") and Path(doc["checkpoint"]).name != Path(checkpoint).name:
        return None
    return t


def apply_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Divide the classifier's weight and bias by ``temperature``: logits become ``z / T``."""
    getter = getattr(model, "get_classifier", None)  # the ClassifierNet contract
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise CalibrationError(f"{type(model).__name__}: no linear classifier to scale")
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    return model


def summary(doc: dict[str, Any]) -> str:
    """One line for the terminal from a ``calibration.json`` document."""
    parts = [f"T = {doc['temperature']:.3f} (fitted on {doc['fitted_on']}, {doc['count']} images)"]
    for split in ("val", "test"):
        if split in doc:
            d = doc[split]
            parts.append(f"{split}: ECE {d['ece_before']:.2f}% -> {d['ece_after']:.2f}%, "
                         f"NLL {d['nll_before']:.4f} -> {d['nll_after']:.4f}")
    return " | ".join(parts)


__all__ = ["CALIBRATION_FILE", "ECE_BINS", "CalibrationError", "apply_temperature", "calibration_bins",
           "calibration_metrics", "calibration_path", "expected_calibration_error", "fit_temperature", "nll",
           "plot_reliability", "read_temperature", "summary"]
