"""Distributed helpers: torchrun's environment variables plus a few small functions.

One process is the degenerate case of many: every helper here works (and does nothing costly)
when ``WORLD_SIZE`` is unset, so the training code has a single path.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger("resnetlab")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); no-op alone.

    Ranks other than 0 have their ``resnetlab`` logger raised to WARNING so that only rank 0
    reports progress, without patching ``print``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    if rank != 0:
        log.setLevel(logging.WARNING)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place when distributed) and return it."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the run folder name with its timestamp)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """SyncBN (optional) and DistributedDataParallel around ``model`` when distributed."""
    if not info.enabled:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (its state dict has clean keys)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
