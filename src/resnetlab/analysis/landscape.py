"""The loss landscape (Li et al., NeurIPS 2018, "Visualizing the Loss Landscape of Neural Nets").

Around the trained weights ``w`` the loss is drawn along one or two random directions::

    L(a) = loss(w + a d1)              (1-D)
    L(a, b) = loss(w + a d1 + b d2)    (2-D)

**Filter normalisation** (the paper's Sec. 4): each direction is Gaussian, then every *filter* of
it (one output channel of a conv, one output row of a linear layer) is rescaled to the norm of
the weight filter it perturbs, ``d_ij <- d_ij / ||d_ij|| * ||w_ij||``, so the picture does not
depend on the scale invariance that BatchNorm gives the weights. Directions for BN weights/biases
and for biases (any parameter with fewer than two dimensions) are zero, as in the paper.

**BatchNorm** during evaluation (``bn``):

- ``"batch"`` (default): every grid point normalises with the statistics of the evaluated images
  themselves, i.e. running statistics recomputed for the perturbed weights on those images;
  the stored running statistics are neither used nor changed.
- ``"eval"``: the trained model's running statistics, as in ``model.eval()``.

**Speed**: the grid points are evaluated many at a time: the perturbed weights of ``chunk``
points are stacked and one ``torch.func.vmap`` over ``torch.func.functional_call`` runs them all
on the same fixed images. The reference
(:func:`~resnetlab.analysis.loss_surface.landscape_loop`, used by the benchmark and the tests)
loads each perturbed state dict into the model and runs it. The mathematics lives in
:mod:`resnetlab.analysis.loss_surface`; this module turns run folders into landscape files.

**Roughness** as numbers, not only a picture:

- ``second_difference``: the mean absolute second difference of the loss along each grid axis,
  divided by the squared step, ``mean |L(a+h) - 2 L(a) + L(a-h)| / h^2`` (loss units per unit
  of filter-normalised distance squared); large on a rough, steep surface, small on a smooth one.
- Hessian extremes at the minimum: the largest eigenvalue ``lambda_max`` by power iteration
  on Hessian-vector products (double backward), and the smallest ``lambda_min`` by power
  iteration on ``H - lambda_max I``; ``|lambda_min / lambda_max|`` is the paper's measure of
  non-convexity (0 for a locally convex minimum). Over all trainable parameters, same BN mode.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.analysis import args
from resnetlab.analysis.degradation import train_models, write_rows_csv
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.gradients import torch_threads
from resnetlab.analysis.loss_surface import (
    BN_LABELS,
    BN_MODES,
    filter_normalized_direction,
    grid_points,
    hessian_extremes,
    landscape_batched,
    second_difference,
)
from resnetlab.analysis.plots import save_figure
from resnetlab.analysis.seeds import final_metrics
from resnetlab.inference import SPLITS, OpenRun, open_run, output_dir
from resnetlab.runtime import select_device

# ----------------------------------------------------------------------------------------------
# a run folder -> landscape files


@dataclass
class LandscapeResult:
    """What :func:`run_landscape` returns for one network."""

    name: str  # label: the model name
    out_dir: Path
    coords: list[float]
    dims: int
    loss: torch.Tensor  # [g] or [g, g] (rows: b, columns: a)
    acc: torch.Tensor  # same shape, fraction
    loss_at_zero: float
    roughness: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def load_images(run: OpenRun, split: str, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``images`` images of ``split`` of the run's own data, normalised as in training."""
    subset, _ = run.split(split)
    n = min(images, len(subset))
    x, y = next(iter(run.loader(split, batch_size=n, channels_last=False).iterate(0)))
    return x[:n].contiguous(), y[:n]


def check_landscape_args(*, grid: int, span: float, dims: int, images: int, bn: str, seed: int, chunk: int,
                         hessian_iters: int) -> None:
    """The landscape's own arguments, against :data:`resnetlab.analysis.args.BOUNDS` (and ``bn``
    against :data:`BN_MODES`): :class:`AnalysisError` naming the first bad one."""
    args.check(grid=grid, span=span, dims=dims, images=images, seed=seed, chunk=chunk,
               hessian_iters=hessian_iters)
    args.one_of(bn, "bn", BN_MODES)


def run_landscape(path: str | Path, *, grid: int = 21, span: float = 1.0, dims: int = 2,
                  split: args.Split = "train", images: int = 256, bn: args.BnMode = "batch", seed: int = 0,
                  chunk: int = 16, hessian_iters: int = 20, out: str | Path | None = None,
                  device: str = "cpu") -> LandscapeResult:
    """The landscape of the network saved at ``path`` (run folder or checkpoint).

    Writes to ``out`` (default ``<run>/landscape/``): ``landscape.csv`` (one row per grid point:
    ``a, b, loss, acc``), ``landscape.png``/``.svg`` and ``landscape.json`` (settings, roughness).
    """
    check_landscape_args(grid=grid, span=span, dims=dims, images=images, bn=bn, seed=seed, chunk=chunk,
                         hessian_iters=hessian_iters)
    args.one_of(split, "split", SPLITS)
    t0 = time.perf_counter()
    dev = select_device(device)

    # One intra-op thread on CPU: these small convolutions do not split well, and on 2 shared
    # cores two threads fighting were several times slower than one.
    with torch_threads(1 if dev.type == "cpu" else 0):
        return _run_landscape(path, grid, span, dims, split, images, bn, seed, chunk, hessian_iters,
                              out, dev, t0)


def _run_landscape(path: str | Path, grid: int, span: float, dims: int, split: args.Split, images: int,
                   bn: args.BnMode, seed: int, chunk: int, hessian_iters: int, out: str | Path | None,
                   dev: torch.device, t0: float) -> LandscapeResult:
    run = open_run(path, dev, fuse=False)
    model, cfg, file = run.model.requires_grad_(True), run.config, run.file
    x, y = load_images(run, split, images)

    g = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, g)
    d2 = filter_normalized_direction(model, g) if dims == 2 else None
    coords = torch.linspace(-span, span, grid).tolist()
    points = grid_points(coords, coords if dims == 2 else None)
    t_grid = time.perf_counter()
    loss, acc = landscape_batched(model, x, y, d1, d2, points, bn=bn, chunk=chunk)
    grid_seconds = time.perf_counter() - t_grid
    shape = (grid, grid) if dims == 2 else (grid,)
    loss, acc = loss.view(shape), acc.view(shape)
    zero, _ = landscape_batched(model, x, y, d1, d2, [(0.0, 0.0)], bn=bn, chunk=1)
    step = 2 * span / (grid - 1)
    rough = {"second_difference": second_difference(loss, step)}
    if hessian_iters > 0:
        rough.update(hessian_extremes(model, x, y, bn=bn, iters=hessian_iters, seed=seed))

    out_dir = Path(out).expanduser() if out else output_dir(path) / "landscape"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = cfg.model.name
    res = LandscapeResult(name, out_dir, coords, dims, loss, acc, float(zero[0]), rough, info={
        "model": name, "source": str(file), "data": cfg.data.name, "split": split, "images": len(y),
        "grid": grid, "span": span, "dims": dims, "bn": bn, "bn_label": BN_LABELS[bn], "seed": seed,
        "grid_points": len(points), "grid_seconds": grid_seconds,
        "points_per_second": len(points) / grid_seconds, "chunk": chunk,
        "directions": "Gaussian, filter-normalised (Li et al. 2018); BN and bias directions zero",
    })
    write_landscape_csv(out_dir / "landscape.csv", res)
    res.files = [out_dir / "landscape.csv",
                 *plot_landscapes([res], out_dir / "landscape.png", formats=("png", "svg"))]
    res.info["seconds"] = time.perf_counter() - t0
    (out_dir / "landscape.json").write_text(json.dumps(
        {**res.info, "loss_at_zero": res.loss_at_zero, "roughness": rough}, indent=2) + "\n")
    res.files.append(out_dir / "landscape.json")
    return res


def load_landscape(folder: str | Path) -> LandscapeResult:
    """A :class:`LandscapeResult` back from a folder ``run_landscape`` wrote (landscape.csv and
    landscape.json), e.g. to re-plot several nets: ``plot_landscapes([load_landscape(a), ...], png)``."""
    folder = Path(folder).expanduser()
    try:
        doc = json.loads((folder / "landscape.json").read_text())
        (name, grid), = read_landscape_csv(folder / "landscape.csv").items()
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{folder}: not a landscape folder ({e})") from None
    g, dims = int(doc["grid"]), int(doc["dims"])
    shape = (g, g) if dims == 2 else (g,)
    coords = grid["a"][:g]
    info = {k: v for k, v in doc.items() if k not in ("loss_at_zero", "roughness")}
    return LandscapeResult(name, folder, coords, dims, torch.tensor(grid["loss"]).view(shape),
                           torch.tensor(grid["acc"]).view(shape), float(doc["loss_at_zero"]),
                           dict(doc["roughness"]), info)


def write_landscape_csv(path: Path, res: LandscapeResult) -> None:
    """One row per grid point: ``model, a, b, loss, acc`` (b empty for a 1-D landscape)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "a", "b", "loss", "acc"])
        if res.dims == 1:
            for a, lo, ac in zip(res.coords, res.loss.tolist(), res.acc.tolist(), strict=True):
                w.writerow([res.name, f"{a:.6g}", "", f"{lo:.6g}", f"{ac:.6g}"])
        else:
            for j, b in enumerate(res.coords):
                for i, a in enumerate(res.coords):
                    w.writerow([res.name, f"{a:.6g}", f"{b:.6g}", f"{float(res.loss[j, i]):.6g}",
                                f"{float(res.acc[j, i]):.6g}"])


def read_landscape_csv(path: str | Path) -> dict[str, dict[str, Any]]:
    """``landscape.csv`` back as ``{model: {"a": [...], "b": [...], "loss": [...], "acc": [...]}}``."""
    out: dict[str, dict[str, Any]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            d = out.setdefault(r["model"], {"a": [], "b": [], "loss": [], "acc": []})
            d["a"].append(float(r["a"]))
            d["b"].append(float(r["b"]) if r["b"] else None)
            d["loss"].append(float(r["loss"]))
            d["acc"].append(float(r["acc"]))
    return out


# ----------------------------------------------------------------------------------------------
# figures


def plot_landscapes(results: Sequence[LandscapeResult], path: str | Path,
                    formats: Sequence[str] = ("png",), title: str = "") -> list[Path]:
    """Side by side, one column per network, on the same levels: 2-D loss contours (top) and
    accuracy contours (bottom), or 1-D loss and accuracy curves on shared axes."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    n = len(results)
    if results[0].dims == 2:
        fig = Figure(figsize=(4.6 * n + 0.8, 8), layout="constrained")
        axes = fig.subplots(2, n, squeeze=False)
        # Same levels for every net: log-spaced losses from the lowest minimum up to a cap.
        lo = min(float(r.loss.min()) for r in results)
        hi = max(float(r.loss.max()) for r in results)
        cap = min(hi, max(lo * 50, lo + 5.0))
        # Log-spaced levels over the common range, plus each net's own quartiles, so a net on
        # a flat plateau (an untrained plain net sits near ln(classes)) still shows its contours;
        # every panel uses the same union of levels.
        own = [np.quantile(np.clip(r.loss.numpy(), None, cap), [0.1, 0.3, 0.5, 0.7, 0.9]) for r in results]
        loss_levels = np.unique(np.round(np.concatenate([np.geomspace(max(lo, 1e-4), cap, 12), *own]), 4))
        acc_levels = np.linspace(0, 1, 11)
        for i, r in enumerate(results):
            a = np.asarray(r.coords)
            loss = np.clip(r.loss.numpy(), None, cap)
            cs = axes[0][i].contour(a, a, loss, levels=loss_levels, cmap="viridis",
                                    norm=matplotlib.colors.LogNorm(loss_levels[0], loss_levels[-1]))
            axes[0][i].clabel(cs, cs.levels[::3], fontsize=6, fmt="%.2g")
            axes[0][i].set_title(f"{r.name}: loss (roughness {r.roughness['second_difference']:.3g})",
                                 fontsize=10)
            ca = axes[1][i].contourf(a, a, r.acc.numpy(), levels=acc_levels, cmap="magma")
            axes[1][i].set_title(f"{r.name}: accuracy", fontsize=10)
            for ax in (axes[0][i], axes[1][i]):
                ax.plot([0], [0], "r+", ms=10)
                ax.set(xlabel="direction 1", ylabel="direction 2", aspect="equal")
        fig.colorbar(ca, ax=axes[1, :].tolist(), label="accuracy", shrink=0.8)
    else:
        fig = Figure(figsize=(10, 4), layout="constrained")
        axes = fig.subplots(1, 2, squeeze=False)
        for r in results:
            axes[0][0].plot(r.coords, r.loss.numpy(), marker=".", label=r.name)
            axes[0][1].plot(r.coords, r.acc.numpy() * 100, marker=".", label=r.name)
        axes[0][0].set(yscale="log", xlabel="direction 1", ylabel="cross-entropy loss", title="loss")
        axes[0][1].set(xlabel="direction 1", ylabel="accuracy (%)", title="accuracy", ylim=(0, 100))
        for ax in axes[0]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    r0 = results[0]
    head = title or f"Loss landscape on {r0.info.get('data')} {r0.info.get('split')}"
    fig.suptitle(f"{head}, {r0.info.get('images')} images, filter-normalised directions\n"
                 f"{BN_LABELS[r0.info.get('bn', 'batch')]}", fontsize=10)
    return save_figure(fig, path, formats)


# ----------------------------------------------------------------------------------------------
# resnetlab reproduce landscape


@dataclass
class ReproduceLandscapeResult:
    """What :func:`reproduce_landscape` returns."""

    out_dir: Path
    results: list[LandscapeResult]
    files: list[Path]
    markdown: str


def reproduce_landscape(models: str | Sequence[str] = ("plain56", "resnet56"), *, epochs: int = 10,
                        seed: int = 0, data: str = "digits", grid: int = 21, span: float = 1.0, dims: int = 2,
                        images: int = 128, bn: args.BnMode = "batch", chunk: int = 16, hessian_iters: int = 20,
                        overrides: Sequence[str] = (), jobs: int | None = None,
                        on_progress: Callable[[str], None] | None = None) -> ReproduceLandscapeResult:
    """Train ``models`` on ``data`` with the degradation recipe, then draw their landscapes side by
    side (``landscape.png``, ``landscape.csv`` with every net's grid, ``roughness.md``/``.csv``)."""
    # every argument, the landscape's too, before the nets train
    check_landscape_args(grid=grid, span=span, dims=dims, images=images, bn=bn, seed=seed, chunk=chunk,
                         hessian_iters=hessian_iters)
    names, out_dir, jobs = train_models("landscape", models, epochs=epochs, seed=seed, data=data,
                                        overrides=overrides, jobs=jobs)
    jobs_kw = [dict(path=str(out_dir / m), grid=grid, span=span, dims=dims, split="train", images=images,
                    bn=bn, seed=seed, chunk=chunk, hessian_iters=hessian_iters,
                    out=str(out_dir / f"{m}-landscape")) for m in names]
    if jobs > 1 and len(names) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # one single-thread process per net (spawn: a clean interpreter, as in degradation.py)
        with ProcessPoolExecutor(max_workers=min(jobs, len(names)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_landscape_job, jobs_kw))
    else:
        results = [_landscape_job(kw) for kw in jobs_kw]
    for m, res in zip(names, results, strict=True):
        res.info["train_err"] = final_metrics(out_dir / m)["train_err"]
        if on_progress:
            on_progress(f"{m}: {res.info['grid_points']} points in {res.info['grid_seconds']:.0f} s "
                        f"({res.info['points_per_second']:.2f} points/s)")
    files = plot_landscapes(results, out_dir / "landscape.png", formats=("png", "svg"),
                            title=f"Loss landscape on {data} train, after {epochs} epochs")
    with open(out_dir / "landscape.csv", "w", newline="") as f:
        f.write("model,a,b,loss,acc\n")
    for r in results:  # every net's grid in one file
        tmp = out_dir / f".{r.name}.csv"
        write_landscape_csv(tmp, r)
        with open(out_dir / "landscape.csv", "a") as f:
            f.writelines(tmp.read_text().splitlines(keepends=True)[1:])
        tmp.unlink()
    md = roughness_markdown(results)
    (out_dir / "roughness.md").write_text(md)

    write_rows_csv(out_dir / "roughness.csv", roughness_rows(results))
    return ReproduceLandscapeResult(out_dir, results, [*files, out_dir / "landscape.csv",
                                                      out_dir / "roughness.md", out_dir / "roughness.csv"], md)


def _landscape_job(kw: dict[str, Any]) -> LandscapeResult:
    return run_landscape(**kw)


def roughness_rows(results: Sequence[LandscapeResult]) -> list[dict[str, Any]]:
    """One row per net: training error, loss at the minimum, the roughness numbers."""
    return [{"model": r.name, "train_err": r.info.get("train_err"), "loss_at_zero": r.loss_at_zero,
             "second_difference": r.roughness["second_difference"],
             "lambda_max": r.roughness.get("lambda_max"), "lambda_min": r.roughness.get("lambda_min"),
             "ratio": r.roughness.get("ratio")} for r in results]


def roughness_markdown(results: Sequence[LandscapeResult]) -> str:
    """The roughness numbers as a Markdown table with a note on what each means."""
    lines = ["| model | training error (%) | loss at w | mean abs 2nd difference | lambda_max | "
             "lambda_min | abs(lambda_min / lambda_max) |", "|---|---:|---:|---:|---:|---:|---:|"]

    def f(v: Any, fmt: str = ".3g") -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in roughness_rows(results):
        lines.append(f"| {r['model']} | {f(r['train_err'], '.2f')} | {f(r['loss_at_zero'], '.4f')} | "
                     f"{f(r['second_difference'])} | {f(r['lambda_max'])} | {f(r['lambda_min'])} | "
                     f"{f(r['ratio'])} |")
    where = "along the line" if all(r.dims == 1 for r in results) else "over the grid, both axes"
    lines += ["", f"Mean abs 2nd difference: mean |L(a+h) - 2L(a) + L(a-h)| / h^2 {where}. "
              "lambda: Hessian eigenvalues at the trained weights (power iteration on "
              "Hessian-vector products); abs(lambda_min / lambda_max) near 0 = locally convex."]
    return "\n".join(lines) + "\n"
