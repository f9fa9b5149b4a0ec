"""Weights to share and reuse: weights (list, show, verify), publish, calibrate, zoo build, lesson."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="the shipped weights: list them, show a card, verify one",
                       description="`weights` lists the weights that ship with the package; `weights show "
                                   "NAME` prints its card data; `weights verify NAME` re-measures top-1 on "
                                   "its test split and compares it with the card (exit code 1 on a mismatch).")
    p.add_argument("action", nargs="?", choices=("list", "show", "verify"), default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="e.g. resnet20.digits (show, verify)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="verify: data.*/train.* changes, e.g. data.root=~/data/fashion-mnist")


def run_weights(args: argparse.Namespace) -> int:
    import json

    from resnetlab.weights import get
    from resnetlab.weights.zoo import describe

    if args.action == "list":
        rows = describe()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no weights ship with this installation")
            return 0
        print(f"{'name':<26} {'dataset':<14} {'test top-1':>10} {'params':>10} {'file':>9}  default")
        for r in rows:
            acc = f"{r['top1_acc']:.2f}%" if r["top1_acc"] is not None else "-"
            print(f"{r['name']:<26} {r['dataset'] or '-':<14} {acc:>10} {r['num_params']:>10,} "
                  f"{r['file_size'] / 2**20:>7.2f}MB  {'yes' if r['default'] else ''}".rstrip())
        print("default: what pretrained=True (or weights='DEFAULT') loads for that architecture")
        return 0
    if not args.name:
        print(f"resnetlab weights {args.action}: error: name the weights, e.g. `resnetlab weights "
              f"{args.action} resnet20.digits` (`resnetlab weights` lists them)", file=sys.stderr)
        return 2
    # a WeightsError reaches main's handler, which prints it with its flags and exits 2
    w = get(args.name)
    if args.action == "show":
        print(json.dumps({"name": w.name, "file": str(w.file), **w.meta}, indent=2))
        return 0
    from resnetlab.weights.build import verify

    result = verify(w, args.overrides)
    if args.json:
        print(json.dumps({**vars(result), "ok": result.ok}, indent=2))
    else:
        print(result.line())
    return 0 if result.ok else 1


def add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="a run as model.safetensors + config.json + README.md model card",
                       description="Write what the model hubs expect: model.safetensors (config and data "
                                   "meta in its header), config.json in timm's save_for_hf shape, a README.md "
                                   "model card with the Hugging Face YAML header and the run's own numbers "
                                   "(measured on its test split), figures and command, and train_config.yaml. "
                                   "resnetlab.load(OUT), model.init_from=OUT and, for timm's architectures, "
                                   "timm.create_model('local-dir:OUT', pretrained=True) read it back.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("out", metavar="OUT", help="folder to write (its name is the weights' name)")
    p.add_argument("--force", action="store_true", help="overwrite the files of a non-empty OUT")
    p.add_argument("--no-eval", dest="measure", action="store_false",
                   help="do not evaluate for the card (its numbers are then missing)")


def run_publish(args: argparse.Namespace) -> int:
    from resnetlab.weights.publish import publish

    res = publish(args.path, args.out, force=args.force, measure=args.measure)
    test = res.card["metrics"].get("test") or res.card["metrics"].get("val") or {}
    acc = f" | top-1 {test['top1_acc']:.2f}%" if "top1_acc" in test else ""
    print(f"wrote {res.folder}: {', '.join(f.name for f in res.files)}{acc}")
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a temperature on the validation split (calibrated probabilities)",
                       description="Temperature scaling (Guo et al. 2017): one scalar T fitted on the "
                                   "validation split by minimising the NLL of softmax(logits / T), stored "
                                   "in RUN/calibration.json. predict, serve, explain, export and publish then "
                                   "report calibrated probabilities; top-1 is unchanged. Prints ECE (15 "
                                   "bins) and NLL before and after on val and test.")
    p.add_argument("path", metavar="RUN", help="run folder")
    p.add_argument("--json", action="store_true", help="print the calibration document as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.*/train.* changes, as for eval")


def run_calibrate(args: argparse.Namespace) -> int:
    import json

    from resnetlab.calibration import summary
    from resnetlab.evaluate import calibrate_checkpoint

    doc = calibrate_checkpoint(args.path, args.overrides)
    print(json.dumps(doc, indent=2) if args.json else f"{summary(doc)}\nwrote {doc['file']}")
    return 0


def add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="re-make the shipped weights: train, calibrate, publish",
                       description="`zoo build [NAME ...]` trains each shipped weight's recipe (its budget "
                                   "is on its card), fits its temperature and publishes it into the "
                                   "package's weights folder (or --out). `zoo recipes` prints the commands.")
    p.add_argument("action", choices=("build", "recipes"))
    p.add_argument("names", nargs="*", metavar="NAME", help="which weights (default: all)")
    p.add_argument("--runs", default="runs/zoo", help="parent folder of the training runs (default runs/zoo)")
    p.add_argument("--out", metavar="DIR", help="write the weights here instead of the package folder")
    p.add_argument("--force", action="store_true", help="overwrite existing weights folders")


def run_zoo(args: argparse.Namespace) -> int:
    from resnetlab.weights.build import RECIPES, build
    from resnetlab.weights.zoo import FILES

    if args.action == "recipes":
        for r in RECIPES.values():
            print(f"{r.name:<26} {r.command}")
        return 0
    for folder in build(args.names, runs=args.runs, out=args.out or FILES, force=args.force):
        print(f"wrote {folder}")
    return 0


def add_lesson(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lesson", help="copy the lesson notebook (lesson.ipynb) into a folder to open it",
                       description="Copies the notebook that ships with the package to DEST (default: the "
                                   "current folder); open it with `jupyter lab lesson.ipynb` "
                                   "(pip install 'resnetlab[notebook]').")
    p.add_argument("dest", nargs="?", default=".", help="folder to copy into (default .)")
    p.add_argument("--force", action="store_true", help="overwrite an existing lesson.ipynb")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="the copy's default data source (its DATA parameter; default digits): any that "
                        "`resnetlab reproduce degradation --data` takes")


def lesson_with_data(text: str, data: str) -> str:
    """The notebook ``text`` (JSON) with its parameters cell's default ``DATA`` set to ``data``."""
    import json
    import re

    nb = json.loads(text)
    line = re.compile(r'^(DATA = os\.environ\.get\("RESNETLAB_LESSON_DATA", )"[^"]*"\)', re.M)
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            if line.search(source):
                cell["source"] = line.sub(lambda m: f'{m.group(1)}"{data}")', source).splitlines(keepends=True)
                return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    raise ValueError("lesson.ipynb has no parameters cell setting DATA")  # a packaging mistake, not user input


def run_lesson(args: argparse.Namespace) -> int:
    from importlib.resources import files
    from pathlib import Path

    src = files("resnetlab") / "notebooks" / "lesson.ipynb"
    dest = Path(args.dest).expanduser()
    target = dest / "lesson.ipynb" if dest.is_dir() or not dest.suffix else dest
    if target.exists() and not args.force:
        print(f"resnetlab lesson: error: {target} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    text = src.read_bytes().decode("utf-8")
    if args.data is not None:
        from resnetlab.analysis.degradation import data_choices

        if args.data not in data_choices():
            print(f"resnetlab lesson: error: --data must be one of {', '.join(data_choices())}, got {args.data!r}",
                  file=sys.stderr)
            return 2
        text = lesson_with_data(text, args.data)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text.encode("utf-8"))
    print(f"wrote {target}; open it with `jupyter lab {target}` (pip install 'resnetlab[notebook]')")
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "weights": (add_weights, run_weights),
    "publish": (add_publish, run_publish),
    "calibrate": (add_calibrate, run_calibrate),
    "zoo": (add_zoo, run_zoo),
    "lesson": (add_lesson, run_lesson),
}
