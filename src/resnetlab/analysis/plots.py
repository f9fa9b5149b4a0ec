"""Figures from metrics, never from models: every function here reads rows or run folders only.

In the spirit of pycls ``plotting.py``: training writes ``metrics.jsonl``; plots are made
afterwards, from those files, as often as wanted. Figures are built on a bare
:class:`matplotlib.figure.Figure`: ``savefig`` renders PNG with the Agg backend and SVG with
the SVG backend, so nothing here needs a display or touches pyplot's global state (a notebook's
inline backend stays as it was).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from resnetlab.analysis.errors import AnalysisError
from resnetlab.engine.metrics import read_jsonl
from resnetlab.params import named

METRICS = ("err", "loss")
# (training key, validation key, axis label) per --metric choice
_KEYS = {"err": ("train_err", "val_top1_err", "top-1 error (%)"),
         "loss": ("train_loss", "val_loss", "cross-entropy loss")}


# ----------------------------------------------------------------------------------------------
# reading


def read_run_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of ``run_dir/metrics.jsonl``; a clear error if there are none."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "no such folder" if not run_dir.exists() else "no metrics.jsonl (not a run folder?)"
        raise AnalysisError(f"{run_dir}: {what}")
    rows = read_jsonl(path)
    if not rows:
        raise AnalysisError(f"{path}: no complete epoch recorded yet")
    return rows


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) where ``key`` is present and finite (validation may skip epochs)."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(float(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def _mean_curve(runs: Sequence[Sequence[Mapping[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    """Per-epoch mean of ``key`` over several runs (seeds), on the epochs they all recorded."""
    per_run = [dict(zip(*_column(rows, key), strict=True)) for rows in runs]
    common = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    return common, [sum(d[e] for d in per_run) / len(per_run) for e in common]


def save_figure(fig: Figure, path: str | Path, formats: Iterable[str] = ("png",)) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats``; returns the files written."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=120)
        out.append(target)
    return out


# ----------------------------------------------------------------------------------------------
# resnetlab plot RUN [RUN ...]


def plot_runs(run_dirs: Sequence[str | Path], metric: Literal["err", "loss"] = "err", output: str | Path | None = None,
              labels: Sequence[str] | None = None) -> list[Path]:
    """Training (dashed) and validation (solid) curves plus the learning rate, PNG and SVG.

    One colour per run. ``output`` is the figure path (its suffix is replaced by .png and
    .svg); default ``curves_<metric>.png`` in the run folder (one run) or in the runs' common
    parent folder (several). Returns the two files written.
    """
    if metric not in _KEYS:
        raise named(AnalysisError, "metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    if not run_dirs:
        raise AnalysisError("plot needs at least one run folder")
    dirs = [Path(d).expanduser() for d in run_dirs]
    rows_per_run = [read_run_metrics(d) for d in dirs]
    if labels is None:  # folder names, with the parent's when two runs share a name (seed0, seed0)
        short = [d.name for d in dirs]
        labels = [f"{d.parent.name}/{d.name}" if short.count(d.name) > 1 else d.name for d in dirs]
    train_key, val_key, ylabel = _KEYS[metric]

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, ax_lr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    colours = matplotlib.colormaps["tab10"]
    for i, (label, rows) in enumerate(zip(labels, rows_per_run, strict=True)):
        c = colours(i % 10)
        marker = "o" if len(rows) < 3 else None  # a 1-epoch line would be invisible
        ax.plot(*_column(rows, train_key), ls="--", color=c, lw=1.4, marker=marker, mfc="none",
                label=f"{label} training")
        ax.plot(*_column(rows, val_key), ls="-", color=c, lw=1.8, marker=marker, label=f"{label} validation")
        ax_lr.plot(*_column(rows, "lr"), color=c, lw=1.6, marker=marker, label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ylabel}: training (dashed), validation (solid)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric == "loss":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_lr.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.grid(alpha=0.3)
    if output is None:
        folder = dirs[0] if len(dirs) == 1 else Path(_common_parent(dirs))
        output = folder / f"curves_{metric}.png"
    return save_figure(fig, output, ("png", "svg"))


def _common_parent(dirs: Sequence[Path]) -> Path:
    import os

    return Path(os.path.commonpath([str(d.resolve().parent) for d in dirs]))


# ----------------------------------------------------------------------------------------------
# the degradation figure (He et al. 2015, Figure 6)


def plot_degradation(curves: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                     held_out: str = "auto", formats: Iterable[str] = ("png",)) -> list[Path]:
    """Figure 6 of the paper: plain nets left, residual nets right, one colour per depth.

    ``curves`` holds one mapping per trained run: ``{"family": "plain"|"resnet", "depth": int,
    "rows": metrics.jsonl rows}``; several seeds of one (family, depth) are averaged per epoch.
    Training error is dashed, held-out error solid; both panels share the y-axis so the two
    families compare at a glance. ``held_out``: ``"test"`` (``test_top1_err`` rows, when the runs
    evaluated the test split every epoch), ``"validation"`` (``val_top1_err``), or ``"auto"``:
    test when every run has it, else validation. The legend says which.
    """
    if held_out == "auto":
        has_test = all(any("test_top1_err" in r for r in c["rows"]) for c in curves)
        held_out = "test" if curves and has_test else "validation"
    if held_out not in ("test", "validation"):
        raise AnalysisError(f"held_out must be 'test', 'validation' or 'auto', got {held_out!r}")
    held_key = "test_top1_err" if held_out == "test" else "val_top1_err"
    groups: dict[tuple[str, int], list[Sequence[Mapping[str, Any]]]] = {}
    for c in curves:
        groups.setdefault((c["family"], int(c["depth"])), []).append(c["rows"])
    depths = sorted({d for _, d in groups})
    colours = {d: matplotlib.colormaps["tab10"](i % 10) for i, d in enumerate(depths)}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    top = 0.0
    panels = ((axes[0], "plain", "plain", "plain networks"),
              (axes[1], "resnet", "ResNet", "residual networks (ResNet)"))
    for ax, family, name, panel_title in panels:
        for d in depths:
            runs = groups.get((family, d))
            if not runs:
                continue
            tx, ty = _mean_curve(runs, "train_err")
            vx, vy = _mean_curve(runs, held_key)
            seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
            marker = "o" if len(tx) < 3 else None  # a 1-epoch line would be invisible
            ax.plot(tx, ty, ls="--", lw=1.3, color=colours[d], marker=marker, mfc="none")
            ax.plot(vx, vy, ls="-", lw=2.0, color=colours[d], marker=marker, label=f"{name}-{d}{seeds}")
            top = max(top, *ty, *vy)
        style = [Line2D([], [], color="grey", ls="--", label="training error (dashed)"),
                 Line2D([], [], color="grey", ls="-", lw=2, label=f"{held_out} error (solid)")]
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=[*handles, *style], fontsize=8, loc="best")
        ax.set(xlabel="epoch", title=panel_title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 error (%)")
    # Same limits on both panels (sharey), from 0 to a little above the highest curve.
    axes[0].set_ylim(0, min(100.0, max(top, 1.0) * 1.08))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, formats)


# ----------------------------------------------------------------------------------------------
# gradient flow


def plot_gradients(rows: Sequence[Mapping[str, Any]], path: str | Path,
                   formats: Iterable[str] = ("png",)) -> list[Path]:
    """Gradient L2 norms against position in depth, log y: a 2x2 grid.

    Rows of :func:`resnetlab.analysis.gradients.gradient_flow`: ``model``, ``phase``,
    ``kind`` ("conv" weight / "block" output), ``index`` (1 = nearest the input), ``grad_norm``.
    Top: conv weights; bottom: block outputs; left: at initialisation; right: after training.
    """
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(models)}
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, max(len(phases), 1), sharey="row", squeeze=False)
    for row_i, (kind, what) in enumerate((("conv", "conv weight"), ("block", "block output"))):
        for col_i, phase in enumerate(phases):
            ax = axes[row_i][col_i]
            for m in models:
                pts = sorted((r["index"], r["grad_norm"]) for r in rows
                             if r["model"] == m and r["phase"] == phase and r["kind"] == kind)
                if pts:
                    ls = "--" if m.startswith("plain") else "-"
                    ax.plot(*zip(*pts, strict=True), ls=ls, color=colours[m], marker=".", ms=4, label=m)
            ax.set_yscale("log")
            ax.set(title=f"{what} gradient, {phase}", xlabel=f"{what} index (1 = input side)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        axes[row_i][0].set_ylabel("gradient L2 norm")
    return save_figure(fig, path, formats)


# ----------------------------------------------------------------------------------------------
# the depth sweep (error against depth)


def plot_depth_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, *, held_out: str = "test",
                     title: str = "", formats: Iterable[str] = ("png",)) -> list[Path]:
    """Final error against depth: training error (left) and held-out error (right).

    ``rows`` are :func:`resnetlab.analysis.degradation.table_rows` (one per model: ``family``,
    ``depth``, ``train_err_mean``/``_std``, ``test_err_mean``/``_std``, ``val_err_mean``/``_std``).
    Plain and residual nets are two lines with mean ± std error bars over seeds; other families
    (``--extra-models``, e.g. DenseNet) are points at their own depth.
    """
    key = "test_err" if held_out == "test" else "val_err"
    styles = {"plain": ("tab:red", "s", "--", "plain"), "resnet": ("tab:blue", "o", "-", "ResNet")}
    others = [f for f in dict.fromkeys(r["family"] for r in rows) if f not in styles]
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    top = 0.0
    for ax, metric, what in ((axes[0], "train_err", "training error"), (axes[1], key, f"{held_out} error")):
        for family in [*styles, *others]:
            pts = sorted((r["depth"], r[f"{metric}_mean"], r[f"{metric}_std"] or 0.0) for r in rows
                         if r["family"] == family and r.get(f"{metric}_mean") is not None)
            if not pts:
                continue
            colour, marker, ls, label = styles[family] if family in styles else (
                matplotlib.colormaps["tab10"](2 + others.index(family) % 8), "D", "none", family)
            d, m, s = zip(*pts, strict=True)
            ax.errorbar(d, m, yerr=s, color=colour, marker=marker, ls=ls, capsize=3, label=label)
            top = max(top, *(a + b for a, b in zip(m, s, strict=True)))
        ax.set(xlabel="depth (weighted layers)", title=f"final {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("top-1 error (%), mean ± std over seeds")
    axes[0].set_ylim(0, min(100.0, max(top, 1.0) * 1.08))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, formats)
