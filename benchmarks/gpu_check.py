"""The one-shot GPU check: what a session with a lent GPU runs once (``benchmarks/gpu_check.sh``).

On one CUDA device, in one process, inside 8 minutes on an H100 including compilation (the
shell script puts a ``timeout`` around the whole run; the JSON is rewritten after every part, so
a run cut short still leaves what it measured). Parts, in this order:

1. **sync** — ``fit()`` with *default* settings (progress bar and TensorBoard on, the default
   sync interval) under ``torch.cuda.set_sync_debug_mode("error")`` with the host-sync entry points
   trapped: the only host reads allowed are the guard's, at its sync steps.
2. **ddp** — a 1-process DistributedDataParallel over NCCL with ``SyncBatchNorm2d``, compiled
   around DDP; ``SyncBatchNorm2d`` against torch's SyncBatchNorm numerically (fp32, bf16), and the
   step time of resnet50 with each BN kind (the cost of SyncBN per step).
3. **fit_compile** — ``fit()`` with ``train.compile=true`` (inductor) through freezing, unfreezing
   (recompiled) and EMA.
4. **e2e** — what a GPU user asks: time to 94% test accuracy on Fashion-MNIST with resnetlab's
   ``fashion_mnist`` recipe against torchvision's reference-style loop (FashionMNIST dataset,
   transforms, DataLoader), and images/s of ``fit()`` on a synthetic JPEG image folder against
   ``ImageFolder`` + ``DataLoader``, each also without the model (the data pipeline alone), so the
   pipeline's share is known.
5. **throughput** — resnet50 at 224 px and resnet20 at 32 px on synthetic data already on the
   device; fp32, bf16 and fp16 AMP; eager, then ``torch.compile``; channels_last for both
   contenders. For each setting, images/s of resnetlab's step (``train_one_epoch`` with its meter,
   fused SGD) and of the idiomatic torchvision loop, each built in its own scope and freed before
   the other is built (so each peak memory is its own), and its peak memory over a step after
   warm-up.

Every part and setting reserves its expected time before it starts: what the remaining budget
cannot hold is listed as "not run (budget)", never dropped. ``--no-compile`` leaves out every
compiled setting. Without CUDA (and without ``--dry-run``) it says so and exits 2; ``--dry-run``
runs every code path on the CPU with tiny shapes in under a minute (gloo instead of NCCL, CPU
compile backends, the end-to-end mode on a tiny subset), so the first real run does not fail on
a typo.

    bash benchmarks/gpu_check.sh --results-dir OUT     # on the GPU machine; writes OUT/gpu-*.json
    bash benchmarks/gpu_check.sh --dry-run             # anywhere: the same code paths, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS_DIR, Window, autocast, machine_info, peak_memory_after_warmup
from benchmarks.reference import backward_step

NUM_CLASSES = 1000
NO_CUDA_EXIT = 2  # no CUDA device and no --dry-run: nothing was measured
TARGET_ACC = 94.0  # Fashion-MNIST test accuracy, percent, for the time-to-accuracy race


@dataclass(frozen=True)
class Case:
    model: str
    image: int  # pixels, square
    batch: int
    amp: str  # "none" (fp32), "bf16", "fp16"
    compile: bool
    channels_last: bool = True  # both contenders alike

    @property
    def label(self) -> str:
        precision = {"none": "fp32", "bf16": "bf16 AMP", "fp16": "fp16 AMP"}[self.amp]
        return f"{self.model} {self.image}px b{self.batch} {precision}{' compiled' if self.compile else ''}"


@dataclass(frozen=True)
class Plan:
    """Sizes and the time budget of one run (GPU_PLAN on the GPU, DRY_PLAN for --dry-run)."""

    models: tuple[tuple[str, int, int], ...]  # (name, image px, batch) of the throughput part
    warmup: int  # untimed steps per contender (compile happens here)
    steps: int  # steps per timed window
    rounds: int  # timed windows per contender
    sync_steps: int  # steps of fit() checked under the sync debug mode
    budget_s: float  # the whole run: a part or setting starts only if its reserve fits in what is left
    compile_backend: str  # torch.compile backend of the throughput and fit_compile parts
    reserve_s: dict[str, float]  # expected seconds of each part (throughput: of each setting kind)
    fashion_subset: tuple[int, int]  # (train, test) images of Fashion-MNIST in the race; (0, 0) = all
    race_s: float  # each contender of the race stops after this long (or at TARGET_ACC)
    race_epochs: int  # the recipe's epochs (0 = the recipe's own 30)
    race_batch: int  # the recipe's batch (0 = the recipe's own 128)
    folder_images: int  # synthetic JPEGs in the folder pipeline test
    folder_px: int  # their size (the training crop is 7/8 of it)
    folder_model: str
    folder_batch: int
    folder_epochs: int
    compiled_settings: int | None = None  # compiled throughput settings to run (None = all)


GPU_PLAN = Plan(
    (("resnet50", 224, 256), ("resnet20", 32, 512)), warmup=8, steps=20, rounds=3, sync_steps=40,
    budget_s=450.0, compile_backend="inductor",
    reserve_s={"sync": 20, "ddp": 60, "fit_compile": 70, "fashion": 180, "folder": 50,
               "eager": 10, "compiled": 80},
    fashion_subset=(0, 0), race_s=80.0, race_epochs=0, race_batch=0,
    folder_images=6000, folder_px=144, folder_model="resnet50", folder_batch=128, folder_epochs=2)
# The dry run: the same code paths with tiny shapes on the CPU, one compiled throughput setting
# (dynamo's tracing alone costs seconds per setting on a CPU), compile backend "eager".
DRY_PLAN = Plan(
    (("resnet50", 32, 2), ("resnet20", 16, 2)), warmup=1, steps=1, rounds=1, sync_steps=6,
    budget_s=170.0, compile_backend="eager",
    reserve_s={"sync": 5, "ddp": 5, "fit_compile": 5, "fashion": 5, "folder": 5, "eager": 1, "compiled": 1},
    fashion_subset=(200, 100), race_s=30.0, race_epochs=1, race_batch=16,
    folder_images=24, folder_px=40, folder_model="resnet20", folder_batch=8, folder_epochs=1,
    compiled_settings=1)


class Budget:
    """The run's clock: each part asks for its reserve before it starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0 = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, reserve_s: float) -> bool:
        return self.left() >= reserve_s


def cases(plan: Plan, compile: bool = True) -> list[Case]:
    """Eager settings first (cheap), then compiled ones (each compiles twice: ours, reference)."""
    eager = [Case(m, px, b, amp, False) for m, px, b in plan.models for amp in ("none", "bf16", "fp16")]
    compiled = [Case(m, px, b, amp, True) for amp in ("bf16", "fp16", "none") for m, px, b in plan.models[::-1]]
    return eager + (compiled if compile else [])


def _free(device: torch.device, compiled: bool = False) -> None:
    """Drop what the last contender left: Python garbage, dynamo's caches, the CUDA cache."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# throughput: resnetlab's step vs the idiomatic torchvision loop


class _DeviceBatches:
    """A loader for ``train_one_epoch``: the same device batch, ``n`` times per epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n
        self.batch_size = int(y.shape[0])

    def __len__(self) -> int:
        return self.n

    def num_samples(self) -> int:
        return self.n * self.batch_size

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(start_batch, self.n):
            yield self.x, self.y


def _batch(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.batch, 3, case.image, case.image, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (case.batch,), generator=g)
    return (x.contiguous(memory_format=torch.channels_last) if case.channels_last else x), y.to(device)


def _layout(model: nn.Module, case: Case) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if case.channels_last else model


def resnetlab_contender(case: Case, device: torch.device, plan: Plan) -> Callable[[int], None]:
    """``run(n)``: n optimiser steps through resnetlab's ``train_one_epoch``."""
    from resnetlab.config import OptimConfig
    from resnetlab.engine.loop import train_one_epoch
    from resnetlab.engine.metrics import SumMeter
    from resnetlab.engine.optim import build_optimizer
    from resnetlab.models import create_model

    model = _layout(create_model(case.model, num_classes=NUM_CLASSES).to(device), case)
    net = cast(nn.Module, torch.compile(model, backend=plan.compile_backend)) if case.compile else model
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


def _cifar_resnet(depth: int, num_classes: int, in_chans: int = 3) -> nn.Module:
    """The paper's CIFAR ResNet written the plain way (benchmarks/bench_train.py's), any input channels."""
    from benchmarks.bench_train import CifarResNet

    model = CifarResNet(depth, num_classes)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def reference_contender(case: Case, device: torch.device, plan: Plan) -> Callable[[int], None]:
    """``run(n)``: the loop a PyTorch user writes: torchvision's model, SGD, autocast, GradScaler."""
    import torchvision

    model: nn.Module = (_cifar_resnet(20, NUM_CLASSES) if case.model == "resnet20"
                        else getattr(torchvision.models, case.model)(num_classes=NUM_CLASSES))
    model = _layout(model.to(device), case)
    net = cast(nn.Module, torch.compile(model, backend=plan.compile_backend)) if case.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    scaler = torch.amp.GradScaler(device.type) if case.amp == "fp16" else None
    x, y = _batch(case, device)

    def run(n: int) -> None:
        for _ in range(n):
            with autocast(device, case.amp):
                loss = F.cross_entropy(net(x), y)
            backward_step(loss, opt, scaler)

    return run


CONTENDERS = {"resnetlab": resnetlab_contender, "torchvision": reference_contender}


def measure(case: Case, device: torch.device, plan: Plan) -> dict[str, Any]:
    """Images/s of each contender (best of ``plan.rounds`` windows) and its peak step memory.

    Each contender is built, warmed up, timed and freed before the next is built, so neither its
    peak memory nor its allocator state includes the other's tensors (and a compiled one's
    caches are dropped)."""
    rates: dict[str, list[float]] = {}
    peaks: dict[str, int | None] = {}
    warm: dict[str, float] = {}
    for name, make in CONTENDERS.items():
        rates[name], peaks[name], warm[name] = _time_contender(make, case, device, plan)
        _free(device, case.compile)  # the contender's tensors went with _time_contender's frame
    best = {name: max(v) for name, v in rates.items()}
    return {**asdict(case), "label": case.label, "images_per_s": best, "rounds": rates,
            "ratio": best["resnetlab"] / best["torchvision"], "peak_bytes": peaks, "warmup_seconds": warm}


def _time_contender(make: Callable[[Case, torch.device, Plan], Callable[[int], None]], case: Case,
                    device: torch.device, plan: Plan) -> tuple[list[float], int | None, float]:
    """Build one contender, warm it up (compiling), read its peak, time its windows:
    ``(images/s per window, peak bytes, warm-up seconds)``. Its tensors die with this frame."""
    t0 = time.perf_counter()
    run = make(case, device, plan)
    peak = peak_memory_after_warmup(lambda: run(1), device, warmup=plan.warmup)
    warm = time.perf_counter() - t0
    clock, rates = Window(device), []
    for _ in range(plan.rounds):
        clock.start()
        run(plan.steps)
        rates.append(plan.steps * case.batch / clock.stop())
    return rates, peak, warm


def throughput(device: torch.device, plan: Plan, budget: Budget, log: Callable[[str], None],
               compile: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    compiled = 0
    for case in cases(plan, compile):
        if case.compile and plan.compiled_settings is not None and compiled >= plan.compiled_settings:
            rows.append({**asdict(case), "label": case.label, "status": "not run (dry run)"})
            continue
        reserve = plan.reserve_s["compiled" if case.compile else "eager"]
        if not budget.allows(reserve):
            rows.append({**asdict(case), "label": case.label, "status": "not run (budget)"})
            log(f"  {case.label}: not run ({budget.left():.0f}s left, {reserve:.0f}s reserved per setting)")
            continue
        compiled += case.compile
        try:
            row = {**measure(case, device, plan), "status": "ok"}
            log(f"  {case.label}: resnetlab {row['images_per_s']['resnetlab']:.0f} img/s, torchvision "
                f"{row['images_per_s']['torchvision']:.0f} img/s, {row['ratio']:.2f}x")
        except Exception as e:  # noqa: BLE001 - a failing setting is reported, the others still run
            row = {**asdict(case), "label": case.label, "status": "error",
                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            log(f"  {case.label}: ERROR {type(e).__name__}: {str(e)[:200]}")
            _free(device, case.compile)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# ddp: a 1-process DDP group (NCCL; gloo in the dry run), SyncBatchNorm2d, compile around DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _syncbn_against_torch(device: torch.device) -> dict[str, Any]:
    """SyncBatchNorm2d against torch's SyncBatchNorm (CUDA; BatchNorm2d on the CPU, where torch's
    refuses to run) on the same input: output, input gradient, running statistics, in fp32 and
    under bf16 autocast. Largest absolute gaps; ``ok`` within float32 / bf16 rounding."""
    from resnetlab.engine.dist import SyncBatchNorm2d

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(16, 32, 14, 14, generator=g) * 2 + 3).to(device)
    gy = torch.randn(16, 32, 14, 14, generator=g).to(device)
    ok = True
    for amp, tol in (("none", 1e-4), ("bf16", 5e-2)):
        got = []
        for cls in (SyncBatchNorm2d, torch.nn.SyncBatchNorm if device.type == "cuda" else torch.nn.BatchNorm2d):
            bn = cls(32).to(device)
            x = x0.clone().requires_grad_(True)
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
            with ctx:
                y = bn(x.to(torch.bfloat16) if amp == "bf16" else x)
            (y.float() * gy).sum().backward()
            got.append((y.float().detach(), x.grad, bn.running_mean, bn.running_var))
        gaps = [float((a - b).abs().max()) for a, b in zip(*got, strict=True)]
        out[amp] = dict(zip(("y", "dx", "running_mean", "running_var"), gaps, strict=True))
        ok = ok and max(gaps) <= tol
    out["reference"] = "torch.nn.SyncBatchNorm" if device.type == "cuda" else "torch.nn.BatchNorm2d"
    out["ok"] = ok
    return out


def _bn_step_seconds(device: torch.device, sync_bn: str, steps: int, batch: int, px: int) -> float:
    """Seconds per DDP training step of resnet50 (bf16 on CUDA) with plain BN, SyncBatchNorm2d,
    or torch's SyncBatchNorm: the cost of synchronised BN per step."""
    from resnetlab.engine.dist import convert_sync_batchnorm
    from resnetlab.models import create_model

    model: nn.Module = create_model("resnet50", num_classes=NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    if sync_bn == "resnetlab":
        model = convert_sync_batchnorm(model, device)
    elif sync_bn == "torch":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index or 0] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, px, px, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    clock = Window(device)
    clock.start()
    for _ in range(steps):
        step()
    return clock.stop() / steps


def ddp_check(device: torch.device, plan: Plan, dry: bool) -> dict[str, Any]:
    """DDP over one process with fit()'s collectives, SyncBatchNorm2d and torch.compile around
    DDP; ``ok`` when the loss is finite, the collectives return what they should and
    SyncBatchNorm2d matches torch's SyncBatchNorm."""
    import torch.distributed as tdist

    from resnetlab.engine.dist import all_gather_object, all_reduce_sum, convert_sync_batchnorm
    from resnetlab.engine.optim import ModelEMA
    from resnetlab.models import create_model

    backend = "nccl" if device.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        out: dict[str, Any] = {"backend": backend, "syncbn_vs_torch": _syncbn_against_torch(device)}
        model: nn.Module = create_model("resnet20", num_classes=10).to(device).to(memory_format=torch.channels_last)
        model = convert_sync_batchnorm(model, device)
        ids = [device.index or 0] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        net = torch.compile(ddp, backend=plan.compile_backend)  # compiled around DDP, as fit() does
        ema = ModelEMA(ddp, 0.99)  # the wrapped model, as fit() gives it under torchrun
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        batch = 4 if dry else 64
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device)
        steps = 2 if dry else 5
        from torch._dynamo.utils import counters

        counters.clear()
        for _ in range(steps):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(ddp)
        flags = all_reduce_sum(torch.tensor([0.0, 1.0], device=device))
        gathered = all_gather_object({"rank": 0})
        loss_value, finite = float(loss.item()), bool(torch.isfinite(loss).item())
        # reasons (first line) -> count; SyncBatchNorm2d must add none (DDP's own logger shows up)
        out["graph_breaks"] = {k.splitlines()[0][:160]: v for k, v in counters["graph_break"].items()}
        _free(device, compiled=True)
        if not dry:  # the cost of synchronised BN per step (1 process: the kernels, no network)
            out["bn_step_ms"] = {}
            for kind in ("none", "resnetlab", "torch"):
                out["bn_step_ms"][kind] = 1000 * _bn_step_seconds(device, kind, 20, 128, 224)
                _free(device)
        ok = (finite and flags.tolist() == [0.0, 1.0] and gathered == [{"rank": 0}]
              and out["syncbn_vs_torch"]["ok"])
        out.update({"steps": steps, "compiled_around_ddp": True, "loss": loss_value, "ok": ok,
                    "seconds": time.perf_counter() - t0})
        return out
    finally:
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# sync: no host synchronisation inside fit()'s steps, default settings


@contextlib.contextmanager
def trap_host_syncs(calls: list[str], armed: list[bool], allowed: list[int], step: list[int]) -> Iterator[None]:
    """Record (while ``armed[0]``) every call of the host-sync entry points; those made inside
    the guard's flag read (``StepGuard.sync``) go to ``allowed`` as the step (``step[0]``)."""
    patched = [(torch.Tensor, n) for n in ("item", "tolist", "cpu")] + [(torch, n) for n in ("tensor", "as_tensor")]
    originals = [(obj, name, getattr(obj, name)) for obj, name in patched]

    def trap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if armed[0]:
                frames = traceback.extract_stack()[:-1]
                if any(f.name == "sync" and f.filename.endswith("guard.py") for f in frames):
                    allowed.append(step[0])
                else:
                    calls.append(f"step {step[0]}: {frames[-1].filename}:{frames[-1].lineno} -> {name}")
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
    """fit() on digits with default settings (progress bar forced on, TensorBoard on, the default
    sync interval); steps 2..steps+1 run armed: trapped calls and (CUDA) the sync debug mode,
    except at the guard's sync steps, where the host reads its flags by design."""

    import resnetlab
    from resnetlab.engine import runlog  # the progress bar's owner
    from resnetlab.runtime import SYNC_EVERY_AUTO
    sync_every = SYNC_EVERY_AUTO["cuda"] if device.type == "cuda" else 3  # CPU's auto is 1: every step
    calls: list[str] = []
    allowed: list[int] = []
    armed, step = [False], [0]
    cuda = device.type == "cuda"
    errors: list[str] = []

    def on_step(info: dict[str, Any]) -> bool:
        # on_step(k) runs before step k's flag read: the debug mode is off for that read and step k+1
        step[0] = info["step"]
        armed[0] = 1 <= info["step"] <= steps
        if cuda:
            syncs_now = info["step"] % sync_every == 0
            torch.cuda.set_sync_debug_mode("error" if armed[0] and not syncs_now else "default")
        return info["step"] > steps + 1

    overrides = ["model.name=resnet20", "data.name=digits", "train.batch_size=16", "train.epochs=1",
                 f"train.device={device}", "optim.ema_decay=0.99", "train.test_at_end=false",
                 f"run.root={workdir}", "run.name=sync-check"]
    if not cuda:
        overrides.append(f"train.sync_every={sync_every}")
    watches = runlog.someone_watches
    runlog.someone_watches = lambda stream: True  # the progress bar, as in a terminal
    try:
        with trap_host_syncs(calls, armed, allowed, step):
            result = resnetlab.train(None, overrides, on_step=on_step)
        steps_run = result.steps
    except RuntimeError as e:  # the sync debug mode raises on the first synchronisation
        errors.append(f"{type(e).__name__}: {str(e)[:300]}")
        steps_run = None
    finally:
        runlog.someone_watches = watches
        armed[0] = False
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    return {"steps_checked": steps, "steps_run": steps_run, "sync_every": sync_every,
            "trapped_calls": calls[:20], "guard_reads": len(allowed), "sync_debug_errors": errors,
            "guard_reads_at": allowed[:20],
            "sync_debug_mode": "error" if cuda else "n/a (CPU)", "defaults": "progress bar, tensorboard",
            "ok": not calls and not errors and all(s % sync_every == 0 for s in allowed)}


# ----------------------------------------------------------------------------------------------
# fit_compile: fit() with train.compile=true through freezing and unfreezing


def fit_compile_check(device: torch.device, plan: Plan, workdir: Path) -> dict[str, Any]:
    """fit() compiled (plan's backend: inductor on the GPU) on digits: 1 epoch with the backbone
    frozen, then unfrozen (a recompilation), with EMA; ``ok`` when it finishes with finite numbers
    and the frozen weights stayed put in epoch 1."""
    import resnetlab
    from resnetlab.engine.dist import unwrap

    t0 = time.perf_counter()
    seen: dict[str, Any] = {}

    def on_step(info: dict[str, Any]) -> None:
        conv1 = cast(nn.Conv2d, unwrap(info["model"]).conv1)
        w = conv1.weight.detach()
        if info["step"] == 1:
            seen["first"] = w.clone()
        elif info["epoch"] == 0:
            seen["frozen_ok"] = bool(torch.equal(w, seen["first"]))
        seen["type"] = type(info["model"]).__name__

    overrides = ["model.name=resnet20", "data.name=digits", "train.epochs=2", f"train.device={device}",
                 "train.compile=true", f"train.compile_backend={plan.compile_backend}",
                 "train.freeze=[backbone]", "train.unfreeze_at_epoch=1", "optim.ema_decay=0.99",
                 "train.quiet=true", "train.tensorboard=false", f"run.root={workdir}", "run.name=fit-compile"]
    if device.type == "cuda":
        overrides.append("train.amp=bf16")
    else:
        overrides += ["data.train_per_class=8", "train.batch_size=32", "train.test_at_end=false"]
    result = resnetlab.train(None, overrides, on_step=on_step)
    _free(device, compiled=True)
    ok = (result.steps > 0 and seen.get("frozen_ok", False) and seen.get("type") == "OptimizedModule"
          and all(v == v for v in result.val.values()))
    return {"backend": plan.compile_backend, "steps": result.steps, "val": result.val, "ok": ok,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# e2e: time to 94% on Fashion-MNIST; the image-folder pipeline


def fashion_files() -> dict[str, Path] | None:
    """The four Fashion-MNIST files where ``data.name=fashion_mnist`` looks (Debian's folder, then
    ./data/FashionMNIST/raw), or None."""
    from resnetlab.config import DataConfig
    from resnetlab.data.datasets import DataError
    from resnetlab.data.sources.idx import FASHION_MNIST, locate

    try:
        return locate(FASHION_MNIST, DataConfig(name="fashion_mnist"))
    except DataError:
        return None


FASHION_HINT = ("Fashion-MNIST (30 MB) is not where data.name=fashion_mnist looks (/usr/share/datasets/"
                "fashion-mnist/ from Debian's dataset-fashion-mnist, or ./data/FashionMNIST/raw/): copy the "
                "four *-ubyte.gz files into data/FashionMNIST/raw/ of the repository and carry that folder "
                "to the GPU machine")


def _race_overrides(plan: Plan) -> list[str]:
    """The recipe's epochs and batch as the plan shrinks them (the dry run), for both contenders."""
    return ([f"train.epochs={plan.race_epochs}"] if plan.race_epochs else []) + \
        ([f"train.batch_size={plan.race_batch}"] if plan.race_batch else [])


def _tiny_fashion(files: dict[str, Path], folder: Path, n_train: int, n_test: int) -> dict[str, Path]:
    """The first ``n_train`` / ``n_test`` images of Fashion-MNIST as IDX files in ``folder`` (the
    dry run: the same reading, splitting and training code, on a few hundred images)."""
    from resnetlab.data.sources.idx import FILES, read_pair, write_idx

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = FILES[split]
        x, y = read_pair(files[images], files[labels], 10)
        for base, array in ((images, x[:n]), (labels, y[:n])):
            write_idx(folder / f"{base}.gz", array)
            out[base] = folder / f"{base}.gz"
    return out


def _race_resnetlab(device: torch.device, plan: Plan, workdir: Path, root: Path | None) -> dict[str, Any]:
    """resnetlab's fashion_mnist recipe through fit(), tested after every epoch; stops at TARGET_ACC
    or after ``plan.race_s``. Seconds count from the call (data loading and set-up included)."""
    import resnetlab
    from resnetlab.engine.metrics import read_jsonl

    t0 = time.perf_counter()
    run_dir = workdir / "fashion-resnetlab"
    reached: list[float] = []
    curve: list[tuple[int, float, float]] = []

    def on_step(info: dict[str, Any]) -> bool:
        if info["batch"] == 0 and info["epoch"] > len(curve):  # a new epoch: read the last row
            rows = read_jsonl(run_dir / "metrics.jsonl")
            for r in rows[len(curve):]:
                curve.append((r["epoch"], time.perf_counter() - t0, 100.0 - r["test_top1_err"]))
                if curve[-1][2] >= TARGET_ACC and not reached:
                    reached.append(curve[-1][1])
        return bool(reached) or time.perf_counter() - t0 > plan.race_s

    overrides = [f"train.device={device}", "train.test_every_epoch=true", "train.test_at_end=false",
                 "train.quiet=true", "train.tensorboard=false", f"run.root={workdir}", f"run.name={run_dir.name}"]
    if root is not None:
        overrides.append(f"data.root={root}")
    cfg = resnetlab.load_config("fashion_mnist", overrides + _race_overrides(plan))
    result = resnetlab.train(cfg, on_step=on_step)
    log = run_dir / "metrics.jsonl"  # absent when the time limit stopped the race inside epoch 1
    for r in (read_jsonl(log) if log.is_file() else [])[len(curve):]:  # epochs after the last check
        curve.append((r["epoch"], time.perf_counter() - t0, 100.0 - r["test_top1_err"]))
        if curve[-1][2] >= TARGET_ACC and not reached:
            reached.append(curve[-1][1])
    return {"recipe": "fashion_mnist", "epochs_run": len(curve), "steps": result.steps,
            "curve": [{"epoch": e, "seconds": s, "test_acc": a} for e, s, a in curve],
            "seconds_to_target": reached[0] if reached else None, "best_acc": max((a for *_, a in curve), default=None)}


def _race_reference(device: torch.device, plan: Plan, files: dict[str, Path], workdir: Path) -> dict[str, Any]:
    """The torchvision reference-style loop (:mod:`benchmarks.reference`) with the recipe's
    numbers, on the same CIFAR ResNet-20 written plainly, channels_last, DataLoader workers and
    pinned memory on CUDA; tested after every epoch until TARGET_ACC or ``plan.race_s``. Seconds
    count from the call (unpacking the files included). Trains on all 60k images (a user's loop
    holds none out; resnetlab's holds out 6k for validation)."""
    import os

    import resnetlab
    from benchmarks import reference

    t0 = time.perf_counter()
    cfg = resnetlab.load_config("fashion_mnist", _race_overrides(plan))
    tv_root = reference.torchvision_layout(files.values(), workdir / "tv")
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    torch.manual_seed(cfg.seed)
    r = reference.train(cfg, tv_root, device, workers=workers, channels_last=True,
                        model=_cifar_resnet(20, 10, in_chans=1), test_every_epoch=True, started=t0,
                        stop=lambda seconds, acc: acc >= TARGET_ACC or seconds > plan.race_s)
    reached = r.curve[-1]["seconds"] if r.curve and r.curve[-1]["test_acc"] >= TARGET_ACC else None
    return {"loop": "torchvision reference style", "epochs_run": len(r.curve), "curve": r.curve,
            "seconds_to_target": reached, "best_acc": max((c["test_acc"] for c in r.curve), default=None)}


def fashion_race(device: torch.device, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Time to TARGET_ACC on Fashion-MNIST's test split: resnetlab's recipe vs the reference loop."""
    files = fashion_files()
    if files is None:
        return {"status": "not run (no data)", "hint": FASHION_HINT}
    out: dict[str, Any] = {"target_acc": TARGET_ACC, "cap_seconds_each": plan.race_s,
                           "files": str(next(iter(files.values())).parent)}
    root = None
    if plan.fashion_subset != (0, 0):
        root = workdir / "subset"
        files = _tiny_fashion(files, root, *plan.fashion_subset)
    out["resnetlab"] = _race_resnetlab(device, plan, workdir, root)
    _free(device)
    out["torchvision"] = _race_reference(device, plan, files, workdir)
    _free(device)
    a, b = out["resnetlab"]["seconds_to_target"], out["torchvision"]["seconds_to_target"]
    out["ratio"] = b / a if a and b else None  # > 1: resnetlab reached the target sooner
    out["ok"] = out["resnetlab"]["epochs_run"] > 0 and out["torchvision"]["epochs_run"] > 0
    return out


def make_image_folder(root: Path, n: int, px: int, classes: int = 10) -> Path:
    """``n`` JPEGs of ``px`` x ``px`` (smooth random colour fields, ~10-20 KB each at 144 px) in
    ``root/train/<class>/``: decoding is part of what the pipelines pay."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((px, px), Image.Resampling.BILINEAR)
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))
    return root


def folder_pipeline(device: torch.device, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Images/s on a synthetic JPEG folder: fit() (its last epoch; metrics.jsonl's images_per_s)
    against an ImageFolder + DataLoader loop with the same model family, batch, crop and workers,
    and each pipeline alone (its loader iterated without the model)."""
    import os

    import torchvision
    from torchvision.transforms import v2

    import resnetlab
    from resnetlab.engine.metrics import read_jsonl

    root = make_image_folder(workdir / "images", plan.folder_images, plan.folder_px)
    crop = plan.folder_px * 7 // 8
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    amp = "bf16" if device.type == "cuda" else "none"
    common = [f"data.root={root}", f"data.image_size={crop}", f"data.resize={plan.folder_px}",
              f"data.num_workers={workers}", "data.val_fraction=0", f"train.batch_size={plan.folder_batch}",
              f"train.epochs={plan.folder_epochs}", f"train.amp={amp}", f"train.device={device}",
              "train.test_at_end=false", "train.quiet=true", "train.tensorboard=false",
              f"model.name={plan.folder_model}", f"run.root={workdir}"]
    out: dict[str, Any] = {"images": plan.folder_images, "px": plan.folder_px, "crop": crop, "workers": workers,
                           "model": plan.folder_model, "batch": plan.folder_batch, "amp": amp}
    result = resnetlab.train("folder", [*common, "run.name=folder-fit"])
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    out["resnetlab_fit_images_per_s"] = rows[-1]["images_per_s"]

    # resnetlab's loader alone: the same loader fit() built, iterated without a model
    from resnetlab.config import load as load_config
    from resnetlab.data import build_datasets, build_loader

    cfg = load_config("folder", [*common, "run.name=folder-loader"])
    data = build_datasets(cfg.data, seed=cfg.seed)
    loader = build_loader(data.train, data.meta, cfg.data, train=True, batch_size=plan.folder_batch,
                          device=device, seed=cfg.seed, rank=0, world_size=1, channels_last=True)
    out["resnetlab_loader_images_per_s"] = _loader_rate(lambda epoch: loader.iterate(epoch), device, plan.folder_epochs)

    # the torchvision way
    norm = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tf = v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor(),
                     v2.ToDtype(torch.float32, scale=True), norm])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    tv_loader = torch.utils.data.DataLoader(dataset, batch_size=plan.folder_batch, shuffle=True, drop_last=True,
                                            num_workers=workers, pin_memory=device.type == "cuda",
                                            persistent_workers=workers > 0)
    out["torchvision_loader_images_per_s"] = _loader_rate(lambda epoch: iter(tv_loader), device, plan.folder_epochs)
    rate = _torchvision_train_rate(tv_loader, device, plan, amp)
    out["torchvision_fit_images_per_s"] = rate
    _free(device)
    out["ratio"] = out["resnetlab_fit_images_per_s"] / max(rate, 1e-9)
    out["ok"] = out["resnetlab_fit_images_per_s"] > 0 and rate > 0
    return out


def _torchvision_train_rate(loader: Any, device: torch.device, plan: Plan, amp: str) -> float:
    """Images/s of the plain loop over ``loader`` (its last epoch): torchvision's model, SGD, autocast."""
    import torchvision

    model = getattr(torchvision.models, plan.folder_model, None)
    net: nn.Module = (model(num_classes=10) if model is not None else _cifar_resnet(20, 10)).to(device)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rate = 0.0
    for _epoch in range(plan.folder_epochs):  # the last epoch's rate, as fit()'s
        t0, images = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp):
                loss = F.cross_entropy(net(x), y)
            backward_step(loss, opt, None)
            images += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = images / (time.perf_counter() - t0)
    return rate


def _loader_rate(batches: Callable[[int], Any], device: torch.device, epochs: int) -> float:
    """Images/s of a loader alone over its last epoch (batches moved to ``device``, as training does)."""
    rate = 0.0
    for epoch in range(epochs):
        t0, images = time.perf_counter(), 0
        last = None
        for x, _y in batches(epoch):
            last = x.to(device, non_blocking=True)
            images += x.shape[0]
        if last is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = images / max(time.perf_counter() - t0, 1e-9)
    return rate


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


PARTS = ("sync", "ddp", "fit_compile", "fashion", "folder", "throughput")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: exercise every code path")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where gpu-*.json goes")
    p.add_argument("--skip", default="", help=f"comma list of parts not to run: {','.join(PARTS)}")
    p.add_argument("--no-compile", action="store_true", help="leave out every compiled setting and part")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: the plan's)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing measured. It needs one GPU "
              "(use --dry-run to exercise its code paths on the CPU).", file=sys.stderr)
        return NO_CUDA_EXIT
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget is not None:
        plan = replace(plan, budget_s=args.budget)
    budget = Budget(plan.budget_s)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(PARTS)
    if unknown:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
    if args.no_compile:
        skip.add("fit_compile")
    log = lambda text: print(text, flush=True)  # noqa: E731
    out: dict[str, Any] = {"dry_run": args.dry_run, "no_compile": args.no_compile, "machine": machine_info(device),
                           "plan": asdict(plan), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit() does by default (train.cudnn_benchmark)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train.tf32
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"gpu-{'dryrun-' if args.dry_run else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:  # after every part: a run cut short by the timeout keeps what it measured
        out["seconds"] = plan.budget_s - budget.left()
        path.write_text(json.dumps(out, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts: dict[str, Callable[[], Any]] = {
            "sync": lambda: sync_check(device, plan.sync_steps, work / "sync"),
            "ddp": lambda: ddp_check(device, replace(plan, compile_backend="eager") if args.no_compile else plan,
                                     args.dry_run),
            "fit_compile": lambda: fit_compile_check(device, plan, work / "compile"),
            "fashion": lambda: fashion_race(device, plan, work / "fashion"),
            "folder": lambda: folder_pipeline(device, plan, work / "folder"),
            "throughput": lambda: throughput(device, plan, budget, log, compile=not args.no_compile),
        }
        for name, fn in parts.items():
            if name in skip:
                out[name] = {"status": "skipped (--skip)" if name in args.skip.split(",") else "skipped (--no-compile)"}
                continue
            reserve = plan.reserve_s.get(name, plan.reserve_s["eager"])
            if not budget.allows(reserve):
                out[name] = {"status": "not run (budget)", "reserve_s": reserve, "left_s": budget.left()}
                log(f"{name}: not run ({budget.left():.0f}s left, {reserve:.0f}s reserved)")
                continue
            log(f"{name} ... ({budget.left():.0f}s of the budget left)")
            t0 = time.perf_counter()
            try:
                out[name] = fn()
            except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit code
                out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]}
                _free(device, compiled=True)
            if isinstance(out[name], dict):
                out[name].setdefault("seconds", time.perf_counter() - t0)
                log(f"  {json.dumps({k: v for k, v in out[name].items() if k not in ('traceback', 'curve')}, default=str)[:600]}")
            save()
    found = out.get("throughput")
    rows: list[dict[str, Any]] = found if isinstance(found, list) else []
    print("\n" + format_table(rows))
    failures = [r["label"] for r in rows if r.get("status") == "error"]
    failures += [n for n in PARTS if isinstance(out.get(n), dict) and out[n].get("ok") is False]
    out["failures"] = failures
    save()
    print(f"\n{'dry run ' if args.dry_run else ''}done in {out['seconds']:.0f}s; wrote {path}; "
          f"{'failures: ' + ', '.join(failures) if failures else 'no failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
