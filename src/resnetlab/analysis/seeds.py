"""One recipe, several seeds: train once per seed, then the mean +- std of every final metric.

``resnetlab train ... --seeds 0,1,2`` makes a group folder ``<run.root>/<run.name>/`` holding
``seed0/``, ``seed1/``, ... (ordinary run folders) and, beside them, ``summary.md`` and
``summary.json``. The statistics are computed from the run folders' files only
(``metrics.jsonl``, ``result.json``), so a summary can be redone at any time with
:func:`summarize_runs`.

Standard deviations are sample standard deviations (``ddof=1``, what "± std over seeds" means
in papers). With a single seed the sample std is undefined: it is reported as ``n/a`` in
Markdown and ``null`` in JSON, never as a misleading 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from resnetlab.analysis.args import int_list
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.plots import read_run_metrics
from resnetlab.config import Config, apply_overrides, load
from resnetlab.engine.fit import fit
from resnetlab.exit_codes import exit_code
from resnetlab.runtime import default_run_name

# metrics.jsonl keys that are counters or schedule values, not results to average
_NOT_METRICS = {"epoch", "step", "lr"}
# result.json test/val keys that are not metrics
_NOT_EVAL_METRICS = {"count", "weights", "seconds"}


def parse_seeds(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"0,1,2"`` (or ``"0 1 2"``, or a list of ints) -> ``(0, 1, 2)``; each within the seed
    bound of :mod:`resnetlab.analysis.args`, no repeats."""
    return int_list(text if isinstance(text, str) else tuple(text), "seeds", "0,1,2", key="seed")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    mean = math.fsum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def format_pm(mean: float, std: float | None, digits: int = 2) -> str:
    """``"12.34 ± 0.56"``; ``"12.34 ± n/a"`` when std is undefined (one seed)."""
    spread = "n/a" if std is None else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric over ``rows`` (one dict of final metrics per seed): mean, std, n, values.

    A metric missing from some rows is summarised over the rows that have it (``n`` says how
    many). Non-numeric values are ignored. Keys keep first-seen order.
    """
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and _is_number(v)]
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if _is_number(r.get(k))]
        mean, std = mean_std(vals)
        out[k] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def final_metrics(run_dir: str | Path) -> dict[str, float]:
    """A finished run's final numbers, from its files only.

    The last ``metrics.jsonl`` row (``train_err``, ``train_loss``, ``val_top1_err``, ...,
    without epoch/step/lr), ``train_seconds`` (summed epoch times), ``best_val_top1_err`` and
    ``best_epoch``, and ``test_<metric>`` from ``result.json`` when the test split was evaluated.
    """
    run_dir = Path(run_dir).expanduser()
    rows = read_run_metrics(run_dir)
    out = {k: float(v) for k, v in rows[-1].items() if k not in _NOT_METRICS and _is_number(v)}
    out["train_seconds"] = math.fsum(float(r.get("seconds", 0.0)) for r in rows)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        try:
            doc = json.loads(result_path.read_text())
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{result_path}: not valid JSON ({e})") from None
        best = doc.get("best") or {}
        if _is_number(best.get("val_top1_err")):
            out["best_val_top1_err"] = float(best["val_top1_err"])
            out["best_epoch"] = float(best.get("epoch", math.nan))
        for k, v in (doc.get("test") or {}).items():
            if k not in _NOT_EVAL_METRICS and _is_number(v):
                out[f"test_{k}"] = float(v)
    return out


def summary_markdown(summary: Mapping[str, Mapping[str, Any]], labels: Sequence[str],
                     title: str = "") -> str:
    """Markdown table: metric | mean ± std | n | one column per run (``labels``)."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| metric | mean ± std | n | " + " | ".join(labels) + " |",
              "|---|---:|---:|" + "---:|" * len(labels)]
    for k, s in summary.items():
        vals = [f"{v:.4g}" for v in s["values"]]
        vals += [""] * (len(labels) - len(vals))
        lines.append(f"| {k} | {format_pm(s['mean'], s['std'], 4 if abs(s['mean']) < 1 else 2)} "
                     f"| {s['n']} | " + " | ".join(vals) + " |")
    lines += ["", "std: sample standard deviation over seeds (ddof=1); n/a with one seed."]
    return "\n".join(lines) + "\n"


@dataclass
class SeedsResult:
    """What :func:`train_seeds` returns: the group folder, the run folders, the summary."""

    group_dir: Path
    runs: list[Path]
    seeds: tuple[int, ...]
    summary: dict[str, dict[str, Any]]
    markdown: str
    interrupted: str | None = None  # set when one seed's run was stopped; later seeds not run

    @property
    def exit_code(self) -> int:
        """0, or the shell's code for the signal that stopped a run (130 Ctrl-C, 143 SIGTERM)."""
        return exit_code(self.interrupted)


def summarize_runs(group_dir: str | Path, runs: Sequence[str | Path], seeds: Sequence[int]) -> SeedsResult:
    """Write ``summary.md`` and ``summary.json`` for finished ``runs`` into ``group_dir``."""
    group_dir = Path(group_dir)
    runs = [Path(r) for r in runs]
    rows = [final_metrics(r) for r in runs]
    summary = summarize(rows)
    labels = [f"seed {s}" for s in seeds]
    md = summary_markdown(summary, labels, title=f"{group_dir.name}: {len(runs)} seeds")
    doc = {"seeds": list(seeds), "runs": [str(r) for r in runs],
           "std": "sample standard deviation (ddof=1); null with one seed", "metrics": summary}
    (group_dir / "summary.md").write_text(md)
    (group_dir / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    return SeedsResult(group_dir, [Path(r) for r in runs], tuple(seeds), summary, md)


def train_seeds(config: Config | str | Path | None, overrides: Sequence[str] = (),
                seeds: str | Iterable[int] = (0, 1, 2),
                train_fn: Callable[[Config], Any] | None = None) -> SeedsResult:
    """Train the recipe once per seed into ``<run.root>/<name>/seed<k>/``; summarise beside them.

    ``name`` is ``run.name`` if set, else ``<model>-<data>-<time>-seeds``. ``train_fn(cfg)``
    defaults to :func:`resnetlab.engine.fit`. If a run is interrupted (Ctrl-C, SIGTERM) the
    remaining seeds are not started and the summary covers the finished runs only.
    """
    seeds = parse_seeds(seeds)
    cfg = apply_overrides(config, overrides) if isinstance(config, Config) else load(config, overrides)
    name = cfg.run.name or f"{default_run_name(cfg)}-seeds"
    group = Path(cfg.run.root).expanduser() / name
    train_fn = train_fn or fit
    runs: list[Path] = []
    done: list[int] = []
    interrupted = None
    for s in seeds:
        run_cfg = replace(cfg, seed=s, run=replace(cfg.run, root=str(group), name=f"seed{s}"))
        result = train_fn(run_cfg)
        if getattr(result, "interrupted", None):
            interrupted = result.interrupted
            break
        runs.append(Path(result.run_dir))
        done.append(s)
    if not runs:
        raise AnalysisError(f"{group}: the first seed's run was interrupted ({interrupted}); nothing to summarise")
    out = summarize_runs(group, runs, done)
    out.interrupted = interrupted
    return out
