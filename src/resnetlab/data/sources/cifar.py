"""CIFAR-10 and CIFAR-100 from the official python-format batches, as a folder or the .tar.gz.

CIFAR batches are pickles; they are read with a restricted unpickler that only rebuilds
dicts, lists, strings, numbers and numpy arrays, so a planted pickle cannot run code.
``data.download=true`` fetches the official archive with torchvision's downloader (MD5-checked);
only its downloader is used, never its unrestricted unpickling.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resnetlab.data.errors import DataError
from resnetlab.data.sources.registry import Source, register_source

if TYPE_CHECKING:
    import torch

    from resnetlab.config import DataConfig
    from resnetlab.data.datasets import Datasets


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
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 3, 32, 32] uint8, labels [n] int64)`` of one batch file's bytes."""
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
    return pixels.reshape(-1, 3, 32, 32), y  # [n, 3, 32, 32] planar RGB, [n]


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

    from resnetlab.data.download import created_folders_removed_on_error

    source = CIFAR10 if spec.name == "cifar10" else CIFAR100
    try:
        with created_folders_removed_on_error(root):  # no empty data folder when it fails
            try:
                tv_utils.download_and_extract_archive(
                    source.url, str(root), filename=source.filename, md5=source.tgz_md5
                )
            except BaseException:  # a partial or refused (bad MD5) archive is not kept
                (root / source.filename).unlink(missing_ok=True)
                raise
    except Exception as e:  # no network, proxy, disk full, bad checksum, ...
        raise DataError(
            f"data.download=true could not fetch {source.url} ({type(e).__name__}: {e}). "
            f"Without network, download it elsewhere and put {spec.archive} in {root}, "
            f"or extract it there so that {root}/{spec.folder}/ holds {', '.join(spec.files)}"
        ) from None


def load(cfg: DataConfig, seed: int, needs: frozenset[str]) -> Datasets:
    """The official batches under ``data.root`` (folder or .tar.gz; fetched first with
    ``data.download=true``): 50k training images minus a stratified validation share, and the
    official 10k test images. ``needs`` is ignored: the batches are read whole."""
    import torch

    from resnetlab.data.splits import from_train_test

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
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])))

    classes = _read_class_names(load(spec.meta_file), str(origin / spec.meta_file), spec)
    train_x, train_y = load_split(spec.train_files)  # [50000, 3, 32, 32] uint8, [50000]
    test_x, test_y = load_split(spec.test_files)  # [10000, 3, 32, 32] uint8, [10000]

    return from_train_test(cfg, seed, train_x, train_y, test_x, test_y, classes=classes)


_FILES = ("data.root: the cifar-10-batches-py / cifar-100-python folder, its parent, or the official "
          ".tar.gz; data.download=true fetches the archive")
for _spec, _summary in ((_CIFAR["cifar10"], "60k 32x32 colour images, 10 classes (Krizhevsky)"),
                        (_CIFAR["cifar100"], "60k 32x32 colour images, 100 classes (Krizhevsky)")):
    register_source(Source(
        name=_spec.name, summary=_summary, files=_FILES, load=load, needs_root=True,
        can_download=True, in_chans=3, image_size=(32, 32), eval_resample="bilinear",
    ))


__all__ = ["load", "safe_unpickle"]
