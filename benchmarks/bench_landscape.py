"""Loss-landscape grid points per second: batched (vmap over stacked weights) vs a plain loop.

- ``batched``: :func:`resnetlab.analysis.loss_surface.landscape_batched`, ``chunk`` grid points per
  ``torch.func.vmap`` over ``functional_call``, as ``resnetlab landscape`` runs it.
- ``loop``: :func:`resnetlab.analysis.loss_surface.landscape_loop`, the straightforward reference:
  per point, ``load_state_dict`` of the perturbed weights and one forward pass.

Both evaluate the same grid on the same fixed images (digits-sized, 1x8x8, 10 classes) with the
same BN mode, and their losses are compared before timing. Rounds alternate between the two so
both see the same machine load; the ratio is the median of per-round ratios.

    python -m benchmarks.bench_landscape            # ~1-2 min on 2 CPU cores
    python -m benchmarks.bench_landscape --quick

Writes ``benchmarks/results/landscape.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import alternate, machine_info, paired_ratio, pick_device, write_json
from resnetlab.analysis.loss_surface import (
    filter_normalized_direction,
    grid_points,
    landscape_batched,
    landscape_loop,
)
from resnetlab.models import create_model

CASES = {"full": [("resnet56", 128, 8, 16), ("plain56", 128, 8, 16), ("resnet20", 256, 8, 32)],
         "quick": [("resnet56", 64, 6, 12)]}  # (model, images, grid side, chunk)
ROUNDS = {"full": 3, "quick": 1}


def run(quick: bool = False, device: str = "auto", threads: int = 1) -> dict[str, Any]:
    """Measure every case; returns the payload written to ``landscape.json``."""
    dev = pick_device(device)
    before = torch.get_num_threads()
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)  # as `resnetlab landscape` runs on CPU
    try:
        machine = machine_info(dev)
        mode = "quick" if quick else "full"
        results = [_case(*c, dev, ROUNDS[mode]) for c in CASES[mode]]
    finally:
        torch.set_num_threads(before)
    payload = {"case": "landscape", "title": "landscape grid points/s, batched (vmap) / state-dict loop",
               "machine": machine, "quick": quick, "results": results}
    write_json("landscape", payload)
    return payload


def _case(name: str, images: int, side: int, chunk: int, dev: torch.device, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1).to(dev).eval()
    x = torch.randn(images, 1, 8, 8, device=dev)
    y = torch.randint(0, 10, (images,), device=dev)
    g = torch.Generator().manual_seed(0)
    d1, d2 = filter_normalized_direction(model, g), filter_normalized_direction(model, g)
    coords = torch.linspace(-1, 1, side).tolist()
    points = grid_points(coords, coords)
    fast = landscape_batched(model, x, y, d1, d2, points[:chunk], chunk=chunk)  # warm-up + check
    slow = landscape_loop(model, x, y, d1, d2, points[:chunk])
    max_diff = float((fast[0] - slow[0]).abs().max())

    def timed(fn) -> tuple[int, float]:
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return len(points), time.perf_counter() - t0

    res = alternate({"batched": lambda: timed(lambda: landscape_batched(model, x, y, d1, d2, points,
                                                                          chunk=chunk)),
                     "loop": lambda: timed(lambda: landscape_loop(model, x, y, d1, d2, points))}, rounds)
    return {"model": name, "images": images, "grid_points": len(points), "chunk": chunk, "bn": "batch",
            "batched": {"points_per_s": res["batched"].median, "rounds": res["batched"].rates},
            "loop": {"points_per_s": res["loop"].median, "rounds": res["loop"].rates},
            "ratio": paired_ratio(res["batched"].rates, res["loop"].rates),
            "max_abs_loss_diff": max_diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_landscape", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1; 0 leaves torch's)")
    args = p.parse_args(argv)
    payload = run(args.quick, args.device, args.threads)
    for r in payload["results"]:
        print(f"{r['model']}, {r['images']} images, {r['grid_points']} points, chunk {r['chunk']}: batched "
              f"{r['batched']['points_per_s']:.2f} points/s, loop {r['loop']['points_per_s']:.2f} points/s, "
              f"ratio {r['ratio']:.2f}x (|loss diff| {r['max_abs_loss_diff']:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
