"""Loaders: an in-memory device loader (digits, CIFAR) and a DataLoader path (image folders).

Both follow one batch plan. Training: epoch ``e`` is a permutation drawn from
``(seed, e)``; global batch ``b`` is ``perm[b*B:(b+1)*B]`` (the tail that does not fill a batch
is dropped) and rank ``r`` of ``W`` takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` of it.
Augmentation is drawn per sample from ``(seed, e, b)`` (in memory) or ``(seed, e, sample)``
(folders), never from a global RNG. So a batch is a pure function of ``(seed, epoch, index)``:
``iterate(epoch, start_batch=k)`` resumes bit for bit without replaying batches ``0..k-1``,
and ``W`` processes together see exactly the samples one process would. The loaders keep no
random state; a checkpoint only needs the epoch and the batch index.

Evaluation: samples in order, no augmentation, nothing dropped; rank ``r`` takes its
contiguous shard (shard sizes differ by at most one, so ``len()`` may too: reduce metrics once
after the loop, weighted by :meth:`num_samples`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from functools import partial
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from resnetlab.config import DataConfig
from resnetlab.data.augment import (
    apply_crop_flip,
    draw_crop_flip,
    make_generator,
    normalize,
    sample_resized_crop,
)
from resnetlab.data.datasets import ArraySplit, DataMeta, FileSplit, eval_transform
from resnetlab.data.images import BadImageError, DataError, read_image, read_resized_crop

log = logging.getLogger("resnetlab")

Batch = tuple[torch.Tensor, torch.Tensor]  # images [b, c, h, w] float32, labels [b] int64


@runtime_checkable
class Loader(Protocol):
    """What the training and evaluation loops need from a loader."""

    batch_size: int  # GLOBAL batch size, all ranks together

    def __len__(self) -> int:
        """Batches per epoch (this rank)."""
        ...

    def num_samples(self) -> int:
        """Samples this rank sees per epoch (for averaging evaluation metrics)."""
        ...

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_batch`` on: normalised float32 images and int64
        labels, on the loader's device."""
        ...


def build_loader(
    split: ArraySplit | FileSplit,
    meta: DataMeta,
    cfg: DataConfig,
    *,
    train: bool,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = True,
) -> Loader:
    """The loader for ``split``: :class:`InMemoryLoader` for arrays, :class:`FolderLoader` for
    files. ``batch_size`` is global; for training it must divide by ``world_size``."""
    device = torch.device(device)
    if isinstance(split, ArraySplit):
        return InMemoryLoader(split, meta, cfg, train=train, batch_size=batch_size, device=device,
                              seed=seed, rank=rank, world_size=world_size,
                              channels_last=channels_last)
    if isinstance(split, FileSplit):
        return FolderLoader(split, meta, cfg, train=train, batch_size=batch_size, device=device,
                            seed=seed, rank=rank, world_size=world_size,
                            channels_last=channels_last)
    raise TypeError(f"expected an ArraySplit or FileSplit, got {type(split).__name__}")


# ----------------------------------------------------------------------------------------------
# The batch plan shared by both loaders


class _BatchPlan:
    """Which sample indices each batch of an epoch holds, for one rank.

    ``weights`` (training only): per-sample draw weights; an epoch is then ``n`` indices drawn
    with replacement from ``(seed, "balance", epoch)`` instead of a permutation (data.balance).
    """

    def __init__(
        self, n: int, batch_size: int, *, train: bool, seed: int, rank: int, world_size: int,
        weights: torch.Tensor | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.weights = weights if train else None  # [n] float64, or None
        if train:
            if batch_size % world_size:
                raise DataError(
                    f"train.batch_size={batch_size} is global and must divide by the number of "
                    f"processes ({world_size})"
                )
            self.local = batch_size // world_size  # samples per rank per batch
            self.num_batches = n // batch_size  # drop_last
            if self.num_batches == 0:
                raise DataError(
                    f"train.batch_size={batch_size} is larger than the training split ({n} "
                    "samples): not one full batch per epoch"
                )
        else:
            self.local = max(1, batch_size // world_size)
            base, extra = divmod(n, world_size)
            self.shard_start = rank * base + min(rank, extra)  # contiguous shard of the samples
            self.shard_size = base + (rank < extra)
            self.num_batches = math.ceil(self.shard_size / self.local)

    def num_samples(self) -> int:
        return self.num_batches * self.local if self.train else self.shard_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """``[n]`` int64 CPU sample order of a training epoch (with ``weights``: a seeded
        weighted draw with replacement, a pure function of ``(seed, epoch)`` too)."""
        if self.weights is not None:
            gen = make_generator(self.seed, "balance", epoch)
            return torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        return torch.randperm(self.n, generator=make_generator(self.seed, "perm", epoch))

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch index, this rank's sample indices [b] int64 on the CPU)`` from start_batch."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if self.train:
            perm = self.permutation(epoch)
            lo = self.rank * self.local  # this rank's offset inside a global batch
            for b in range(start_batch, self.num_batches):
                start = b * self.batch_size + lo
                yield b, perm[start : start + self.local]
        else:
            end = self.shard_start + self.shard_size
            for b in range(start_batch, self.num_batches):
                start = self.shard_start + b * self.local
                yield b, torch.arange(start, min(start + self.local, end))


def balance_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``1 / (samples of its class)``: every class is drawn equally often.

    ``labels``: ``[n]`` int64 -> ``[n]`` float64 (multinomial normalises them).
    """
    counts = torch.bincount(labels.cpu())  # [classes]
    return 1.0 / counts[labels.cpu()].double()


def _plan(split: ArraySplit | FileSplit, cfg: DataConfig, *, train: bool, batch_size: int,
          seed: int, rank: int, world_size: int) -> _BatchPlan:
    weights = balance_weights(split.labels) if train and cfg.balance else None
    return _BatchPlan(len(split), batch_size, train=train, seed=seed, rank=rank,
                      world_size=world_size, weights=weights)


def _finish(x: torch.Tensor, meta: DataMeta, channels_last: bool) -> torch.Tensor:
    """uint8 [b, c, h, w] -> normalised float32, NHWC in memory when asked."""
    x = normalize(x, meta)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------------------------
# In memory


class InMemoryLoader:
    """A whole split as one uint8 tensor; batches gathered, augmented and normalised on device.

    With ``cfg.in_memory`` false the tensor stays in host memory and only each batch is moved;
    the batches are the same.
    """

    def __init__(
        self,
        split: ArraySplit,
        meta: DataMeta,
        cfg: DataConfig,
        *,
        train: bool,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
    ) -> None:
        if split.images.dtype != torch.uint8 or split.images.ndim != 4:
            raise DataError(f"expected uint8 images [n, c, h, w], got {split.images.dtype} "
                            f"{tuple(split.images.shape)}")
        self.batch_size = batch_size
        self.meta, self.device, self.channels_last = meta, device, channels_last
        self.train = train
        self.padding = cfg.augment.crop_padding
        self.flip = cfg.augment.flip
        self.augment = train and (self.padding > 0 or self.flip)
        self.plan = _plan(split, cfg, train=train, batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size)
        self.seed = seed
        store = device if cfg.in_memory else torch.device("cpu")
        self.images = split.images.to(store)  # [n, c, h, w] uint8
        self.labels = split.labels.to(store)  # [n] int64

    def __len__(self) -> int:
        return self.plan.num_batches

    def num_samples(self) -> int:
        return self.plan.num_samples()

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        plan = self.plan
        for b, idx in plan.batches(epoch, start_batch):
            idx = idx.to(self.images.device, non_blocking=True)
            x = self.images[idx].to(self.device, non_blocking=True)  # [local, c, h, w] uint8
            y = self.labels[idx].to(self.device, non_blocking=True)  # [local] int64
            if self.augment:
                # Draw for the whole GLOBAL batch, then take this rank's slice: W processes
                # then augment every sample exactly as one process would.
                params = draw_crop_flip(
                    self.batch_size, self.padding, self.flip,
                    make_generator(self.seed, "augment", epoch, b),
                )
                lo = plan.rank * plan.local
                params = params.slice(lo, lo + plan.local).to(self.device)
                x = apply_crop_flip(x, params, self.padding)
            yield _finish(x, self.meta, self.channels_last), y


# ----------------------------------------------------------------------------------------------
# Image folders through torch's DataLoader


Sample = tuple[torch.Tensor | None, int, tuple[str, str] | None]  # pixels, label, (file, why)


class _FileDataset(Dataset):
    """Decodes one image per key ``(index, epoch)``; the crop is seeded by ``(seed, epoch,
    index)``, so it does not depend on which worker decodes it, or in which order.

    An unreadable file does not raise in the worker (where the error would come back wrapped
    in a traceback): the sample comes back as ``(None, label, (file, reason))`` and the loader
    in the main process stops or skips (data.on_bad_image).
    """

    def __init__(self, split: FileSplit, meta: DataMeta, cfg: DataConfig, *, train: bool,
                 seed: int) -> None:
        self.paths = list(split.paths)
        self.labels = split.labels.tolist()
        self.meta, self.train, self.seed = meta, train, seed
        self.scale = (cfg.augment.scale_min, 1.0)  # area fraction of the random-resized crop
        self.ratio = (3 / 4, 4 / 3)  # aspect ratio range, as torchvision and the paper
        self.flip = cfg.augment.flip

    def __len__(self) -> int:
        return len(self.paths)

    def train_sample(self, path: str, generator: torch.Generator) -> torch.Tensor:
        """Random-resized crop + flip -> uint8 [c, s, s]; the crop is drawn from the image's
        size before decoding, so JPEGs can be decoded at reduced scale."""
        def pick_box(height: int, width: int) -> tuple[int, int, int, int]:
            return sample_resized_crop(height, width, self.scale, self.ratio, generator)

        x = read_resized_crop(path, self.meta.in_chans, pick_box, self.meta.input_size)
        if self.flip and bool(torch.rand(1, generator=generator) < 0.5):
            x = x.flip(-1)
        return x

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, epoch = key
        path = self.paths[index]
        try:
            if self.train:
                x = self.train_sample(path, make_generator(self.seed, "crop", epoch, index))
            else:
                x = eval_transform(read_image(path, self.meta.in_chans), self.meta)
        except BadImageError as e:  # "<path>: <reason>"
            return None, self.labels[index], (path, str(e).removeprefix(f"{path}: "))
        except DataError as e:  # decoded, but refused by the preprocessing (e.g. too thin)
            return None, self.labels[index], (path, str(e))
        return x, self.labels[index], None


def normalize_batch(x: torch.Tensor, meta: DataMeta, channels_last: bool) -> torch.Tensor:
    """:func:`~resnetlab.data.augment.normalize` (bit for bit: the same float32 scale and
    shift, the same two roundings) into one freshly allocated, NHWC-if-asked float32 tensor:
    one allocation and three passes instead of four allocations, for the CPU path."""
    c = x.shape[-3]
    mean = torch.tensor(meta.mean, dtype=torch.float32)  # [c]
    std = torch.tensor(meta.std, dtype=torch.float32)  # [c]
    fmt = torch.channels_last if channels_last and x.ndim == 4 else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, memory_format=fmt)
    out.copy_(x)  # uint8 -> float32 and the layout change in one pass
    out.mul_((1.0 / (255.0 * std)).view(c, 1, 1))
    return out.add_((-mean / std).view(c, 1, 1))


Collated = tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]


def _collate(samples: list[Sample], meta: DataMeta | None = None,
             channels_last: bool = True) -> Collated:
    """``(images of the readable samples or None, labels [b], [(file, reason)])``: images are
    uint8 ``[b, c, s, s]``, or, with ``meta`` (CPU training: no device to do it on, so the
    workers do it in parallel), already normalised float32."""
    good = [(x, y) for x, y, _ in samples if x is not None]
    bad = [b for _, _, b in samples if b is not None]
    x = torch.stack([x for x, _ in good]) if good else None
    if x is not None and meta is not None:
        x = normalize_batch(x, meta, channels_last)
    return x, torch.tensor([y for _, y in good], dtype=torch.int64), bad


class _PlanSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler over a :class:`_BatchPlan`; :meth:`set` picks the epoch and first batch
    before each pass (it lives in the main process, so persistent workers follow it)."""

    def __init__(self, plan: _BatchPlan) -> None:
        self.plan, self.epoch, self.start_batch = plan, 0, 0

    def set(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.plan.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch  # bound now: a later set() must not change a running pass
        return ([(i, epoch) for i in idx.tolist()]
                for _, idx in self.plan.batches(epoch, self.start_batch))


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed (user transforms
    may use them; ours draw from explicit generators)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class FolderLoader:
    """Image files decoded in DataLoader workers; uint8 batches normalised on the device."""

    def __init__(
        self,
        split: FileSplit,
        meta: DataMeta,
        cfg: DataConfig,
        *,
        train: bool,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
    ) -> None:
        self.batch_size = batch_size
        self.meta, self.device, self.channels_last = meta, device, channels_last
        self.plan = _plan(split, cfg, train=train, batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size)
        self.sampler = _PlanSampler(self.plan)
        self.split, self.train, self.skip = split, train, cfg.on_bad_image == "skip"
        workers = cfg.num_workers
        self.loader = DataLoader(
            _FileDataset(split, meta, cfg, train=train, seed=seed),
            batch_sampler=self.sampler,
            # On a CPU device the workers normalise too; an accelerator does it on arrival.
            collate_fn=partial(_collate, meta=meta if device.type == "cpu" else None,
                               channels_last=channels_last),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_seed_worker if workers else None,
            generator=make_generator(seed, "workers", rank),
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return self.plan.num_batches

    def num_samples(self) -> int:
        return self.plan.num_samples()

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set(epoch, start_batch)
        for b, (x, y, bad) in enumerate(self.loader, start=start_batch):
            # x [b, c, s, s] uint8 (None: nothing readable), y [b] int64, on the CPU
            self._bad(bad)
            if x is None:
                if self.train:  # an empty step would shift every later step of the plan
                    raise DataError(
                        f"every image of training batch {b} (epoch {epoch + 1}) is unreadable, "
                        f"e.g. {bad[0][0]}; run with data.check_images=true to leave all bad "
                        "files out before training")
                continue
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield (x if x.is_floating_point() else _finish(x, self.meta, self.channels_last)), y

    def _bad(self, bad: list[tuple[str, str]]) -> None:
        """Stop on the first unreadable file, or record it in the split (skip)."""
        for path, reason in bad:
            if not self.skip:
                raise BadImageError(
                    f"{path}: {reason}. Fix or remove it, or set data.on_bad_image=skip to leave "
                    "unreadable files out (they are then listed in result.json)")
            if path not in self.split.bad:
                log.warning("skipping unreadable image %s: %s", path, reason)
                self.split.bad[path] = reason


__all__ = ["FolderLoader", "InMemoryLoader", "Loader", "balance_weights", "build_loader",
           "normalize_batch"]
