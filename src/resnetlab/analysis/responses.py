"""Layer responses (He et al. 2015, Sec. 4.2 and Fig. 7): how strongly each 3x3 layer responds.

The response of a 3x3 layer is its output after BN and before any other nonlinearity: for
the paper's (post-activation) blocks the output of the BN that reads the conv, i.e. before the
ReLU, and for the second conv of a block *before the addition* of the shortcut: in a residual
net that tensor is the residual function F(x). Where no BN reads a 3x3 conv directly
(pre-activation blocks, DenseNet's 3x3), the conv's own output is the response.

For each network, the standard deviation of every response over all its elements (images,
channels, positions) of the whole evaluated split, with the trained weights in eval mode
(running BN statistics). The paper's finding on CIFAR-10: ResNets respond less than their plain
twins, and deeper ResNets respond less than shallower ones: residual functions stay close to
zero, so each layer modifies the signal less.

Writes ``responses.csv`` (``model, run, index, layer, std``) and ``responses.png``/``.svg``
(top: std against layer index; bottom: the same values sorted in descending order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnetlab.analysis import args
from resnetlab.analysis.degradation import train_models, write_rows_csv
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.gradients import torch_threads
from resnetlab.analysis.plots import save_figure
from resnetlab.analysis.seeds import final_metrics
from resnetlab.inference import SPLITS, open_run
from resnetlab.models.fuse import direct_pairs
from resnetlab.runtime import run_dir

DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56", "resnet110")
CSV_COLUMNS = ("model", "run", "index", "layer", "std")


def response_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the 3x3 layers' responses, in forward order.

    For each 3x3 conv: the BN that directly reads it (declared by ``fuse_pairs`` or adjacent in
    an ``nn.Sequential``), else the conv itself. Returns ``(name, module)`` pairs.
    """
    bn_after: dict[int, tuple[str, nn.Module]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for parent in model.modules():
        for conv_name, bn_name in direct_pairs(parent):
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                bn_after[id(conv)] = (names[id(bn)], bn)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            out.append(bn_after.get(id(m), (name, m)))
    return out


class ResponseStats:
    """Forward hooks that accumulate the sum and sum of squares of each response (float64).

    ``captured`` keeps the last output of every hooked module when ``keep=True`` (for tests).
    """

    def __init__(self, model: nn.Module, keep: bool = False) -> None:
        self.layers = response_modules(model)
        if not self.layers:
            raise AnalysisError(f"{type(model).__name__} has no 3x3 convolutions to measure")
        n = len(self.layers)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.squares = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.keep = keep
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(i, name))
                         for i, (name, m) in enumerate(self.layers)]

    def _hook(self, i: int, name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            t = out.detach()
            if self.keep:
                self.captured[name] = t.clone()  # clone: a later in-place ReLU must not change it
            t64 = t.double()
            self.sums[i] += float(t64.sum())
            self.squares[i] += float((t64 * t64).sum())
            self.counts[i] += t.numel()
        return hook

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()

    def stds(self) -> list[float]:
        """Population std of each response over everything seen so far."""
        mean = self.sums / self.counts
        var = (self.squares / self.counts - mean * mean).clamp_min(0)
        return var.sqrt().tolist()


def layer_response_stds(model: nn.Module, batches: Any) -> list[dict[str, Any]]:
    """``[{index, layer, std}]`` over every ``(x, y)`` in ``batches``, eval mode, no grad."""
    stats = ResponseStats(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _y in batches:
                model(x)
    finally:
        stats.remove()
        model.train(was)
    return [{"index": i + 1, "layer": name, "std": s}
            for i, ((name, _m), s) in enumerate(zip(stats.layers, stats.stds(), strict=True))]


@dataclass
class ResponsesResult:
    """What :func:`run_responses` returns."""

    out_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]  # model -> mean / median / max std
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


def _measure_run(path: str | Path, split: args.Split) -> tuple[str, list[dict[str, Any]]]:
    run = open_run(path, "cpu", fuse=False)
    return run.config.model.name, layer_response_stds(run.model, run.loader(split, channels_last=False).iterate(0))


def run_responses(runs: Sequence[str | Path], *, split: args.Split = "test", out: str | Path | None = None,
                  labels: Sequence[str] | None = None) -> ResponsesResult:
    """Layer-response stds of the trained networks in ``runs`` on ``split``; CSV, figure, summary.

    ``out`` defaults to ``runs/responses-<time>/``. ``labels`` name the curves (default: the
    model names, with the run folder's name added where two runs share a model).
    """
    if not runs:
        raise AnalysisError("give at least one run folder")
    if split not in ("train", "val", "test"):
        args.one_of(split, "split", SPLITS)

    with torch_threads(1):  # small convolutions on shared cores: one thread is fastest
        measured = [(Path(r), *_measure_run(r, split)) for r in runs]
    models = [m for _, m, _ in measured]
    if labels is None:
        labels = [m if models.count(m) == 1 else f"{m} ({p.name})" for p, m, _ in measured]
    rows = [{"model": label, "run": str(p), **r} for (p, _m, rs), label in zip(measured, labels, strict=True)
            for r in rs]
    out_dir = Path(out).expanduser() if out else run_dir("responses")
    out_dir.mkdir(parents=True, exist_ok=True)

    write_rows_csv(out_dir / "responses.csv", rows, CSV_COLUMNS)
    summary = summarize_responses(rows)
    files = [out_dir / "responses.csv",
             *plot_responses(rows, out_dir / "responses.png", formats=("png", "svg"), split=split)]
    md = responses_markdown(summary)
    (out_dir / "summary.md").write_text(md)
    files.append(out_dir / "summary.md")
    return ResponsesResult(out_dir, rows, summary, files, md)


def summarize_responses(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model: mean, median and max of its layers' stds, and the layer count."""
    out: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        s = sorted(r["std"] for r in rows if r["model"] == model)
        mid = len(s) // 2
        median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
        out[model] = {"layers": len(s), "mean": math.fsum(s) / len(s), "median": median, "max": s[-1]}
    return out


def responses_markdown(summary: dict[str, dict[str, float]]) -> str:
    """The per-model summary as a Markdown table."""
    lines = ["| model | 3x3 layers | mean std | median std | max std |", "|---|---:|---:|---:|---:|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['layers']} | {s['mean']:.3f} | {s['median']:.3f} | {s['max']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_responses(rows: Sequence[dict[str, Any]], path: str | Path, formats: Sequence[str] = ("png",),
                   split: args.Split = "test") -> list[Path]:
    """The paper's Fig. 7: std against layer index (top) and sorted by magnitude (bottom)."""
    import matplotlib
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(models)}
    fig = Figure(figsize=(9, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    for m in models:
        pts = sorted((r["index"], r["std"]) for r in rows if r["model"] == m)
        ls = "--" if m.startswith("plain") else "-"
        idx, std = zip(*pts, strict=True)
        top.plot(idx, std, ls=ls, color=colours[m], lw=1.2, label=m)
        bottom.plot(range(1, len(std) + 1), sorted(std, reverse=True), ls=ls, color=colours[m], lw=1.2,
                    label=m)
    top.set(xlabel="layer index (original order)", ylabel="std", title=f"3x3 layer responses on the "
            f"{split} split (after BN, before ReLU / addition)")
    bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path, formats)


@dataclass
class ReproduceResponsesResult:
    """What :func:`reproduce_responses` returns."""

    out_dir: Path
    responses: ResponsesResult
    train_err: dict[str, float]


def reproduce_responses(models: str | Sequence[str] = DEFAULT_MODELS, *, epochs: int = 10, seed: int = 0,
                        data: str = "digits", overrides: Sequence[str] = (),
                        jobs: int | None = None) -> ReproduceResponsesResult:
    """Train ``models`` on ``data`` (the degradation recipe, one seed), then measure and draw
    their layer responses on the test split into ``runs/responses-<data>-<time>/``."""
    names = list(models.replace(",", " ").split() if isinstance(models, str) else models)
    # deepest first: better packing on the worker processes
    names, out_dir, _ = train_models("responses", names, epochs=epochs, seed=seed, data=data, overrides=overrides,
                                     jobs=jobs, order=sorted(names, key=lambda n: -_depth_key(n)))
    runs = [out_dir / m for m in names]
    res = run_responses(runs, split="test", out=out_dir, labels=names)
    errs = {m: final_metrics(out_dir / m)["train_err"] for m in names}
    return ReproduceResponsesResult(out_dir, res, errs)


def _depth_key(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0
