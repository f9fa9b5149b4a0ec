"""scikit-learn's 8x8 handwritten digits: 1,797 images bundled with scikit-learn, no download.

Split 70/10/20 (train/val/test) by default, seeded and stratified: the test share
(``data.test_fraction``) first, then the validation share (``data.val_fraction``, a share of the
total) from the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resnetlab.data.errors import DataError
from resnetlab.data.sources.registry import Source, register_source

if TYPE_CHECKING:
    from resnetlab.config import DataConfig
    from resnetlab.data.datasets import Datasets


def load(cfg: DataConfig, seed: int, needs: frozenset[str]) -> Datasets:
    """Read the bundled digits and split them (``needs`` is ignored: all of it is 1 MB)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    from resnetlab.data.augment import derive_seed
    from resnetlab.data.datasets import DataMeta, Datasets
    from resnetlab.data.splits import channel_stats, held_count, stratified_split, take

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8] ink 0..16
    images = torch.from_numpy(np.round(pixels * 255.0 / 16.0).astype(np.uint8))[:, None]  # [n,1,8,8]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))  # [n]
    y = labels.numpy()
    n = len(y)

    rest, test_idx = stratified_split(
        y, held_count(cfg.test_fraction, n, "data.test_fraction"), derive_seed(seed, "digits", "test")
    )
    n_val = held_count(cfg.val_fraction, n, "data.val_fraction")  # a share of the TOTAL
    if n_val >= len(rest):
        raise DataError("data.val_fraction + data.test_fraction leave no training samples")
    keep, val_rel = stratified_split(y[rest], n_val, derive_seed(seed, "digits", "val"))
    train = take(images, labels, rest[keep])
    val = take(images, labels, rest[val_rel]) if n_val else None
    mean, std = channel_stats(train.images)
    meta = DataMeta(
        name=SOURCE.name,
        classes=tuple(str(c) for c in bunch.target_names),
        in_chans=1,
        input_size=(8, 8),
        mean=mean,
        std=std,
    )
    return Datasets(train=train, val=val, test=take(images, labels, test_idx), meta=meta)


SOURCE = register_source(Source(
    name="digits",
    summary="scikit-learn's 8x8 grey handwritten digits (1,797 images, 10 classes)",
    files="bundled with scikit-learn (no data.root, no download); split 70/10/20 by "
          "data.val_fraction and data.test_fraction",
    load=load,
    in_chans=1,
    image_size=(8, 8),
    classes=tuple(str(i) for i in range(10)),
    eval_resample="box",  # area average: how the 8x8 digits were made from 32x32 bitmaps
))
