"""Image folders: ``root/train/<class>/*``, optional ``root/val/<class>/*`` and ``root/test/<class>/*``.

Files are listed and labelled up front and decoded by the loaders' workers (random-resized crop
for training, resize + centre crop for evaluation, as torchvision's ImageNet reference).
Links are checked so that no image is labelled as another class's; unreadable files stop the
run or, with ``data.on_bad_image=skip``, are counted and left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from resnetlab.data.errors import DataError
from resnetlab.data.sources.registry import Source, register_source

if TYPE_CHECKING:
    from resnetlab.config import DataConfig
    from resnetlab.data.datasets import Datasets, FileSplit


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
        from resnetlab.data.images import is_image_file

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
    from resnetlab.data.images import IMAGE_EXTENSIONS

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
    from resnetlab.data.images import check_image

    if not paths:
        return []
    workers = min(32, 2 * (os.cpu_count() or 1), len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_image, paths, chunksize=64))


Checker = Callable[[Sequence[str]], "list[str | None]"]
_checker: ContextVar[Checker | None] = ContextVar("resnetlab_check_images_with", default=None)


@contextmanager
def images_checked_with(check: Checker) -> Iterator[None]:
    """Inside this block ``data.check_images=true`` decodes with ``check`` instead of
    :func:`check_images` (training under DDP passes one that splits the files over the ranks)."""
    token = _checker.set(check)
    try:
        yield
    finally:
        _checker.reset(token)


def _check_up_front(
    scanned: dict[str, tuple[list[str], list[int]]], needs: set[str], cfg: DataConfig, root: Path
) -> list[tuple[str, str]]:
    """data.check_images=true: decode every needed file now; drop (skip) or stop on bad ones."""
    skipped: list[tuple[str, str]] = []
    for split, (paths, labels) in scanned.items():
        if split not in needs:
            continue
        reasons = (_checker.get() or check_images)(paths)
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


def _scan_root(root: Path, *, skip: bool) -> tuple[dict[str, tuple[list[str], list[int]]], tuple[str, ...],
                                                    list[tuple[str, str]]]:
    """``(split -> (paths, labels), classes, unreadable (path, reason))`` for train/ and the
    val/ and test/ beside it; the classes are train/'s folders, in sorted order."""
    train_dir = root / "train"
    listers = {"train": _Lister(root, train_dir, skip=skip)}
    scanned = {"train": _scan_split(train_dir, None, listers["train"])}
    classes = tuple(f.name for f in listers["train"].class_folders())
    for split in ("val", "test"):
        if (root / split).is_dir():
            listers[split] = _Lister(root, root / split, skip=skip)
            scanned[split] = _scan_split(root / split, classes, listers[split])
    return scanned, classes, [u for lister in listers.values() for u in lister.unreadable]


def _file_split(paths: list[str], labels: list[int]) -> FileSplit:
    import torch

    from resnetlab.data.datasets import FileSplit

    return FileSplit(paths=list(paths), labels=torch.tensor(labels, dtype=torch.int64))


def _train_val(scanned: dict[str, tuple[list[str], list[int]]], cfg: DataConfig,
               seed: int) -> tuple[FileSplit, FileSplit | None]:
    """train/ and val/ as found, or val held out of train/: stratified, ``data.val_fraction`` of
    it, the same files for the same ``seed``."""
    import numpy as np

    from resnetlab.data.augment import derive_seed
    from resnetlab.data.splits import held_count, stratified_split

    if "val" in scanned:
        return _file_split(*scanned["train"]), _file_split(*scanned["val"])
    train_paths, train_labels = scanned["train"]
    y = np.asarray(train_labels, dtype=np.int64)
    n_val = held_count(cfg.val_fraction, len(y), "data.val_fraction")
    keep, held = stratified_split(y, n_val, derive_seed(seed, SOURCE.name, "val"))
    train = _file_split([train_paths[i] for i in keep], y[keep].tolist())
    val = _file_split([train_paths[i] for i in held], y[held].tolist()) if n_val else None
    return train, val


def load(cfg: DataConfig, seed: int, needs: frozenset[str]) -> Datasets:
    """List and label the files (no decoding: 100,000 files take about a second); bad files
    are found as the loaders read them, or all up front with ``data.check_images=true``.

    ``needs``: with ``data.check_images=true``, only the files of these splits are decoded up
    front (evaluating test/ does not decode train/), plus train/ when a needed val split is held
    out of it, so that the held-out files are the ones training held out.
    """
    from resnetlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD, DataMeta, Datasets

    if cfg.root is None:
        raise DataError("data.root is required for data.name=folder")
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} is not a folder; expected {root}/train/<class>/<images>")
    scanned, classes, skipped = _scan_root(root, skip=cfg.on_bad_image == "skip")
    if cfg.check_images:
        check = set(needs) | ({"train"} if "val" in needs and "val" not in scanned else set())
        skipped += _check_up_front(scanned, check, cfg, root)  # val is held out of train

    present = set(scanned["train"][1])
    for i, name in enumerate(classes):
        if i not in present and "train" in needs:
            raise DataError(f"class folder {train_dir / name} has no readable images left")
    train, val = _train_val(scanned, cfg, seed)
    test = _file_split(*scanned["test"]) if "test" in scanned else None
    meta = DataMeta(
        name=SOURCE.name,
        classes=classes,
        in_chans=3,
        input_size=(cfg.image_size, cfg.image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize=cfg.resize,
    )
    return Datasets(train=train, val=val, test=test, meta=meta, skipped=skipped)


SOURCE = register_source(Source(
    name="folder",
    summary="your own images in class folders (train/<class>/*, optional val/ and test/)",
    files="data.root holding train/<class>/<images>, optionally val/ and test/ beside it",
    load=load,
    needs_root=True,
    in_chans=3,
    image_size=None,  # data.image_size
    classes=None,  # the class folders under train/
    eval_resample="resize_crop",
    stats="imagenet",
    split_folders=True,
))


__all__ = ["check_images", "images_checked_with", "load"]
