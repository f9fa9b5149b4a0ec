"""resnet50 inference, side by side: resnetlab's fused fast path vs torchvision's eager model.

- ``resnetlab fused``: ``create_model("resnet50")`` through ``fuse_for_inference`` (every
  BatchNorm folded into its convolution, channels_last weights) fed channels_last images, as
  ``eval`` and ``predict`` run it.
- ``torchvision eager``: ``torchvision.models.resnet50()`` in eval mode, NCHW images.

Both hold the same weights (torchvision's state dict loads unchanged), and their logits are
compared before timing. Batch-1 latency (median ms per forward) and batch-64 throughput
(images/s, from the median forward) at 224x224 float32 under ``torch.inference_mode``;
repetitions alternate between the two models so both see the same machine load.

    python -m benchmarks.bench_inference            # full: ~2-3 min on 2 CPU cores
    python -m benchmarks.bench_inference --quick    # one timed batch-64 pass each
    python -m benchmarks.bench_inference --threads 1  # steadier on a machine shared with other jobs

Writes ``benchmarks/results/inference.json`` and prints a ratio table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import resnetlab
from resnetlab.engine.checkpoint import atomic_write
from resnetlab.models import create_model, fuse_for_inference

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
IMAGE_SIZE = 224  # pixels, ImageNet evaluation crop
CASES = {  # batch -> (warm-up forwards, timed forwards per model), full and quick
    1: {"full": (3, 20), "quick": (2, 5)},
    64: {"full": (1, 3), "quick": (1, 1)},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Seconds for one forward pass, the device work included."""
    _sync(device)
    t0 = time.perf_counter()
    model(x)
    _sync(device)
    return time.perf_counter() - t0


def build_pair(device: torch.device) -> tuple[nn.Module, nn.Module, float]:
    """(torchvision eager, resnetlab fused) with the same weights, and their max |logit diff|."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    ours = create_model("resnet50")
    ours.load_state_dict(tv.state_dict(), strict=True)  # same parameter names
    fused = fuse_for_inference(ours.eval())
    tv, fused = tv.to(device), fused.to(device)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)  # [b, c, h, w]
    with torch.inference_mode():
        diff = (fused(x.contiguous(memory_format=torch.channels_last)) - tv(x)).abs().max().item()
    return tv, fused, diff


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Measure both models at batch 1 and batch 64; return (and write) the results dict.

    ``device``: a torch device string, default cuda when available, else cpu. ``threads``: CPU
    intra-op threads for the run (default: torch's, one per core). On a machine shared with
    other jobs, 1 thread gives steadier numbers: OpenMP threads that wait on a busy core stall.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(quick, dev)
    finally:
        torch.set_num_threads(old_threads)


def _measure(quick: bool, dev: torch.device) -> dict[str, Any]:
    tv, fused, diff = build_pair(dev)
    models: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {
        "torchvision_eager": (tv, lambda x: x.contiguous()),  # NCHW, torchvision's default
        "resnetlab_fused": (fused, lambda x: x.contiguous(memory_format=torch.channels_last)),
    }
    rows = []
    for batch, plans in CASES.items():
        warmup, reps = plans["quick" if quick else "full"]
        base = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=dev)  # [b, 3, 224, 224]
        inputs = {name: layout(base) for name, (_, layout) in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for name, (model, _) in models.items():
                for _ in range(warmup):
                    _time_forward(model, inputs[name], dev)
            for r in range(reps):  # alternate the order so neither always runs second
                order = list(models) if r % 2 == 0 else list(reversed(models))
                for name in order:
                    times[name].append(_time_forward(models[name][0], inputs[name], dev))
        row: dict[str, Any] = {"batch": batch, "reps": reps}
        for name, ts in times.items():
            median = statistics.median(ts)  # seconds per forward
            row[name] = {"median_ms": 1e3 * median, "min_ms": 1e3 * min(ts), "images_per_s": batch / median}
        row["speedup"] = row["torchvision_eager"]["median_ms"] / row["resnetlab_fused"]["median_ms"]
        rows.append(row)

    result = {
        "benchmark": "inference",
        "model": "resnet50",
        "image_size": IMAGE_SIZE,
        "dtype": "float32",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "resnetlab": resnetlab.__version__,
        "max_abs_logit_diff": diff,
        "results": rows,
    }
    text = json.dumps(result, indent=2)
    atomic_write(RESULTS, lambda f: f.write(text.encode()))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Batch-1 latency and batch-64 throughput side by side, with the ratio."""
    head = (f"{result['model']} inference, {result['dtype']} {result['image_size']}x{result['image_size']}, "
            f"{result['device']} ({result['threads']} threads), max |logit diff| {result['max_abs_logit_diff']:.1e}")
    lines = [head, f"{'case':<22}{'torchvision eager':>19}{'resnetlab fused':>17}{'fused speed-up':>16}"]
    for row in result["results"]:
        tv, ours = row["torchvision_eager"], row["resnetlab_fused"]
        if row["batch"] == 1:
            lines.append(f"{'batch 1 latency, ms':<22}{tv['median_ms']:>19.1f}{ours['median_ms']:>17.1f}"
                         f"{row['speedup']:>15.2f}x")
        else:
            case = f"batch {row['batch']} images/s"
            lines.append(f"{case:<22}{tv['images_per_s']:>19.1f}{ours['images_per_s']:>17.1f}"
                         f"{row['speedup']:>15.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, device=args.device, threads=args.threads)
    print(format_table(result))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
