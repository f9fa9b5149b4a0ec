"""The degradation experiment (He et al. 2015, Sec. 4.2, Figure 6): deeper plain nets train
worse; the same nets with identity shortcuts do not.

For each depth ``d`` the plain net ``plain<d>`` and its residual twin ``resnet<d>`` (same
layers, same parameter count: option A shortcuts add none) are trained with one recipe and the
same seeds. Everything lands in ``<run.root>/degradation-<data>-<time>/``::

    plain20-seed0/ ... resnet56-seed2/   ordinary run folders (metrics.jsonl, result.json, ...)
    degradation.png, degradation.svg      Figure 6: plain left, ResNet right
    depth.png, depth.svg                  final training and test error against depth
    table.md, table.csv                   final errors, mean ± std over seeds (ddof=1)
    runs.csv                              the same numbers per run
    experiment.json                       settings, recipe, wall time

On CPU the runs go to ``jobs`` worker processes with one intra-op thread each: on 2 cores two
single-thread processes were 5-7x faster than one two-thread process for these tiny (8x8)
convolutions, whose per-op work is too small to split across threads.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from resnetlab import runtime
from resnetlab.analysis import args
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.plots import plot_degradation, plot_depth_sweep, read_run_metrics
from resnetlab.analysis.seeds import final_metrics, format_pm, mean_std, parse_seeds
from resnetlab.analysis.trainings import default_jobs, run_trainings
from resnetlab.config import Config, apply_overrides, from_dict, recipe_path, validate
from resnetlab.data import build_datasets
from resnetlab.data.sources import get_source, source_names
from resnetlab.exit_codes import exit_code
from resnetlab.launch import discard_untrained, removed_on_failure
from resnetlab.models import create_model, list_models, model_defaults
from resnetlab.params import named

log = logging.getLogger("resnetlab")

# Changes to a source's own recipe (its recipes/<name>.yaml, the one source of that recipe).
# Digits at half its lr: at lr 0.1, 20 epochs, resnet56 seed 1 jumped from 60% back to 82%
# training error when the warm-up reached 0.1 and ended at 50%; at 0.05 it ends at ~1% while
# plain56 still sits at ~72%.
RECIPE_CHANGES: dict[str, dict[str, Any]] = {"digits": {"optim": {"lr": 0.05}}}
# Recipes of the experiment itself, as typed values over the defaults.
RECIPES: dict[str, dict[str, Any]] = {
    # The paper's CIFAR recipe (Sec. 4.2): lr 0.1, /10 at 50% and 75%, wd 1e-4, batch 128,
    # pad-4 crop + flip. Needs data.root=... pointing at the local CIFAR files.
    "cifar10": {"data": {"name": "cifar10", "augment": {"crop_padding": 4, "flip": True}},
                "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                          "schedule": "step", "milestones": [0.5, 0.75], "warmup": "none"},
                "train": {"batch_size": 128, "test_every_epoch": True}},
}
RECIPES["cifar100"] = {**RECIPES["cifar10"], "data": {**RECIPES["cifar10"]["data"], "name": "cifar100"}}
DEFAULT_EPOCHS = {"digits": 20, "cifar10": 164, "cifar100": 164}
# The paper's warm-up for its 110-layer nets (Sec. 4.2): lr/10 "until the training error is below
# 80% (about 400 iterations)", then the recipe's lr. Nets at least DEEP_LAYERS deep get a constant
# warm-up at lr * DEEP_WARMUP_FACTOR for DEEP_WARMUP_STEPS steps, capped at DEEP_WARMUP_SHARE of
# the run (digits has 9 steps per epoch: 400 steps would be the whole experiment).
DEEP_LAYERS = 100
DEEP_WARMUP_STEPS = 400
DEEP_WARMUP_SHARE = 0.2
DEEP_WARMUP_FACTOR = 0.1
DEFAULT_DEPTHS = (20, 56)
DEFAULT_SEEDS = (0, 1, 2)
FAMILIES = ("plain", "resnet")


@dataclass
class DegradationResult:
    """What :func:`run_degradation` returns."""

    out_dir: Path
    rows: list[dict[str, Any]]  # one per (family, depth): the table, means and stds
    runs: list[dict[str, Any]]  # one per trained run: final numbers and its folder
    markdown: str  # the table as printed
    figure: Path
    seconds: float  # wall time of the whole experiment
    interrupted: str | None = None  # a run was stopped (Ctrl-C, SIGTERM); the rest did not run

    @property
    def exit_code(self) -> int:
        """0, or the shell's code for the signal that stopped a run (130 Ctrl-C, 143 SIGTERM)."""
        return exit_code(self.interrupted)


# ----------------------------------------------------------------------------------------------
# parsing and planning


def parse_depths(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"20,56"`` -> ``(20, 56)``; every depth must have a CIFAR-style plain and resnet twin."""
    return tuple(sorted(args.int_choices(text, "depths", "20,56", twin_depths(),
                                         "a depth with a plain and a residual twin")))


def twin_depths() -> tuple[int, ...]:
    """Depths with both ``plain<d>`` and ``resnet<d>`` registered with the CIFAR stem."""
    out = []
    for name in list_models("plain*"):
        d = name.removeprefix("plain")
        if d.isdigit() and f"resnet{d}" in list_models() and model_defaults(name).get("stem") == "cifar":
            out.append(int(d))
    return tuple(sorted(out))


def data_choices() -> list[str]:
    """The data sources the experiments accept (``--data``): every registered source that is one
    labelled set split by the seed, i.e. all but image folders (whose splits are folders)."""
    return source_names(split_folders=False)


def recipe_for(data: str) -> dict[str, Any]:
    """The experiment's recipe for ``data``: the paper's one of :data:`RECIPES` with its
    :data:`DEFAULT_EPOCHS`, else the source's own recipe (the registry's, with
    :data:`RECIPE_CHANGES`; the nets come from the experiment) testing after every epoch."""
    if data in RECIPES:
        return {**RECIPES[data], "train": {**RECIPES[data]["train"], "epochs": DEFAULT_EPOCHS[data]}}
    args.one_of(data, "data", data_choices())
    recipe = dict(yaml.safe_load(recipe_path(get_source(data).default_recipe)[0].read_text()) or {})
    recipe.pop("model", None)  # the nets are the experiment's
    changes = RECIPE_CHANGES.get(data, {})
    recipe = {**recipe, **{k: {**recipe.get(k, {}), **v} for k, v in changes.items()}}
    train = {**recipe.get("train", {}), "test_every_epoch": True}
    if data in DEFAULT_EPOCHS:
        train["epochs"] = DEFAULT_EPOCHS[data]
    return {**recipe, "train": train}


def base_config(data: str, overrides: Sequence[str] = (), epochs: int | None = None) -> Config:
    """The shared recipe for ``data``, then the user's ``overrides``, then ``epochs``."""
    recipe = recipe_for(data)
    args.fixed_by_experiment(overrides, ("model.name", "seed"), "the nets and seeds")
    # validated after the overrides: data.root may only come with them
    cfg = apply_overrides(from_dict(recipe, check=False), overrides)
    # --epochs wins over a train.epochs=... override: it is the experiment's own flag
    return validate(replace(cfg, train=replace(cfg.train, epochs=epochs))) if epochs else cfg


def train_models(kind: str, models: str | Sequence[str], *, epochs: int, seed: int, data: str = "digits",
                 overrides: Sequence[str] = (), jobs: int | None = None,
                 order: Sequence[str] | None = None) -> tuple[list[str], Path, int]:
    """Train each of ``models`` once on ``data`` (the degradation recipe, one ``seed``, the deep
    nets' warm-up) into ``<run.root>/<kind>-<data>-<time>/<model>/``; returns ``(names, folder,
    worker processes)``.

    The shared first half of ``reproduce landscape`` and ``reproduce responses``. ``order`` is the
    order in which the runs are handed to the workers (e.g. deepest first); any run that did not
    finish raises AnalysisError naming it.
    """
    names = args.models(models)
    args.check(epochs=epochs, seed=seed, jobs=jobs)
    base = base_config(data, overrides, epochs)
    steps = steps_per_epoch(base)
    out_dir = runtime.run_dir(f"{kind}-{data}", base.run.root, base.run.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = default_jobs(base.train.device) if jobs is None else jobs
    cfgs = [deep_warmup(replace(base, seed=seed, model=replace(base.model, name=m),
                                train=replace(base.train, quiet=True, tensorboard=False,
                                              threads=1 if jobs > 1 else base.train.threads),
                                run=replace(base.run, root=str(out_dir), name=m)), steps, overrides)
            for m in (order or names)]
    trained = {Path(t["run_dir"]).name: t for t in run_trainings(cfgs, jobs)}
    for m in names:
        t = trained.get(m)
        if t is None or t["interrupted"] or t["error"]:
            reason = "interrupted" if t is None else (t["interrupted"] or t["error"])
            raise AnalysisError(f"{m}: training did not finish ({reason})")
    return names, out_dir, jobs


def parse_extra_models(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"densenet_bc100,lesson_resnet18"`` -> registered names trained beside the twins."""
    if text is None or not (text.replace(",", " ").split() if isinstance(text, str) else text):
        return ()
    names = tuple(args.models(text, "extra_models"))  # registered, none twice
    for n in names:
        if re.fullmatch(r"(plain|resnet)\d+", n):
            raise named(AnalysisError, "extra_models", f"names {n!r}, a plain/resnet twin; choose twins by their depth instead")
    return names


def weighted_depth(model_name: str) -> int:
    """Weighted layers on the main path (convs + linear, not shortcut projections), as the
    papers count depth: 20 for resnet20, 100 for densenet_bc100, 121 for densenet121."""
    import torch
    from torch import nn

    with torch.device("meta"):
        model = create_model(model_name)
    shortcut_words = ("downsample", "extra", "shortcut")
    return sum(1 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and not any(w in n.split(".") for w in shortcut_words))


def family_depth(model: str, extra: bool = False) -> tuple[str, int]:
    """``("plain", 56)`` for a twin; ``(name, weighted_depth)`` for an extra model."""
    return (model, weighted_depth(model)) if extra else split_name(model)


def steps_per_epoch(cfg: Config) -> int:
    """Optimiser steps per epoch of ``cfg``'s training split (full batches; one process)."""
    n = len(build_datasets(cfg.data, seed=cfg.seed, needs=("train",)).train.labels)
    return max(1, n // cfg.train.batch_size)


def deep_warmup(cfg: Config, steps: int, overrides: Sequence[str] = ()) -> Config:
    """``cfg`` with the paper's warm-up for very deep nets (see :data:`DEEP_LAYERS`), ``steps``
    being the optimiser steps per epoch; unchanged for shallower nets or when the user's
    ``overrides`` set any ``optim.warmup*`` key themselves."""
    if any(o.split("=", 1)[0].strip().startswith("optim.warmup") for o in overrides):
        return cfg
    family, depth = (split_name(cfg.model.name) if re.fullmatch(r"(plain|resnet)\d+", cfg.model.name)
                     else (cfg.model.name, weighted_depth(cfg.model.name)))
    if depth < DEEP_LAYERS:
        return cfg
    warm_steps = min(DEEP_WARMUP_STEPS, DEEP_WARMUP_SHARE * steps * cfg.train.epochs)
    optim = replace(cfg.optim, warmup="constant", warmup_lr=cfg.optim.lr * DEEP_WARMUP_FACTOR,
                    warmup_epochs=round(warm_steps / steps, 3))
    return validate(replace(cfg, optim=optim))


def plan(base: Config, depths: Sequence[int], seeds: Sequence[int], out_dir: Path,
         jobs: int, extra_models: Sequence[str] = (), steps: int | None = None,
         overrides: Sequence[str] = ()) -> list[Config]:
    """One config per (family, depth, seed), the deepest first (better packing on workers);
    then one per (extra model, seed). With ``steps`` (per epoch), nets of :data:`DEEP_LAYERS`
    layers or more get :func:`deep_warmup`."""
    cfgs = []
    names = [f"{family}{d}" for d in sorted(depths, reverse=True) for family in FAMILIES]
    for model_name in [*names, *extra_models]:
        for s in seeds:
            train = replace(base.train, quiet=True, tensorboard=False,
                            threads=1 if jobs > 1 else base.train.threads)
            cfg = validate(replace(base, seed=s, train=train, model=replace(base.model, name=model_name),
                                   run=replace(base.run, root=str(out_dir), name=f"{model_name}-seed{s}")))
            cfgs.append(deep_warmup(cfg, steps, overrides) if steps else cfg)
    return cfgs


def split_name(model: str) -> tuple[str, int]:
    """``"plain56"`` -> ``("plain", 56)``."""
    m = re.fullmatch(r"([a-z_]+?)(\d+)", model)
    if m is None:
        raise AnalysisError(f"{model!r} is not a <family><depth> model name")
    return m.group(1), int(m.group(2))


# ----------------------------------------------------------------------------------------------
# the experiment


def run_degradation(data: str = "digits", depths: str | Sequence[int] = DEFAULT_DEPTHS,
                    seeds: str | Sequence[int] = DEFAULT_SEEDS, epochs: int | None = None,
                    overrides: Sequence[str] = (), jobs: int | None = None,
                    extra_models: str | Sequence[str] | None = None) -> DegradationResult:
    """Train plain and residual twins at each depth and seed; write the figures and the table.

    ``extra_models`` (registered names, e.g. ``densenet_bc100``) are trained with the same
    recipe and seeds and appear in the table and the depth figure at their weighted depth.
    ``overrides`` (``key=value``) apply to every run after the recipe; ``run.root`` and
    ``run.name`` place the experiment folder. ``jobs`` worker processes (default: 2 on CPU, 1 on
    a GPU). Returns a :class:`DegradationResult`; ``result.markdown`` is the table.
    """
    t0 = time.perf_counter()
    depths = parse_depths(depths)
    seeds = parse_seeds(seeds)
    extras = parse_extra_models(extra_models)
    args.check(epochs=epochs, jobs=jobs)
    base = base_config(data, overrides, epochs)
    jobs = default_jobs(base.train.device) if jobs is None else int(jobs)
    out_dir = runtime.run_dir(f"degradation-{data}", base.run.root, base.run.name)
    steps = steps_per_epoch(base)  # reads the data: a missing dataset fails before any folder exists
    existed = out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfgs = plan(base, depths, seeds, out_dir, jobs, extras, steps=steps, overrides=overrides)
    deep = {c.model.name: c.optim.warmup_epochs for c in cfgs if c.optim.warmup == "constant"
            and c.optim != base.optim}
    log.info("degradation on %s: %d runs (plain and resnet x depths %s x seeds %s), %d epochs each, "
             "%d worker process(es) -> %s", data, len(cfgs), ",".join(map(str, depths)),
             ",".join(map(str, seeds)), base.train.epochs, jobs, out_dir)
    with removed_on_failure(out_dir, existed):  # a failed start leaves nothing
        results = run_trainings(cfgs, jobs)
    interrupted = next((r["interrupted"] for r in results if r["interrupted"]), None)
    finished = {r["run_dir"] for r in results if not r["interrupted"] and not r["error"]}
    failed = [{"run_dir": r["run_dir"], "error": r["error"]} for r in results if r["error"]]

    runs, curves = _finished_runs(cfgs, out_dir, finished, extras)
    if not runs:
        discard_untrained(out_dir, existed)
        raise AnalysisError(f"{out_dir}: no run finished ({interrupted or 'nothing trained'})")

    rows = table_rows(runs)
    markdown, figure, held_out = _write_results(out_dir, data, base.train.epochs, seeds, rows, runs, curves)
    seconds = time.perf_counter() - t0
    (out_dir / "experiment.json").write_text(json.dumps({
        "data": data, "depths": list(depths), "seeds": list(seeds), "epochs": base.train.epochs,
        "extra_models": list(extras), "steps_per_epoch": steps,
        "deep_warmup": {m: {"warmup": "constant", "warmup_lr": base.optim.lr * DEEP_WARMUP_FACTOR,
                            "warmup_epochs": e} for m, e in deep.items()},
        "jobs": jobs, "recipe": recipe_for(data), "overrides": list(overrides),
        "wall_seconds": seconds, "interrupted": interrupted, "failed": failed,
        "curves": {"training": "train_err per epoch (running mean over the epoch, augmented)",
                   "held_out": f"{held_out} top-1 error after each epoch"},
    }, indent=2) + "\n")
    return DegradationResult(out_dir, rows, runs, markdown, figure, seconds, interrupted)


def _finished_runs(cfgs: Sequence[Config], out_dir: Path, finished: set[str],
                   extras: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(runs, curves)`` of the runs that finished: final numbers per run, and its per-epoch
    rows for the figure, each with its family and (weighted) depth."""
    runs: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for cfg in cfgs:
        run_dir = out_dir / str(cfg.run.name)
        if str(run_dir) not in finished:
            continue
        family, depth = family_depth(cfg.model.name, cfg.model.name in extras)
        m = final_metrics(run_dir)
        runs.append({"model": cfg.model.name, "family": family, "depth": depth, "seed": cfg.seed,
                     "train_err": m["train_err"], "val_err": m.get("val_top1_err"),
                     "test_err": m.get("test_top1_err"), "train_seconds": m["train_seconds"],
                     "run_dir": str(run_dir)})
        curves.append({"family": family, "depth": depth, "rows": read_run_metrics(run_dir)})
    return runs, curves


def _write_results(out_dir: Path, data: str, epochs: int, seeds: Sequence[int], rows: list[dict[str, Any]],
                   runs: list[dict[str, Any]], curves: list[dict[str, Any]]) -> tuple[str, Path, str]:
    """table.md/.csv, runs.csv, degradation.png and depth.png (+ .svg); returns ``(markdown,
    the degradation figure, the held-out split its solid curves show)``."""
    markdown = table_markdown(rows, title=f"Degradation on {data}: final errors (%) after "
                              f"{epochs} epochs, mean ± std over seeds {','.join(map(str, seeds))}")
    write_table_csv(out_dir / "table.csv", rows)
    write_rows_csv(out_dir / "runs.csv", runs)
    (out_dir / "table.md").write_text(markdown)
    # Solid curves: the test split when the runs evaluated it every epoch, else validation.
    held_out = "test" if all(any("test_top1_err" in r for r in c["rows"]) for c in curves) else "validation"
    n_seeds = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    (figure, _svg) = plot_degradation(curves, out_dir / "degradation.png", held_out=held_out,
                                      formats=("png", "svg"),
                                      title=f"{data}: plain vs residual nets, {epochs} epochs, {n_seeds}")
    plot_depth_sweep(rows, out_dir / "depth.png", held_out=held_out, formats=("png", "svg"),
                     title=f"{data}: final error against depth, {epochs} epochs, {n_seeds}")
    return markdown, figure, held_out


# ----------------------------------------------------------------------------------------------
# the table


def table_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-run results by model; mean and sample std (ddof=1; None with one seed)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["model"], []).append(r)
    rows = []
    for model, rs in groups.items():
        row: dict[str, Any] = {"model": model, "family": rs[0]["family"], "depth": rs[0]["depth"],
                               "seeds": len(rs)}
        for key in ("train_err", "val_err", "test_err"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(vals) if vals else (None, None)
        rows.append(row)
    # paper order: by depth, plain before resnet
    return sorted(rows, key=lambda r: (r["family"] not in FAMILIES, r["depth"],
                                       FAMILIES.index(r["family"]) if r["family"] in FAMILIES else 9))


def _cell(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else format_pm(mean, std)


def table_markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The table as Markdown, with a note on what each column means."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | layers | seeds | training error | validation error | test error |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['depth']} | {r['seeds']} | "
                     f"{_cell(r['train_err_mean'], r['train_err_std'])} | "
                     f"{_cell(r['val_err_mean'], r['val_err_std'])} | "
                     f"{_cell(r['test_err_mean'], r['test_err_std'])} |")
    lines += ["", "Training error: the last epoch's running top-1 error on the augmented training "
              "batches (the paper's dashed curves). Validation error: after the last epoch. Test "
              "error: the test split, once, with the best-validation weights. ± is the sample std "
              "over seeds (ddof=1); n/a with one seed."]
    return "\n".join(lines) + "\n"


TABLE_COLUMNS = ("model", "family", "depth", "seeds", "train_err_mean", "train_err_std",
                 "val_err_mean", "val_err_std", "test_err_mean", "test_err_std")


def write_table_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``table.csv``: :data:`TABLE_COLUMNS`; an undefined std (one seed) is an empty cell."""
    write_rows_csv(path, rows, TABLE_COLUMNS)


def write_rows_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Rows as CSV; ``None`` becomes an empty cell; columns default to the first row's keys."""
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
