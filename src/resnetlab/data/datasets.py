"""Data sources and splits: scikit-learn digits, CIFAR-10/100 from local files, image folders.

:func:`build_datasets` returns the train / val / test splits plus a :class:`DataMeta` holding
everything prediction, evaluation and export need to preprocess an image the way training did.
Splits are seeded and stratified and depend only on ``seed`` and the configured fractions.

CIFAR batches are pickles; they are read with a restricted unpickler that only rebuilds
dicts, lists, strings, numbers and numpy arrays, so a planted pickle cannot run code.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from resnetlab.config import DataConfig
from resnetlab.data.augment import derive_seed
from resnetlab.data.images import (
    IMAGE_EXTENSIONS,
    DataError,
    check_image,
    is_image_file,
    to_mode,
)

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

    name: str  # "digits" | "cifar10" | "cifar100" | "folder"
    classes: tuple[str, ...]  # label id -> class name
    in_chans: int  # 1 for digits, 3 otherwise
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
    """Load the source named by ``cfg.name`` and split it; the split depends only on ``seed``
    and the fractions in ``cfg``. Raises :class:`DataError` naming the file or folder at fault.

    ``needs``: the splits the caller will read. Image folders decode only the files of those
    splits up front (evaluating test/ does not decode train/), plus train/ when a needed val
    split is held out of it, so that the held-out files are the ones training held out.
    """
    unknown = set(needs) - set(SPLITS)
    if unknown:
        raise ValueError(f"needs: unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    if cfg.name == "digits":
        data = _build_digits(cfg, seed)
    elif cfg.name in ("cifar10", "cifar100"):
        data = _build_cifar(cfg, seed)
    elif cfg.name == "folder":
        data = _build_folder(cfg, seed, set(needs))
    else:
        raise DataError(f"data.name: unknown data source {cfg.name!r}")
    from resnetlab.data.subset import select_subset  # data.classes / data.train_per_class

    return select_subset(data, cfg, seed)


# ----------------------------------------------------------------------------------------------
# Splits and statistics


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


def _held_count(fraction: float, n: int, what: str) -> int:
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


def _take(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray) -> ArraySplit:
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return ArraySplit(images=images[index].contiguous(), labels=labels[index].contiguous())


# ----------------------------------------------------------------------------------------------
# digits


def _build_digits(cfg: DataConfig, seed: int) -> Datasets:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8] ink 0..16
    images = torch.from_numpy(np.round(pixels * 255.0 / 16.0).astype(np.uint8))[:, None]  # [n,1,8,8]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))  # [n]
    y = labels.numpy()
    n = len(y)

    rest, test_idx = stratified_split(
        y, _held_count(cfg.test_fraction, n, "data.test_fraction"), derive_seed(seed, "digits", "test")
    )
    n_val = _held_count(cfg.val_fraction, n, "data.val_fraction")  # a share of the TOTAL
    if n_val >= len(rest):
        raise DataError("data.val_fraction + data.test_fraction leave no training samples")
    keep, val_rel = stratified_split(
        y[rest], n_val, derive_seed(seed, "digits", "val")
    )
    train = _take(images, labels, rest[keep])
    val = _take(images, labels, rest[val_rel]) if n_val else None
    mean, std = channel_stats(train.images)
    meta = DataMeta(
        name="digits",
        classes=tuple(str(c) for c in bunch.target_names),
        in_chans=1,
        input_size=(8, 8),
        mean=mean,
        std=std,
    )
    return Datasets(train=train, val=val, test=_take(images, labels, test_idx), meta=meta)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (official python-format batches)


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    folder: str  # the folder inside the archive
    archive: str  # official archive file name
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # key of the labels in a batch dict
    names_key: str  # key of the class names in the meta dict
    num_classes: int
    max_bytes: int  # largest file or archive member read: about twice the official largest

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def layout(self, root: Path) -> str:
        files = ", ".join(self.files)
        return (
            f"expected {root}/{self.folder}/ holding {files} (the official python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html), or the archive {root}/{self.archive}"
        )


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        name="cifar10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
        max_bytes=64 * 2**20,  # official data_batch_*: 31 MB
    ),
    "cifar100": _CifarSpec(
        name="cifar100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        train_files=("train",), test_files=("test",), meta_file="meta",
        label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        max_bytes=320 * 2**20,  # official train: 155 MB
    ),
}

# Globals a CIFAR batch may reference. Official batches (Python 2 pickles read with
# encoding="bytes") only need numpy's array reconstruction; pickles re-written by Python 3 at
# protocol 2 add _codecs.encode for bytes, and protocol 5 numpy._core.numeric._frombuffer.
# Nothing here can run code: they only construct containers, numbers, strings and arrays.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(mod, "_reconstruct") for mod in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [("builtins", name) for name in (
        "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
        "float", "complex", "bool",
    )]
)


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _TooLarge(pickle.UnpicklingError):
    pass


#: Most bytes one ``bytes(n)`` / ``bytearray(n)`` call in a pickle may create. Protocol-2
#: pickles call ``bytes()`` for empty strings; ``bytes(8_000_000_000)`` in a 40-byte file would
#: allocate 8 GB, so a size argument is capped (real data arrive as byte strings, not sizes).
_MAX_SIZED_ALLOC = 2**20


def _sized(kind: type) -> Callable[..., Any]:
    def make(*args: Any) -> Any:
        if args and isinstance(args[0], int) and not isinstance(args[0], bool) \
                and args[0] > _MAX_SIZED_ALLOC:
            raise _TooLarge(f"{kind.__name__}({args[0]}) would allocate {args[0]:,} bytes")
        return kind(*args)
    return make


_SIZED = {("builtins", "bytes"): _sized(bytes), ("builtins", "bytearray"): _sized(bytearray)}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_ALLOWED_GLOBALS` and refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2's name, written by protocol-2 pickles
            module = "builtins"
        if (module, name) in _SIZED:
            return _SIZED[module, name]
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle a CIFAR batch from ``data`` with :class:`_RestrictedUnpickler`.

    ``source`` names the file in errors. A reference to any other global (a planted gadget such
    as ``os.system``) raises :class:`DataError` before anything is called.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as e:
        raise DataError(
            f"{source}: refused to load: the pickle references {e}, which a CIFAR batch never "
            "contains (loading it could run code); replace the file with the official one"
        ) from None
    except _TooLarge as e:
        raise DataError(
            f"{source}: refused to load: {e}, far more than a CIFAR batch holds; replace the "
            "file with the official one"
        ) from None
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(
            f"{source}: corrupt or truncated CIFAR batch ({type(e).__name__}: {e}); "
            "replace it with the file from the official archive"
        ) from None


def _str_keys(obj: Any, source: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_batch(
    data: bytes, source: str, spec: _CifarSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    d = _str_keys(safe_unpickle(data, source), source)
    pixels, labels = d.get("data"), d.get(spec.label_key)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 \
            or pixels.shape[1] != 3 * 32 * 32:
        got = getattr(pixels, "shape", type(pixels).__name__)
        raise DataError(f"{source}: key 'data' must be a uint8 array [n, 3072], got {got}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{source}: key {spec.label_key!r} must be a list of ints") from None
    if len(y) != len(pixels):
        raise DataError(f"{source}: {len(pixels)} images but {len(y)} {spec.label_key!r} entries")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise DataError(f"{source}: labels outside 0..{spec.num_classes - 1}")
    images = torch.from_numpy(pixels.reshape(-1, 3, 32, 32).copy())  # [n, 3, 32, 32] planar RGB
    return images, torch.from_numpy(y)


def _read_class_names(data: bytes, source: str, spec: _CifarSpec) -> tuple[str, ...]:
    d = _str_keys(safe_unpickle(data, source), source)
    names = d.get(spec.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        raise DataError(f"{source}: key {spec.names_key!r} must list {spec.num_classes} names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _read_cifar_folder(folder: Path, spec: _CifarSpec, root: Path) -> Callable[[str], bytes]:
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"missing CIFAR file {folder / missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; {spec.layout(root)}"
        )

    def read(name: str) -> bytes:
        size = (folder / name).stat().st_size
        if size > spec.max_bytes:
            raise DataError(_too_big(folder / name, size, spec))
        return (folder / name).read_bytes()

    return read


def _too_big(what: object, size: int, spec: _CifarSpec) -> str:
    return (f"{what} is {size / 2**20:.0f} MiB, over the {spec.max_bytes / 2**20:.0f} MiB an "
            f"official {spec.name} file can be (the largest is about half that); refusing to "
            "read it into memory. Replace it with the file from the official archive")


def _read_cifar_archive(archive: Path, spec: _CifarSpec) -> Callable[[str], bytes]:
    """Read the batch members straight from the .tar.gz (nothing is extracted to disk)."""
    wanted = {f"{spec.folder}/{f}": f for f in spec.files}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    if member.size > spec.max_bytes:  # the header's size, before reading
                        raise DataError(_too_big(f"{archive}: member {member.name}",
                                                 member.size, spec))
                    stream = tar.extractfile(member)
                    if stream is not None:
                        found[name] = stream.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{archive}: corrupt or truncated archive ({e})") from None
    missing = [f for f in spec.files if f not in found]
    if missing:
        raise DataError(
            f"{archive}: member {spec.folder}/{missing[0]} is missing; expected the official "
            f"{spec.archive} holding {spec.folder}/{{{', '.join(spec.files)}}}"
        )
    return found.__getitem__


def _locate_cifar(spec: _CifarSpec, root: Path) -> tuple[Callable[[str], bytes], Path] | None:
    """Reader for the batches under ``root`` and the place they are read from, or None."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return _read_cifar_archive(root, spec), root
    if not root.is_dir():
        return None
    if any((root / f).is_file() for f in spec.files):  # root is the batches folder itself
        return _read_cifar_folder(root, spec, root.parent), root
    if (root / spec.folder).is_dir():
        return _read_cifar_folder(root / spec.folder, spec, root), root / spec.folder
    if (root / spec.archive).is_file():
        return _read_cifar_archive(root / spec.archive, spec), root / spec.archive
    return None


def _download_cifar(spec: _CifarSpec, root: Path) -> None:
    """Fetch and extract the official archive with torchvision's downloader (md5-checked).

    Only the downloader is used: torchvision's dataset classes unpickle with the unrestricted
    ``pickle``, the files are then read by :func:`safe_unpickle` like local ones.
    """
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets import utils as tv_utils

    source = CIFAR10 if spec.name == "cifar10" else CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(
            source.url, str(root), filename=source.filename, md5=source.tgz_md5
        )
    except Exception as e:  # no network, proxy, disk full, bad checksum, ...
        raise DataError(
            f"data.download=true could not fetch {source.url} ({type(e).__name__}: {e}). "
            f"Without network, download it elsewhere and put {spec.archive} in {root}, "
            f"or extract it there so that {root}/{spec.folder}/ holds {', '.join(spec.files)}"
        ) from None


def _build_cifar(cfg: DataConfig, seed: int) -> Datasets:
    spec = _CIFAR[cfg.name]
    if cfg.root is None:
        raise DataError(f"data.root is required for data.name={cfg.name}")
    root = Path(cfg.root).expanduser()
    found = _locate_cifar(spec, root)
    if found is None and cfg.download:
        _download_cifar(spec, root)
        found = _locate_cifar(spec, root)
    if found is None:
        where = "does not exist" if not root.exists() else "holds no CIFAR files"
        raise DataError(
            f"data.root {root} {where}: {spec.layout(root)}; "
            "or set data.download=true where there is network"
        )
    read, origin = found

    def load(name: str) -> bytes:
        try:
            return read(name)
        except OSError as e:
            raise DataError(f"{origin / name}: cannot read ({e.strerror or e})") from None

    def load_split(names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_batch(load(f), str(origin / f), spec) for f in names]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    classes = _read_class_names(load(spec.meta_file), str(origin / spec.meta_file), spec)
    train_x, train_y = load_split(spec.train_files)  # [50000, 3, 32, 32] uint8, [50000]
    test_x, test_y = load_split(spec.test_files)  # [10000, 3, 32, 32] uint8, [10000]

    n_val = _held_count(cfg.val_fraction, len(train_y), "data.val_fraction")
    keep, val_idx = stratified_split(
        train_y.numpy(), n_val, derive_seed(seed, cfg.name, "val")
    )
    train = _take(train_x, train_y, keep)
    val = _take(train_x, train_y, val_idx) if n_val else None
    mean, std = channel_stats(train.images)
    meta = DataMeta(
        name=cfg.name, classes=classes, in_chans=3, input_size=(32, 32), mean=mean, std=std
    )
    return Datasets(train=train, val=val, test=ArraySplit(test_x, test_y), meta=meta)


# ----------------------------------------------------------------------------------------------
# Image folders: root/train/<class>/*, optional root/val/<class>/*, root/test/<class>/*


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both resolved)."""
    return path == folder or folder in path.parents


class _Lister:
    """Lists one split's image files with links checked; folders that cannot be listed are an
    error, or, with ``skip``, collected in :attr:`unreadable` as ``(folder, reason)``.

    Links are followed, except that a link resolving inside ``data.root`` but outside its own
    class folder is an error (it would label another class's or split's image as this class),
    and so is a folder reached twice in one split (a symlink loop, or two links to one folder:
    its images would count twice, possibly under two classes). Links leading outside
    ``data.root`` (a link farm over a central image store) are followed.
    """

    def __init__(self, root: Path, split_dir: Path, *, skip: bool) -> None:
        self.root, self.split_dir, self.skip = root.resolve(), split_dir, skip
        self.seen: dict[Path, str] = {}  # real folder -> the path it was first reached by
        self.unreadable: list[tuple[str, str]] = []

    def _entries(self, folder: Path, skip: bool) -> list[os.DirEntry[str]] | None:
        try:
            with os.scandir(folder) as it:
                return sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)
        except OSError as e:
            reason = f"cannot list folder ({e.strerror or e})"
            if not skip:
                raise DataError(f"{folder}: {reason}; fix its permissions or remove it, or set "
                                "data.on_bad_image=skip to leave it out (it is then listed in "
                                "result.json)") from None
            self.unreadable.append((str(folder), reason))
            return None

    def _enter(self, folder: Path, own: Path) -> None:
        """Record ``folder`` as visited: an error when reached before or when it leaves its
        class folder for another place inside data.root."""
        real = folder.resolve()
        if real in self.seen:
            raise DataError(
                f"{folder} leads to {real}, already listed as {self.seen[real]}: a symlink loop "
                "or a second link to one folder, whose images would count twice; remove the link")
        if _inside(real, self.root) and not _inside(real, own):
            raise DataError(
                f"{folder} is a link to {real}, outside its class folder {own} but inside "
                f"data.root: its images would be labelled {own.name!r}; remove the link")
        self.seen[real] = str(folder)

    def class_folders(self) -> list[Path]:
        """The class folders of the split (an unreadable split folder is always an error; so is a
        split folder linked to another place inside data.root, e.g. ``test -> train``)."""
        real = self.split_dir.resolve()
        if _inside(real, self.root) and real != self.root / self.split_dir.name:
            raise DataError(f"split folder {self.split_dir} is a link to {real}, inside data.root: its "
                            f"images would count in two splits (test scored on training images); "
                            f"remove the link")
        entries = self._entries(self.split_dir, skip=False) or []
        return [Path(e.path) for e in entries if _is_dir(e)]

    def image_files(self, class_dir: Path) -> list[str]:
        """Image files under ``class_dir``, recursively, in os.walk's top-down sorted order."""
        own = class_dir.resolve()
        if _inside(own, self.root) and not _inside(own, self.split_dir.resolve()):
            raise DataError(f"class folder {class_dir} is a link to {own}, outside its split "
                            f"{self.split_dir}; remove the link")
        out: list[str] = []
        stack = [class_dir]
        while stack:
            folder = stack.pop()
            self._enter(folder, own)
            entries = self._entries(folder, self.skip)
            if entries is None:
                continue
            subdirs: list[Path] = []
            for e in entries:
                if e.is_symlink() and not _is_dir(e):  # a linked file: where does it lead?
                    target = Path(e.path).resolve()
                    if _inside(target, self.root) and not _inside(target, own):
                        raise DataError(
                            f"{e.path} is a link to {target}, outside its class folder {class_dir} "
                            f"but inside data.root: it would be labelled {class_dir.name!r}; "
                            "remove the link")
                if _is_dir(e):
                    subdirs.append(Path(e.path))
                elif is_image_file(e.name):
                    out.append(e.path)
            stack.extend(reversed(subdirs))  # the first sub-folder is listed next
        return out


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling link is not a folder
    except OSError:
        return False


def _scan_split(
    split_dir: Path, classes: Sequence[str] | None, lister: _Lister
) -> tuple[list[str], list[int]]:
    """Paths and labels of one split folder. ``classes`` None: this is train and defines them."""
    folders = lister.class_folders()
    if not folders:
        raise DataError(
            f"{split_dir} has no class folders; expected {split_dir}/<class name>/<image files>"
        )
    if classes is not None:
        unknown = [f for f in folders if f.name not in classes]
        if unknown:
            raise DataError(
                f"class folder {unknown[0]} is not a class of the training set "
                f"({len(classes)} classes under {split_dir.parent / 'train'})"
            )
    ids = {name: i for i, name in enumerate(classes or [f.name for f in folders])}
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        before = len(lister.unreadable)
        files = lister.image_files(folder)
        if not files and len(lister.unreadable) == before:
            raise DataError(
                f"class folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}); add "
                "images or remove it: an empty class would shift every later label id"
            )
        paths.extend(files)
        labels.extend([ids[folder.name]] * len(files))
    return paths, labels


def check_images(paths: Sequence[str]) -> list[str | None]:
    """:func:`~resnetlab.data.images.check_image` for every path, on a thread pool.

    PIL releases the GIL while decoding, so threads give a real speed-up.
    """
    if not paths:
        return []
    workers = min(32, 2 * (os.cpu_count() or 1), len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_image, paths, chunksize=64))


def _check_up_front(
    scanned: dict[str, tuple[list[str], list[int]]], needs: set[str], cfg: DataConfig, root: Path
) -> list[tuple[str, str]]:
    """data.check_images=true: decode every needed file now; drop (skip) or stop on bad ones."""
    skipped: list[tuple[str, str]] = []
    for split, (paths, labels) in scanned.items():
        if split not in needs:
            continue
        reasons = check_images(paths)
        bad = [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]
        if bad and cfg.on_bad_image == "error":
            listed = "; ".join(f"{p}: {r}" for p, r in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DataError(
                f"{len(bad)} unreadable image(s) in {root / split}: {listed}{more}. "
                "Fix or remove them, or set data.on_bad_image=skip to leave them out"
            )
        skipped.extend(bad)
        good = [i for i, r in enumerate(reasons) if r is None]
        scanned[split] = ([paths[i] for i in good], [labels[i] for i in good])
    return skipped


def _build_folder(cfg: DataConfig, seed: int, needs: set[str]) -> Datasets:
    """List and label the files (no decoding: 100,000 files take about a second); bad files
    are found as the loaders read them, or all up front with ``data.check_images=true``."""
    if cfg.root is None:
        raise DataError("data.root is required for data.name=folder")
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} is not a folder; expected {root}/train/<class>/<images>")
    skip = cfg.on_bad_image == "skip"
    listers = {"train": _Lister(root, train_dir, skip=skip)}
    scanned = {"train": _scan_split(train_dir, None, listers["train"])}
    classes = tuple(f.name for f in listers["train"].class_folders())
    for split in ("val", "test"):
        if (root / split).is_dir():
            listers[split] = _Lister(root, root / split, skip=skip)
            scanned[split] = _scan_split(root / split, classes, listers[split])
    skipped = [u for lister in listers.values() for u in lister.unreadable]

    if cfg.check_images:
        if "val" in needs and "val" not in scanned:
            needs = needs | {"train"}  # val is held out of the checked train files
        skipped += _check_up_front(scanned, needs, cfg, root)

    def as_split(paths: list[str], labels: list[int]) -> FileSplit:
        return FileSplit(paths=list(paths), labels=torch.tensor(labels, dtype=torch.int64))

    train_paths, train_labels = scanned["train"]
    present = set(train_labels)
    for i, name in enumerate(classes):
        if i not in present and "train" in needs:
            raise DataError(f"class folder {train_dir / name} has no readable images left")
    if "val" in scanned:
        train, val = as_split(*scanned["train"]), as_split(*scanned["val"])
    else:
        y = np.asarray(train_labels, dtype=np.int64)
        n_val = _held_count(cfg.val_fraction, len(y), "data.val_fraction")
        keep, held = stratified_split(
            y, n_val, derive_seed(seed, "folder", "val")
        )
        train = as_split([train_paths[i] for i in keep], y[keep].tolist())
        val = as_split([train_paths[i] for i in held], y[held].tolist()) if n_val else None  # type: ignore[assignment]
    test = as_split(*scanned["test"]) if "test" in scanned else None
    meta = DataMeta(
        name="folder",
        classes=classes,
        in_chans=3,
        input_size=(cfg.image_size, cfg.image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize=cfg.resize,
    )
    return Datasets(train=train, val=val, test=test, meta=meta, skipped=skipped)


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

    folder: shorter side to ``meta.resize``, centre crop to ``meta.input_size`` (torchvision v2).
    digits: grey, box filter (area average, how the 8x8 digits were made from 32x32 bitmaps).
    cifar: RGB, bilinear (antialiased) resize to 32x32.
    """
    from torchvision.transforms.v2 import functional as TF

    img = to_mode(img, meta.in_chans)
    h, w = meta.input_size
    if meta.resize is not None:
        reason = resize_too_large(img.width, img.height, meta.resize)
        if reason:
            raise DataError(reason)
        img = TF.center_crop(TF.resize(img, [meta.resize], antialias=True), [h, w])
    elif img.size != (w, h):
        resample = Image.Resampling.BOX if meta.name == "digits" else Image.Resampling.BILINEAR
        img = img.resize((w, h), resample=resample)
    return TF.pil_to_tensor(img)  # [c, h, w] uint8


def preprocess(images: Sequence[Image.Image], meta: DataMeta) -> torch.Tensor:
    """Images of any mode and size -> uint8 ``[n, c, h, w]`` as evaluation preprocessed them.

    Follow with :func:`~resnetlab.data.augment.normalize`. Note that digits are light ink on a
    dark background (0 = paper): invert dark-on-light scans before calling this.
    """
    if not images:
        h, w = meta.input_size
        return torch.empty(0, meta.in_chans, h, w, dtype=torch.uint8)
    return torch.stack([eval_transform(img, meta) for img in images])


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ArraySplit", "DataMeta", "Datasets", "FileSplit",
    "build_datasets", "channel_stats", "check_images", "eval_transform", "preprocess",
    "safe_unpickle", "stratified_split",
]
