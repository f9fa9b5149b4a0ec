"""The step functions: ``train_step``, ``train_one_epoch`` (its loop) and ``evaluate``. Explicit
arguments in, tensors and dicts out.

None of them knows about run folders, checkpoints or signals: ``fit()`` passes an
``after_step`` callback that does those things and says when to stop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from resnetlab.data.loaders import Loader
from resnetlab.engine.dist import all_reduce_sum
from resnetlab.engine.metrics import SumMeter, mirror_log_probs
from resnetlab.engine.optim import ModelEMA, set_lr

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast to ``amp``'s dtype on ``device``, or a no-op for ``"none"``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    ema: ModelEMA | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the batch ``x`` ``[b, c, h, w]``, labels ``y`` ``[b]``: forward
    (under ``amp``'s autocast), backward (through ``scaler`` for fp16), optional clipping of the
    global gradient norm, the update, then the EMA. Returns ``(loss, logits [b, classes])``;
    the optimiser's lr is the caller's business (``train_one_epoch`` sets it per step)."""
    with autocast(x.device, amp):
        logits = model(x)  # [b, classes]
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
    if ema is not None:
        ema.update(model)
    return loss, logits


def train_one_epoch(
    model: nn.Module,
    loader: Loader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    epoch: int,
    start_batch: int,
    step: int,
    lr_fn: Callable[[int], float],
    meter: SumMeter,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    ema: ModelEMA | None = None,
    after_step: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Train over ``loader``'s epoch ``epoch`` from batch ``start_batch``, one
    :func:`train_step` per batch.

    ``step`` is the global optimiser step before this call; ``lr_fn(step)`` sets each step's
    lr. ``after_step(info)`` runs after every optimiser step with the step's loss tensor and
    may return True to stop (a signal, a non-finite loss); the epoch then ends early.
    Returns ``{"step", "batches_done", "stopped", "seconds", "images"}``.
    """
    model.train()
    device = meter.sums.device
    t0, images, batch = time.perf_counter(), 0, start_batch
    stopped = False
    for batch, (x, y) in enumerate(loader.iterate(epoch, start_batch), start=start_batch):
        lr = lr_fn(step)
        set_lr(optimizer, lr)
        loss, logits = train_step(model, x, y, optimizer, criterion, amp=amp, scaler=scaler,
                                  clip_grad_norm=clip_grad_norm, ema=ema)
        meter.update(loss, logits.float(), y)
        step += 1
        images += y.shape[0]
        if after_step is not None and after_step(
            {"epoch": epoch, "batch": batch, "step": step, "lr": lr, "loss": loss.detach(), "model": model}
        ):
            stopped = True
            break
    else:
        batch = len(loader) - 1
    if device.type == "cuda":  # queued kernels belong to this epoch's time (images/s)
        torch.cuda.synchronize(device)
    return {"step": step, "batches_done": batch + 1, "stopped": stopped,
            "seconds": time.perf_counter() - t0, "images": images}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, *, device: torch.device, amp: str = "none",
             criterion: nn.Module | None = None, tta_flip: bool = False) -> dict[str, float]:
    """Loss and top-1/top-5 error and accuracy (percent) over every sample of ``loader``.

    ``tta_flip`` also runs every image mirrored left-right and adds ``loss_flip``,
    ``top1_acc_flip``, ``top1_err_flip`` and ``top5_acc_flip``: the same measures of the mean
    softmax of each image and its mirror (:func:`~resnetlab.engine.metrics.mirror_log_probs`).
    Under DDP each rank evaluates its shard and the sums are all-reduced, so every rank
    returns the metrics of the whole split.
    """
    criterion = criterion or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    meter = SumMeter(device)
    mirrored = SumMeter(device)
    t0 = time.perf_counter()
    for x, y in loader.iterate(0):
        with autocast(device, amp):
            logits = model(x).float()  # [b, k]
            flipped = model(x.flip(dims=[3])).float() if tta_flip else None  # mirror the width axis
        meter.update(criterion(logits, y), logits, y)
        if flipped is not None:
            both = mirror_log_probs(logits, flipped)  # [b, k]
            mirrored.update(criterion(both, y), both, y)
    all_reduce_sum(meter.sums)
    out = meter.summary()
    if tta_flip:
        all_reduce_sum(mirrored.sums)
        out |= {f"{k}_flip": v for k, v in mirrored.summary().items() if k != "count"}
    model.train(was_training)
    out["seconds"] = time.perf_counter() - t0
    return out
