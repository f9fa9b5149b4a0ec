"""Fashion-MNIST results beside the published leaderboard (``resnetlab reproduce fashion-table``).

Each selected net is trained with its packaged recipe ``fashion_mnist_<net>`` (a plain twin
``plain<d>`` with its residual twin's recipe, ``fashion_mnist_resnet<d>``, so that only the
shortcuts differ) once per seed. Everything lands in ``<run.root>/fashion-table-<time>/``::

    resnet20-seed0/ ...          ordinary run folders (metrics.jsonl, result.json, config.yaml)
    table.md, table.csv          ours (mean ± std over seeds) and the published rows, marked
    runs.csv                     one row per run
    fashion-table.png/.svg       test accuracy, ours and theirs, as horizontal bars
    experiment.json              settings, machine, wall time

The published rows are the leaderboard of the Fashion-MNIST README (zalandoresearch; Debian's
``/usr/share/doc/dataset-fashion-mnist/README.md.gz``), which its authors list as submitted and
not re-tested by them. :func:`published_rows` reads that file when it is installed and checks the
numbers below against it.
"""

from __future__ import annotations

import gzip
import json
import logging
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from resnetlab.analysis import args
from resnetlab.analysis.degradation import write_rows_csv
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.plots import save_figure
from resnetlab.analysis.seeds import format_pm, mean_std, parse_seeds
from resnetlab.analysis.trainings import default_jobs, run_trainings
from resnetlab.analysis.transfer import TransferResult
from resnetlab.config import apply_overrides, from_dict, load, recipe_names
from resnetlab.launch import discard_untrained, removed_on_failure
from resnetlab.models import create_model
from resnetlab.params import named
from resnetlab.runtime import select_device

log = logging.getLogger("resnetlab")

#: The nets of the table, in the order they are printed.
MODELS = ("resnet20", "plain20", "resnet56", "plain56", "resnet110", "plain110", "densenet_bc100",
          "lesson_resnet18")
#: Test-accuracy targets (%) of the full recipes (issue: measured, not assumed).
TARGETS = {"resnet20": 94.0, "resnet56": 95.0, "densenet_bc100": 95.4}
#: The leaderboard rows we sit beside: (classifier as the README names it, its row's key
#: words, parameters or None, test accuracy as a fraction).
PUBLISHED: tuple[tuple[str, str, int | None, float], ...] = (
    ("ResNet18", "|ResNet18 |", None, 0.949),
    ("DenseNet-BC 768K params", "|DenseNet-BC 768K params|", 768_000, 0.954),
    ("WRN-28-10", "|WRN-28-10|", None, 0.959),
    ("WRN-28-10 + Random Erasing", "|WRN-28-10 + Random Erasing|", None, 0.963),
    ("WRN40-4 8.9M params", "|WRN40-4 8.9M params |", 8_900_000, 0.967),
    ("MobileNet", "|MobileNet |", None, 0.950),
    ("Human Performance", "|Human Performance|", None, 0.835),
)
DEBIAN_README = Path("/usr/share/doc/dataset-fashion-mnist/README.md.gz")
SOURCE = "Fashion-MNIST README leaderboard (zalandoresearch/fashion-mnist; Debian dataset-fashion-mnist)"


def published_rows(readme: Path | None = DEBIAN_README) -> list[dict[str, Any]]:
    """The published rows as dicts; where ``readme`` exists, each accuracy is checked against
    its leaderboard line (a mismatch raises AnalysisError naming the row)."""
    text = None
    if readme is not None and readme.is_file():
        raw = readme.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", "replace")
    rows = []
    for name, key, params, acc in PUBLISHED:
        if text is not None:
            line = next((ln for ln in text.splitlines() if ln.replace(" ", "").startswith(key.replace(" ", ""))), None)
            found = None if line is None else re.findall(r"\|\s*(0\.\d+)\s*\|", line)
            if not found or abs(float(found[0]) - acc) > 5e-4:
                raise AnalysisError(f"{readme}: the leaderboard row {name!r} says "
                                    f"{found[0] if found else 'nothing'}, the table has {acc}")
        rows.append({"model": name, "params": params, "test_acc": round(100.0 * acc, 1), "source": "published"})
    return rows


def recipe_for(model: str) -> str:
    """``fashion_mnist_<model>``; a plain twin ``plain<d>`` uses ``fashion_mnist_resnet<d>``."""
    m = re.fullmatch(r"plain(\d+)", model)
    name = f"fashion_mnist_resnet{m.group(1)}" if m else f"fashion_mnist_{model}"
    if name not in recipe_names():
        raise named(AnalysisError, "models", f"names {model!r}, which has no packaged recipe {name}; "
                    f"choose from {', '.join(MODELS)}")
    return name


def parse_models(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"resnet20,plain20"`` -> the nets of the table (default: all of :data:`MODELS`)."""
    if text is None:
        return MODELS
    names = tuple(n for n in (text.replace(",", " ").split() if isinstance(text, str) else text) if n)
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise named(AnalysisError, "models", f"names {bad[0] if bad else 'none given'!r}, which is not a net of "
                    f"the table; choose from {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise named(AnalysisError, "models", f"has a repeated name in {text!r}")
    return names


def count_parameters(model: str, in_chans: int = 1, num_classes: int = 10) -> int:
    """Parameters of ``model`` built for 1-channel, 10-class Fashion-MNIST (no memory used)."""
    import torch

    with torch.device("meta"):
        net = create_model(model, in_chans=in_chans, num_classes=num_classes)
    return sum(p.numel() for p in net.parameters())


class FashionTableResult(TransferResult):
    """What :func:`run_fashion_table` returns (the fields of every experiment's result): ``rows``
    are ours, one per net (means over seeds), then the published rows; ``runs`` one per run."""


def plan(models: Sequence[str], seeds: Sequence[int], out_dir: Path, *, epochs: int | None,
         train_images: int | None, overrides: Sequence[str], jobs: int) -> list[Any]:
    """One validated config per (net, seed): its recipe, the overrides, then the table's own flags."""
    cfgs = []
    for m in models:
        for s in seeds:
            extra = [f"model.name={m}", f"seed={s}", f"run.root={out_dir}", f"run.name={m}-seed{s}",
                     "train.quiet=true", "train.tensorboard=false"]
            if epochs is not None:
                extra.append(f"train.epochs={epochs}")
            if train_images is not None:
                extra.append(f"data.train_per_class={train_images // 10}")
            cfg = load(recipe_for(m), [*overrides, *extra])
            if jobs > 1:
                cfg = replace(cfg, train=replace(cfg.train, threads=1))
            if cfg.data.name != "fashion_mnist":
                raise AnalysisError(f"{recipe_for(m)}: data.name must stay fashion_mnist, got {cfg.data.name}")
            cfgs.append(cfg)
    return cfgs


def run_fashion_table(models: str | Sequence[str] | None = None, seeds: str | Sequence[int] = (0,),
                      epochs: int | None = None, train_images: int | None = None,
                      overrides: Sequence[str] = (), jobs: int | None = None,
                      on_progress: Callable[[str], Any] | None = None) -> FashionTableResult:
    """Train each net per seed with its recipe; write the table beside the published rows.

    ``epochs`` shortens every recipe; ``train_images`` trains on a seeded draw of that many
    training images (equally many per class; validation and test stay whole). ``overrides``
    (``key=value``) apply to every run; ``run.root``/``run.name`` place the folder.
    """
    t0 = time.perf_counter()
    names = parse_models(models)
    seed_list = parse_seeds(seeds)
    args.check(epochs=epochs, jobs=jobs)  # the experiments' shared bounds
    if train_images is not None and (train_images < 10 or train_images % 10):
        raise named(AnalysisError, "train_images", f"must be a positive multiple of 10 (ten classes), got {train_images}")
    args.fixed_by_experiment(overrides, ("model.name", "seed", "data.name"), "the nets, seeds and data")
    # run.root / run.name / train.device come from the overrides alone (no recipe applies to them)
    where = apply_overrides(from_dict({}, check=False), [o for o in overrides if o.startswith(("run.", "train.device"))])
    out_dir = Path(where.run.root).expanduser() / (where.run.name or f"fashion-table-{time.strftime('%Y%m%d-%H%M%S')}")
    jobs = default_jobs(where.train.device) if jobs is None else int(jobs)
    cfgs = plan(names, seed_list, out_dir, epochs=epochs, train_images=train_images,
                overrides=[o for o in overrides if not o.startswith(("run.root", "run.name"))], jobs=jobs)
    existed = out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = on_progress or log.info
    say(f"fashion-table: {len(cfgs)} runs ({', '.join(names)} x seeds {','.join(map(str, seed_list))}), "
        f"{jobs} worker process(es) -> {out_dir}")
    with removed_on_failure(out_dir, existed):
        results = run_trainings(cfgs, jobs)
    interrupted = next((r["interrupted"] for r in results if r["interrupted"]), None)
    runs = _tested_runs(cfgs, results, train_images)
    if not runs:
        discard_untrained(out_dir, existed)
        raise AnalysisError(f"{out_dir}: no run finished ({interrupted or 'nothing trained'})")
    rows = table_rows(runs)
    published = published_rows()

    write_rows_csv(out_dir / "runs.csv", runs)
    write_rows_csv(out_dir / "table.csv", [*rows, *published], TABLE_COLUMNS)
    seconds = time.perf_counter() - t0
    experiment = {"models": list(names), "seeds": list(seed_list), "epochs": epochs, "train_images": train_images,
                  "overrides": list(overrides), "jobs": jobs, "wall_seconds": seconds,
                  "interrupted": interrupted, "machine": machine_line(jobs, where.train.device),
                  "load_average_1min_at_end": _load_average(),
                  "published_source": SOURCE, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out_dir / "experiment.json").write_text(json.dumps(experiment, indent=2) + "\n")
    markdown = table_markdown(rows, published, experiment)
    (out_dir / "table.md").write_text(markdown)
    figure = plot_table(rows, published, out_dir / "fashion-table.png")
    return FashionTableResult(out_dir, [*rows, *published], runs, markdown, figure, seconds, interrupted)


def _tested_runs(cfgs: Sequence[Any], results: Sequence[dict[str, Any]],
                 train_images: int | None) -> list[dict[str, Any]]:
    """One row per run that finished and was tested: net, seed, recipe, epochs, training
    images, test accuracy, wall time and its folder's name (relative: the table moves)."""
    runs = []
    for cfg, r in zip(cfgs, results, strict=False):
        if r["interrupted"] or r["error"]:
            continue
        doc = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        if not doc.get("test"):
            continue
        runs.append({"model": cfg.model.name, "seed": cfg.seed, "recipe": recipe_for(cfg.model.name),
                     "epochs": doc.get("epochs", cfg.train.epochs),
                     "train_images": train_images or _kept_training_images(cfg.data.val_fraction),
                     "test_acc": float(doc["test"]["top1_acc"]), "test_images": int(doc["test"]["count"]),
                     "wall_seconds": float(r["wall_seconds"]), "run_dir": Path(r["run_dir"]).name})
    return runs


def _kept_training_images(val_fraction: float, n: int = 60000) -> int:
    """Training images left after the validation hold-out (the data source's rounding)."""
    return n - (max(1, round(val_fraction * n)) if val_fraction > 0 else 0)


def _load_average() -> float | None:
    """The 1-minute load average (how shared the machine was), None where the OS has none."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine_line(jobs: int, device: str = "auto") -> str:
    """``"2-core x86_64 CPU (2 worker processes)"`` or the GPU's name: where the table was made."""
    import os

    import torch

    dev = select_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} ({jobs} process)"
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({jobs} worker process{'es' if jobs > 1 else ''})"


TABLE_COLUMNS = ("model", "source", "params", "seeds", "epochs", "train_images", "test_acc", "test_acc_std",
                 "wall_seconds", "target")


def table_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per net (in :data:`MODELS` order): mean test accuracy, sample std (ddof=1), wall time."""
    rows = []
    for m in MODELS:
        rs = [r for r in runs if r["model"] == m]
        if not rs:
            continue
        acc, std = mean_std([r["test_acc"] for r in rs])
        sec, _ = mean_std([r["wall_seconds"] for r in rs])
        rows.append({"model": m, "source": "ours", "params": count_parameters(m), "seeds": len(rs),
                     "epochs": rs[0]["epochs"], "train_images": rs[0]["train_images"], "test_acc": acc,
                     "test_acc_std": std, "wall_seconds": sec, "target": TARGETS.get(m)})
    return rows


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def table_markdown(rows: Sequence[dict[str, Any]], published: Sequence[dict[str, Any]],
                   experiment: dict[str, Any]) -> str:
    """Ours, then theirs, in one table; the heading says where and how ours were made."""
    lines = ["| model | whose | parameters | seeds | epochs | training images | test accuracy (%) | "
             "wall time per run | target |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = "-" if r["target"] is None else (f"{r['target']:.1f} " + ("(met)" if r["test_acc"] >= r["target"]
                                                                           else "(not met)"))
        lines.append(f"| {r['model']} | ours | {_params(r['params'])} | {r['seeds']} | {r['epochs']} | "
                     f"{r['train_images']:,} | {format_pm(r['test_acc'], r['test_acc_std'])} | "
                     f"{r['wall_seconds'] / 60:.1f} min | {target} |")
    for p in published:
        lines.append(f"| {p['model']} | published | {_params(p['params'])} | - | - | - | {p['test_acc']:.1f} | - | - |")
    lines += ["", f"Ours: test accuracy on the official 10,000 test images with the best-validation weights, "
              f"mean ± sample std over seeds {','.join(map(str, experiment['seeds']))} (n/a with one seed); "
              f"trained on {experiment['machine']}. Published: the {experiment['published_source']}, "
              "as submitted (their authors' numbers, not re-run here)."]
    return "\n".join(lines) + "\n"


def plot_table(rows: Sequence[dict[str, Any]], published: Sequence[dict[str, Any]], path: Path) -> Path:
    """Horizontal bars of test accuracy: ours (with ± std) in one colour, the published in grey."""
    from matplotlib.figure import Figure

    items = [(f"{r['model']} (ours, {r['epochs']} ep)", r["test_acc"], r["test_acc_std"] or 0.0, "C0") for r in rows]
    items += [(f"{p['model']} (published)", p["test_acc"], 0.0, "0.6") for p in published]
    fig = Figure(figsize=(7, 0.4 * len(items) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(len(items)))[::-1]
    ax.barh(y, [i[1] for i in items], xerr=[i[2] for i in items], color=[i[3] for i in items])
    ax.set_yticks(y, [i[0] for i in items], fontsize=8)
    low = min(i[1] for i in items)
    ax.set_xlim(max(0.0, low - 5), 100)
    ax.set_xlabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("Fashion-MNIST: ours (blue) beside the published leaderboard (grey)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, ("png", "svg"))[0]


# ----------------------------------------------------------------------------------------------
# the README block, generated from a committed results folder

README_BEGIN = "<!-- fashion-table: generated by python -m resnetlab.analysis.fashion_table -->"
README_END = "<!-- /fashion-table -->"


def readme_block(results: Path, shown: str | None = None) -> str:
    """The README's table section from ``results`` (``table.md`` + ``experiment.json``); the
    folder is named as ``shown`` (default: ``results`` as given)."""
    exp = json.loads((results / "experiment.json").read_text())
    budget = (f"{exp['epochs']} epochs" if exp.get("epochs") else "the recipes' epochs") + (
        f" on a seeded {exp['train_images']:,}-image training subset" if exp.get("train_images") else "")
    head = (f"Measured by `resnetlab reproduce fashion-table` ({budget}, seeds "
            f"{','.join(map(str, exp['seeds']))}) on {exp['machine']}, {exp['time']}, "
            f"{exp['wall_seconds'] / 60:.0f} min in all; folder `{shown or results.as_posix()}`.")
    return f"{README_BEGIN}\n{head}\n\n{(results / 'table.md').read_text().rstrip()}\n{README_END}"


def render_readme(readme: Path, results: Path) -> bool:
    """Replace the block between the markers in ``readme``; True when the file changed."""
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise AnalysisError(f"{readme}: no {README_BEGIN} ... {README_END} block to fill")
    new = text[:start] + readme_block(results) + text[end + len(README_END):]
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resnetlab.analysis.fashion_table [RESULTS] [--readme README.md]``: fill the README."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m resnetlab.analysis.fashion_table", description=main.__doc__)
    p.add_argument("results", nargs="?", default="docs/results/fashion-table", type=Path)
    p.add_argument("--readme", default="README.md", type=Path)
    args = p.parse_args(argv)
    for need in (args.results / "experiment.json", args.results / "table.md", args.readme):
        if not need.is_file():
            p.error(f"{need} does not exist; RESULTS is a folder written by `resnetlab reproduce fashion-table`")
    try:
        changed = render_readme(args.readme, args.results)
    except (AnalysisError, ValueError, KeyError) as e:
        p.error(f"{args.results}: {e}")
    print(f"{args.readme}: {'updated' if changed else 'already up to date'} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
