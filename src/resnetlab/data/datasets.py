"""What every data source returns: splits in memory or as files, and the data meta; the one
entry point :func:`build_datasets`; and evaluation preprocessing.

:func:`build_datasets` looks ``data.name`` up in the source registry
(:mod:`resnetlab.data.sources`: one module per dataset) and returns the train / val / test
splits plus a :class:`DataMeta` holding everything prediction, evaluation and export need to
preprocess an image the way training did. Splits are seeded and stratified and depend only on
``seed`` and the configured fractions (:mod:`resnetlab.data.splits`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from resnetlab.config import DataConfig
from resnetlab.data.images import DataError, ImageTooLargeError, to_mode
from resnetlab.data.sources.registry import UnknownSourceError, find_source, get_source

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per RGB channel, 0..1 scale
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Containers


@dataclass(frozen=True)
class DataMeta:
    """What the network was fed: classes, input geometry and normalisation.

    Saved with every run and checkpoint (:meth:`to_dict`) so predict / eval / export preprocess
    new images exactly as training did.
    """

    name: str  # the data source (data.name), a name of the source registry
    classes: tuple[str, ...]  # label id -> class name
    in_chans: int  # 1 for grey sources, 3 for colour
    input_size: tuple[int, int]  # (h, w) pixels the network sees
    mean: tuple[float, ...]  # per channel, 0..1 scale (train split; ImageNet constants for folder)
    std: tuple[float, ...]  # per channel, 0..1 scale
    resize: int | None = None  # folder: shorter side before the centre crop, pixels; else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, no tuples) for YAML, JSON and ``weights_only`` checkpoints."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "in_chans": self.in_chans,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataMeta:
        """Inverse of :meth:`to_dict`; a missing key raises :class:`DataError` naming it."""
        keys = ("name", "classes", "in_chans", "input_size", "mean", "std")
        missing = [k for k in keys if k not in d]
        if missing:
            raise DataError(f"data meta is missing key(s) {', '.join(missing)}")
        h, w = d["input_size"]
        resize = d.get("resize")
        return cls(
            name=str(d["name"]),
            classes=tuple(str(c) for c in d["classes"]),
            in_chans=int(d["in_chans"]),
            input_size=(int(h), int(w)),
            mean=tuple(float(m) for m in d["mean"]),
            std=tuple(float(s) for s in d["std"]),
            resize=None if resize is None else int(resize),
        )


@dataclass
class ArraySplit:
    """A split held in memory."""

    images: torch.Tensor  # [n, c, h, w] uint8
    labels: torch.Tensor  # [n] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FileSplit:
    """A split of image files, decoded on the fly by the DataLoader path."""

    paths: list[str]
    labels: torch.Tensor  # [n] int64
    # Files found unreadable while reading (data.on_bad_image=skip): file -> reason. Filled in
    # by the loaders of this split, in the main process.
    bad: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Datasets:
    """The three splits of one data source and its :class:`DataMeta`."""

    train: ArraySplit | FileSplit
    val: ArraySplit | FileSplit | None  # None when val_fraction == 0 and there is no val folder
    test: ArraySplit | FileSplit | None  # None for a folder source without test/
    meta: DataMeta
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), "skip" mode

    def bad_files(self) -> list[tuple[str, str]]:
        """Every file or folder left out so far, ``(path, reason)``, sorted by path: those
        found while listing or by ``data.check_images=true``, and those the loaders found
        unreadable while reading (``data.on_bad_image=skip``). For ``result.json``."""
        found = dict(self.skipped)
        for split in (self.train, self.val, self.test):
            if isinstance(split, FileSplit):
                found.update(split.bad)
        return sorted(found.items())


SPLITS = ("train", "val", "test")


def build_datasets(cfg: DataConfig, seed: int, needs: Collection[str] = SPLITS) -> Datasets:
    """Load the source named by ``cfg.name`` (the registry's) and split it; the split depends
    only on ``seed`` and the fractions in ``cfg``. Raises :class:`DataError` naming the file or
    folder at fault.

    ``needs``: the splits the caller will read; a source may skip work for the others (image
    folders decode only those splits' files up front with ``data.check_images=true``).
    """
    unknown = set(needs) - set(SPLITS)
    if unknown:
        raise ValueError(f"needs: unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    try:
        source = get_source(cfg.name)
    except UnknownSourceError as e:
        raise DataError(f"data.name: {e}") from None
    data = source.load(cfg, seed, frozenset(needs))
    from resnetlab.data.subset import select_subset  # data.classes / data.train_per_class

    return select_subset(data, cfg, seed)


# ----------------------------------------------------------------------------------------------
# Evaluation preprocessing (shared by the folder loader and predict)


#: Largest intermediate image of the evaluation resize, in pixels. Resizing the SHORT side to
#: ``resize`` multiplies a thin image's long side: a 20000x1 strip would become 5,120,000x256
#: (1.3 G pixels, ~4 GiB). 16 M pixels allows aspect ratios up to 256:1 at resize=256.
MAX_RESIZED_PIXELS: int = 16 * 2**20


def resize_too_large(width: int, height: int, short_side: int) -> str | None:
    """Why resizing a ``width`` x ``height`` image's short side to ``short_side`` is refused."""
    short, long = min(width, height), max(width, height)
    new_long = math.ceil(long * short_side / max(short, 1))
    if new_long * short_side > MAX_RESIZED_PIXELS:
        return (f"a {width}x{height} image (aspect ratio {long / max(short, 1):.0f}:1) would "
                f"become {new_long}x{short_side} = {new_long * short_side / 1e6:.0f} M pixels "
                f"when its short side is resized to {short_side}, over the limit of "
                f"{MAX_RESIZED_PIXELS / 1e6:.0f} M; crop it to a less extreme shape")
    return None


def eval_transform(img: Image.Image, meta: DataMeta) -> torch.Tensor:
    """One decoded image -> uint8 ``[c, h, w]`` the way evaluation sees it.

    With ``meta.resize`` (image folders): shorter side to ``meta.resize``, centre crop to
    ``meta.input_size`` (torchvision v2). Otherwise a resize to ``meta.input_size`` with the
    source's ``eval_resample`` (registry): ``box`` (area average, how scikit-learn's 8x8 digits
    were made) or ``bilinear`` (antialiased); a source no longer registered gets bilinear.
    """
    from torchvision.transforms.v2 import functional as TF

    img = to_mode(img, meta.in_chans)
    h, w = meta.input_size
    if meta.resize is not None:
        reason = resize_too_large(img.width, img.height, meta.resize)
        if reason:
            raise ImageTooLargeError(reason)
        img = TF.center_crop(TF.resize(img, [meta.resize], antialias=True), [h, w])
    elif img.size != (w, h):
        source = find_source(meta.name)
        box = source is not None and source.eval_resample == "box"
        resample = Image.Resampling.BOX if box else Image.Resampling.BILINEAR
        img = img.resize((w, h), resample=resample)
    return TF.pil_to_tensor(img)  # [c, h, w] uint8


def preprocess(images: Sequence[Image.Image], meta: DataMeta) -> torch.Tensor:
    """Images of any mode and size -> uint8 ``[n, c, h, w]`` as evaluation preprocessed them.

    Follow with :func:`~resnetlab.data.augment.normalize`. Note that digits, Fashion-MNIST and
    the other MNIST-style sources are light on a dark background (0 = background): invert
    dark-on-light scans before calling this.
    """
    if not images:
        h, w = meta.input_size
        return torch.empty(0, meta.in_chans, h, w, dtype=torch.uint8)
    return torch.stack([eval_transform(img, meta) for img in images])


_MOVED = {"stratified_split": "splits", "channel_stats": "splits", "check_images": "sources.folder",
          "safe_unpickle": "sources.cifar"}


def __getattr__(name: str) -> Any:
    """Names that moved out of this module in the split into sources/ and splits.py, still
    importable from here (``from resnetlab.data.datasets import check_images``)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"resnetlab.data.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS", "ArraySplit", "DataMeta", "Datasets", "FileSplit",
    "build_datasets", "eval_transform", "preprocess", "resize_too_large",
]
