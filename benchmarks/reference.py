"""The idiomatic torchvision-style Fashion-MNIST training loop that the benchmarks race resnetlab
against (``bench_speedrun``'s time to 93%, ``gpu_check``'s time to 94%): one owner, so both
measure the same loop a PyTorch user writes from a recipe's numbers.

- data: ``torchvision.datasets.FashionMNIST`` over the same IDX files resnetlab reads (decompressed
  into torchvision's ``FashionMNIST/raw/`` layout by :func:`torchvision_layout`), per-sample
  ``transforms`` (``RandomCrop(padding=data.augment.crop_padding)``, a horizontal flip when
  ``data.augment.flip``, ``ToTensor``, normalised by the training images' mean and std, computed
  once as the usual tutorial does) in a ``DataLoader(shuffle=True, drop_last=True)`` with worker processes
  (and pinned memory on CUDA);
- model: resnetlab's registry net ``model.name`` (or one the caller writes plainly);
- optimiser: ``torch.optim.SGD`` with the recipe's lr, momentum, Nesterov and weight decay;
- schedule: the recipe's warm-up then cosine, per optimiser step, written with torch's own
  schedulers (:func:`build_scheduler`; tests/test_bench_reference.py checks it equals
  ``resnetlab.engine.optim.lr_at`` step for step);
- loss: cross-entropy with the recipe's label smoothing; ``train.amp`` autocast (GradScaler for
  fp16) and channels_last as options;
- evaluation: top-1 on the official test images, after every epoch or once at the end; with
  ``train.test_tta: flip`` the prediction is the argmax of the mean softmax of each image and its
  left-right mirror (the plain top-1 is kept beside it).
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import autocast
from resnetlab.config import Config, OptimConfig

NUM_CLASSES = 10


def torchvision_layout(files: Iterable[Path], dst: Path) -> Path:
    """``dst/FashionMNIST/raw/<file>``, each IDX file decompressed (or copied), as torchvision's
    ``FashionMNIST(root=dst)`` reads them; returns ``dst``. ``files``: the four IDX files (names
    as published, ``.gz`` or not)."""
    raw = dst / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in files:
        opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as src, open(raw / path.name.removesuffix(".gz"), "wb") as out:
            shutil.copyfileobj(src, out)
    return dst


def build_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's schedule as a torchvision user writes it, stepped once per optimiser step:
    ``LinearLR`` from ``warmup_lr`` to ``lr`` over ``round(warmup_epochs * steps_per_epoch)``
    steps, then ``CosineAnnealingLR`` down to ``min_lr`` over the remaining steps.

    The same numbers as resnetlab's ``lr_at`` (tests/test_bench_reference.py). Only the recipes'
    cosine schedule with a linear or no warm-up is written here; others raise ValueError."""
    if o.schedule != "cosine" or o.warmup not in ("linear", "none"):
        raise ValueError(f"reference loop: optim.schedule={o.schedule} with optim.warmup={o.warmup} is not "
                         "written here; it has cosine with a linear or no warm-up")
    total = epochs * steps_per_epoch
    warm = int(round(o.warmup_epochs * steps_per_epoch)) if o.warmup == "linear" else 0
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warm), eta_min=o.min_lr)
    if warm == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=o.warmup_lr / o.lr, end_factor=1.0,
                                               total_iters=warm)
    return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warm])


def backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """The plain loop's update: zero the gradients, backward, step (through ``scaler`` for fp16)."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


@dataclass
class ReferenceResult:
    """What one run of the loop did: wall seconds from its start to the last test score, the last
    test accuracy (%), test images, epochs and optimiser steps run, and the per-epoch curve when
    tested every epoch (``{"epoch", "seconds", "test_acc"}``). ``test_acc`` is the recipe's
    measure (with flip test-time augmentation where ``train.test_tta`` asks for it);
    ``test_acc_plain`` is the top-1 of the images alone."""

    seconds: float
    test_acc: float
    test_acc_plain: float
    test_images: int
    epochs: int
    steps: int
    curve: list[dict[str, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # the lr of every optimiser step, in order


def train(cfg: Config, tv_root: Path, device: torch.device, *, workers: int, channels_last: bool,
          model: nn.Module | None = None, subset: Callable[[torch.Tensor], Sequence[int]] | None = None,
          test_every_epoch: bool = False, stop: Callable[[float, float], bool] | None = None,
          started: float | None = None) -> ReferenceResult:
    """Train ``cfg``'s net on Fashion-MNIST under ``tv_root`` (:func:`torchvision_layout`) the
    torchvision way and score the official test images.

    ``workers``: DataLoader worker processes (persistent; pinned memory on CUDA).
    ``channels_last``: NHWC model and batches. ``model``: the net to train (default: the
    registry's ``cfg.model.name`` with one input channel, seeded by ``cfg.seed``).
    ``subset``: the training labels ``[n]`` -> the indices of the images to train on (a
    ``Subset``; default all). ``test_every_epoch``: score the
    test set after every epoch (the curve) and call ``stop(seconds, test_acc)``; True ends
    training. ``started``: ``time.perf_counter()`` the clock counts from (default: the call).
    Numbers come from ``cfg``: augment, batch, eval batch, epochs, optimiser, schedule, label
    smoothing, amp."""
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms as T

    from resnetlab.models import create_model

    t0 = time.perf_counter() if started is None else started
    o, tr, aug = cfg.optim, cfg.train, cfg.data.augment
    torch.manual_seed(cfg.seed)
    train_set = torchvision.datasets.FashionMNIST(str(tv_root), train=True)
    pixels = train_set.data.float().div(255)  # [n, 28, 28]: the mean/std a tutorial computes once
    norm = T.Normalize((float(pixels.mean()),), (float(pixels.std()),))
    size = tuple(train_set.data.shape[-2:])
    # The classic transforms on the PIL image: on 28x28 images they cost ~400 us per image
    # against ~640 us for the same steps in transforms.v2 (torchvision 0.29, one CPU thread),
    # so the reference is not slowed by a choice a user might not make.
    train_set.transform = T.Compose([T.RandomCrop(size, padding=aug.crop_padding),
                                     *([T.RandomHorizontalFlip()] if aug.flip else []), T.ToTensor(), norm])
    test_set = torchvision.datasets.FashionMNIST(str(tv_root), train=False, transform=T.Compose([T.ToTensor(), norm]))
    data = Subset(train_set, list(subset(train_set.targets))) if subset is not None else train_set
    loader_kw: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda",
                                 "persistent_workers": workers > 0}
    train_loader = DataLoader(data, batch_size=tr.batch_size, shuffle=True, drop_last=True, **loader_kw)
    test_loader = DataLoader(test_set, batch_size=tr.eval_batch_size, **loader_kw)
    if model is None:
        model = create_model(cfg.model.name, num_classes=NUM_CLASSES, in_chans=1)
    model = model.to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                          weight_decay=o.weight_decay)
    sched = build_scheduler(opt, o, len(train_loader), tr.epochs)
    scaler = torch.amp.GradScaler(device.type) if tr.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    out = ReferenceResult(seconds=0.0, test_acc=float("nan"), test_acc_plain=float("nan"),
                          test_images=len(test_set), epochs=0, steps=0)
    flip_tta = tr.test_tta == "flip"

    def test() -> float:
        """Top-1 (%) of the recipe's measure; sets ``out.test_acc_plain`` on the way."""
        model.eval()
        correct = torch.zeros(2, device=device)  # plain, flip TTA
        with torch.no_grad(), autocast(device, tr.amp):
            for x, y in test_loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
                y = y.to(device, non_blocking=True)
                logits = model(x).float()
                correct[0] += (logits.argmax(1) == y).sum()
                if flip_tta:
                    probs = logits.softmax(1) + model(x.flip(3)).float().softmax(1)
                    correct[1] += (probs.argmax(1) == y).sum()
        plain, flipped = (100.0 * c / len(test_set) for c in correct.tolist())
        out.test_acc_plain = plain
        return flipped if flip_tta else plain

    for epoch in range(tr.epochs):
        model.train()
        for x, y in train_loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
            y = y.to(device, non_blocking=True)
            with autocast(device, tr.amp):
                loss = criterion(model(x), y)
            out.lrs.append(opt.param_groups[0]["lr"])
            backward_step(loss, opt, scaler)
            sched.step()
            out.steps += 1
        out.epochs = epoch + 1
        if test_every_epoch:
            out.test_acc = test()
            out.seconds = time.perf_counter() - t0
            out.curve.append({"epoch": out.epochs, "seconds": out.seconds, "test_acc": out.test_acc})
            if stop is not None and stop(out.seconds, out.test_acc):
                break
    if not test_every_epoch:
        out.test_acc = test()
        out.seconds = time.perf_counter() - t0
    return out
