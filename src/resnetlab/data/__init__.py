"""Data for resnetlab: sources and splits, on-device augmentation, loaders, robust image reading.

Typical use::

    ds = build_datasets(cfg.data, seed=cfg.seed)
    train = build_loader(ds.train, ds.meta, cfg.data, train=True, batch_size=128,
                         device=device, seed=cfg.seed)
    for images, labels in train.iterate(epoch):  # float32 [b, c, h, w], int64 [b]
        ...
"""

from resnetlab.data.augment import normalize, random_crop_flip
from resnetlab.data.datasets import (
    ArraySplit,
    DataMeta,
    Datasets,
    FileSplit,
    build_datasets,
    preprocess,
)
from resnetlab.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    DataError,
    load_image,
    to_mode,
    to_rgb,
)
from resnetlab.data.loaders import Loader, build_loader

__all__ = [
    "IMAGE_EXTENSIONS", "ArraySplit", "BadImageError", "DataError", "DataMeta", "Datasets",
    "FileSplit", "Loader", "build_datasets", "build_loader", "load_image", "normalize",
    "preprocess", "random_crop_flip", "to_mode", "to_rgb",
]
