"""The transfer experiment (``resnetlab reproduce transfer``): does pretraining help when only a
few labelled images are available, and how should the pretrained network be trained?

resnet20 is pretrained on digits 0-4 (one network per seed); then a new task, digits 5-9 with
N labelled training images per class, is learnt four ways (``--source``/``--target`` pick other
data sources, e.g. Fashion-MNIST -> digits, every class of each):

- ``scratch``: random initialisation;
- ``probe``: linear probe, the pretrained backbone frozen (``train.freeze=backbone``);
- ``finetune``: every layer trains from the pretrained weights;
- ``stem-frozen``: the pretrained stem stays fixed (``train.freeze=stem``), the rest trains.

Every fine-tuning run has the same number of optimiser steps whatever N is, no validation split
(nothing to choose with: the last weights are tested) and the whole digits 5-9 test split.
Everything lands in ``<run.root>/transfer-digits-<time>/``::

    pretrain-seed0/ ...                    the pretrained run folders (digits 0-4)
    probe-n5-seed0/ ...                    one run folder per (way, N, seed)
    table.md, table.csv                    test accuracy (%), mean ± std over seeds, per way and N
    runs.csv                               the same per run
    transfer.png, transfer.svg             accuracy against N, one line per way
    experiment.json                        settings and wall time
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnetlab import runtime
from resnetlab.analysis import args
from resnetlab.analysis.degradation import data_choices, write_rows_csv
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.plots import save_figure
from resnetlab.analysis.seeds import format_pm, mean_std, parse_seeds
from resnetlab.analysis.trainings import default_jobs, run_trainings
from resnetlab.config import Config, load
from resnetlab.data import DataError, build_datasets
from resnetlab.exit_codes import exit_code
from resnetlab.params import named

SOURCE_CLASSES = ("0", "1", "2", "3", "4")
TARGET_CLASSES = ("5", "6", "7", "8", "9")
WAYS = ("scratch", "probe", "finetune", "stem-frozen")
DEFAULT_NS = (5, 10, 20, 50)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 100  # optimiser steps of every fine-tuning run
DEFAULT_PRETRAIN_EPOCHS = 30
MAX_BATCH = 32  # images per step of the fine-tuning runs (fewer when 5 * N is smaller)

# The net and the quiet runs, whatever the data.
MODEL_COMMON = ("model.name=resnet20", "train.quiet=true", "train.tensorboard=false")
# The digits recipe: data.name=digits applies recipes/digits.yaml (its one source); lr per way below.
DIGITS = ("data.name=digits",)
COMMON = (*DIGITS, *MODEL_COMMON)
PRETRAIN = (f"data.classes=[{','.join(SOURCE_CLASSES)}]", "optim.lr=0.05", "optim.warmup=linear",
            "optim.warmup_epochs=2", "train.batch_size=128")


def data_args(data: str) -> tuple[str, ...]:
    """The recipe keys of a transfer run on ``data``: digits' above, else the source's own packaged
    recipe (applied by ``data.name``) with a cosine schedule."""
    return DIGITS if data == "digits" else (f"data.name={data}", "optim.schedule=cosine")


def same_source_split(source: str, target: str) -> bool:
    """True for the default task (digits 0-4 -> digits 5-9); other pairs use every class of both."""
    return source == target
# Per way: what it changes. Pretrained starts take a 5x lower lr than scratch (they start near a
# good solution); the probe's lone linear layer takes scratch's lr.
WAY_OVERRIDES: dict[str, tuple[str, ...]] = {
    "scratch": ("optim.lr=0.05",),
    "probe": ("optim.lr=0.05", "train.freeze=backbone"),
    "finetune": ("optim.lr=0.01",),
    "stem-frozen": ("optim.lr=0.01", "train.freeze=stem"),
}


@dataclass
class TransferResult:
    """What :func:`run_transfer` returns."""

    out_dir: Path
    rows: list[dict[str, Any]]  # one per (way, N): mean and std test accuracy
    runs: list[dict[str, Any]]  # one per fine-tuning run
    markdown: str
    figure: Path
    seconds: float
    interrupted: str | None = None

    @property
    def exit_code(self) -> int:
        """0, or the shell's code for the signal that stopped a run."""
        return exit_code(self.interrupted)


def parse_ns(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"5,10,20,50"`` -> ``(5, 10, 20, 50)``; each N within ``args.BOUNDS["n"]``, no repeats."""
    return tuple(sorted(args.int_list(text, "ns", "5,10,20,50", key="n")))


def parse_ways(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"scratch,probe"`` -> the ways in :data:`WAYS` order; unknown names refused."""
    ways = [w for w in text.replace(",", " ").split()] if isinstance(text, str) else list(text)
    bad = [w for w in ways if w not in WAYS]
    if not ways or bad:
        raise named(AnalysisError, "ways", f"names {bad[0] if bad else 'none given'!r}, which is not one of "
                    f"{', '.join(WAYS)}")
    return tuple(w for w in WAYS if w in ways)


def finetune_schedule(n: int, steps: int, classes: int = len(TARGET_CLASSES)) -> tuple[int, int]:
    """``(batch_size, epochs)`` giving at least ``steps`` optimiser steps on ``n * classes`` images."""
    images = n * classes
    batch = min(MAX_BATCH, images)
    per_epoch = images // batch
    return batch, math.ceil(steps / per_epoch)


def plan(ns: Sequence[int], seeds: Sequence[int], ways: Sequence[str], out_dir: Path, *,
         steps: int, pretrain_epochs: int, overrides: Sequence[str], jobs: int, source: str = "digits",
         target: str = "digits", pretrain_images: int | None = None,
         target_classes: int = len(TARGET_CLASSES)) -> tuple[list[Config], list[Config]]:
    """``(pretraining configs, fine-tuning configs)``: one pretraining per seed, then one run
    per (way, N, seed), the largest N first (better packing on the workers).

    digits -> digits splits the classes (0-4 pretrain, 5-9 fine-tune); any other pair pretrains
    on every ``source`` class (``pretrain_images``: a seeded draw, equally many per class) and
    fine-tunes on every ``target`` class (``target_classes`` of them)."""
    threads = ["train.threads=1"] if jobs > 1 else []
    split = same_source_split(source, target)
    pre_data = [*DIGITS, *PRETRAIN] if split else [*data_args(source)]
    if pretrain_images is not None:
        pre_data.append(f"data.train_per_class={pretrain_images // 10}")
    fine_data = [*data_args(target), *([f"data.classes=[{','.join(TARGET_CLASSES)}]"] if split else [])]
    pre, fine = [], []
    for s in seeds:
        pre.append(load(None, [*pre_data, *MODEL_COMMON, f"train.epochs={pretrain_epochs}", *overrides, *threads,
                               f"seed={s}", f"run.root={out_dir}", f"run.name=pretrain-seed{s}"]))
    for n in sorted(ns, reverse=True):
        batch, epochs = finetune_schedule(n, steps, target_classes)
        for way in ways:
            for s in seeds:
                init = [] if way == "scratch" else [f"model.init_from={out_dir / f'pretrain-seed{s}'}"]
                fine.append(load(None, [
                    *fine_data, *MODEL_COMMON, f"data.train_per_class={n}",
                    "data.val_fraction=0", f"train.batch_size={batch}", f"train.epochs={epochs}",
                    *WAY_OVERRIDES[way], *init, *overrides, *threads, f"seed={s}",
                    f"run.root={out_dir}", f"run.name={way}-n{n}-seed{s}"]))
    return pre, fine


def _check_overrides(overrides: Sequence[str]) -> None:
    fixed = ("model.init_from", "train.freeze", "data.classes", "data.train_per_class", "seed",
             "run.name", "data.name")
    args.fixed_by_experiment(overrides, fixed, "the N, seeds and ways")


def _check_largest_n(cfg: Config, n: int) -> None:
    """Build the training split of the run with the largest N (digits: a fraction of a second):
    a class with fewer than N images is refused before anything trains."""
    try:
        build_datasets(cfg.data, seed=cfg.seed, needs=("train",))
    except DataError as e:
        raise named(AnalysisError, "ns", f"has {n}, more than the data gives: {e}") from None


def run_transfer(ns: str | Sequence[int] = DEFAULT_NS, seeds: str | Sequence[int] = DEFAULT_SEEDS,
                 ways: str | Sequence[str] = WAYS, *, steps: int = DEFAULT_STEPS,
                 pretrain_epochs: int = DEFAULT_PRETRAIN_EPOCHS, overrides: Sequence[str] = (),
                 jobs: int | None = None, source: str = "digits", target: str = "digits",
                 pretrain_images: int | None = None) -> TransferResult:
    """Pretrain on ``source``, fine-tune on ``target`` with N images per class four ways; write
    the table and the figure. digits -> digits (the default) pretrains on digits 0-4 and
    fine-tunes on 5-9; another pair (e.g. fashion_mnist -> digits) uses every class of both.
    ``overrides`` (``key=value``) apply to every run; ``run.root`` places the experiment folder."""
    t0 = time.perf_counter()
    ns, seeds, ways = parse_ns(ns), parse_seeds(seeds), parse_ways(ways)
    args.check(steps=steps, pretrain_epochs=pretrain_epochs, jobs=jobs)
    for param, d in (("source", source), ("target", target)):
        args.one_of(d, param, data_choices())
    if pretrain_images is not None and (pretrain_images < 10 or pretrain_images % 10):
        raise named(AnalysisError, "pretrain_images", f"must be a positive multiple of 10, got {pretrain_images}")
    _check_overrides(overrides)
    split = same_source_split(source, target)
    base = load(None, [*data_args(target), *MODEL_COMMON, *overrides])
    target_classes = len(TARGET_CLASSES) if split else _class_count(base)
    jobs = default_jobs(base.train.device) if jobs is None else int(jobs)
    task = "digits" if split and source == "digits" else f"{source}-to-{target}"
    out_dir = runtime.run_dir(f"transfer-{task}", base.run.root).resolve()
    pre, fine = plan(ns, seeds, ways, out_dir, steps=steps, pretrain_epochs=pretrain_epochs,
                     overrides=overrides, jobs=jobs, source=source, target=target,
                     pretrain_images=pretrain_images, target_classes=target_classes)
    _check_largest_n(fine[0], max(ns))  # before pretraining: --n 100000 is refused now, not later
    out_dir.mkdir(parents=True, exist_ok=True)
    need_pretrain = any(w != "scratch" for w in ways)
    runs, interrupted = _train(pre if need_pretrain else [], fine, out_dir, jobs)
    pre_acc = _test_accuracies(pre if need_pretrain else [], out_dir)
    rows = table_rows(runs)
    src_txt, tgt_txt = ("digits 0-4", "digits 5-9") if split else (source, target)
    title = (f"Transfer: resnet20 pretrained on {src_txt}, trained on {tgt_txt} with N labelled "
             f"images per class; test accuracy (%), mean ± std over seeds {','.join(map(str, seeds))}")
    markdown = table_markdown(rows, ns, ways, title=title, steps=steps,
                              pretrain=mean_std(pre_acc) if pre_acc else None, source=src_txt, target=tgt_txt)
    (out_dir / "table.md").write_text(markdown)
    write_rows_csv(out_dir / "table.csv", rows, ("way", "n", "seeds", "test_acc_mean", "test_acc_std"))
    write_rows_csv(out_dir / "runs.csv", runs)
    figure = plot_transfer(rows, out_dir / "transfer.png", seeds=len(seeds), source=src_txt, target=tgt_txt)
    seconds = time.perf_counter() - t0
    (out_dir / "experiment.json").write_text(json.dumps({
        "source": source, "target": target, "pretrain_images": pretrain_images,
        "ns": list(ns), "seeds": list(seeds), "ways": list(ways), "steps": steps,
        "pretrain_epochs": pretrain_epochs, "jobs": jobs, "common": list(COMMON),
        "pretrain": list(PRETRAIN), "way_overrides": {w: list(WAY_OVERRIDES[w]) for w in ways},
        "overrides": list(overrides), "pretrain_test_acc": pre_acc, "wall_seconds": seconds,
        "interrupted": interrupted}, indent=2) + "\n")
    return TransferResult(out_dir, rows, runs, markdown, figure, seconds, interrupted)


def _train(pre: Sequence[Config], fine: Sequence[Config], out_dir: Path,
           jobs: int) -> tuple[list[dict[str, Any]], str | None]:
    """Pretrain (``pre``; none when only scratch runs), then fine-tune; ``(one row per finished
    fine-tuning run, what interrupted the experiment or None)``."""
    interrupted = None
    if pre:
        done = run_trainings(pre, jobs)
        interrupted = next((r["interrupted"] for r in done if r["interrupted"]), None)
        failed = [r for r in done if r["error"]]
        if failed:
            raise AnalysisError(f"pretraining failed: {failed[0]['error']}")
    results = [] if interrupted else run_trainings(fine, jobs)
    interrupted = interrupted or next((r["interrupted"] for r in results if r["interrupted"]), None)
    finished = {r["run_dir"] for r in results if not r["interrupted"] and not r["error"]}
    runs = []
    for cfg in fine:
        run_dir = out_dir / str(cfg.run.name)
        if str(run_dir) not in finished:
            continue
        doc = json.loads((run_dir / "result.json").read_text())
        way = str(cfg.run.name).rsplit("-n", 1)[0]
        runs.append({"way": way, "n": cfg.data.train_per_class, "seed": cfg.seed,
                     "test_acc": doc["test"]["top1_acc"], "steps": doc["steps"],
                     "epochs": doc["epochs"], "run_dir": str(run_dir)})
    if not runs:
        raise AnalysisError(f"{out_dir}: no fine-tuning run finished ({interrupted or 'nothing trained'})")
    return runs, interrupted


def _test_accuracies(cfgs: Sequence[Config], out_dir: Path) -> list[float]:
    """Test top-1 accuracy of each of ``cfgs``' runs that wrote a result.json."""
    accs = []
    for cfg in cfgs:
        p = out_dir / str(cfg.run.name) / "result.json"
        if p.is_file():
            accs.append(json.loads(p.read_text())["test"]["top1_acc"])
    return accs


def _class_count(cfg: Config) -> int:
    """Classes of ``cfg``'s data source (its test split is read once)."""
    return len(build_datasets(cfg.data, seed=cfg.seed, needs=("test",)).meta.classes)


def table_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (way, N): seeds, mean and sample std (ddof=1) of the test accuracy."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        groups.setdefault((r["way"], r["n"]), []).append(r["test_acc"])
    rows = []
    for (way, n), accs in groups.items():
        m, s = mean_std(accs)
        rows.append({"way": way, "n": n, "seeds": len(accs), "test_acc_mean": m, "test_acc_std": s})
    return sorted(rows, key=lambda r: (WAYS.index(r["way"]), r["n"]))


def table_markdown(rows: Sequence[dict[str, Any]], ns: Sequence[int], ways: Sequence[str], *,
                   title: str = "", steps: int = DEFAULT_STEPS,
                   pretrain: tuple[float, float | None] | None = None, source: str = "digits 0-4",
                   target: str = "digits 5-9") -> str:
    """Ways down, N across: ``mean ± std`` test accuracy (%)."""
    cell = {(r["way"], r["n"]): format_pm(r["test_acc_mean"], r["test_acc_std"], digits=1) for r in rows}
    lines = [f"### {title}", ""] if title else []
    lines += ["| way | " + " | ".join(f"N = {n}" for n in ns) + " |",
              "|---|" + "---:|" * len(ns)]
    for way in ways:
        lines.append(f"| {way} | " + " | ".join(cell.get((way, n), "n/a") for n in ns) + " |")
    if "scratch" in ways and len(ways) > 1:
        lines.append("| **pretraining's gain** | " + " | ".join(_gain(rows, n) for n in ns) + " |")
    note = ("Pretraining's gain: the best pretrained way's mean minus scratch's, in points (negative: "
            f"it hurts). Every run: {steps} optimiser steps (batch min(32, classes x N)), cosine lr, no validation "
            f"split (the last weights are tested on the whole {target} test split). scratch and "
            "probe: lr 0.05; finetune and stem-frozen: lr 0.01. ± is the sample std over seeds.")
    if pretrain is not None:
        note += f" Pretrained nets on their own test split ({source}): {format_pm(*pretrain, digits=1)}%."
    return "\n".join([*lines, "", note]) + "\n"


def _gain(rows: Sequence[dict[str, Any]], n: int) -> str:
    """Best pretrained way's mean accuracy minus scratch's at ``n`` (points), with that way."""
    mean = {r["way"]: r["test_acc_mean"] for r in rows if r["n"] == n}
    pre = {w: a for w, a in mean.items() if w != "scratch"}
    if "scratch" not in mean or not pre:
        return "n/a"
    best = max(pre, key=lambda w: pre[w])
    return f"{pre[best] - mean['scratch']:+.1f} ({best})"


def plot_transfer(rows: Sequence[dict[str, Any]], path: str | Path, *, seeds: int, source: str = "digits 0-4",
                  target: str = "digits 5-9") -> Path:
    """Accuracy against N (log axis), one line per way, error bars one std; PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for way in WAYS:
        pts = [r for r in rows if r["way"] == way]
        if not pts:
            continue
        ax.errorbar([r["n"] for r in pts], [r["test_acc_mean"] for r in pts],
                    yerr=[r["test_acc_std"] or 0.0 for r in pts], marker="o", capsize=3, label=way)
    ax.set_xscale("log")
    ns = sorted({r["n"] for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()  # the log axis's minor labels (6x10^0 ...) would crowd the N ticks
    ax.set_xlabel(f"labelled training images per class ({target})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"resnet20 pretrained on {source}; mean ± std of {seeds} seed(s)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files = save_figure(fig, path, ("png", "svg"))
    plt.close(fig)
    return files[0]


__all__ = ["TransferResult", "WAYS", "finetune_schedule", "parse_ns", "parse_ways", "plot_transfer",
           "run_transfer", "table_markdown", "table_rows"]
