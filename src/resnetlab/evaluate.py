"""``resnetlab eval``: loss, top-1/top-5 error, per-class accuracy and the confusion matrix.

The data are rebuilt from the checkpoint's own config (``key=value`` overrides on top, e.g. a new
``data.root``), so the split is the one training held out. The network runs fused
(:func:`resnetlab.models.fuse_for_inference`). Written next to the run (in the run folder, or
beside a checkpoint file):

- ``eval-<split>.json``: the metrics, per-class accuracy and where they came from;
- ``confusion-<split>.json``: the matrix, rows = true class, columns = predicted class;
- ``confusion-<split>.png``: the same matrix, row-normalised, as a picture;
- ``reliability-<split>.png``: the reliability diagram (accuracy per confidence bin).

Calibration (expected calibration error over 15 bins, NLL) is measured on every evaluation,
before and after the temperature ``resnetlab calibrate`` stored; ``tta="flip"`` (``--tta flip``)
adds the top-1 accuracy with horizontal-flip test-time augmentation.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab import __version__
from resnetlab.calibration import (
    calibration_bins,
    calibration_metrics,
    calibration_path,
    fit_temperature,
    plot_reliability,
    read_temperature,
)
from resnetlab.config import Config, ConfigError, parse_override
from resnetlab.data import DataError, DataMeta, build_loader
from resnetlab.engine.metrics import SumMeter, mirror_log_probs
from resnetlab.inference import NonFiniteOutputError, open_run, output_dir
from resnetlab.outputs import write_output

SPLITS = ("val", "test")
OVERRIDE_SECTIONS = ("data.", "train.")  # the model itself comes from the checkpoint, never a flag


@dataclass
class EvalReport:
    """Everything ``resnetlab eval`` measured on one split."""

    source: str  # checkpoint file evaluated
    split: str  # "val" | "test"
    metrics: dict[str, float]  # loss, top1_err, top5_err, top1_acc, top5_acc (percent), count
    classes: list[str]  # label id -> name (the checkpoint's classes)
    confusion: list[list[int]]  # [k, k] counts, rows = true class, columns = predicted
    per_class: list[dict[str, Any]]  # {"class", "index", "count", "correct", "accuracy"} (percent)
    files: dict[str, str] = field(default_factory=dict)  # "json"/"confusion_json"/"confusion_png" -> path

    def to_dict(self) -> dict[str, Any]:
        """The ``eval-<split>.json`` document (without the matrix, which has its own file)."""
        return {"source": self.source, "split": self.split, "metrics": self.metrics,
                "per_class": self.per_class, "files": self.files, "resnetlab_version": __version__}


# ----------------------------------------------------------------------------------------------
# pieces


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[k, k]`` int64 counts of (true, predicted) pairs; pred and target are ``[n]`` label ids."""
    k = num_classes
    flat = target.long() * k + pred.long()  # [n] row-major cell index
    return torch.bincount(flat, minlength=k * k).reshape(k, k)


def per_class_accuracy(cm: torch.Tensor, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class: images, correct top-1, accuracy, precision, recall and F1 in percent.

    Accuracy is None for a class absent from the split. Precision, recall and F1 come from
    scikit-learn's ``precision_recall_fscore_support`` on the (true, predicted) pairs the matrix
    counts, with 0 where a ratio has nothing to divide by (a class never predicted).
    """
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    k = len(classes)
    counts, correct = cm.sum(dim=1).tolist(), cm.diagonal().tolist()
    flat = cm.reshape(-1).numpy()  # [k * k] counts of (true, pred) pairs, row-major
    cells = np.repeat(np.arange(k * k), flat)  # one entry per image
    y_true, y_pred = cells // k, cells % k
    prec, rec, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(k), zero_division=0)
    return [{"class": name, "index": i, "count": n, "correct": c,
             "accuracy": 100.0 * c / n if n else None,
             "precision": 100.0 * float(prec[i]), "recall": 100.0 * float(rec[i]), "f1": 100.0 * float(f1[i])}
            for i, (name, n, c) in enumerate(zip(classes, counts, correct, strict=True))]


def _label_map(data_classes: Sequence[str], model_classes: Sequence[str], where: str) -> torch.Tensor:
    """Dataset label id -> model label id, by class name (identity when the lists agree).

    An imported ImageNet checkpoint lists its classes in the order of its ``--classes`` file,
    while a folder dataset sorts them by folder name; matching by name makes both agree.
    """
    if list(data_classes) == list(model_classes):
        return torch.arange(len(model_classes))
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [c for c in data_classes if c not in index]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        shown = ", ".join(list(model_classes)[:5]) + (", ..." if len(model_classes) > 5 else "")
        raise DataError(f"{where}: class {unknown[0]!r}{more} is not among the network's "
                        f"{len(model_classes)} classes ({shown})")
    return torch.tensor([index[c] for c in data_classes])


def _check_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        key, _ = parse_override(text)
        if not key.startswith(OVERRIDE_SECTIONS):
            raise ConfigError(
                f"eval override {text!r}: only data.* and train.* keys can change (e.g. "
                "data.root=... or train.device=cpu); the network comes from the checkpoint")


@dataclass
class SplitOutputs:
    """What :func:`run_split` saw, for calibration: CPU tensors in loader order."""

    logits: torch.Tensor  # [n, k] float32, model label ids
    labels: torch.Tensor  # [n] model label ids
    logits_flip: torch.Tensor | None = None  # [n, k] of the mirrored images (tta_flip)


@torch.no_grad()
def run_split(model: nn.Module, loader: Any, label_map: torch.Tensor, num_classes: int,
              device: torch.device, *, tta_flip: bool = False,
              ) -> tuple[dict[str, float], torch.Tensor, SplitOutputs]:
    """One pass over ``loader``: (metrics as :class:`SumMeter` reports them, confusion ``[k, k]``,
    the logits and labels); ``tta_flip`` also runs the horizontally mirrored images."""
    criterion = nn.CrossEntropyLoss()
    meter = SumMeter(device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    label_map = label_map.to(device)
    kept: list[torch.Tensor] = []
    kept_flip: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for x, y in loader.iterate(0):  # x [b, c, h, w] float32 normalised, y [b] dataset ids
        y = label_map[y]  # [b] model ids
        logits = model(x).float()  # [b, k]
        meter.update(criterion(logits, y), logits, y)
        cm += confusion_matrix(logits.argmax(dim=1), y, num_classes)
        kept.append(logits.cpu())
        labels.append(y.cpu())
        if tta_flip:
            kept_flip.append(model(x.flip(dims=[3])).float().cpu())  # mirror the width axis
    k = num_classes
    outputs = SplitOutputs(torch.cat(kept) if kept else torch.empty(0, k),
                           torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
                           (torch.cat(kept_flip) if kept_flip else torch.empty(0, k)) if tta_flip else None)
    return meter.summary(), cm.cpu(), outputs


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float | None,
                       logits_flip: torch.Tensor | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Calibration numbers for one split and the reliability-diagram bins they came from.

    ``ece`` (percent, 15 bins) and ``nll`` (nats) of the raw softmax; with a stored
    ``temperature`` also ``ece_calibrated``/``nll_calibrated`` (the bins are then the calibrated
    ones, what predict reports). With ``logits_flip``: ``top1_acc_flip``, the top-1 accuracy of
    the mean softmax over the image and its mirror, and ``top1_acc_flip_gain`` in points.
    """
    out = dict(calibration_metrics(logits, labels))
    t = 1.0
    if temperature is not None:
        t = temperature
        cal = calibration_metrics(logits, labels, t)
        out |= {"temperature": t, "ece_calibrated": cal["ece"], "nll_calibrated": cal["nll"]}
    if logits_flip is not None:
        both = mirror_log_probs(logits, logits_flip)  # [n, k]
        plain = 100.0 * float((logits.argmax(1) == labels).double().mean())
        out["top1_acc_flip"] = 100.0 * float((both.argmax(1) == labels).double().mean())
        out["top1_acc_flip_gain"] = out["top1_acc_flip"] - plain
    bins = calibration_bins(torch.softmax(logits.double() / t, 1), labels)
    return out, bins


def plot_confusion(cm: torch.Tensor, classes: Sequence[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (atomic write; no global matplotlib state)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(classes)
    rows = cm.sum(dim=1, keepdim=True).clamp(min=1)
    share = (cm.double() / rows).numpy()  # [k, k] fraction of each true class
    size = min(4 + 0.35 * k, 14)  # inches: readable for 10 classes, capped for 1000
    fig = Figure(figsize=(size, size * 0.85))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 30:  # names and counts only where they stay legible
        ax.set_xticks(range(k), labels=list(classes), rotation=90 if k > 10 else 0)
        ax.set_yticks(range(k), labels=list(classes))
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_output(path, lambda f: f.write(buf.getvalue()))


def _write_json(path: Path, doc: Any) -> None:
    text = json.dumps(doc, indent=2)
    write_output(path, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------------------------
# the command


def split_pass(path: str | Path, split: str, overrides: Sequence[str] = (), *, tta: str | None = None,
               ) -> tuple[Path, Config, DataMeta, dict[str, float], torch.Tensor, SplitOutputs]:
    """Rebuild ``path``'s data and network and run ``split`` once (the raw network: no stored
    temperature): ``(checkpoint file, config, meta, metrics, confusion, outputs)``."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if tta not in (None, "flip"):
        raise ConfigError(f"tta must be 'flip' or None, got {tta!r}")
    _check_overrides(overrides)
    # fused, on the config's train.device, without a stored temperature (the raw network)
    run = open_run(path, device=None, overrides=overrides, calibrated=False)
    cfg, meta, device, file, model = run.config, run.meta, run.device, run.file, run.model
    subset, data_meta = run.split(split)
    label_map = _label_map(data_meta.classes, meta.classes, f"{cfg.data.name} data")
    loader = build_loader(subset, data_meta, cfg.data, train=False,
                          batch_size=cfg.train.eval_batch_size, device=device, seed=cfg.seed)
    metrics, cm, seen = run_split(model, loader, label_map, len(meta.classes), device,
                                  tta_flip=tta == "flip")
    if not math.isfinite(metrics["loss"]):  # NaN would pass as a number into the report and the JSON
        raise NonFiniteOutputError(f"{file}: loss {metrics['loss']} on the {split} split: the network's "
                                   f"outputs are not finite; this checkpoint is unusable, use an earlier one")
    return file, cfg, meta, metrics, cm, seen


def evaluate_checkpoint(path: str | Path, split: str = "val", overrides: Sequence[str] = (),
                        *, write: bool = True, out_dir: str | Path | None = None,
                        tta: str | None = None) -> EvalReport:
    """Evaluate the run folder or checkpoint ``path`` on ``split`` of its own data.

    ``overrides`` are ``data.*`` / ``train.*`` ``key=value`` strings applied to the stored
    config (e.g. ``data.root=/new/place``, ``train.device=cpu``, ``train.eval_batch_size=64``).
    With ``write`` the three files of the module docstring go to ``out_dir`` (created if
    needed), by default the run (or checkpoint) folder: pass one for a read-only run.
    Calibration (ECE over 15 bins, NLL; calibrated too when ``resnetlab calibrate`` stored a
    temperature) goes into ``metrics`` and a reliability diagram ``reliability-<split>.png``.
    ``tta="flip"`` also measures top-1 on the mean softmax of each image and its mirror.
    OS errors name the path (:class:`~resnetlab.outputs.OutputWriteError`).
    """
    file, cfg, meta, metrics, cm, seen = split_pass(path, split, overrides, tta=tta)

    temperature = read_temperature(path, file)
    cal, bins = calibration_report(seen.logits, seen.labels, temperature, seen.logits_flip)
    metrics.update(cal)
    per_class = per_class_accuracy(cm, meta.classes)
    present = [r for r in per_class if r["count"]]  # macro average over the classes in the split
    metrics["macro_f1"] = sum(r["f1"] for r in present) / max(len(present), 1)
    report = EvalReport(source=str(file), split=split, metrics=metrics, classes=list(meta.classes),
                        confusion=cm.tolist(), per_class=per_class)
    if write:
        out = Path(out_dir).expanduser() if out_dir is not None else output_dir(path)
        files = {"json": out / f"eval-{split}.json", "confusion_json": out / f"confusion-{split}.json",
                 "confusion_png": out / f"confusion-{split}.png", "reliability_png": out / f"reliability-{split}.png"}
        report.files = {k: str(v) for k, v in files.items()}
        _write_json(files["confusion_json"], {"split": split, "classes": report.classes,
                                              "rows": "true class", "columns": "predicted class",
                                              "matrix": report.confusion})
        plot_confusion(cm, meta.classes, files["confusion_png"],
                       title=f"{cfg.model.name} on {cfg.data.name} {split}: "
                             f"top-1 error {metrics['top1_err']:.2f}%")

        shown = "calibrated" if temperature is not None else "uncalibrated"
        plot_reliability(bins, files["reliability_png"],
                         title=f"{cfg.model.name} on {cfg.data.name} {split} ({shown}): ECE "
                               f"{metrics.get('ece_calibrated', metrics['ece']):.2f}%")
        _write_json(files["json"], report.to_dict())
    return report


def calibrate_checkpoint(path: str | Path, overrides: Sequence[str] = (),
                         report_on: Sequence[str] = ("val", "test")) -> dict[str, Any]:
    """``resnetlab calibrate``: fit a temperature on ``path``'s validation split (Guo et al. 2017)
    and store it in the run's ``calibration.json``; returns the document written.

    The document holds ``temperature``, the checkpoint it was fitted for, and ECE/NLL before and
    after on ``report_on`` (test only where the data have one). Loading the run afterwards
    (predict, serve, explain, export, ``resnetlab.load``) divides the logits by it.
    """
    file, cfg, _meta, _m, _cm, val = split_pass(path, "val", overrides)
    if len(val.labels) == 0:
        raise DataError(f"{file}: the validation split is empty; nothing to fit the temperature on")
    t = fit_temperature(val.logits, val.labels)
    doc: dict[str, Any] = {"temperature": t, "fitted_on": "val", "count": len(val.labels),
                           "checkpoint": str(file), "method": "temperature scaling (Guo et al. 2017), "
                                                             "NLL minimised by L-BFGS", "bins": 15}
    splits = {"val": val} if "val" in report_on else {}
    if "test" in report_on:
        with contextlib.suppress(DataError):  # no test split (an image folder without test/): val only
            splits["test"] = split_pass(path, "test", overrides)[5]
    for name, seen in splits.items():
        before, after = calibration_metrics(seen.logits, seen.labels), calibration_metrics(seen.logits, seen.labels, t)
        doc[name] = {"ece_before": before["ece"], "ece_after": after["ece"],
                     "nll_before": before["nll"], "nll_after": after["nll"], "count": len(seen.labels)}
    dest = calibration_path(path)
    _write_json(dest, doc)
    doc["file"] = str(dest)
    del cfg
    return doc


def format_report(report: EvalReport, max_classes: int = 30) -> str:
    """The printed table: headline metrics, then per-class accuracy (worst first when many)."""
    m = report.metrics
    lines = [f"{report.source} | {report.split} split | {m['count']} images",
             f"loss {m['loss']:.4f} | top-1 error {m['top1_err']:.2f}% (acc {m['top1_acc']:.2f}%) | "
             f"top-5 error {m['top5_err']:.2f}% (acc {m['top5_acc']:.2f}%)"
             + (f" | macro F1 {m['macro_f1']:.2f}%" if "macro_f1" in m else "")]
    if "ece" in m:
        line = f"calibration: ECE {m['ece']:.2f}% (15 bins) | NLL {m['nll']:.4f}"
        if "temperature" in m:
            line += (f" | with T = {m['temperature']:.3f}: ECE {m['ece_calibrated']:.2f}%, "
                     f"NLL {m['nll_calibrated']:.4f}")
        lines.append(line)
    if "top1_acc_flip" in m:
        lines.append(f"flip test-time augmentation: top-1 acc {m['top1_acc_flip']:.2f}% "
                     f"({m['top1_acc_flip_gain']:+.2f} points)")
    lines.append("")
    rows = [r for r in report.per_class if r["count"]]
    note = ""
    if len(rows) > max_classes:  # 1000 ImageNet rows help nobody on a terminal
        note = f"(the {max_classes} worst of {len(rows)} classes; all in the JSON)"
        rows = sorted(rows, key=lambda r: (r["accuracy"], r["index"]))[:max_classes]
    width = max([5, *(len(r["class"]) for r in rows)])
    lines.append(f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}  {'precision':>9}  "
                 f"{'recall':>7}  {'F1':>7}  {note}".rstrip())
    for r in rows:
        lines.append(f"{r['class']:<{width}}  {r['count']:>6}  {r['correct']:>7}  {r['accuracy']:>7.2f}%  "
                     f"{r.get('precision', 0.0):>8.2f}%  {r.get('recall', 0.0):>6.2f}%  {r.get('f1', 0.0):>6.2f}%")
    if report.files:
        lines += ["", "wrote " + ", ".join(report.files.values())]
    return "\n".join(lines)


__all__ = ["EvalReport", "calibrate_checkpoint", "calibration_report", "confusion_matrix", "evaluate_checkpoint", "format_report",
           "per_class_accuracy", "plot_confusion", "run_split", "split_pass", "SplitOutputs"]
