"""Training speed, side by side in one run: cases (a), (b) and (c).

(a) Training throughput (images/s, data loading included) of resnetlab against the same
    architecture in an idiomatic PyTorch loop:
    - resnetlab: ``create_model`` in channels_last, its in-memory device loader (uint8 split on
      the device, batched pad-crop-flip and normalisation there) and its loop,
      ``engine.loop.train_one_epoch`` (the one ``fit`` runs);
    - baseline: torchvision's ``resnet18``/``resnet50``, or a straightforward hand-written CIFAR
      ResNet (option-A shortcuts, as resnetlab's) for ``resnet20``/``resnet56``; NCHW; a torch
      ``DataLoader`` over a ``TensorDataset`` with per-sample torchvision transforms doing the
      same augmentation (pad 4 + random crop, horizontal flip, normalise).
    Both: SGD with momentum and weight decay, cross-entropy, the same batch, bf16 autocast on
    CUDA. On CPU the full run also times the baseline with 0 DataLoader workers and keeps the
    faster baseline, so the ratio is never against a handicapped loop.
(b) Utilisation: the model's training FLOP/s (``torch.utils.flop_counter`` over one forward and
    backward, times the pure train-step rate) over the machine's large-matmul FLOP/s, both
    measured in this run.
(c) Data-pipeline overhead: images/s of a real ``fit()`` run's training loop (its loader,
    step, meters and per-step checks; random CIFAR-format files on disk) over the pure
    train-step images/s (the same architecture stepping on one batch already on the device),
    sampled alternately during the run (see :func:`measure_fit`).

    python -m benchmarks.bench_train [--quick] [--device cpu|cuda] [--compile] [--models a,b]
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from benchmarks.common import (
    Rounds,
    Window,
    alternate,
    amp_for,
    autocast,
    describe_machine,
    fmt_rate,
    fmt_ratio,
    machine_info,
    matmul_flops,
    met,
    paired_ratio,
    parse_list,
    pick_device,
    sync,
    usable_cores,
    write_json,
)

TARGETS = {"a": 1.15, "b": 0.75, "c": 0.95}  # minimums on the 2-core CPU
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10, 0..1 scale
LR = 0.01  # random labels: a moderate lr keeps the weights finite for any number of steps
NUM_CLASSES = 10


@dataclass(frozen=True)
class Plan:
    """How long to measure one model: batch, warm-up steps, steps per timed round, rounds."""

    batch: int
    warmup: int
    steps: int
    rounds: int
    image: int  # pixels, square

    @property
    def dataset_size(self) -> int:  # several batches, so both loaders reshuffle per epoch
        return self.batch * (8 if self.image <= 64 else 4)


# Per device and mode. CPU sizes keep `make bench` under ~20 min (full) / ~3 min (quick) on two
# idle cores; 224-pixel nets are slow there (resnet50: a few images/s), so their batches are small.
PLANS: dict[tuple[str, bool], dict[str, Plan]] = {
    ("cpu", True): {"resnet20": Plan(128, 2, 5, 3, 32)},
    ("cpu", False): {
        "resnet20": Plan(128, 3, 10, 4, 32),
        "resnet56": Plan(128, 2, 6, 3, 32),
        "resnet18": Plan(32, 1, 3, 3, 224),
        "resnet50": Plan(16, 1, 2, 3, 224),
    },
    ("cuda", True): {"resnet20": Plan(512, 10, 30, 3, 32), "resnet50": Plan(256, 5, 15, 3, 224)},
    ("cuda", False): {
        "resnet20": Plan(512, 20, 60, 5, 32),
        "resnet56": Plan(512, 20, 60, 5, 32),
        "resnet18": Plan(256, 10, 40, 5, 224),
        "resnet50": Plan(256, 10, 30, 5, 224),
    },
}
FIT_MODELS = {True: ("resnet20",), False: ("resnet20", "resnet56")}  # case (c): CIFAR-size only
FIT_STEPS = {("cpu", True): 10, ("cpu", False): 20, ("cuda", True): 60, ("cuda", False): 150}
FIT_EPOCHS = {True: 2, False: 3}  # the first epoch is warm-up (allocator, oneDNN, cudnn)


# ----------------------------------------------------------------------------------------------
# the baseline: what a straightforward PyTorch user writes


class _PlainBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, + shortcut, ReLU; option A (subsample + zero channels) when the
    shape changes, as in the paper's CIFAR nets."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.stride != 1 or self.extra:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + x)


class CifarResNet(nn.Module):
    """The paper's 6n+2-layer CIFAR ResNet, written the plain way (16/32/64 channels)."""

    def __init__(self, depth: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(_PlainBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, 3, 32, 32] -> [b, classes]
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _sgd_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              device: torch.device, amp: str) -> torch.Tensor:
    """One optimiser step on (x, y), the same for both contenders; returns the loss."""
    with autocast(device, amp):
        loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def baseline_model(name: str) -> nn.Module:
    """torchvision's model for ImageNet-style names, the hand-written one for resnet<6n+2>."""
    if name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        return getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    return CifarResNet(int(name.removeprefix("resnet")))


class TransformTensorDataset(TensorDataset):
    """A TensorDataset whose images pass through a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return self.transform(x), y


def baseline_loader(images: torch.Tensor, labels: torch.Tensor, plan: Plan, workers: int,
                    device: torch.device) -> DataLoader:
    """The idiomatic input pipeline: per-sample torchvision v2 transforms in DataLoader workers."""
    transform = v2.Compose([
        v2.RandomCrop(plan.image, padding=4),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
    return DataLoader(TransformTensorDataset(images, labels, transform), batch_size=plan.batch,
                      shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epochs without end (the workers persist between epochs)."""
    return itertools.chain.from_iterable(loader for _ in itertools.count())


# ----------------------------------------------------------------------------------------------
# contenders: each returns a function that runs `steps` timed steps -> (images, seconds)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)


def baseline_contender(name: str, plan: Plan, images: torch.Tensor, labels: torch.Tensor,
                       device: torch.device, amp: str, compile_: bool,
                       workers: int) -> Callable[[], tuple[int, float]]:
    model = baseline_model(name).to(device)
    net = cast(nn.Module, torch.compile(model)) if compile_ else model
    opt = sgd(model)
    batches = forever(baseline_loader(images, labels, plan, workers, device))

    def step() -> torch.Tensor:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return _sgd_step(net, opt, x, y, device, amp)

    return _timed(step, plan, device)


def resnetlab_parts(name: str, device: torch.device, compile_: bool) -> tuple[nn.Module, nn.Module,
                                                                             torch.optim.Optimizer]:
    """(model, net to call, optimiser) as fit builds them: channels_last, resnetlab's optimiser."""
    from resnetlab.config import OptimConfig
    from resnetlab.engine.optim import build_optimizer
    from resnetlab.models import create_model

    model = create_model(name, num_classes=NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    net = cast(nn.Module, torch.compile(model)) if compile_ else model
    return model, net, build_optimizer(model, OptimConfig(lr=LR, weight_decay=1e-4))


def resnetlab_contender(parts: tuple, plan: Plan, images: torch.Tensor, labels: torch.Tensor,
                        device: torch.device, amp: str) -> Callable[[], tuple[int, float]]:
    """resnetlab's loader and ``train_one_epoch``, stopped after each round's steps."""
    from resnetlab.config import AugmentConfig, DataConfig
    from resnetlab.data import ArraySplit, DataMeta, build_loader
    from resnetlab.engine.loop import train_one_epoch
    from resnetlab.engine.metrics import SumMeter

    _, net, opt = parts
    meta = DataMeta(name="cifar10", classes=tuple(str(i) for i in range(NUM_CLASSES)), in_chans=3,
                    input_size=(plan.image, plan.image), mean=MEAN, std=STD)
    cfg = DataConfig(name="cifar10", augment=AugmentConfig(crop_padding=4, flip=True))
    loader = build_loader(ArraySplit(images, labels), meta, cfg, train=True, batch_size=plan.batch,
                          device=device, seed=0, channels_last=True)
    meter, criterion = SumMeter(device), nn.CrossEntropyLoss()
    pos = {"epoch": 0, "batch": 0, "step": 0, "stop_at": 0}

    def stop(info: dict[str, Any]) -> bool:
        return info["step"] >= pos["stop_at"]

    def run(steps: int) -> None:
        """``steps`` optimiser steps, continuing the epoch where the last call stopped."""
        pos["stop_at"] = pos["step"] + steps
        while pos["step"] < pos["stop_at"]:
            out = train_one_epoch(net, loader, opt, criterion, epoch=pos["epoch"],
                                  start_batch=pos["batch"], step=pos["step"], lr_fn=lambda s: LR,
                                  meter=meter, amp=amp, after_step=stop)
            pos["step"] = out["step"]
            if out["batches_done"] >= len(loader):
                pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
            else:
                pos["batch"] = out["batches_done"]
        meter.sums.cpu()  # wait for the device

    run(plan.warmup)

    def timed() -> tuple[int, float]:
        sync(device)
        t0 = time.perf_counter()
        run(plan.steps)
        sync(device)
        return plan.steps * plan.batch, time.perf_counter() - t0

    return timed


def pure_contender(parts: tuple, plan: Plan, device: torch.device,
                   amp: str) -> Callable[[], tuple[int, float]]:
    """resnetlab's model stepping on one normalised batch already on the device: no data work."""
    return _timed(_step_fn(parts, plan, device, amp), plan, device)


def _timed(step: Callable[[], torch.Tensor], plan: Plan,
           device: torch.device) -> Callable[[], tuple[int, float]]:
    for _ in range(plan.warmup):
        step()
    sync(device)

    def timed() -> tuple[int, float]:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(plan.steps):
            loss = step()
        loss.item()  # the last step's work is done
        sync(device)
        return plan.steps * plan.batch, time.perf_counter() - t0

    return timed


def train_flops_per_image(model: nn.Module, plan: Plan, device: torch.device, amp: str) -> float:
    """Forward + backward FLOPs of one image (conv/matmul, as FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(plan.batch, 3, plan.image, plan.image, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (plan.batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / plan.batch


PROFILE_GROUPS = (  # (group, substrings of profiler event names), first match wins
    ("convolution", ("convolution", "conv2d")),
    ("batch_norm", ("batch_norm",)),
    ("relu_add_pad", ("relu", "threshold", "clamp", "add", "pad", "slice", "copy_", "fill_")),
    ("optimizer", ("Optimizer.", "_foreach", "sgd")),
    ("loss_pool_fc", ("cross_entropy", "log_softmax", "nll_loss", "adaptive_avg_pool", "mean",
                      "addmm", "mm", "linear")),
    ("autograd_and_python", ("autograd", "Backward", "evaluate_function")),
)


def profile_step(parts: tuple, plan: Plan, device: torch.device, amp: str,
                 steps: int = 3) -> dict[str, Any]:
    """Where a pure train step's time goes (self time per op group): the explanation behind (b).
    Utilisation over the convolutions' share of the time is the ceiling for the step, the
    utilisation if nothing else took time."""
    from torch.profiler import ProfilerActivity, profile

    step = _step_fn(parts, plan, device, amp)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        us = float(getattr(event, attr, 0.0) or 0.0)
        group = next((g for g, keys in PROFILE_GROUPS if any(k in event.key for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + us
    total = sum(groups.values()) or 1.0
    return {
        "time_share": {g: round(v / total, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "timer": "device self time" if device.type == "cuda" else "CPU self time",
    }


def _step_fn(parts: tuple, plan: Plan, device: torch.device, amp: str) -> Callable[[], torch.Tensor]:
    _, net, opt = parts
    x = torch.randn(plan.batch, 3, plan.image, plan.image, device=device)  # [b, 3, s, s]
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (plan.batch,), device=device)

    def step() -> torch.Tensor:
        return _sgd_step(net, opt, x, y, device, amp)

    return step


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# (a) + (b): one side-by-side loop per model


def measure_model(name: str, plan: Plan, device: torch.device, amp: str, compile_: bool,
                  workers: list[int]) -> dict[str, Any]:
    """Baseline(s), resnetlab and the pure step of ``name``, alternated in rounds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (plan.dataset_size, 3, plan.image, plan.image),
                           dtype=torch.uint8, generator=g)  # [n, 3, s, s]
    labels = torch.randint(0, NUM_CLASSES, (plan.dataset_size,), generator=g)  # [n]
    parts = resnetlab_parts(name, device, compile_)
    flops = train_flops_per_image(parts[0], plan, device, amp)
    contenders = {f"baseline_w{w}": baseline_contender(name, plan, images, labels, device, amp,
                                                       compile_, w) for w in workers}
    contenders["resnetlab"] = resnetlab_contender(parts, plan, images, labels, device, amp)
    contenders["pure_step"] = pure_contender(parts, plan, device, amp)
    rounds = alternate(contenders, plan.rounds)
    profile = profile_step(parts, plan, device, amp)
    best_base = max((k for k in rounds if k.startswith("baseline")), key=lambda k: rounds[k].median)
    same = count_params(parts[0]) == count_params(baseline_model(name))
    return {
        "model": name, "batch": plan.batch, "image_size": plan.image, "steps_per_round": plan.steps,
        "rounds": plan.rounds, "baseline_workers": workers, "same_parameter_count": same,
        "train_flops_per_image": flops,
        **{k: v.to_dict() for k, v in rounds.items()},
        "baseline": best_base,
        "ratio": paired_ratio(rounds["resnetlab"].rates, rounds[best_base].rates),
        "pure_step_flops_per_s": flops * rounds["pure_step"].median,
        "profile": profile,
    }


# ----------------------------------------------------------------------------------------------
# (c): a real fit() on CIFAR-format files


def write_fake_cifar(root: Path, train_images: int, seed: int = 0) -> Path:
    """Random images in the official CIFAR-10 python layout (5 train batches, a test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-train_images // 5)
    for name, n in [*[(f"data_batch_{i}", per) for i in range(1, 6)], ("test_batch", 100)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, NUM_CLASSES, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = {"label_names": [f"class{i}" for i in range(NUM_CLASSES)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(names, protocol=2))
    return root


class FitWindows:
    """``on_step`` for fit(): times windows of ``window`` consecutive steps inside an epoch, with
    the device waited on at each window's edges only (:class:`~benchmarks.common.Window`), and
    runs ``pure()`` (a window of pure steps) between fit windows, so both rates are sampled
    alternately through the run. Epoch 1 is warm-up; a window never spans an epoch boundary
    (validation, checkpoint)."""

    def __init__(self, device: torch.device, window: int, steps_per_epoch: int, batch: int,
                 pure: Callable[[], tuple[int, float]]) -> None:
        self.clock, self.window, self.steps_per_epoch, self.batch = Window(device), window, steps_per_epoch, batch
        self.pure = pure
        self.seconds, self.steps, self.left = 0.0, 0, 0
        self.pure_rates: list[float] = []

    def __call__(self, info: dict[str, Any]) -> bool:
        if self.left:  # inside a window
            self.left -= 1
            if self.left == 0:
                self.seconds += self.clock.stop()
                self.steps += self.window
                images, seconds = self.pure()
                self.pure_rates.append(images / seconds)
            return False
        batch = info["batch"] + 1  # batches done in this epoch
        if info["epoch"] >= 1 and batch + self.window <= self.steps_per_epoch:
            self.clock.start()  # the next `window` steps are timed
            self.left = self.window
        return False

    @property
    def images_per_s(self) -> float:
        return self.steps * self.batch / self.seconds if self.seconds else float("nan")


def measure_fit(name: str, plan: Plan, steps_per_epoch: int, epochs: int, device: torch.device,
                amp: str, compile_: bool, workdir: Path) -> dict[str, Any]:
    """fit()'s loop images/s against the pure step's, interleaved inside one fit() run.

    A timed fit window is whole iterations of fit's loop (next batch from its loader, the step,
    its meters and per-step checks), timed by :class:`FitWindows` with a sync at its edges only;
    after each, a window of ``plan.steps`` pure steps runs on a second model (fit's state is
    untouched). Both rates share the run's machine load.
    """
    import resnetlab

    val_fraction = 0.1
    train_images = int(steps_per_epoch * plan.batch / (1 - val_fraction)) + plan.batch // 2
    root = write_fake_cifar(workdir / "cifar", train_images)
    pure = pure_contender(resnetlab_parts(name, device, compile_), plan, device, amp)
    window = max(2, steps_per_epoch // 4)  # ~3 fit windows an epoch after the first
    windows = FitWindows(device, window, steps_per_epoch, plan.batch, pure)
    overrides = [
        f"model.name={name}", "data.name=cifar10", f"data.root={root}", f"data.val_fraction={val_fraction}",
        f"train.batch_size={plan.batch}", f"train.epochs={epochs}", f"train.eval_every={epochs}",
        f"train.device={device}", f"train.amp={amp}", f"train.compile={str(compile_).lower()}",
        "train.quiet=true", "train.tensorboard=false", "train.test_at_end=false",
        f"optim.lr={LR}", "optim.schedule=constant", "optim.warmup=none",
        f"run.root={workdir / 'runs'}", f"run.name=fit-{name}",
    ]
    result = resnetlab.train(None, overrides, on_step=windows)
    pure_rounds = Rounds(windows.pure_rates)
    return {
        "model": name, "batch": plan.batch, "steps_per_epoch": result.steps // epochs, "epochs": epochs,
        "fit_steps_timed": windows.steps, "fit_images_per_s": windows.images_per_s,
        "pure_step": pure_rounds.to_dict(), "ratio": windows.images_per_s / pure_rounds.median,
    }


# ----------------------------------------------------------------------------------------------


def run(quick: bool = False, device: str = "auto", compile_: bool = False,
        models: list[str] | None = None, write: bool = True,
        cases: tuple[str, ...] = ("a", "b", "c")) -> dict[str, dict[str, Any]]:
    """Measure ``cases`` of (a), (b), (c); write ``results/<case>.json``; return the payloads."""
    dev = pick_device(device)
    amp = amp_for(dev)
    plans = PLANS[(dev.type if dev.type == "cuda" else "cpu", quick)]
    names = models or list(plans)
    unknown = [n for n in names if n not in PLANS[("cpu", False)]]
    if unknown:
        raise SystemExit(f"--models: no plan for {', '.join(unknown)}; known: {', '.join(PLANS[('cpu', False)])}")
    plans = {n: plans.get(n) or PLANS[(dev.type if dev.type == "cuda" else "cpu", False)][n] for n in names}
    cores = usable_cores()
    default_workers = min(cores, 8) if dev.type == "cuda" else min(cores, 2)
    workers = [default_workers] if quick or dev.type == "cuda" else sorted({0, default_workers})
    machine = machine_info(dev)
    print(f"[bench_train] {describe_machine(machine)}; amp={amp}, compile={compile_}", flush=True)

    # The matmul ceiling is sampled before and after every model and the best kept: a single
    # sample taken while other work shares the machine would understate the peak.
    matmuls = [matmul_flops(dev, quick)] if "b" in cases else []
    rows = []
    for name, plan in (plans.items() if {"a", "b"} & set(cases) else ()):
        t0 = time.perf_counter()
        row = measure_model(name, plan, dev, amp, compile_, workers)
        rows.append(row)
        if "b" in cases:
            matmuls.append(matmul_flops(dev, quick))
        print(f"[a] {name}: resnetlab {fmt_rate(row['resnetlab']['images_per_s'])} img/s vs "
              f"{row['baseline']} {fmt_rate(row[row['baseline']]['images_per_s'])} -> "
              f"{row['ratio']:.2f}x ({time.perf_counter() - t0:.0f}s)", flush=True)
    flops_peak = dict(max(matmuls, key=lambda m: m["flops_per_s"])) if matmuls else {}
    if matmuls:
        flops_peak["samples_flops_per_s"] = [round(m["flops_per_s"] / 1e9, 1) * 1e9 for m in matmuls]
    for row in rows if "b" in cases else ():
        row["utilisation"] = row["pure_step_flops_per_s"] / flops_peak["flops_per_s"]
        shares = ", ".join(f"{g} {v:.0%}" for g, v in list(row["profile"]["time_share"].items())[:4])
        print(f"[b] {row['model']}: {row['pure_step_flops_per_s'] / 1e9:.1f} GFLOP/s of "
              f"{flops_peak['flops_per_s'] / 1e9:.1f} matmul -> {row['utilisation']:.2f} "
              f"(time: {shares})", flush=True)

    fit_rows = []
    fit_names = [n for n in FIT_MODELS[quick] if n in names] or [n for n in names if plans[n].image <= 64][:1]
    fit_names = fit_names if "c" in cases else []
    with tempfile.TemporaryDirectory(prefix="resnetlab-bench-") as tmp:
        for name in fit_names:
            t0 = time.perf_counter()
            steps = FIT_STEPS[(dev.type if dev.type == "cuda" else "cpu", quick)]
            fit_rows.append(measure_fit(name, plans[name], steps, FIT_EPOCHS[quick], dev, amp,
                                        compile_, Path(tmp)))
            r = fit_rows[-1]
            print(f"[c] {name}: fit {fmt_rate(r['fit_images_per_s'])} img/s over pure step "
                  f"{fmt_rate(r['pure_step']['images_per_s'])} -> {r['ratio']:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)

    common = {"machine": machine, "quick": quick, "amp": amp, "compile": compile_}
    out: dict[str, dict[str, Any]] = {
        "a": {"case": "a", "title": "training images/s, resnetlab vs idiomatic PyTorch loop",
              **common, "target": TARGETS["a"], "higher_is_better": True,
              "results": [{k: v for k, v in r.items() if k not in ("utilisation",)} for r in rows]},
        "b": {"case": "b", "title": "model FLOP/s over large-matmul FLOP/s", **common,
              "target": TARGETS["b"], "higher_is_better": True, "matmul": flops_peak,
              "results": [{"model": r["model"], "batch": r["batch"], "image_size": r["image_size"],
                           "train_flops_per_image": r["train_flops_per_image"],
                           "pure_step_images_per_s": r["pure_step"]["images_per_s"],
                           "model_flops_per_s": r["pure_step_flops_per_s"],
                           "ratio": r["utilisation"],
                           # the ratio if everything but the convolutions took no time
                           "convolution_only_ratio": r["utilisation"]
                           / (r["profile"]["time_share"].get("convolution") or float("nan")),
                           "profile": r["profile"]} for r in rows if "utilisation" in r]},
        "c": {"case": "c", "title": "whole-epoch (fit) images/s over pure train-step images/s",
              **common, "target": TARGETS["c"], "higher_is_better": True, "results": fit_rows},
    }
    out = {case: payload for case, payload in out.items() if case in cases}
    for case, payload in out.items():
        payload["met"] = all(met(r["ratio"], TARGETS[case], True) for r in payload["results"]) \
            if payload["results"] else None
        if write:
            write_json(case, payload)
    return out


def format_table(out: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'case':<5}{'model':<10}{'resnetlab':>12}{'reference':>12}{'ratio':>8}{'target':>8}"]
    for case in out:
        for r in out[case]["results"]:
            if case == "a":
                ours, ref = r["resnetlab"]["images_per_s"], r[r["baseline"]]["images_per_s"]
            elif case == "b":
                ours, ref = r["model_flops_per_s"] / 1e9, out["b"]["matmul"]["flops_per_s"] / 1e9
            else:
                ours, ref = r["fit_images_per_s"], r["pure_step"]["images_per_s"]
            lines.append(f"{case:<5}{r['model']:<10}{fmt_rate(ours):>12}{fmt_rate(ref):>12}"
                         f"{fmt_ratio(r['ratio']):>8}{TARGETS[case]:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one model, short rounds")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides (for GPUs)")
    p.add_argument("--models", help="comma-separated, e.g. resnet20,resnet50")
    args = p.parse_args(argv)
    out = run(args.quick, args.device, args.compile, parse_list(args.models, []) or None)
    print(format_table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
