"""Data for resnetlab: sources and splits, on-device augmentation, loaders, robust image reading.

Typical use::

    ds = build_datasets(cfg.data, seed=cfg.seed)
    train = build_loader(ds.train, ds.meta, cfg.data, train=True, batch_size=128,
                         device=device, seed=cfg.seed)
    for images, labels in train.iterate(epoch):  # float32 [b, c, h, w], int64 [b]
        ...

Importing the package is cheap (no torch): the names below load their modules on first use,
so the source registry (:mod:`resnetlab.data.sources`) can be read by ``config`` and ``--help``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from resnetlab.data.errors import BadImageError, DataError

if TYPE_CHECKING:
    from resnetlab.data.augment import normalize, random_crop_flip
    from resnetlab.data.datasets import (
        ArraySplit,
        DataMeta,
        Datasets,
        FileSplit,
        build_datasets,
        preprocess,
    )
    from resnetlab.data.images import IMAGE_EXTENSIONS, load_image, to_mode, to_rgb
    from resnetlab.data.loaders import Loader, build_loader

# name -> submodule that defines it; resolved by __getattr__ on first use (PEP 562)
_LAZY = {
    **dict.fromkeys(["normalize", "random_crop_flip"], "augment"),
    **dict.fromkeys(["ArraySplit", "DataMeta", "Datasets", "FileSplit", "build_datasets",
                     "preprocess"], "datasets"),
    **dict.fromkeys(["IMAGE_EXTENSIONS", "load_image", "to_mode", "to_rgb"], "images"),
    **dict.fromkeys(["Loader", "build_loader"], "loaders"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_EXTENSIONS", "ArraySplit", "BadImageError", "DataError", "DataMeta", "Datasets",
    "FileSplit", "Loader", "build_datasets", "build_loader", "load_image", "normalize",
    "preprocess", "random_crop_flip", "to_mode", "to_rgb",
]
