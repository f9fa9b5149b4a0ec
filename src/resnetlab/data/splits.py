"""Splits and statistics shared by the sources: stratified seeded hold-outs, exact channel
statistics, and the train/val/test splits of a source with an official test set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from resnetlab.config import DataConfig
from resnetlab.data.augment import derive_seed
from resnetlab.data.datasets import ArraySplit, DataMeta, Datasets
from resnetlab.data.errors import DataError


def stratified_split(labels: np.ndarray, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..n-1`` into ``(kept, held)`` with exactly ``n_held`` held out, stratified.

    scikit-learn's ``train_test_split(..., stratify=labels, random_state=seed)`` does the work:
    each class gives ``n_held * n_class / n`` samples rounded so the total is exact, and class
    shares match to within one sample. scikit-learn refuses sets too small to stratify its way
    (a class with a single sample, or fewer held or kept samples than classes: tiny image
    folders); those get the same largest-remainder rule here, where a class's only sample stays
    in the kept part unless its quota rounds up. Both index arrays come back sorted; the result
    depends only on ``labels``, ``n_held`` and ``seed``.
    """
    n = len(labels)
    if not 0 <= n_held <= n:
        raise ValueError(f"cannot hold out {n_held} of {n} samples")
    everything = np.arange(n)
    if n_held == 0:
        return everything, np.empty(0, np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() >= 2 and min(n_held, n - n_held) >= len(classes):
        from sklearn.model_selection import train_test_split

        kept, held = train_test_split(everything, test_size=n_held, stratify=labels,
                                      random_state=seed % 2**32)  # sklearn takes 32-bit seeds
        return np.sort(kept), np.sort(held)
    rng = np.random.default_rng(seed)
    exact = n_held * counts / n  # [k] ideal samples held per class
    quota = np.floor(exact).astype(np.int64)
    rest = n_held - int(quota.sum())
    if rest:
        order = np.lexsort((rng.random(len(classes)), -(exact - quota)))  # largest remainder
        quota[order[:rest]] += 1
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    held = np.concatenate(
        [rng.permutation(idx)[:q] for idx, q in zip(by_class, quota, strict=True)]
        + [np.empty(0, np.int64)]
    )
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def held_count(fraction: float, n: int, what: str) -> int:
    """Samples a ``fraction`` of ``n`` holds out (at least 1 when positive); an error naming the
    key ``what`` when nothing would be left to train on."""
    if fraction <= 0:
        return 0
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"{what}={fraction} leaves no training samples out of {n}")
    return k


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std on the 0..1 scale of uint8 ``[n, c, h, w]`` images.

    Uses a 256-bin histogram per channel: exact, and no float copy of the whole split.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    values = torch.arange(256, dtype=torch.float64) / 255.0  # [256] 0..1
    means, stds = [], []
    for ch in range(images.shape[1]):
        counts = torch.bincount(images[:, ch].reshape(-1), minlength=256).double()  # [256]
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-6))  # a constant channel must not divide by 0
    return tuple(means), tuple(stds)


def take(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray) -> ArraySplit:
    """Rows ``idx`` of uint8 ``images [n, c, h, w]`` and ``labels [n]`` as a contiguous split."""
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return ArraySplit(images=images[index].contiguous(), labels=labels[index].contiguous())


def from_train_test(
    cfg: DataConfig, seed: int, train_x: torch.Tensor, train_y: torch.Tensor,
    test_x: torch.Tensor, test_y: torch.Tensor, *, classes: Sequence[str],
) -> Datasets:
    """Splits of a source with an official train/test split: a stratified, seeded share
    ``data.val_fraction`` of the training set is held out for validation; the test set stays
    whole. Images are uint8 ``[n, c, h, w]``; normalisation comes from the kept training part."""
    n_val = held_count(cfg.val_fraction, len(train_y), "data.val_fraction")
    keep, val_idx = stratified_split(
        train_y.numpy(), n_val, derive_seed(seed, cfg.name, "val")
    )
    train = take(train_x, train_y, keep)
    val = take(train_x, train_y, val_idx) if n_val else None
    mean, std = channel_stats(train.images)
    _, c, h, w = train_x.shape
    meta = DataMeta(name=cfg.name, classes=tuple(classes), in_chans=int(c),
                    input_size=(int(h), int(w)), mean=mean, std=std)
    return Datasets(train=train, val=val, test=ArraySplit(test_x, test_y), meta=meta)


__all__ = ["channel_stats", "from_train_test", "held_count", "stratified_split", "take"]
