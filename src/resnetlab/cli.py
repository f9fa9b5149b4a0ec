"""Command line: parse -> Config -> call one library function. No logic lives here.

Each subcommand is a pair: ``add_<name>(subparsers)`` declares its arguments and
``run_<name>(args)`` calls the library and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def _user_errors() -> tuple[type[BaseException], ...]:
    from resnetlab.config import ConfigError
    from resnetlab.data import DataError
    from resnetlab.engine.checkpoint import CheckpointError
    from resnetlab.engine.errors import TrainingError

    return (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("resnetlab")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:  # ranks other than 0 have already raised theirs
        logger.setLevel(logging.WARNING if quiet else logging.INFO)


# ---------------------------------------------------------------------------------------------- train


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network (default: resnet20 on digits, its tuned recipe)",
                       description="Train a network. Config layers: defaults <- the dataset's recipe "
                                   "(chosen by data.name) <- -c RECIPE <- key=value overrides. Config "
                                   "values are key=value words, not --options: train.epochs=5.")
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
        from resnetlab.engine import resume_config

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
            return 2
        seeds = train_seeds(resolve_train_config(args), (), args.seeds)
        print(seeds.markdown + f"\n{seeds.group_dir}/summary.md, summary.json")
        return seeds.exit_code
    from resnetlab.launch import fit_cleanly

    result = fit_cleanly(resolve_train_config(args))
    if result.interrupted is None and result.test is not None and os.environ.get("RANK", "0") == "0":
        t = result.test
        print(f"test: top-1 acc {t['top1_acc']:.2f}% (err {t['top1_err']:.2f}%), "
              f"top-5 acc {t['top5_acc']:.2f}%, loss {t['loss']:.4f} | {result.run_dir}")
    return result.exit_code


# ---------------------------------------------------------------------------------------------- recipes, config


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


# ---------------------------------------------------------------------------------------------- models


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the networks: parameters and multiply-adds")
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_models(args: argparse.Namespace) -> int:
    import json

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


# ---------------------------------------------------------------------------------------------- eval


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, top-1/top-5 error, per-class accuracy/precision/recall/F1, confusion matrix",
                       description="Evaluate a run (or checkpoint) on its own data, rebuilt from the "
                                   "stored config. Writes eval-SPLIT.json, confusion-SPLIT.json and "
                                   "confusion-SPLIT.png in the run folder (or beside the checkpoint).")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder (best.pt, else last.pt) or checkpoint file")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which held-out split (default val)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", metavar="DIR", help="write the report files here instead of the run folder "
                                                "(for read-only runs)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data.*/train.* changes to the stored config, e.g. data.root=~/data/x train.device=cpu")


def run_eval(args: argparse.Namespace) -> int:
    import json

    from resnetlab.evaluate import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(args.path, args.split, args.overrides, out_dir=args.out)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------- predict


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes and probabilities for image files or folders",
                       description="Predict with the run's own preprocessing. Unreadable files are "
                                   "named on stderr and the others still predicted; the exit code is "
                                   "then 1 (0 when every file was predicted).")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders searched recursively")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="grey runs (digits: light ink on dark) learned one polarity; auto reads it from "
                        "the image border and inverts dark-on-light images (default auto)")


def run_predict(args: argparse.Namespace) -> int:
    import json

    from resnetlab.predict import format_predictions, predict

    result = predict(args.path, args.inputs, topk=args.topk, device=args.device, invert=args.invert)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.predictions:
        print(format_predictions(result))
    for file, reason in result.errors:
        print(f"resnetlab predict: error: {file}: {reason}", file=sys.stderr)
    return 1 if result.errors else 0


# ---------------------------------------------------------------------------------------------- export


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="safetensors / TorchScript / ONNX, checked against PyTorch",
                       description="Export a run (or checkpoint) plus OUTPUT.json metadata. The export "
                                   "is run on random inputs and compared with the PyTorch model; above "
                                   "1e-4 nothing is written and the exit code is 1.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("--format", required=True, choices=("safetensors", "torchscript", "onnx"))
    p.add_argument("--output", metavar="PATH", help="model file (default: <run>/<arch>.<ext>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output (never a "
                                                        "run's checkpoint)")


def run_export(args: argparse.Namespace) -> int:
    from resnetlab.export import ExportError, export_model

    try:
        res = export_model(args.path, args.format, args.output, force=args.force)
    except ExportError as e:
        print(f"resnetlab export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res.path} and {res.metadata_path.name} | max |{res.format} - pytorch| = "
          f"{res.max_abs_diff:.2e} (limit {res.metadata['tolerance']:.0e})")
    return 0


# ---------------------------------------------------------------------------------------------- import


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn torchvision weights on disk into a resnetlab checkpoint",
                       description="Wrap a torchvision state dict (torch.save(model.state_dict())) in a "
                                   "checkpoint with config and ImageNet-style data meta (resize 256, crop "
                                   "224, ImageNet mean/std) that eval, predict and export accept.")
    p.add_argument("source", choices=("torchvision",), help="where the weights come from")
    p.add_argument("file", metavar="FILE.pth", help="the state dict file")
    p.add_argument("--arch", required=True, help="registry name, e.g. resnet50")
    p.add_argument("--classes", metavar="FILE", help="class names, one per line (default 0..k-1)")
    p.add_argument("--output", metavar="PATH", help="checkpoint to write (default FILE.resnetlab.pt)")
    p.add_argument("--data-root", default="data/imagenet",
                   help="image folder (train/, val/) stored for eval (default data/imagenet)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output (never a "
                                                        "run's checkpoint)")


def run_import(args: argparse.Namespace) -> int:
    from resnetlab.importers import import_torchvision

    res = import_torchvision(args.file, args.arch, args.classes, args.output, data_root=args.data_root,
                             force=args.force)
    check = "not compared" if res.max_abs_diff is None else f"{res.max_abs_diff:.2e}"
    print(f"wrote {res.path} | {res.arch}, {res.num_classes} classes | max |resnetlab - torchvision| = {check}")
    return 0


# ---------------------------------------------------------------------------------------------- analysis


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="experiments: degradation (Fig. 6), cifar-table (Table 6), landscape, "
                                         "responses (Fig. 7), transfer (fine-tuning)",
                       description="Reproduce an experiment of He et al. 2015.")
    exp = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    d = exp.add_parser("degradation", help="plain vs residual nets: figure + table of final errors",
                       description="Train plain<d> and resnet<d> with one recipe and the same seeds; "
                                   "write runs/degradation-<data>-<time>/ with degradation.png (Figure 6 "
                                   "style), table.md, table.csv; print the table.")
    d.add_argument("--data", default="digits", choices=("digits", "cifar10", "cifar100"),
                   help="data source (cifar: pass data.root=DIR)")
    d.add_argument("--depths", default="20,56", help="depths with a plain and a resnet twin (default 20,56)")
    d.add_argument("--seeds", default="0,1,2", help="seeds per net (default 0,1,2)")
    d.add_argument("--epochs", type=int, help="epochs per run (default 20 on digits, 164 on CIFAR)")
    d.add_argument("--jobs", type=int, help="worker processes (default 2 single-thread ones on CPU, 1 on GPU)")
    d.add_argument("--extra-models", metavar="NAME,...",
                   help="other registered nets trained with the same recipe and seeds (e.g. densenet_bc100, "
                        "lesson_resnet18); in the table and in depth.png at their weighted depth")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. optim.lr=0.05")
    ls = exp.add_parser("landscape", help="loss landscapes of plain56 and resnet56 on digits, side by side",
                        description="Train the models on digits (degradation recipe, one seed), then draw "
                                    "their loss landscapes along the same kind of filter-normalised random "
                                    "directions on the same contour levels; print the roughness numbers. "
                                    "Writes runs/landscape-digits-<time>/landscape.png, landscape.csv, "
                                    "roughness.md, roughness.csv.")
    ls.add_argument("--models", default="plain56,resnet56", help="registry names (default plain56,resnet56)")
    ls.add_argument("--epochs", type=int, default=10, help="training epochs per net (default 10)")
    ls.add_argument("--seed", type=int, default=0, help="training seed and direction seed (default 0)")
    _landscape_options(ls, images=128)
    ls.add_argument("--jobs", type=int, help="training worker processes (default 2 on CPU)")
    ls.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every training run")
    rs = exp.add_parser("responses", help="layer responses (Fig. 7) of plain20/56, resnet20/56/110 on digits",
                        description="Train the models on digits (degradation recipe, one seed), then write "
                                    "the std of every 3x3 layer's response on the test split: "
                                    "runs/responses-digits-<time>/responses.png, responses.csv, summary.md.")
    rs.add_argument("--models", default="plain20,plain56,resnet20,resnet56,resnet110",
                    help="registry names (default plain20,plain56,resnet20,resnet56,resnet110)")
    rs.add_argument("--epochs", type=int, default=10, help="training epochs per net (default 10)")
    rs.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    rs.add_argument("--jobs", type=int, help="training worker processes (default 2 on CPU)")
    rs.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every training run")
    t = exp.add_parser("transfer", help="pretrain on digits 0-4, then learn 5-9 from N images per class four ways",
                       description="Pretrain resnet20 on digits 0-4 (one net per seed), then train on digits "
                                   "5-9 with N labelled images per class: from scratch, linear probe, full "
                                   "fine-tune, stem frozen. Writes runs/transfer-digits-<time>/ with table.md, "
                                   "table.csv, transfer.png; prints the table.")
    t.add_argument("--n", default="5,10,20,50", help="labelled images per class (default 5,10,20,50)")
    t.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    t.add_argument("--ways", default="scratch,probe,finetune,stem-frozen", help="which ways (default all four)")
    t.add_argument("--steps", type=int, default=100, help="optimiser steps per fine-tuning run (default 100)")
    t.add_argument("--pretrain-epochs", type=int, default=30, help="epochs of pretraining (default 30)")
    t.add_argument("--jobs", type=int, help="worker processes (default 2 single-thread ones on CPU, 1 on GPU)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. run.root=out")
    c = exp.add_parser("cifar-table", help="Table 6: resnet20..110 on local CIFAR-10, ours vs the paper's",
                       description="Train the packaged recipes cifar10_resnet{20,32,44,56,110} on local CIFAR-10 "
                                   "files and print our test error next to the paper's. For GPUs: prints "
                                   "its estimated time first; on CPU it trains only with --yes.")
    c.add_argument("--depths", default="20,32,44,56,110", help="which of Table 6's nets (default all five)")
    c.add_argument("--seeds", default="0", help="seeds per net (default 0)")
    c.add_argument("--yes", action="store_true", help="train even on a CPU")
    c.add_argument("--configs", metavar="DIR", help="folder with cifar10_resnet<d>.yaml (default: the packaged recipes)")
    c.add_argument("--estimate-steps", type=int, default=5, help="optimiser steps timed per net (default 5)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=~/data/cifar10")


def run_reproduce(args: argparse.Namespace) -> int:
    if args.experiment == "landscape":
        from resnetlab.analysis.landscape import reproduce_landscape

        res = reproduce_landscape(args.models, epochs=args.epochs, seed=args.seed, grid=args.grid,
                                  span=args.span, dims=args.dims, images=args.images, bn=args.bn,
                                  chunk=args.chunk, hessian_iters=args.hessian_iters,
                                  overrides=args.overrides, jobs=args.jobs, on_progress=print)
        print(res.markdown)
        print(" | ".join(str(f) for f in res.files))
        return 0
    if args.experiment == "responses":
        from resnetlab.analysis.responses import reproduce_responses

        rr = reproduce_responses(args.models, epochs=args.epochs, seed=args.seed, overrides=args.overrides,
                                 jobs=args.jobs)
        print(rr.responses.markdown)
        print("final training error (%): " + ", ".join(f"{m} {e:.2f}" for m, e in rr.train_err.items()))
        print(" | ".join(str(f) for f in rr.responses.files))
        return 0
    if args.experiment == "degradation":
        from resnetlab.analysis import run_degradation

        deg = run_degradation(args.data, args.depths, args.seeds, args.epochs, args.overrides, args.jobs,
                              extra_models=args.extra_models)
        print(deg.markdown)
        print(f"{deg.figure} | {deg.out_dir / 'depth.png'} | {deg.out_dir / 'table.md'} | "
              f"{deg.out_dir / 'table.csv'} | {deg.seconds:.0f} s")
        return deg.exit_code
    if args.experiment == "transfer":
        from resnetlab.analysis.transfer import run_transfer

        tr = run_transfer(args.n, args.seeds, args.ways, steps=args.steps, pretrain_epochs=args.pretrain_epochs,
                          overrides=args.overrides, jobs=args.jobs)
        print(tr.markdown)
        print(f"{tr.figure} | {tr.out_dir / 'table.md'} | {tr.out_dir / 'table.csv'} | {tr.seconds:.0f} s")
        return tr.exit_code
    from resnetlab.analysis import run_cifar_table

    table = run_cifar_table(args.depths, args.seeds, args.overrides, yes=args.yes, configs_dir=args.configs,
                            estimate_steps=args.estimate_steps, on_estimate=print)
    if not table.ran:
        print("resnetlab reproduce cifar-table: this is meant for a GPU; on this CPU it would take the "
              "time above. Add --yes to train anyway.", file=sys.stderr)
        return 1
    print(table.markdown)
    print(f"{table.out_dir / 'table.md'} | {table.out_dir / 'table.csv'}")
    return 0


def add_gradients(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gradients", help="gradient norm per layer at init and after K steps (plain vs resnet)",
                       description="Gradient L2 norm of every conv weight and every block output, at "
                                   "initialisation and after K training steps; writes gradients.csv and "
                                   "gradients.png (log scale) to runs/gradients-<data>-<time>/ and prints "
                                   "the first-block / last-block ratio per model.")
    p.add_argument("--models", default="plain20,plain56,resnet20,resnet56", help="comma-separated registry names")
    p.add_argument("--data", default="digits", choices=("digits", "cifar10", "cifar100"))
    p.add_argument("--steps", type=int, default=100, help="training steps before the second measurement")
    p.add_argument("--seed", type=int, default=0, help="init, split and probe batch")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.batch_size=64")


def run_gradients(args: argparse.Namespace) -> int:
    from resnetlab.analysis.gradients import format_ratios, gradient_flow

    res = gradient_flow(args.models, args.data, args.steps, args.overrides, seed=args.seed)
    print(format_ratios(res))
    print(" | ".join(str(f) for f in res.files))
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training/validation curves and learning rate of run folders",
                       description="Curves from metrics.jsonl of one or more runs on one figure "
                                   "(PNG and SVG): training dashed, validation solid, plus the learning rate.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--metric", default="err", choices=("err", "loss"), help="top-1 error or loss (default err)")
    p.add_argument("--output", metavar="FILE", help="figure path; .png and .svg are written "
                                                    "(default RUN/curves_<metric>.png)")


def run_plot(args: argparse.Namespace) -> int:
    from resnetlab.analysis import plot_runs

    print(" | ".join(str(f) for f in plot_runs(args.runs, args.metric, args.output)))
    return 0


def _landscape_options(p: argparse.ArgumentParser, images: int = 256) -> None:
    p.add_argument("--grid", type=int, default=21, help="points per direction (default 21)")
    p.add_argument("--span", type=float, default=1.0, help="offsets from -span to +span (default 1.0)")
    p.add_argument("--dims", type=int, default=2, choices=(1, 2), help="1-D curve or 2-D surface (default 2)")
    p.add_argument("--images", type=int, default=images,
                   help=f"fixed images the loss is taken over (default {images})")
    p.add_argument("--bn", default="batch", choices=("batch", "eval"),
                   help="BatchNorm: statistics of the evaluated images (batch, default) or running ones (eval)")
    p.add_argument("--chunk", type=int, default=16, help="grid points per batched forward pass (default 16)")
    p.add_argument("--hessian-iters", type=int, default=20,
                   help="power-iteration steps per Hessian eigenvalue; 0 skips them (default 20)")


def add_landscape(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("landscape", help="loss landscape around a trained net (filter-normalised directions)",
                       description="Loss and accuracy at w + a*d1 (+ b*d2) for random filter-normalised "
                                   "directions (Li et al. 2018), many grid points per forward pass; prints "
                                   "the roughness numbers. Writes landscape.csv, landscape.png and "
                                   "landscape.json to RUN/landscape/ (or --out).")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="images from (default train)")
    p.add_argument("--seed", type=int, default=0, help="direction seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN/landscape)")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")
    _landscape_options(p)


def run_landscape(args: argparse.Namespace) -> int:
    from resnetlab.analysis.landscape import roughness_markdown
    from resnetlab.analysis.landscape import run_landscape as landscape

    res = landscape(args.path, grid=args.grid, span=args.span, dims=args.dims, split=args.split,
                    images=args.images, bn=args.bn, seed=args.seed, chunk=args.chunk,
                    hessian_iters=args.hessian_iters, out=args.out, device=args.device)
    print(roughness_markdown([res]))
    print(f"loss at w: {res.loss_at_zero:.4f} | {res.info['grid_points']} points in "
          f"{res.info['grid_seconds']:.1f} s | " + " | ".join(str(f) for f in res.files))
    return 0


def add_responses(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("responses", help="std of every 3x3 layer's response (the paper's Fig. 7)",
                       description="For each run, the standard deviation of every 3x3 layer's response "
                                   "(after BN, before the ReLU and the addition) over a split. Writes "
                                   "responses.csv, responses.png and summary.md to --out.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or checkpoints")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="default test")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/responses-<time>)")


def run_responses(args: argparse.Namespace) -> int:
    from resnetlab.analysis.responses import run_responses as responses

    res = responses(args.runs, split=args.split, out=args.out)
    print(res.markdown)
    print(" | ".join(str(f) for f in res.files))
    return 0


# ----------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------- serve


def _positive(kind: type, name: str) -> Callable[[str], float]:
    def parse(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got {text!r}") from None
        if value <= 0 and not (name == "--max-wait-ms" and value == 0):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value

    return parse


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP API + web page for a trained network (127.0.0.1:8000)",
                       description="Serve a run (or checkpoint): POST /v1/predict, POST /v1/explain, "
                                   "GET /v1/model, /healthz, /readyz, and a web page at /. Listens on "
                                   "127.0.0.1 only unless --host says otherwise. SIGTERM or Ctrl-C "
                                   "finishes the requests in flight and exits 0.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes "
                        "the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")
    p.add_argument("--max-batch", type=_positive(int, "--max-batch"), default=16,
                   help="images per forward pass at most (default 16; 1 turns micro-batching off)")
    p.add_argument("--max-wait-ms", type=_positive(float, "--max-wait-ms"), default=5.0,
                   help="how long a batch waits for more images after its first, ms (default 5)")
    p.add_argument("--max-body-mb", type=_positive(float, "--max-body-mb"), default=10.0,
                   help="largest request body, MiB (default 10; larger: 413)")
    p.add_argument("--max-images", type=_positive(int, "--max-images"), default=32,
                   help="images in one request at most (default 32; more: 413)")
    p.add_argument("--max-pixels", type=_positive(int, "--max-pixels"), default=40_000_000,
                   help="pixels (w*h) of one image at most (default 40e6; more: 400, a likely "
                        "decompression bomb)")
    p.add_argument("--threads", type=_positive(int, "--threads"),
                   help="torch CPU threads for the network (default: one per core; 1 is steadier on a "
                        "machine shared with other busy processes)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default warning; info logs every request)")


def run_serve(args: argparse.Namespace) -> int:
    from resnetlab.serve import Limits, serve

    limits = Limits(max_body_mb=args.max_body_mb, max_images=args.max_images, max_pixels=args.max_pixels)
    try:
        return serve(args.path, host=args.host, port=args.port, device=args.device,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits,
                     log_level=args.log_level, threads=args.threads)
    except OSError as e:
        print(f"resnetlab serve: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------- explain


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmaps: where the network looked, per image",
                       description="Per image: top-k classes and a Grad-CAM overlay PNG (Captum's "
                                   "LayerGradCam on the last stage), with the run's own preprocessing. "
                                   "Writes OUT/<name>.cam.png and OUT/explain.json.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders searched recursively")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/explain)")
    p.add_argument("--target", metavar="CLASS",
                   help="class name or id to explain (default: each image's top class)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")


def run_explain(args: argparse.Namespace) -> int:
    from resnetlab.explain import explain

    result = explain(args.path, args.inputs, out=args.out, target=args.target, topk=args.topk,
                     device=args.device)
    for e, png in zip(result.explanations, result.written, strict=True):
        top = " | ".join(f"{c} {q:.3f}" for c, q in zip(e.classes, e.probs, strict=True))
        print(f"{e.file}: {top} -> {png} (Grad-CAM of {e.target_class})")
    if result.summary is not None:
        print(f"wrote {len(result.written)} overlays and {result.summary}")
    for file, reason in result.errors:
        print(f"resnetlab explain: error: {file}: {reason}", file=sys.stderr)
    return 1 if result.errors else 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (add_train, run_train),
    "recipes": (add_recipes, run_recipes),
    "config": (add_config, run_config),
    "models": (add_models, run_models),
    "info": (add_info, run_info),
    "eval": (add_eval, run_eval),
    "predict": (add_predict, run_predict),
    "serve": (add_serve, run_serve),
    "explain": (add_explain, run_explain),
    "export": (add_export, run_export),
    "import": (add_import, run_import),
    "reproduce": (add_reproduce, run_reproduce),
    "gradients": (add_gradients, run_gradients),
    "plot": (add_plot, run_plot),
    "landscape": (add_landscape, run_landscape),
    "responses": (add_responses, run_responses),
}


def build_parser() -> argparse.ArgumentParser:
    from resnetlab import __version__

    parser = argparse.ArgumentParser(prog="resnetlab", description="Deep residual networks in PyTorch.")
    parser.add_argument("--version", action="version", version=f"resnetlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


# Options other tools taught (timm, torchvision's references, Lightning) -> resnetlab's config key.
_OPTION_KEYS = {"model": "model.name", "arch": "model.name", "a": "model.name", "dataset": "data.name",
                "data": "data.name", "data_path": "data.root", "data_dir": "data.root", "root": "data.root",
                "b": "train.batch_size", "lr": "optim.lr", "wd": "optim.weight_decay", "opt": "optim.name",
                "sched": "optim.schedule", "j": "data.num_workers", "workers": "data.num_workers",
                "output": "run.root", "output_dir": "run.root", "out_dir": "run.root",
                "warmup_epochs": "optim.warmup_epochs", "smoothing": "optim.label_smoothing",
                "pretrained": "model.init_from", "weights": "model.init_from", "num_classes": "model.num_classes"}


def option_hint(option: str, value: str | None) -> str | None:
    """For an unknown ``--option [value]``: the ``key=value`` override it most likely meant."""
    from resnetlab.config import Config, _all_keys

    name = option.lstrip("-").split("=", 1)[0]
    keys = _all_keys(Config)
    key: str | None
    if name in keys:
        key = name
    else:
        norm = name.replace("-", "_")
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == norm]
        key = matches[0] if len(matches) == 1 else _OPTION_KEYS.get(norm)
    if key is None:
        return None
    if key == "model.init_from" and key not in keys:  # the weights key, named before it exists
        return ("resnetlab downloads nothing; start from saved weights with model.init_from=RUN|CKPT, "
                "or import torchvision weights on disk with `resnetlab import torchvision FILE.pth --arch NAME`")
    shown = value if value is not None else "VALUE"
    return f"config values are key=value words: did you mean `{key}={shown}`?"


def _unknown_options(extra: list[str], argv: list[str]) -> str:
    """The message for unrecognised arguments, with a key=value hint where one fits."""
    for tok in extra:
        if not tok.startswith("-"):
            continue
        if "=" in tok:
            value: str | None = tok.split("=", 1)[1]
        else:
            i = argv.index(tok) if tok in argv else -1
            nxt = argv[i + 1] if 0 <= i < len(argv) - 1 else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else None
        hint = option_hint(tok, value)
        if hint:
            return f"unrecognized option {tok.split('=', 1)[0]}; {hint}"
    return f"unrecognized arguments: {' '.join(extra)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also come after options: `eval RUN --split test data.root=x`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(_unknown_options(extra, argv))
    _setup_logging(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command][1](args)
    except _user_errors() as e:
        print(f"resnetlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `resnetlab predict ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by the broken pipe
    except OSError as e:  # disk full, read-only, permission denied, a file where a folder should be
        from resnetlab.outputs import describe_os_error

        print(f"resnetlab {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
