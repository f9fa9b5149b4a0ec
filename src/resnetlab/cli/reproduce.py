"""`resnetlab reproduce EXPERIMENT`: the paper's experiments, one (add, run) pair per experiment
in the :data:`REPRODUCE` table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from resnetlab.data.sources import source_names


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="experiments: degradation (Fig. 6), cifar-table (Table 6), landscape, "
                                         "responses (Fig. 7), transfer (fine-tuning), fashion-table",
                       description="Reproduce an experiment of He et al. 2015.")
    exp = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    sources = source_names(split_folders=False)  # --data choices: the registry's labelled sets
    for add, _ in REPRODUCE.values():
        add(exp, sources)


def _add_degradation(exp: argparse._SubParsersAction, sources: list[str]) -> None:
    d = exp.add_parser("degradation", help="plain vs residual nets: figure + table of final errors",
                       description="Train plain<d> and resnet<d> with one recipe and the same seeds; "
                                   "write runs/degradation-<data>-<time>/ with degradation.png (Figure 6 "
                                   "style), table.md, table.csv; print the table.")
    d.add_argument("--data", default="digits", choices=sources,
                   help="data source (cifar: pass data.root=DIR; a subset: data.train_per_class=N)")
    d.add_argument("--depths", default="20,56", help="depths with a plain and a resnet twin (default 20,56)")
    d.add_argument("--seeds", default="0,1,2", help="seeds per net (default 0,1,2)")
    d.add_argument("--epochs", type=int, help="epochs per run (default 20 on digits, 164 on CIFAR)")
    d.add_argument("--jobs", type=int, help="worker processes (default 2 single-thread ones on CPU, 1 on GPU)")
    d.add_argument("--extra-models", metavar="NAME,...",
                   help="other registered nets trained with the same recipe and seeds (e.g. densenet_bc100, "
                        "lesson_resnet18); in the table and in depth.png at their weighted depth")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. optim.lr=0.05")


def _add_landscape(exp: argparse._SubParsersAction, sources: list[str]) -> None:
    ls = exp.add_parser("landscape", help="loss landscapes of plain56 and resnet56 on digits, side by side",
                        description="Train the models on digits (degradation recipe, one seed), then draw "
                                    "their loss landscapes along the same kind of filter-normalised random "
                                    "directions on the same contour levels; print the roughness numbers. "
                                    "Writes runs/landscape-digits-<time>/landscape.png, landscape.csv, "
                                    "roughness.md, roughness.csv.")
    ls.add_argument("--models", default="plain56,resnet56", help="registry names (default plain56,resnet56)")
    ls.add_argument("--epochs", type=int, default=10, help="training epochs per net (default 10)")
    ls.add_argument("--seed", type=int, default=0, help="training seed and direction seed (default 0)")
    ls.add_argument("--data", default="digits", choices=sources, help="data source (default digits)")
    landscape_options(ls, images=128)
    ls.add_argument("--jobs", type=int, help="training worker processes (default 2 on CPU)")
    ls.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every training run")


def _add_responses(exp: argparse._SubParsersAction, sources: list[str]) -> None:
    rs = exp.add_parser("responses", help="layer responses (Fig. 7) of plain20/56, resnet20/56/110 on digits",
                        description="Train the models on digits (degradation recipe, one seed), then write "
                                    "the std of every 3x3 layer's response on the test split: "
                                    "runs/responses-digits-<time>/responses.png, responses.csv, summary.md.")
    rs.add_argument("--models", default="plain20,plain56,resnet20,resnet56,resnet110",
                    help="registry names (default plain20,plain56,resnet20,resnet56,resnet110)")
    rs.add_argument("--epochs", type=int, default=10, help="training epochs per net (default 10)")
    rs.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    rs.add_argument("--data", default="digits", choices=sources, help="data source (default digits)")
    rs.add_argument("--jobs", type=int, help="training worker processes (default 2 on CPU)")
    rs.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every training run")


def _add_transfer(exp: argparse._SubParsersAction, sources: list[str]) -> None:
    t = exp.add_parser("transfer", help="pretrain on digits 0-4, then learn 5-9 from N images per class four ways",
                       description="Pretrain resnet20 on digits 0-4 (one net per seed), then train on digits "
                                   "5-9 with N labelled images per class: from scratch, linear probe, full "
                                   "fine-tune, stem frozen. Writes runs/transfer-digits-<time>/ with table.md, "
                                   "table.csv, transfer.png; prints the table.")
    t.add_argument("--n", dest="ns", metavar="N", default="5,10,20,50", help="labelled images per class (default 5,10,20,50)")
    t.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    t.add_argument("--ways", default="scratch,probe,finetune,stem-frozen", help="which ways (default all four)")
    t.add_argument("--steps", type=int, default=100, help="optimiser steps per fine-tuning run (default 100)")
    t.add_argument("--pretrain-epochs", type=int, default=30, help="epochs of pretraining (default 30)")
    t.add_argument("--source", default="digits", choices=sources,
                   help="pretraining data (default digits: classes 0-4; another source: all its classes)")
    t.add_argument("--target", default="digits", choices=sources,
                   help="fine-tuning data (default digits: classes 5-9 when --source is digits, else all)")
    t.add_argument("--pretrain-images", type=int, metavar="N", help="pretrain on a seeded draw of N images")
    t.add_argument("--jobs", type=int, help="worker processes (default 2 single-thread ones on CPU, 1 on GPU)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. run.root=out")


def _add_cifar_table(exp: argparse._SubParsersAction, sources: list[str]) -> None:
    c = exp.add_parser("cifar-table", help="Table 6: resnet20..110 on local CIFAR-10, ours vs the paper's",
                       description="Train the packaged recipes cifar10_resnet{20,32,44,56,110} on local CIFAR-10 "
                                   "files and print our test error next to the paper's. For GPUs: prints "
                                   "its estimated time first; on CPU it trains only with --yes.")
    c.add_argument("--depths", default="20,32,44,56,110", help="which of Table 6's nets (default all five)")
    c.add_argument("--seeds", default="0", help="seeds per net (default 0)")
    c.add_argument("--yes", action="store_true", help="train even on a CPU")
    c.add_argument("--configs", dest="configs_dir", metavar="DIR", help="folder with cifar10_resnet<d>.yaml (default: the packaged recipes)")
    c.add_argument("--estimate-steps", type=int, default=5, help="optimiser steps timed per net (default 5)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=~/data/cifar10")


def _add_fashion_table(exp: argparse._SubParsersAction, sources: list[str]) -> None:
    f = exp.add_parser("fashion-table", help="resnet20/56/110, plain twins, densenet_bc100, lesson_resnet18 on "
                                             "Fashion-MNIST beside the published leaderboard",
                       description="Train each net with its packaged recipe fashion_mnist_<net> (plain twins with "
                                   "their resnet's) once per seed; write runs/fashion-table-<time>/ with table.md, "
                                   "table.csv (test accuracy mean ± std, parameters, epochs, wall time, beside the "
                                   "published rows, marked), fashion-table.png; print the table.")
    f.add_argument("--models", help="comma-separated subset of resnet20,plain20,resnet56,plain56,resnet110,"
                                    "plain110,densenet_bc100,lesson_resnet18 (default all)")
    f.add_argument("--epochs", type=int, help="epochs per run (default: each recipe's)")
    f.add_argument("--seeds", default="0", help="seeds per net (default 0)")
    f.add_argument("--train-images", type=int, metavar="N",
                   help="train on a seeded draw of N training images, N/10 per class (default all 54,000)")
    f.add_argument("--jobs", type=int, help="worker processes (default 2 single-thread ones on CPU, 1 on GPU)")
    f.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every run, e.g. data.root=DIR run.root=out")


def _reproduce_landscape(args: argparse.Namespace) -> int:
    from resnetlab.analysis.landscape import reproduce_landscape

    res = reproduce_landscape(args.models, epochs=args.epochs, seed=args.seed, data=args.data, grid=args.grid,
                              span=args.span, dims=args.dims, images=args.images, bn=args.bn,
                              chunk=args.chunk, hessian_iters=args.hessian_iters,
                              overrides=args.overrides, jobs=args.jobs, on_progress=print)
    print(res.markdown)
    print(" | ".join(str(f) for f in res.files))
    return 0


def _reproduce_responses(args: argparse.Namespace) -> int:
    from resnetlab.analysis.responses import reproduce_responses

    rr = reproduce_responses(args.models, epochs=args.epochs, seed=args.seed, data=args.data,
                             overrides=args.overrides, jobs=args.jobs)
    print(rr.responses.markdown)
    print("final training error (%): " + ", ".join(f"{m} {e:.2f}" for m, e in rr.train_err.items()))
    print(" | ".join(str(f) for f in rr.responses.files))
    return 0


def _reproduce_degradation(args: argparse.Namespace) -> int:
    from resnetlab.analysis import run_degradation

    deg = run_degradation(args.data, args.depths, args.seeds, args.epochs, args.overrides, args.jobs,
                          extra_models=args.extra_models)
    print(deg.markdown)
    print(f"{deg.figure} | {deg.out_dir / 'depth.png'} | {deg.out_dir / 'table.md'} | "
          f"{deg.out_dir / 'table.csv'} | {deg.seconds:.0f} s")
    return deg.exit_code


def _reproduce_transfer(args: argparse.Namespace) -> int:
    from resnetlab.analysis.transfer import run_transfer

    tr = run_transfer(args.ns, args.seeds, args.ways, steps=args.steps, pretrain_epochs=args.pretrain_epochs,
                      overrides=args.overrides, jobs=args.jobs, source=args.source, target=args.target,
                      pretrain_images=args.pretrain_images)
    print(tr.markdown)
    print(f"{tr.figure} | {tr.out_dir / 'table.md'} | {tr.out_dir / 'table.csv'} | {tr.seconds:.0f} s")
    return tr.exit_code


def _reproduce_cifar_table(args: argparse.Namespace) -> int:
    from resnetlab.analysis import run_cifar_table

    table = run_cifar_table(args.depths, args.seeds, args.overrides, yes=args.yes, configs_dir=args.configs_dir,
                            estimate_steps=args.estimate_steps, on_estimate=print)
    if not table.ran:
        print("resnetlab reproduce cifar-table: this is meant for a GPU; on this CPU it would take the "
              "time above. Add --yes to train anyway.", file=sys.stderr)
        return 1
    print(table.markdown)
    print(f"{table.out_dir / 'table.md'} | {table.out_dir / 'table.csv'}")
    return 0


def _reproduce_fashion_table(args: argparse.Namespace) -> int:
    from resnetlab.analysis.fashion_table import run_fashion_table

    ft = run_fashion_table(args.models, args.seeds, args.epochs, args.train_images, args.overrides,
                           args.jobs, on_progress=print)
    print(ft.markdown)
    print(f"{ft.figure} | {ft.out_dir / 'table.md'} | {ft.out_dir / 'table.csv'} | {ft.seconds:.0f} s")
    return ft.exit_code


# `reproduce EXPERIMENT`: the experiment's name -> (declare its arguments, run it and print its
# result); `resnetlab reproduce --help` lists them in this order
REPRODUCE: dict[str, tuple[Callable[[argparse._SubParsersAction, list[str]], None],
                           Callable[[argparse.Namespace], int]]] = {
    "degradation": (_add_degradation, _reproduce_degradation),
    "landscape": (_add_landscape, _reproduce_landscape),
    "responses": (_add_responses, _reproduce_responses),
    "transfer": (_add_transfer, _reproduce_transfer),
    "cifar-table": (_add_cifar_table, _reproduce_cifar_table),
    "fashion-table": (_add_fashion_table, _reproduce_fashion_table),
}


def run_reproduce(args: argparse.Namespace) -> int:
    return REPRODUCE[args.experiment][1](args)


def landscape_options(p: argparse.ArgumentParser, images: int = 256) -> None:
    """The loss-landscape options `landscape` and `reproduce landscape` share."""
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


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "reproduce": (add_reproduce, run_reproduce),
}
