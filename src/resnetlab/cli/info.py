"""The model catalog: models and info."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the networks: parameters and multiply-adds")
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--pretrained", action="store_true",
                   help="only the networks with weights that ship (`resnetlab weights` shows their cards)")


def run_models(args: argparse.Namespace) -> int:
    import json

    if args.pretrained:
        from fnmatch import fnmatch

        from resnetlab.weights.zoo import describe

        rows_w = [r for r in describe() if fnmatch(r["arch"], args.pattern) or fnmatch(r["name"], args.pattern)]
        if args.json:
            print(json.dumps(rows_w, indent=2))
        else:
            for r in rows_w:
                acc = f"{r['top1_acc']:.2f}%" if r["top1_acc"] is not None else "-"
                print(f"{r['name']:<26} {r['arch']:<10} {r['dataset'] or '-':<14} test top-1 {acc}")
        return 0

    from resnetlab.catalog import cached_rows

    rows = cached_rows(args.pattern)  # the shipped counts: no torch import
    if rows is None:  # the catalog is stale (a model file changed): count afresh
        from resnetlab.models.summary import model_table

        rows = model_table(args.pattern, use_catalog=False)
    if not rows:
        print(f"resnetlab models: error: no model matches {args.pattern!r}; `resnetlab models` lists "
              f"them all", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from resnetlab.catalog import format_model_table

    print(format_model_table(rows))
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="one network's stages: output shapes and parameters")
    p.add_argument("name", help="registry name, e.g. resnet56")
    p.add_argument("--json", action="store_true", help="print the stages as JSON")


def run_info(args: argparse.Namespace) -> int:
    import difflib
    import json

    from resnetlab.models import list_models
    from resnetlab.models.summary import format_model_info, model_info

    if args.name not in list_models():
        close = difflib.get_close_matches(args.name, list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        print(f"resnetlab info: error: unknown model {args.name!r}{hint} (`resnetlab models` lists them)",
              file=sys.stderr)
        return 1
    rows = model_info(args.name)
    print(json.dumps(rows, indent=2) if args.json else format_model_info(rows))
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "models": (add_models, run_models),
    "info": (add_info, run_info),
}
