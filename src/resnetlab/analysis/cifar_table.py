"""``resnetlab reproduce cifar-table``: the paper's Table 6 (CIFAR-10 test error of resnet20..110).

Each network is trained with its packaged recipe ``cifar10_resnet<d>`` (the paper's: 64k
iterations of batch 128, lr 0.1 divided by 10 at 32k and 48k, weight decay 1e-4, 45k/5k split,
pad-4 crop and flip; resnet110 warms up at lr 0.01) on local CIFAR-10 files (``data.root=...``),
then tested once. The result is a table of our test error next to the paper's.

This is hours of GPU time. Before training anything it times a few real optimiser steps of each
network on the chosen device and prints the estimated total; on a CPU it then stops unless
``yes=True`` (``--yes``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resnetlab.analysis import args
from resnetlab.analysis.degradation import write_rows_csv
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.seeds import final_metrics, format_pm, mean_std, parse_seeds
from resnetlab.analysis.trainings import run_trainings
from resnetlab.config import RECIPE_DIR, Config, load, validate
from resnetlab.data import build_datasets, build_loader
from resnetlab.engine.loop import train_step
from resnetlab.engine.optim import ModelEMA, build_optimizer
from resnetlab.launch import removed_on_failure
from resnetlab.models import build_model
from resnetlab.params import named
from resnetlab.runtime import run_dir, select_device

if TYPE_CHECKING:
    from resnetlab.data.loaders import Loader

log = logging.getLogger("resnetlab")

# He et al. 2015, Table 6: CIFAR-10 test error (%). resnet110: best of 5 runs (mean 6.61 ± 0.16).
PAPER_TABLE6: dict[str, float] = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17,
                                  "resnet56": 6.97, "resnet110": 6.43}
PAPER_NOTES: dict[str, str] = {"resnet110": "best of 5; mean 6.61 ± 0.16"}
DEPTHS = (20, 32, 44, 56, 110)
TABLE_COLUMNS = ("model", "layers", "seeds", "test_err_mean", "test_err_std", "paper_test_err",
                 "difference", "paper_note")


@dataclass
class CifarTableResult:
    """What :func:`run_cifar_table` returns. ``ran`` is False when it stopped after the estimate."""

    out_dir: Path
    estimate: list[dict[str, Any]]  # per model: steps, seconds per step, estimated seconds
    estimate_text: str
    ran: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    markdown: str = ""
    device: str = "cpu"


def find_configs(configs_dir: str | Path | None = None) -> Path:
    """The folder with ``cifar10_resnet<d>.yaml``: ``configs_dir``, else the packaged recipes."""
    folder = Path(configs_dir).expanduser() if configs_dir is not None else RECIPE_DIR
    if (folder / "cifar10_resnet20.yaml").is_file():
        return folder
    raise named(AnalysisError, "configs_dir", f"{folder} has no cifar10_resnet20.yaml; name a folder with "
                "cifar10_resnet<d>.yaml files, or leave it out to use the packaged recipes")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _seconds_per_step(cfg: Config, model: nn.Module, loader: Loader, device: torch.device,
                      steps: int) -> float:
    """Mean wall time of ``steps`` optimiser steps after one warm-up step, data loading excluded.

    Each is the step training runs (:func:`~resnetlab.engine.loop.train_step`): amp, fp16 loss
    scaling, clipping and EMA as configured.
    """
    model.train()
    opt = build_optimizer(model, cfg.optim)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    batches = loader.iterate(0)
    timed = 0.0
    for i in range(steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:  # a short epoch: go on with the next one
            batches = loader.iterate(i)
            x, y = next(batches)
        t0 = time.perf_counter()
        train_step(model, x, y, opt, criterion, amp=cfg.train.amp, scaler=scaler,
                   clip_grad_norm=cfg.optim.clip_grad_norm, ema=ema)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first step pays for allocation and kernel selection
            timed += time.perf_counter() - t0
    return timed / max(steps, 1)


def estimate_time(cfgs: Sequence[Config], steps: int = 5) -> list[dict[str, Any]]:
    """Time ``steps`` real optimiser steps (after one warm-up step) of each config's network.

    Total = training steps x seconds per step + evaluation (validation every epoch and the test
    split once, counted as a third of a training step per batch: forward only).
    """
    out = []
    cache: dict[tuple[Any, ...], Any] = {}
    for cfg in cfgs:
        device = select_device(cfg.train.device)
        key = (cfg.data, cfg.seed)
        if key not in cache:
            cache[key] = build_datasets(cfg.data, seed=cfg.seed)
        ds = cache[key]
        loader = build_loader(ds.train, ds.meta, cfg.data, train=True, batch_size=cfg.train.batch_size,
                              device=device, seed=cfg.seed, channels_last=cfg.train.channels_last)
        if len(loader) == 0:
            raise AnalysisError(f"train.batch_size={cfg.train.batch_size} is larger than the training split")
        model: nn.Module = build_model(cfg, ds.meta).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        per_step = _seconds_per_step(cfg, model, loader, device, steps)
        train_steps = cfg.train.epochs * len(loader)
        n_val = len(ds.val) if ds.val is not None else 0
        n_test = len(ds.test) if ds.test is not None else 0
        eval_batches = (cfg.train.epochs * n_val + n_test) / cfg.train.batch_size
        seconds = per_step * (train_steps + eval_batches / 3)
        out.append({"model": cfg.model.name, "device": str(device), "epochs": cfg.train.epochs,
                    "steps": train_steps, "seconds_per_step": per_step, "estimated_seconds": seconds})
    return out


def format_estimate(est: Sequence[dict[str, Any]]) -> str:
    """The estimate as a Markdown table with the total."""
    lines = ["| model | device | epochs | steps | s/step | estimated time |", "|---|---|---:|---:|---:|---:|"]
    for e in est:
        lines.append(f"| {e['model']} | {e['device']} | {e['epochs']} | {e['steps']} | "
                     f"{e['seconds_per_step']:.3f} | {_duration(e['estimated_seconds'])} |")
    total = sum(e["estimated_seconds"] for e in est)
    lines.append(f"\nestimated total: {_duration(total)} (measured from a few steps on this machine)")
    return "\n".join(lines) + "\n"


def run_cifar_table(depths: str | Sequence[int] = DEPTHS, seeds: str | Sequence[int] = (0,),
                    overrides: Sequence[str] = (), yes: bool = False,
                    configs_dir: str | Path | None = None, estimate_steps: int = 5,
                    on_estimate: Callable[[str], None] | None = None) -> CifarTableResult:
    """Train resnet<d> for each depth with its paper recipe, then tabulate ours vs the paper's.

    ``overrides`` (``key=value``) apply to every run after its recipe, e.g. ``data.root=...``
    or a smaller ``train.epochs`` for a trial. ``on_estimate(text)`` receives the time estimate
    before any training (default: logged). On a CPU nothing is trained unless ``yes``.
    """
    depths_t = _parse_depths(depths)
    seeds_t = parse_seeds(seeds)
    args.check(estimate_steps=estimate_steps)
    args.fixed_by_experiment(overrides, ("model.name", "seed"), "the nets and seeds")
    folder = find_configs(configs_dir)
    cfgs = [load(folder / f"cifar10_resnet{d}.yaml", overrides) for d in depths_t]
    out_dir = run_dir("cifar-table", cfgs[0].run.root, cfgs[0].run.name)

    est = estimate_time(cfgs, estimate_steps)
    text = format_estimate(est)
    (on_estimate or log.info)(text)
    device = est[0]["device"]
    if device == "cpu" and not yes:
        return CifarTableResult(out_dir, est, text, ran=False, device=device)

    existed = out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [validate(replace(cfg, seed=s, train=replace(cfg.train, quiet=True),
                             run=replace(cfg.run, root=str(out_dir), name=f"{cfg.model.name}-seed{s}")))
            for cfg in cfgs for s in seeds_t]
    with removed_on_failure(out_dir, existed):  # a failed start leaves nothing
        results = run_trainings(runs, jobs=1)
    per_model: dict[str, list[float]] = {}
    for cfg, res in zip(runs, results, strict=False):
        if res["interrupted"] or res["error"]:
            continue
        m = final_metrics(res["run_dir"])
        if "test_top1_err" in m:
            per_model.setdefault(cfg.model.name, []).append(m["test_top1_err"])
    rows = table_rows(per_model)
    markdown = table_markdown(rows)
    write_rows_csv(out_dir / "table.csv", rows, TABLE_COLUMNS)
    (out_dir / "table.md").write_text(markdown)
    return CifarTableResult(out_dir, est, text, ran=True, rows=rows, markdown=markdown, device=device)


def _parse_depths(depths: str | Sequence[int]) -> tuple[int, ...]:
    return args.int_choices(depths, "depths", "20,56", DEPTHS, "a depth of Table 6")


def table_rows(test_errs: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Per model: our test error (mean, sample std over seeds) and the paper's, in %."""
    rows = []
    for model, errs in test_errs.items():
        mean, std = mean_std(errs)
        paper = PAPER_TABLE6.get(model)
        rows.append({"model": model, "layers": int(model.removeprefix("resnet")), "seeds": len(errs),
                     "test_err_mean": mean, "test_err_std": std, "paper_test_err": paper,
                     "difference": None if paper is None else mean - paper,
                     "paper_note": PAPER_NOTES.get(model, "")})
    return sorted(rows, key=lambda r: r["layers"])


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Ours vs the paper's, as Markdown."""
    lines = ["### CIFAR-10 test error (%): ours vs He et al. 2015, Table 6", "",
             "| model | layers | seeds | ours | paper | ours - paper |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = "n/a" if r["paper_test_err"] is None else f"{r['paper_test_err']:.2f}"
        note = f" ({r['paper_note']})" if r["paper_note"] else ""
        diff = "n/a" if r["difference"] is None else f"{r['difference']:+.2f}"
        lines.append(f"| {r['model']} | {r['layers']} | {r['seeds']} | "
                     f"{format_pm(r['test_err_mean'], r['test_err_std'])} | {paper}{note} | {diff} |")
    lines += ["", "Ours: the test split, once, with the best-validation weights (45k/5k split); "
              "± is the sample std over seeds (n/a with one seed). Plain nets are not in Table 6."]
    return "\n".join(lines) + "\n"
