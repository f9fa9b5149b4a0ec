"""Using a trained run: eval, predict, explain, export and import."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from resnetlab.cli.serve import add_backend_options


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, top-1/top-5 error, per-class accuracy/precision/recall/F1, confusion matrix",
                       description="Evaluate a run (or checkpoint) on its own data, rebuilt from the "
                                   "stored config. Writes eval-SPLIT.json, confusion-SPLIT.json and "
                                   "confusion-SPLIT.png in the run folder (or beside the checkpoint).")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder (best.pt, else last.pt), checkpoint file, or latest (the newest run in runs/)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which held-out split (default val)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", metavar="DIR", help="write the report files here instead of the run folder "
                                                "(for read-only runs)")
    p.add_argument("--tta", choices=("flip",), help="also report top-1 with horizontal-flip test-time "
                                                     "augmentation (mean softmax of the image and its mirror)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",  # default: optional in usage
                   help="data.*/train.* changes to the stored config, e.g. data.root=~/data/x train.device=cpu")


def run_eval(args: argparse.Namespace) -> int:
    import json

    from resnetlab.evaluate import evaluate_checkpoint, format_report
    from resnetlab.inference import NonFiniteOutputError

    try:
        report = evaluate_checkpoint(args.path, args.split, args.overrides, out_dir=args.out, tta=args.tta)
    except NonFiniteOutputError as e:
        return _non_finite(args, e, {"source": str(args.path), "split": args.split, "metrics": None})
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _non_finite(args: argparse.Namespace, err: Exception, doc: dict) -> int:
    """A diverged checkpoint: one line on stderr, exit 2; with --json also a valid JSON document
    on stdout (``null`` results and an ``error`` field, never a bare NaN)."""
    import json

    if args.json:
        print(json.dumps({**doc, "error": str(err)}, indent=2, allow_nan=False))
    print(f"resnetlab {args.command}: error: {err}", file=sys.stderr)
    return 2


def _report_errors(command: str, errors: list[tuple[str, str]]) -> int:
    """One stderr line per input that failed (names escaped: no forged lines); exit 1 if any."""
    from resnetlab.outputs import printable

    for file, reason in errors:
        print(f"resnetlab {command}: error: {printable(file)}: {printable(reason)}", file=sys.stderr)
    return 1 if errors else 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes and probabilities for image files or folders",
                       description="Predict with the run's own preprocessing. Unreadable files are "
                                   "named on stderr and the others still predicted; the exit code is "
                                   "then 1 (0 when every file was predicted).")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder, checkpoint file, or latest (the newest run in runs/)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders searched recursively")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="grey runs (digits: light ink on dark) learned one polarity; auto reads it from "
                        "the image border and inverts dark-on-light images (default auto)")
    add_backend_options(p)


def run_predict(args: argparse.Namespace) -> int:
    import json

    from resnetlab.inference import NonFiniteOutputError
    from resnetlab.predict import format_predictions, predict

    if sys.stdout is None:  # started with stdout closed (`>&-`): print() would drop every line
        print("resnetlab predict: error: standard output is closed, so no prediction could be shown; "
              "send it to a file (> predictions.txt) or a pipe", file=sys.stderr)
        return 1
    try:
        result = predict(args.path, args.inputs, topk=args.topk, device=args.device, invert=args.invert,
                         centre=args.centre, backend=args.backend, model_file=args.model_file)
    except NonFiniteOutputError as e:
        return _non_finite(args, e, {"predictions": None})
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.predictions:
        print(format_predictions(result))
    sys.stdout.flush()  # a full disk or a closed pipe shows here, inside the error handling
    return _report_errors("predict", result.errors)


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmaps: where the network looked, per image",
                       description="Per image: top-k classes and a Grad-CAM overlay PNG (Captum's "
                                   "LayerGradCam on the last stage), with the run's own preprocessing. "
                                   "Writes OUT/<name>.cam.png and OUT/explain.json.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder, checkpoint file, or latest (the newest run in runs/)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders searched recursively")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/explain)")
    p.add_argument("--target", metavar="CLASS",
                   help="class name or id to explain (default: each image's top class)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")


def run_explain(args: argparse.Namespace) -> int:
    from resnetlab.explain import explain
    from resnetlab.outputs import printable

    result = explain(args.path, args.inputs, out=args.out, target=args.target, topk=args.topk,
                     device=args.device)
    for e, png in zip(result.explanations, result.written, strict=True):
        top = " | ".join(f"{c} {q:.3f}" for c, q in zip(e.classes, e.probs, strict=True))
        print(printable(f"{e.file}: {top} -> {png} (Grad-CAM of {e.target_class})"))
    if result.summary is not None:
        print(f"wrote {len(result.written)} overlays and {result.summary}")
    return _report_errors("explain", result.errors)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="safetensors / TorchScript / ONNX, checked against PyTorch",
                       description="Export a run (or checkpoint) plus OUTPUT.json metadata. The export "
                                   "is run on random inputs and compared with the PyTorch model; above "
                                   "1e-4 nothing is written and the exit code is 1.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder, checkpoint file, or latest (the newest run in runs/)")
    p.add_argument("--format", dest="fmt", required=True,  # dest: export_model's parameter
                   choices=("safetensors", "torchscript", "onnx"))
    p.add_argument("--output", metavar="PATH", help="model file (default: <run>/<arch>.<ext>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output (never a "
                                                        "run's checkpoint)")


def run_export(args: argparse.Namespace) -> int:
    from resnetlab.export import ExportError, export_model
    from resnetlab.params import for_cli

    try:
        res = export_model(args.path, args.fmt, args.output, force=args.force)
    except ExportError as e:
        print(f"resnetlab export: error: {for_cli(e, args._flags)}", file=sys.stderr)
        return 1
    print(f"wrote {res.path} and {res.metadata_path.name} | max |{res.format} - pytorch| = "
          f"{res.max_abs_diff:.2e} (limit {res.metadata['tolerance']:.0e})")
    return 0


def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="int8 post-training quantization (onnxruntime) with a top-1/size/latency report",
                       description="Quantize a run's exported ONNX model to int8 with onnxruntime (exported "
                                   "first if missing), calibrated on N training images, and compare fp32 "
                                   "and int8: top-1 on the test split, file size, latency at batch 1 and 64. "
                                   "Writes <run>/<arch>.int8.onnx and its .json report; serve it with "
                                   "resnetlab serve RUN --backend onnxruntime --model-file FILE.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("--method", choices=("static", "dynamic"), default="static",
                   help="static: activation ranges calibrated on training images, int8 convolutions "
                        "(default); dynamic: weights only, ranges measured per batch")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training images to calibrate on (static; default 256)")
    p.add_argument("--output", metavar="PATH", help="int8 model file (default <run>/<arch>.int8.onnx)")
    p.add_argument("--threads", type=int, help="CPU threads for the latency measurement (default: torch's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data.* changes to the stored config for reading the images, e.g. data.root=~/data/x")


def run_quantize(args: argparse.Namespace) -> int:
    from resnetlab.quantize import format_report, quantize_run

    report = quantize_run(args.path, args.method, args.calibration, args.output, force=args.force,
                          threads=args.threads, overrides=args.overrides)
    print(format_report(report))
    return 0


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn torchvision weights on disk into a resnetlab checkpoint",
                       description="Wrap a torchvision state dict (torch.save(model.state_dict())) in a "
                                   "checkpoint with config and ImageNet-style data meta (resize 256, crop "
                                   "224, ImageNet mean/std) that eval, predict and export accept.")
    p.add_argument("source", choices=("torchvision",), help="where the weights come from")
    p.add_argument("file", metavar="FILE.pth", help="the state dict file (.pth, .bin or .safetensors), or a "
                                                    "timm / Hugging Face folder")
    p.add_argument("--arch", required=True, help="registry name, e.g. resnet50")
    p.add_argument("--classes", metavar="FILE", help="class names, one per line (default: the source's "
                                                      "own: a config.json beside FILE, torchvision's ImageNet "
                                                      "categories for 1000 classes; else 0..k-1)")
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


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "eval": (add_eval, run_eval),
    "predict": (add_predict, run_predict),
    "explain": (add_explain, run_explain),
    "export": (add_export, run_export),
    "quantize": (add_quantize, run_quantize),
    "import": (add_import, run_import),
}
