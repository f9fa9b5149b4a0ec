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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

log = logging.getLogger("resnetlab")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_from_env created the process group: fit() destroys it at the end

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
    owns = not tdist.is_initialized()
    if owns:
        _import_dynamo_first()
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
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns)


def _import_dynamo_first() -> None:
    """Import ``torch._dynamo`` before the process group exists, so that the group can be destroyed.

    torch._dynamo imports ``torch.distributed.nn.functional``, whose functions take
    ``group=group.WORLD`` as a default argument: imported after ``init_process_group`` (DDP's
    constructor and the functional collectives of :class:`SyncBatchNorm2d` import torch._dynamo),
    those 10 defaults hold the world group (``sys.getrefcount`` 10 -> 20, torch 2.14), and
    ``destroy_process_group`` cannot free it: gloo's worker threads live on to the interpreter's
    exit. A worker that is still releasing the last collective's tensors then needs the GIL of a
    finalising interpreter; Python ends that thread with ``pthread_exit``, whose unwinding through
    a ``noexcept`` destructor is ``std::terminate``: a finished run's rank aborts ("terminate
    called without an active exception", SIGABRT), seen on a cold page cache when the
    destructor's code page faults in.
    Imported first, the group is freed by :func:`shutdown` and its threads are joined there
    (tests/test_distributed.py checks that no gloo thread outlives ``fit``).
    """
    import torch._dynamo  # noqa: F401  (DDP imports it anyway: no cost in practice)


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
    """Wait for every rank (no-op alone)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


T = TypeVar("T")
R = TypeVar("R")


def map_sharded(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)``, with the work split over the ranks: each rank runs ``fn`` on every
    ``world_size``-th item from its rank on, and every rank gets all results in ``items``' order.
    A collective (all ranks call it with the same ``items``); alone, just ``fn(items)``.

    ``data.check_images=true`` decodes every image file this way: each rank decodes its share
    once instead of every rank decoding the whole dataset, and all ranks drop the same files.
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return fn(items)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    parts = all_gather_object(fn(items[rank::world]))
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def _world() -> tdist.ProcessGroup:
    group = tdist.group.WORLD
    assert group is not None  # only called inside an initialised process group
    return group


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose backward sums the gradients over the ranks, built on the
    functional collectives, which torch.compile traces into its graph (the autograd-aware
    ``torch.distributed.nn.functional.all_reduce`` is deprecated and unsupported under compile)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(x, "sum", _world()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", _world()))


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of every rank.

    Used on every backend (NCCL and gloo). torch's own SyncBatchNorm runs on CUDA only, and its
    forward selects the ranks with a non-empty batch by a boolean mask, a host synchronisation in
    every BN layer (53 per resnet50 forward) that also breaks compiled graphs at each BN. Here
    there is no host read: each rank computes its per-channel mean and (biased) variance in
    float32 with one stable kernel (``torch.var_mean``), and one all-reduce of float64
    ``[n*mean, n*(var + mean^2), n]`` (``2c + 1`` numbers) gives the global mean and variance.
    The all-reduce is the autograd-aware one: its backward sums every rank's gradient of the
    statistics, as SyncBatchNorm's backward does. A rank with an empty batch contributes n = 0.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, c, h, w]
        if not (self.training and tdist.is_available() and tdist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        var_l, mean_l = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)  # [c] each, this rank
        n_l = x.numel() // c  # samples per channel on this rank: a Python int, no transfer
        local = torch.cat([mean_l.double() * n_l, (var_l.double() + mean_l.double() ** 2) * n_l,
                           mean_l.new_full((1,), float(n_l), dtype=torch.float64)])  # [2c + 1]
        stats = _AllReduceSum.apply(local)
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
            y = y * self.weight.to(x.dtype)[None, :, None, None] + self.bias.to(x.dtype)[None, :, None, None]
        return y


GlooSyncBatchNorm = SyncBatchNorm2d  # its name before it ran on NCCL too


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm2d of ``module`` as :class:`SyncBatchNorm2d` (on any device; same state dict,
    the very same Parameters and buffers)."""
    if isinstance(module, torch.nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
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
