"""Training: train, recipes and config keys."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from resnetlab.exit_codes import EXIT_USER_ERROR


def _sources_epilog() -> str:
    """The registry's data sources, one paragraph, for `train --help`."""
    from resnetlab.data.sources import list_sources

    listed = "; ".join(f"{s.name}: {s.summary}" + (" [needs data.root]" if s.needs_root else "")
                       for s in list_sources())
    return (f"Data sources (data.name=NAME; each brings its recipe, see `resnetlab recipes`): "
            f"{listed}.")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network (default: resnet20 on digits, its tuned recipe)",
                       description="Train a network. Config layers: defaults <- the dataset's recipe "
                                   "(chosen by data.name) <- -c RECIPE <- key=value overrides. Config "
                                   "values are key=value words, not --options: train.epochs=5.",
                       epilog=_sources_epilog())
    p.add_argument("-c", "--config", metavar="RECIPE",
                   help="packaged recipe name (`resnetlab recipes`, e.g. cifar10_resnet56) or a YAML file")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--seeds", metavar="0,1,2",
                   help="train once per seed into <run.root>/<run.name>/seed<k>/, then write the "
                        "mean ± std of every final metric (summary.md, summary.json) beside them")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit; nothing is created")
    p.add_argument("--help-keys", action="store_true",
                   help="list every config key with its type, default and meaning, and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 train.epochs=30")


def resolve_train_config(args: argparse.Namespace) -> Any:
    """The Config ``resnetlab train`` would run with these arguments (nothing is created)."""
    from dataclasses import replace

    from resnetlab.config import load, validate

    if args.resume:
        from resnetlab.config import ConfigError
        from resnetlab.engine import resume_config

        if args.config:
            raise ConfigError(f"-c {args.config} does not combine with --resume: the run's own config.yaml "
                              f"is its recipe; leave out -c (or start a new run without --resume)")

        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load(args.config, args.overrides)
    # --quiet is a typed value, not a "train.quiet=true" string to re-parse
    return validate(replace(cfg, train=replace(cfg.train, quiet=True))) if args.quiet else cfg


def run_train(args: argparse.Namespace) -> int:
    if args.help_keys:
        from resnetlab.config import describe_keys

        print(format_keys(describe_keys()))
        return 0
    if args.print_config:
        import yaml

        from resnetlab.config import to_dict

        print(yaml.safe_dump(to_dict(resolve_train_config(args)), sort_keys=False), end="")
        return 0
    if args.seeds is not None:
        from resnetlab.analysis import train_seeds

        if args.resume:
            print("resnetlab train: error: --seeds and --resume do not combine; resume one seed's "
                  "run folder at a time", file=sys.stderr)
            return EXIT_USER_ERROR
        seeds = train_seeds(resolve_train_config(args), (), args.seeds)
        print(seeds.markdown + f"\n{seeds.group_dir}/summary.md, summary.json")
        return seeds.exit_code
    from resnetlab.launch import fit_cleanly

    result = fit_cleanly(resolve_train_config(args))
    if result.interrupted is None and result.test is not None and os.environ.get("RANK", "0") == "0":
        t = result.test
        print(f"test: {_scores(t)} | {result.run_dir}")
        if "top1_acc_flip" in t:  # train.test_tta=flip: the mean softmax of each image and its mirror
            print(f"test with flips: {_scores(t, '_flip')}")
    return result.exit_code


def _scores(test: dict[str, Any], suffix: str = "") -> str:
    """Top-1 (and its error), top-5 and loss of a test result; ``suffix`` picks a variant's keys."""
    return (f"top-1 acc {test['top1_acc' + suffix]:.2f}% (err {test['top1_err' + suffix]:.2f}%), "
            f"top-5 acc {test['top5_acc' + suffix]:.2f}%, loss {test['loss' + suffix]:.4f}")


def add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="the packaged training recipes (-c NAME)",
                       description="List the YAML recipes shipped with resnetlab; `train -c NAME` uses "
                                   "one from any folder. Recipes marked with a dataset are applied "
                                   "first whenever data.name is that dataset.")
    p.add_argument("name", nargs="?", help="print this recipe's YAML instead of the list")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def run_recipes(args: argparse.Namespace) -> int:
    import json

    from resnetlab.config import list_recipes, recipe_path

    if args.name:
        print(recipe_path(args.name)[0].read_text(), end="")
        return 0
    rows = list_recipes()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        tag = f"  [default for data.name={r['dataset_default']}]" if r["dataset_default"] else ""
        print(f"{r['name']:<{width}}  {r['description']}{tag}")
    return 0


def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="config keys: type, default and meaning of each",
                       description="Inspect the configuration. `config keys [PATTERN]` lists every key "
                                   "(train --help-keys does the same); `train --print-config` shows a "
                                   "resolved config.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    k = what.add_parser("keys", help="every key with its type, default and comment")
    k.add_argument("pattern", nargs="?", default="*", help="glob on the key, e.g. 'optim.*'")
    k.add_argument("--json", action="store_true", help="print the keys as JSON")


def format_keys(rows: list[dict[str, Any]]) -> str:
    """One line per key: ``key  type  default  # comment`` in aligned columns."""
    import json

    cells = [(r["key"], r["type"], json.dumps(r["default"]), r["comment"]) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {'# ' + d if d else ''}".rstrip()
                     for a, b, c, d in cells)


def run_config(args: argparse.Namespace) -> int:
    import fnmatch
    import json

    from resnetlab.config import describe_keys

    rows = [r for r in describe_keys() if fnmatch.fnmatchcase(r["key"], args.pattern)]
    if not rows:
        print(f"resnetlab config: error: no config key matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else format_keys(rows))
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (add_train, run_train),
    "recipes": (add_recipes, run_recipes),
    "config": (add_config, run_config),
}
