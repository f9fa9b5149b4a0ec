"""Analyses of trained runs: gradients, plot, landscape and responses (`reproduce` is in
:mod:`resnetlab.cli.reproduce`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from resnetlab.cli.reproduce import landscape_options
from resnetlab.data.sources import source_names


def add_gradients(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gradients", help="gradient norm per layer at init and after K steps (plain vs resnet)",
                       description="Gradient L2 norm of every conv weight and every block output, at "
                                   "initialisation and after K training steps; writes gradients.csv and "
                                   "gradients.png (log scale) to runs/gradients-<data>-<time>/ and prints "
                                   "the first-block / last-block ratio per model.")
    p.add_argument("--models", default="plain20,plain56,resnet20,resnet56", help="comma-separated registry names")
    p.add_argument("--data", default="digits", choices=source_names(split_folders=False))
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
    landscape_options(p)


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


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "gradients": (add_gradients, run_gradients),
    "plot": (add_plot, run_plot),
    "landscape": (add_landscape, run_landscape),
    "responses": (add_responses, run_responses),
}
