"""Distributed helpers: torchrun's environment variables plus a few small functions.

One process is the degenerate case of many: every helper here works (and does nothing costly)
when ``WORLD_SIZE`` is unset, so the training code has a single path.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid
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
        timeout = datetime.timedelta(minutes=10)
        store = _round_store(rank, world_size, timeout)
        if store is None:  # not under an elastic agent's shared store: env:// as usual
            tdist.init_process_group(backend=backend, timeout=timeout)
        else:
            tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                     timeout=timeout)
    if rank != 0:
        log.setLevel(logging.WARNING)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


ROUND_PREFIX = "resnetlab/round"  # keys of one restart round live under f"{ROUND_PREFIX}{n}/"


def _round_store(rank: int, world_size: int, timeout: datetime.timedelta) -> tdist.Store | None:
    """A view of torchrun's shared store that only this restart round's workers write to.

    Since torch 2.5 the elastic agent of node 0 hosts one TCPStore for the whole job
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and every restart round's process group reuses it, so
    a restarted group can read the dead round's keys (gloo peer addresses, NCCL unique ids) and
    connect to processes that no longer exist (pytorch#135712). ``TORCHELASTIC_RESTART_COUNT``
    cannot name the round: each agent counts its own restarts, and a node that restarts because a
    peer failed or a replacement node joined does not count (one node says 1, another 0). So the
    round number is agreed in the store itself (:func:`_agree_round`) and the process group gets
    a ``PrefixStore`` for it. ``None`` when the agent does not share its store (no torchrun, or
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): rank 0 then hosts a fresh store every round.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False, timeout=timeout)
    n = _agree_round(store, rank, world_size, timeout)
    return tdist.PrefixStore(f"{ROUND_PREFIX}{n}/", store)


def _agree_round(store: tdist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
                 poll_s: float = 0.02) -> int:
    """A number no earlier round used, the same on every rank of this round (a handshake).

    Rank 0 draws it from a counter (``store.add`` never hands out a value twice). Every other
    rank posts a fresh random token under its rank and waits for the answer under that token:
    keys a dead round may have left (a token nobody answered, an answer nobody read) are never
    mistaken for this round's, because rank 0 answers every token it sees until each rank has
    confirmed under the new round's own prefix.
    """
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f"resnetlab/hello/{rank}", token)
        n = int(store.get(f"resnetlab/answer/{token}"))  # waits up to the store's timeout
        store.set(f"{ROUND_PREFIX}{n}/joined/{rank}", "1")
        return n
    n = store.add("resnetlab/rounds", 1)
    answered: dict[int, str] = {}
    pending = set(range(1, world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    while pending:
        for r in sorted(pending):
            if store.check([f"{ROUND_PREFIX}{n}/joined/{r}"]):
                pending.discard(r)
            elif store.check([f"resnetlab/hello/{r}"]):
                token = store.get(f"resnetlab/hello/{r}").decode()
                if answered.get(r) != token:  # a new token: this round's rank r, or a stale one
                    store.set(f"resnetlab/answer/{token}", str(n))
                    answered[r] = token
        if pending:
            # A newer round has begun (this process outlived its agent): stop answering, or
            # this round's number would reach the new round's ranks.
            if store.add("resnetlab/rounds", 0) != n:
                raise RuntimeError(f"restart round {n} was superseded before every rank joined")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(pending)} did not join restart round {n} of the "
                                   f"process group within {timeout}")
            time.sleep(poll_s)
    return n


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


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone). A collective: all ranks call it."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of every rank.

    torch's SyncBatchNorm runs on CUDA only; this one works with any backend (gloo on CPU).
    Per-channel sums and sums of squares (float64, so E[x^2] - E[x]^2 loses nothing) are
    all-reduced with the autograd-aware collective, whose backward sums the gradients of every
    rank's loss: the gradient of the global batch's statistics, as SyncBatchNorm computes it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, c, h, w]
        if not (self.training and tdist.is_available() and tdist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        stats = all_reduce(torch.cat([xd.sum(dim=(0, 2, 3)), (xd * xd).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n  # [c]
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # [c], biased: used to normalise
        if self.track_running_stats:
            # torch types BN buffers as Optional; with track_running_stats they exist
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # BatchNorm2d's rule: momentum None is the cumulative average over the steps.
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch's SyncBatchNorm on CUDA; :class:`GlooSyncBatchNorm` elsewhere (same state dict)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, torch.nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=device)
        # The very same Parameters and buffers: fit() builds the optimiser (and EMA) before
        # wrap_ddp, so copies would leave the optimiser stepping tensors the model no longer uses.
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """SyncBN (optional) and DistributedDataParallel around ``model`` when distributed."""
    if not info.enabled:
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (its state dict has clean keys)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model
