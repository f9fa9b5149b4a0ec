"""Case (f): DDP with 2 processes vs 1 process, training images/s of ``resnetlab train``.

Both sides are real runs of the command line on the same CIFAR-format files (random images):
one ``python -m resnetlab train`` process, and ``torchrun --standalone --nproc-per-node=2 -m
resnetlab train`` (gloo on CPU, NCCL on CUDA), with the same *global* batch, so the two
processes each take half of every batch. images/s is the all-ranks figure fit() writes to
``metrics.jsonl`` for every epoch after the first (which is warm-up).

On CPU the cores are split, not added: the single process uses every core, each of the two
uses half (``train.threads`` and ``OMP_NUM_THREADS``), so the ratio shows what DDP costs or
gains on the same machine. On CUDA the two processes need two GPUs; with one the case is
skipped and says so.

    python -m benchmarks.bench_ddp [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    REPO_ROOT,
    amp_for,
    describe_machine,
    fmt_rate,
    fmt_ratio,
    machine_info,
    pick_device,
    usable_cores,
    write_json,
)


@dataclass(frozen=True)
class DDPPlan:
    model: str
    batch: int  # global: all processes together
    steps: int  # per epoch
    epochs: int  # the first is warm-up
    rounds: int  # launches per side, alternating


PLANS = {
    ("cpu", True): DDPPlan("resnet20", 128, 6, 2, 1),
    ("cpu", False): DDPPlan("resnet20", 128, 24, 3, 2),
    ("cuda", True): DDPPlan("resnet20", 512, 40, 2, 1),
    ("cuda", False): DDPPlan("resnet56", 512, 80, 3, 2),
}
TIMEOUT_S = 1800


def launch(nproc: int, plan: DDPPlan, data_root: Path, runs: Path, name: str, device: torch.device,
           threads: int) -> list[float]:
    """One training run; images/s of each epoch after the first."""
    overrides = [
        f"model.name={plan.model}", "data.name=cifar10", f"data.root={data_root}", "data.val_fraction=0.1",
        f"train.batch_size={plan.batch}", f"train.epochs={plan.epochs}", f"train.eval_every={plan.epochs}",
        f"train.device={device.type}", f"train.amp={amp_for(device)}", "train.test_at_end=false",
        "train.quiet=true", "train.tensorboard=false", "optim.lr=0.01", "optim.schedule=constant",
        "optim.warmup=none", f"run.root={runs}", f"run.name={name}",
    ]
    if device.type == "cpu":
        overrides.append(f"train.threads={threads}")
    py = [sys.executable, "-m"]
    cmd = [*py, "resnetlab", "train", *overrides] if nproc == 1 else \
        [*py, "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "resnetlab",
         "train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed ({proc.returncode}): {' '.join(cmd[:8])} ...\n"
                           f"{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows[1:]]


def run(quick: bool = False, device: str = "auto", write: bool = True) -> dict[str, Any]:
    """Case (f); writes ``results/f.json``."""
    from benchmarks.bench_train import write_fake_cifar

    dev = pick_device(device)
    machine = machine_info(dev)
    print(f"[bench_ddp] {describe_machine(machine)}", flush=True)
    plan = PLANS[("cuda" if dev.type == "cuda" else "cpu", quick)]
    payload: dict[str, Any] = {"case": "f", "title": "DDP 2 processes vs 1 process, images/s",
                               "machine": machine, "quick": quick, "plan": asdict(plan),
                               "target": None, "results": []}
    if dev.type == "cuda" and torch.cuda.device_count() < 2:
        payload["skipped"] = f"needs 2 GPUs for 2 NCCL processes, found {torch.cuda.device_count()}"
        print(f"[f] skipped: {payload['skipped']}", flush=True)
        if write:
            write_json("f", payload)
        return payload
    cores = usable_cores()
    threads = {1: cores, 2: max(1, cores // 2)}
    rates: dict[int, list[float]] = {1: [], 2: []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resnetlab-ddp-") as tmp:
        root = write_fake_cifar(Path(tmp) / "cifar", int(plan.steps * plan.batch / 0.9) + plan.batch // 2)
        for r in range(plan.rounds):
            for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                rates[nproc] += launch(nproc, plan, root, Path(tmp) / "runs", f"p{nproc}-r{r}", dev,
                                       threads[nproc])
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    payload["results"] = [{
        "model": plan.model, "global_batch": plan.batch, "threads_per_process": threads if dev.type == "cpu" else None,
        "one_process": {"images_per_s": one, "epochs": [round(x, 2) for x in rates[1]]},
        "two_processes": {"images_per_s": two, "epochs": [round(x, 2) for x in rates[2]]},
        "ratio": two / one,
    }]
    print(f"[f] {plan.model}: 2 processes {fmt_rate(two)} img/s vs 1 process {fmt_rate(one)} -> "
          f"{two / one:.2f}x ({time.perf_counter() - t0:.0f}s)", flush=True)
    if write:
        write_json("f", payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short launch per side")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    args = p.parse_args(argv)
    payload = run(args.quick, args.device)
    for r in payload["results"]:
        print(f"{r['model']}: 1 process {fmt_rate(r['one_process']['images_per_s'])} img/s, "
              f"2 processes {fmt_rate(r['two_processes']['images_per_s'])} img/s, ratio {fmt_ratio(r['ratio'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
