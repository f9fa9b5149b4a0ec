"""How the ``fashion_speedrun`` recipe was chosen: one full run per candidate, its test top-1 plain
and with flips, kept in ``benchmarks/results/speedrun-choice.jsonl`` and shown as a table.

Each candidate is the shipped recipe with ``key=value`` overrides, trained once through
``resnetlab.train`` with the final test scoring every image and its mirror
(``train.test_tta=flip``). A row records what was trained (batch, lr, crop padding, epochs, seed),
not the overrides: the recipe they applied to moves on. Runs made two at a time with one thread
each (``train.threads=1``) are worth their accuracy, not their time; the table says so.

    python -m benchmarks.speedrun_choice run NOTE key=value ...   # one candidate, appended
    python -m benchmarks.speedrun_choice table                    # the markdown table, from the rows

The table goes to ``benchmarks/results/speedrun-choice.md``; the README includes that file verbatim
(``tools/readme_include.py``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_speedrun import RECIPE, TARGET_SECONDS
from benchmarks.common import RESULTS_DIR

ROWS = RESULTS_DIR / "speedrun-choice.jsonl"
TABLE = RESULTS_DIR / "speedrun-choice.md"


def run_candidate(note: str, overrides: list[str], rows: Path = ROWS) -> dict[str, Any]:
    """Train the recipe with ``overrides`` (flip-scored test) and append its row to ``rows``."""
    import resnetlab
    from resnetlab.engine.metrics import append_jsonl

    with tempfile.TemporaryDirectory(prefix="speedrun-choice-") as tmp:
        t0 = time.perf_counter()
        cfg = resnetlab.load_config(RECIPE, [*overrides, f"run.root={tmp}", "run.name=candidate",
                                             "train.quiet=true", "train.tensorboard=false", "train.test_tta=flip"])
        result = resnetlab.train(cfg)
        seconds = time.perf_counter() - t0
    assert result.test is not None, "the recipe scores the test set"
    row = {"seed": cfg.seed, "batch": cfg.train.batch_size, "lr": cfg.optim.lr,
           "crop_padding": cfg.data.augment.crop_padding, "epochs": cfg.train.epochs,
           "test_acc": result.test["top1_acc"], "test_acc_flip": result.test["top1_acc_flip"],
           "seconds": seconds, "threads": cfg.train.threads, "note": note}
    rows.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(rows, row)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows``, by seed, in the order they were run within a seed."""
    lines = ["| seed | batch | lr | crop padding | epochs | test top-1 | with flips | time | note |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: r["seed"]):
        flip = "not measured" if r["test_acc_flip"] is None else f"{r['test_acc_flip']:.2f}%"
        if r["threads"] == 1:
            when = "1 thread: not a speedrun time"
        else:
            over = " (over the 10 minutes)" if r["seconds"] > TARGET_SECONDS else ""
            when = f"{r['seconds']:.0f} s on 2 threads{over}"
        lines.append(f"| {r['seed']} | {r['batch']} | {r['lr']:g} | {r['crop_padding']} | {r['epochs']} | "
                     f"{r['test_acc']:.2f}% | {flip} | {when} | {r['note']} |")
    return "\n".join(lines) + "\n"


def read_rows(path: Path = ROWS) -> list[dict[str, Any]]:
    """The rows of ``path``, one JSON object per line; SystemExit naming the file and line when one
    is not."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}, line {n}: not JSON ({e.msg})") from None
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speedrun_choice", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="train one candidate and append its row")
    r.add_argument("note", help="what the candidate changes, for the table")
    r.add_argument("overrides", nargs="*", help="key=value on top of the recipe")
    sub.add_parser("table", help=f"write {TABLE.name} from {ROWS.name}")
    args = p.parse_args(argv)
    if args.action == "run":
        print(json.dumps(run_candidate(args.note, args.overrides)))
        return 0
    if not ROWS.is_file():
        raise SystemExit(f"{ROWS}: no rows yet; run a candidate first")
    TABLE.write_text(table(read_rows()))
    print(TABLE.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
