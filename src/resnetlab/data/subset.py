"""Class subsets and few-shot training splits: ``data.classes`` and ``data.train_per_class``.

Fine-tuning is usually done on a few labelled images of one's own classes; these two keys carve
such a task out of any source, reproducibly:

- ``data.classes=[5,6,7,8,9]`` keeps those classes in every split and relabels them ``0..k-1`` in
  the order given (the data meta's class names follow, so predict/eval name them right).
- ``data.train_per_class=N`` keeps N training images per class, drawn with the run's seed;
  validation and test splits are left whole, so every N is scored on the same images.
"""

from __future__ import annotations

import difflib
from dataclasses import replace

import numpy as np
import torch

from resnetlab.config import DataConfig
from resnetlab.data.augment import derive_seed
from resnetlab.data.datasets import ArraySplit, Datasets, FileSplit
from resnetlab.data.errors import DataError
from resnetlab.data.sources.registry import find_source
from resnetlab.data.splits import channel_stats

Split = ArraySplit | FileSplit


def _take(split: Split, idx: np.ndarray, relabel: np.ndarray | None) -> Split:
    """Rows ``idx`` of ``split``; labels mapped through ``relabel`` (old id -> new id) if given."""
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    labels = split.labels[index]
    if relabel is not None:
        labels = torch.from_numpy(relabel[labels.numpy()]).to(torch.int64)
    if isinstance(split, ArraySplit):
        return ArraySplit(images=split.images[index].contiguous(), labels=labels.contiguous())
    return FileSplit(paths=[split.paths[i] for i in idx.tolist()], labels=labels)


def select_subset(data: Datasets, cfg: DataConfig, seed: int) -> Datasets:
    """``data`` restricted to ``cfg.classes`` and ``cfg.train_per_class`` (unchanged when both
    are unset). Raises :class:`DataError` naming an unknown class or a class with too few images.
    """
    if not cfg.classes and not cfg.train_per_class:
        return data
    meta = data.meta
    relabel: np.ndarray | None = None
    classes = meta.classes
    if cfg.classes:
        unknown = [c for c in cfg.classes if c not in meta.classes]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(meta.classes), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"data.classes: {unknown[0]!r} is not a class of {meta.name}{hint}; "
                            f"its classes are {', '.join(meta.classes[:20])}"
                            f"{' ...' if len(meta.classes) > 20 else ''}")
        old_ids = [meta.classes.index(c) for c in cfg.classes]
        relabel = np.full(len(meta.classes), -1, dtype=np.int64)
        relabel[old_ids] = np.arange(len(old_ids))
        classes = tuple(cfg.classes)

    def restrict(split: Split | None) -> Split | None:
        if split is None or relabel is None:
            return split
        keep = np.flatnonzero(relabel[split.labels.numpy()] >= 0)
        return _take(split, keep, relabel)

    train, val, test = restrict(data.train), restrict(data.val), restrict(data.test)
    assert train is not None
    if cfg.train_per_class and len(train):  # an eval-only build may not have read train/
        y = train.labels.numpy()
        rng = np.random.default_rng(derive_seed(seed, "train_per_class", cfg.train_per_class))
        picked = []
        for k, name in enumerate(classes):
            idx = np.flatnonzero(y == k)
            if len(idx) < cfg.train_per_class:
                raise DataError(f"data.train_per_class={cfg.train_per_class}: class {name!r} has only "
                                f"{len(idx)} training images")
            picked.append(rng.permutation(idx)[: cfg.train_per_class])
        train = _take(train, np.sort(np.concatenate(picked)), None)
    # Sources that normalise by their training split's statistics: recompute them for the split
    # actually trained on. Sources with fixed constants (folders: ImageNet's) keep them.
    meta = replace(meta, classes=classes)
    source = find_source(meta.name)
    if isinstance(train, ArraySplit) and (source is None or source.stats == "train"):
        mean, std = channel_stats(train.images)
        meta = replace(meta, mean=mean, std=std)
    return replace(data, train=train, val=val, test=test, meta=meta)


__all__ = ["select_subset"]
