"""Command line: parse -> Config -> call one library function. No logic lives here.

Each subcommand is a pair: ``add_<name>(subparsers)`` declares its arguments and
``run_<name>(args)`` calls the library and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def _user_errors() -> tuple[type[BaseException], ...]:
    from resnetlab.config import ConfigError
    from resnetlab.data import DataError
    from resnetlab.engine.checkpoint import CheckpointError
    from resnetlab.engine.fit import TrainingError

    return (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError)


def _setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("resnetlab")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:  # ranks other than 0 have already raised theirs
        logger.setLevel(logging.WARNING if quiet else logging.INFO)


# ---------------------------------------------------------------------------------------------- train


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network (default: resnet20 on digits)",
                       description="Train a network: defaults <- -c recipe <- key=value overrides.")
    p.add_argument("-c", "--config", help="YAML recipe, e.g. configs/cifar10_resnet56.yaml")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 train.epochs=30")


def run_train(args: argparse.Namespace) -> int:
    from resnetlab.config import load
    from resnetlab.engine import fit, resume_config

    overrides = [*args.overrides, *(["train.quiet=true"] if args.quiet else [])]
    cfg = resume_config(args.resume, overrides) if args.resume else load(args.config, overrides)
    result = fit(cfg)
    if result.interrupted is None and result.test is not None:
        t = result.test
        print(f"test: top-1 acc {t['top1_acc']:.2f}% (err {t['top1_err']:.2f}%), "
              f"top-5 acc {t['top5_acc']:.2f}%, loss {t['loss']:.4f} | {result.run_dir}")
    return result.exit_code


# ---------------------------------------------------------------------------------------------- models


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the networks: parameters and multiply-adds")
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'resnet*'")


def run_models(args: argparse.Namespace) -> int:
    from resnetlab.models.summary import format_model_table, model_table

    print(format_model_table(model_table(args.pattern)))
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="one network's stages: output shapes and parameters")
    p.add_argument("name", help="registry name, e.g. resnet56")


def run_info(args: argparse.Namespace) -> int:
    from resnetlab.models.summary import format_model_info, model_info

    print(format_model_info(model_info(args.name)))
    return 0


# ---------------------------------------------------------------------------------------------- eval


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, top-1/top-5 error, per-class accuracy, confusion matrix",
                       description="Evaluate a run (or checkpoint) on its own data, rebuilt from the "
                                   "stored config. Writes eval-SPLIT.json, confusion-SPLIT.json and "
                                   "confusion-SPLIT.png in the run folder (or beside the checkpoint).")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder (best.pt, else last.pt) or checkpoint file")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which held-out split (default val)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data.*/train.* changes to the stored config, e.g. data.root=~/data/x train.device=cpu")


def run_eval(args: argparse.Namespace) -> int:
    import json

    from resnetlab.evaluate import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(args.path, args.split, args.overrides)
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


def run_predict(args: argparse.Namespace) -> int:
    import json

    from resnetlab.predict import format_predictions, predict

    result = predict(args.path, args.inputs, topk=args.topk, device=args.device)
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


def run_export(args: argparse.Namespace) -> int:
    from resnetlab.export import ExportError, export_model

    try:
        res = export_model(args.path, args.format, args.output)
    except ExportError as e:
        print(f"resnetlab export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res.path} and {res.metadata_path.name} | max |{res.format} - pytorch| = "
          f"{res.max_abs_diff:.2e} (limit {res.metadata['tolerance']:g})")
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


def run_import(args: argparse.Namespace) -> int:
    from resnetlab.importers import import_torchvision

    res = import_torchvision(args.file, args.arch, args.classes, args.output, data_root=args.data_root)
    check = "not compared" if res.max_abs_diff is None else f"{res.max_abs_diff:.2e}"
    print(f"wrote {res.path} | {res.arch}, {res.num_classes} classes | max |resnetlab - torchvision| = {check}")
    return 0


# ----------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (add_train, run_train),
    "models": (add_models, run_models),
    "info": (add_info, run_info),
    "eval": (add_eval, run_eval),
    "predict": (add_predict, run_predict),
    "export": (add_export, run_export),
    "import": (add_import, run_import),
}


def build_parser() -> argparse.ArgumentParser:
    from resnetlab import __version__

    parser = argparse.ArgumentParser(prog="resnetlab", description="Deep residual networks in PyTorch.")
    parser.add_argument("--version", action="version", version=f"resnetlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command][1](args)
    except _user_errors() as e:
        print(f"resnetlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
