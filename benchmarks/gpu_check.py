"""The one-shot GPU check: what a session with a lent GPU runs once (``benchmarks/gpu_check.sh``).

On one CUDA device, in one process, in under ~8 minutes on an H200:

1. **throughput** — resnet50 at 224 px and resnet20 at 32 px on synthetic data already on the
   device; fp32, bf16 and fp16 AMP; eager and ``torch.compile``; channels_last. For each setting,
   images/s of resnetlab's step (``train_one_epoch`` with its meter, EMA off, fused SGD) and of the
   idiomatic torchvision loop side by side, timed in alternating windows with a sync at each
   window's edges only, and the peak memory of a step after warm-up (optimiser state included).
2. **ddp** — a 1-process DistributedDataParallel run over NCCL (a few steps, plus the
   collectives fit() uses: all-reduce of the step flags, all-gather of random states).
3. **sync** — 20 steps of ``fit()`` under ``torch.cuda.set_sync_debug_mode("error")`` with the
   host-sync entry points (``.item()``, ``.tolist()``, ``.cpu()``, ``torch.tensor``) trapped: it
   must report no synchronisation.

Settings that do not fit the time budget are listed as "not run (budget)", never dropped. On a
machine without CUDA the script says so and exits 2; ``--dry-run`` exercises every code path on
the CPU with tiny shapes (gloo instead of NCCL, torch.compile with the "eager" backend), so the
first real run does not fail on a typo.

    bash benchmarks/gpu_check.sh              # on the GPU machine; writes benchmarks/results/gpu-*.json
    bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same code paths, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS_DIR, Window, machine_info, peak_memory_after_warmup

NUM_CLASSES = 1000
NO_CUDA_EXIT = 2  # no CUDA device and no --dry-run: nothing was measured


@dataclass(frozen=True)
class Case:
    model: str
    image: int  # pixels, square
    batch: int
    amp: str  # "none" (fp32), "bf16", "fp16"
    compile: bool

    @property
    def label(self) -> str:
        precision = {"none": "fp32", "bf16": "bf16 AMP", "fp16": "fp16 AMP"}[self.amp]
        return f"{self.model} {self.image}px b{self.batch} {precision}{' compiled' if self.compile else ''}"


@dataclass(frozen=True)
class Plan:
    models: tuple[tuple[str, int, int], ...]  # (name, image px, batch)
    warmup: int  # untimed steps per contender (compile happens here)
    steps: int  # steps per timed window
    rounds: int  # windows per contender, alternating
    sync_steps: int  # steps checked under the sync debug mode
    budget_s: float  # throughput settings start only while the budget lasts
    compile_backend: str
    compiled_settings: int | None = None  # compiled settings to run (None = all); the rest are listed


GPU_PLAN = Plan((("resnet50", 224, 256), ("resnet20", 32, 512)), warmup=8, steps=20, rounds=3,
                sync_steps=20, budget_s=330.0, compile_backend="inductor")
# The dry run: every model and precision eagerly, one compiled setting (the same code path as
# the others; dynamo's tracing alone costs tens of seconds per setting on a CPU).
DRY_PLAN = Plan((("resnet50", 32, 2), ("resnet20", 16, 2)), warmup=1, steps=1, rounds=1,
                sync_steps=3, budget_s=600.0, compile_backend="eager", compiled_settings=1)


def cases(plan: Plan) -> list[Case]:
    """Eager settings first (cheap), then compiled ones (each compiles twice: ours, reference)."""
    eager = [Case(m, px, b, amp, False) for m, px, b in plan.models for amp in ("none", "bf16", "fp16")]
    compiled = [Case(m, px, b, amp, True) for amp in ("bf16", "fp16", "none") for m, px, b in plan.models[::-1]]
    return eager + compiled


# ----------------------------------------------------------------------------------------------
# 1. throughput: resnetlab's step vs the idiomatic torchvision loop


class _DeviceBatches:
    """A loader for ``train_one_epoch``: the same device batch, ``n`` times per epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(start_batch, self.n):
            yield self.x, self.y


def _batch(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.batch, 3, case.image, case.image, generator=g)
    y = torch.randint(0, NUM_CLASSES, (case.batch,), generator=g)
    return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)


def resnetlab_contender(case: Case, device: torch.device, plan: Plan) -> Callable[[int], None]:
    """``run(n)``: n optimiser steps through resnetlab's ``train_one_epoch``."""
    from resnetlab.config import OptimConfig
    from resnetlab.engine.loop import train_one_epoch
    from resnetlab.engine.metrics import SumMeter
    from resnetlab.engine.optim import build_optimizer
    from resnetlab.models import create_model

    model = create_model(case.model, num_classes=NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model, backend=plan.compile_backend) if case.compile else model
    opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=5e-5))
    scaler = torch.amp.GradScaler(device.type) if case.amp == "fp16" else None
    x, y = _batch(case, device)
    meter, criterion = SumMeter(device), nn.CrossEntropyLoss()
    step = [0]

    def run(n: int) -> None:
        out = train_one_epoch(net, _DeviceBatches(x, y, n), opt, criterion, epoch=0, start_batch=0,
                              step=step[0], lr_fn=lambda s: 0.01, meter=meter, amp=case.amp, scaler=scaler)
        step[0] = out["step"]

    return run


def reference_contender(case: Case, device: torch.device, plan: Plan) -> Callable[[int], None]:
    """``run(n)``: the loop a PyTorch user writes: torchvision's model, SGD, autocast, GradScaler."""
    import torchvision

    if case.model == "resnet20":
        from benchmarks.bench_train import CifarResNet

        model: nn.Module = CifarResNet(20, NUM_CLASSES)
    else:
        model = getattr(torchvision.models, case.model)(num_classes=NUM_CLASSES)
    model = model.to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model, backend=plan.compile_backend) if case.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    scaler = torch.amp.GradScaler(device.type) if case.amp == "fp16" else None
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[case.amp]
    x, y = _batch(case, device)

    def run(n: int) -> None:
        for _ in range(n):
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()

    return run


def measure(case: Case, device: torch.device, plan: Plan) -> dict[str, Any]:
    """Images/s of both contenders in alternating windows, and each one's peak step memory."""
    contenders = {"resnetlab": resnetlab_contender(case, device, plan),
                  "torchvision": reference_contender(case, device, plan)}
    peaks: dict[str, int | None] = {}
    t0 = time.perf_counter()
    for name, run in contenders.items():  # warm-up (and compile), then one step's peak
        peaks[name] = peak_memory_after_warmup(lambda run=run: run(1), device, warmup=plan.warmup)
    warm_s = time.perf_counter() - t0
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    clock = Window(device)
    for r in range(plan.rounds):
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for name in order:
            clock.start()
            contenders[name](plan.steps)
            rates[name].append(plan.steps * case.batch / clock.stop())
    best = {name: max(v) for name, v in rates.items()}
    return {**asdict(case), "label": case.label, "images_per_s": best, "rounds": rates,
            "ratio": best["resnetlab"] / best["torchvision"], "peak_bytes": peaks,
            "warmup_seconds": warm_s}


def throughput(device: torch.device, plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    compiled = 0
    for case in cases(plan):
        if case.compile and plan.compiled_settings is not None and compiled >= plan.compiled_settings:
            rows.append({**asdict(case), "label": case.label, "status": "not run (dry run)"})
            continue
        compiled += case.compile
        if time.perf_counter() - start > plan.budget_s:
            rows.append({**asdict(case), "label": case.label, "status": "not run (budget)"})
            log(f"  {case.label}: not run (time budget of {plan.budget_s:.0f}s spent)")
            continue
        try:
            row = {**measure(case, device, plan), "status": "ok"}
            log(f"  {case.label}: resnetlab {row['images_per_s']['resnetlab']:.0f} img/s, torchvision "
                f"{row['images_per_s']['torchvision']:.0f} img/s, {row['ratio']:.2f}x")
        except Exception as e:  # noqa: BLE001 - a failing setting is reported, the others still run
            row = {**asdict(case), "label": case.label, "status": "error",
                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            log(f"  {case.label}: ERROR {type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# 2. a 1-process DDP run over NCCL (gloo in the dry run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ddp_smoke(device: torch.device, steps: int = 5, batch: int = 32) -> dict[str, Any]:
    """DDP over one process with fit()'s collectives; ``ok`` when the loss is finite and every
    collective returned what it should."""
    import torch.distributed as tdist

    from resnetlab.engine.dist import all_gather_object, all_reduce_sum
    from resnetlab.engine.optim import ModelEMA
    from resnetlab.models import create_model

    backend = "nccl" if device.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = create_model("resnet20", num_classes=10).to(device).to(memory_format=torch.channels_last)
        ids = [device.index or 0] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        ema = ModelEMA(net, 0.99)  # the wrapped model, as fit() gives it under torchrun
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device)
        for _ in range(steps):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(net)
        flags = all_reduce_sum(torch.tensor([0.0, 1.0], device=device))
        gathered = all_gather_object({"rank": 0})
        ok = bool(torch.isfinite(loss).item()) and flags.tolist() == [0.0, 1.0] and gathered == [{"rank": 0}]
        return {"backend": backend, "steps": steps, "loss": float(loss.item()), "ok": ok,
                "seconds": time.perf_counter() - t0}
    finally:
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# 3. no host synchronisation inside fit()'s steps


@contextlib.contextmanager
def trap_host_syncs(calls: list[str], armed: list[bool]) -> Iterator[None]:
    """Record (while ``armed[0]``) every call of the host-sync entry points."""
    patched = [(torch.Tensor, n) for n in ("item", "tolist", "cpu")] + [(torch, n) for n in ("tensor", "as_tensor")]
    originals = [(obj, name, getattr(obj, name)) for obj, name in patched]

    def trap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if armed[0]:
                calls.append("".join(traceback.format_stack(limit=4)[:-1]).strip().splitlines()[-1].strip()
                             + f" -> {name}")
            return original(*args, **kwargs)
        return wrapper

    for obj, name, original in originals:
        setattr(obj, name, trap(name, original))
    try:
        yield
    finally:
        for obj, name, original in originals:
            setattr(obj, name, original)


def sync_check(device: torch.device, steps: int, workdir: Path) -> dict[str, Any]:
    """fit() on digits; steps 2..steps+1 run armed: trapped calls and (CUDA) the sync debug mode."""
    import resnetlab

    calls: list[str] = []
    armed = [False]
    cuda = device.type == "cuda"
    errors: list[str] = []

    def on_step(info: dict[str, Any]) -> bool:
        armed[0] = 1 <= info["step"] <= steps  # armed through steps 2 .. steps+1
        if cuda:
            torch.cuda.set_sync_debug_mode("error" if armed[0] else "default")
        return info["step"] > steps + 1

    overrides = ["model.name=resnet20", "data.name=digits", "train.batch_size=16", "train.epochs=1",
                 f"train.device={device}", "train.sync_every=1000", "optim.ema_decay=0.99",
                 "train.quiet=true", "train.tensorboard=false", "train.test_at_end=false",
                 f"run.root={workdir}", "run.name=sync-check"]
    try:
        with trap_host_syncs(calls, armed):
            result = resnetlab.train(None, overrides, on_step=on_step)
        steps_run = result.steps
    except RuntimeError as e:  # the sync debug mode raises on the first synchronisation
        errors.append(f"{type(e).__name__}: {str(e)[:300]}")
        steps_run = None
    finally:
        armed[0] = False
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    return {"steps_checked": steps, "steps_run": steps_run, "trapped_calls": calls[:20],
            "sync_debug_errors": errors, "sync_debug_mode": "error" if cuda else "n/a (CPU)",
            "ok": not calls and not errors}


# ----------------------------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | resnetlab img/s | torchvision img/s | ratio | peak MiB (ours / ref) | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | - | - | - | - | {r.get('status')} {r.get('error', '')[:60]} |")
            continue
        ips, peak = r["images_per_s"], r["peak_bytes"]
        mib = " / ".join(f"{peak[k] / 2**20:.0f}" if peak[k] is not None else "-" for k in ("resnetlab", "torchvision"))
        lines.append(f"| {r['label']} | {ips['resnetlab']:.0f} | {ips['torchvision']:.0f} | "
                     f"{r['ratio']:.2f}x | {mib} | ok |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: exercise every code path")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where gpu-*.json goes")
    p.add_argument("--skip", default="", help="comma list of parts not to run: throughput,ddp,sync")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing measured. It needs one GPU "
              "(use --dry-run to exercise its code paths on the CPU).", file=sys.stderr)
        return NO_CUDA_EXIT
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    skip = {s for s in args.skip.split(",") if s}
    log = lambda text: print(text, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    out: dict[str, Any] = {"dry_run": args.dry_run, "machine": machine_info(device), "plan": asdict(plan),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit() does by default (train.cudnn_benchmark)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train.tf32
    with tempfile.TemporaryDirectory() as tmp:
        parts: list[tuple[str, Callable[[], Any]]] = [
            ("throughput", lambda: throughput(device, plan, log)),
            ("ddp", lambda: ddp_smoke(device, *((2, 4) if args.dry_run else (5, 32)))),
            ("sync", lambda: sync_check(device, plan.sync_steps, Path(tmp))),
        ]
        for name, fn in parts:
            if name in skip:
                out[name] = {"status": "skipped (--skip)"}
                continue
            log(f"{name} ...")
            try:
                out[name] = fn()
            except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit code
                out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]}
            if name != "throughput":
                log(f"  {json.dumps({k: v for k, v in out[name].items() if k != 'traceback'})[:400]}")
    out["seconds"] = time.perf_counter() - t0
    rows = out.get("throughput") if isinstance(out.get("throughput"), list) else []
    print("\n" + format_table(rows))
    failures = [r["label"] for r in rows if r.get("status") == "error"]
    failures += [n for n in ("ddp", "sync") if isinstance(out.get(n), dict) and out[n].get("ok") is False]
    out["failures"] = failures
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.results_dir / f"gpu-{'dryrun-' if args.dry_run else ''}{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\n{'dry run ' if args.dry_run else ''}done in {out['seconds']:.0f}s; wrote {path}; "
          f"{'failures: ' + ', '.join(failures) if failures else 'no failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
