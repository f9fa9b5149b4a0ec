"""The MNIST file format (IDX) and the datasets stored in it: Fashion-MNIST, MNIST, KMNIST.

An IDX file is a big-endian header (two zero bytes, a type code, the number of dimensions, one
uint32 per dimension) followed by the array (LeCun's MNIST page). Images are ``idx3`` files
``[n, 28, 28]`` uint8 and labels ``idx1`` files ``[n]`` uint8, gzip-compressed or not. The
reader refuses a wrong magic number, a truncated file, a count that disagrees with the file's
length and a label file that does not match its image file, each with one line naming the file.

Where the files are looked for (first folder that holds them wins):
``data.root`` itself, then torchvision's layout ``<data.root>/<FashionMNIST|MNIST|KMNIST>/raw/``;
with no ``data.root``, Debian's folder (``/usr/share/datasets/fashion-mnist/``, package
``dataset-fashion-mnist``) and then torchvision's layout under ``./data`` (PyTorch's
quick-start tutorial's ``root="data"``). ``data.download=true`` fetches the official files
(torchvision's URLs and MD5s) into that torchvision layout.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from resnetlab.data.errors import DataError
from resnetlab.data.sources.registry import Source, register_source

if TYPE_CHECKING:
    from resnetlab.config import DataConfig
    from resnetlab.data.datasets import Datasets

UBYTE = 0x08  # IDX type code of unsigned bytes, the only one MNIST-style datasets use
MAX_IDX_BYTES = 1 << 31  # largest array read, bytes: MNIST-style train images are 47 MB
DEFAULT_ROOT = Path("data")  # torchvision's tutorials' root="data", relative to the working folder

#: The four files of an MNIST-style dataset: split -> (images, labels), without ".gz".
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------------------------
# The format


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzip (by content, not by name)."""
    f = path.open("rb")
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with ``ndim`` dimensions, gzip or not.

    Raises :class:`DataError` starting with the file's path for a file that cannot be read, a
    wrong magic number, a truncated file, or a file longer than its header announces.
    """
    path = Path(path)
    what = "an image file (idx3)" if ndim == 3 else "a label file (idx1)" if ndim == 1 else \
        f"an IDX file with {ndim} dimensions"
    try:
        with _open(path) as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise DataError(f"{path}: truncated: {len(magic)} bytes, not even an IDX header")
            if magic[:2] != b"\0\0" or magic[2] != UBYTE or magic[3] != ndim:
                raise DataError(
                    f"{path}: wrong magic number 0x{magic.hex()} for {what} (expected "
                    f"0x0000{UBYTE:02x}{ndim:02x}); is it the right file, and not an HTML page?")
            head = f.read(4 * ndim)
            if len(head) < 4 * ndim:
                raise DataError(f"{path}: truncated inside its header ({4 + len(head)} bytes)")
            dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4"))
            expected = int(np.prod(dims, dtype=np.int64)) if dims else 0
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{path}: header announces an array of {dims} = {expected:,} bytes, "
                                f"over the {MAX_IDX_BYTES:,} any MNIST-style file holds; corrupt")
            body = f.read(expected + 1)  # one byte more: a longer file is an error too
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip stream cut short, unreadable file
        reason = "truncated gzip stream" if isinstance(e, EOFError) else (
            getattr(e, "strerror", None) or str(e))
        raise DataError(f"{path}: cannot read ({reason}); replace it with the official file") \
            from None
    if len(body) < expected:
        raise DataError(f"{path}: truncated: its header announces {dims[0]:,} items of shape "
                        f"{dims[1:]} ({expected:,} bytes) but only {len(body):,} bytes follow; "
                        "replace it with the official file")
    if len(body) > expected:
        raise DataError(f"{path}: its header's count ({dims[0]:,} items of shape {dims[1:]}, "
                        f"{expected:,} bytes) disagrees with the file's length (more bytes "
                        "follow); replace it with the official file")
    return np.frombuffer(body[:expected], dtype=np.uint8).reshape(dims)


def read_pair(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, h, w] uint8, labels [n] int64)`` from one image file and its label file."""
    x = read_idx(images, 3)
    y = read_idx(labels, 1).astype(np.int64)
    if len(y) != len(x):
        raise DataError(f"{labels}: {len(y):,} labels but its image file {images} holds "
                        f"{len(x):,} images; the two files do not belong together")
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"{labels}: label {int(y.max())} is outside 0..{num_classes - 1}; not a "
                        f"label file of this {num_classes}-class dataset")
    return x, y


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 ``array`` as an IDX file (gzip when ``path`` ends in .gz). For tests and
    for sharing a subset in the format every MNIST tool reads."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    data = header + a.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


# ----------------------------------------------------------------------------------------------
# The datasets


@dataclass(frozen=True)
class IdxDataset:
    """What differs between the MNIST-style datasets."""

    name: str
    torchvision: str  # torchvision's class name, also its folder: <root>/<this>/raw/
    classes: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()  # folders of distribution packages, looked in with no root
    install_hint: str = ""  # how to get the files besides data.download

    def official_files(self) -> tuple[list[str], list[tuple[str, str]]]:
        """``(mirrors, [(file name, md5)])`` of the official files, as torchvision publishes
        them on its dataset class (no URL is typed here)."""
        from torchvision import datasets

        tv = getattr(datasets, self.torchvision)
        return list(getattr(tv, "mirrors", [])), [(str(f), str(m)) for f, m in tv.resources]

    def candidates(self, root: str | None) -> list[Path]:
        """Folders looked in, in order."""
        if root is not None:
            base = Path(root).expanduser()
            return [base, base / self.torchvision / "raw"]
        return [*map(Path, self.system_dirs), DEFAULT_ROOT / self.torchvision / "raw"]

    def download_dir(self, root: str | None) -> Path:
        """Where data.download=true puts the files: torchvision's layout under the root."""
        return (Path(root).expanduser() if root is not None else DEFAULT_ROOT) / self.torchvision / "raw"


FASHION_MNIST = IdxDataset(
    name="fashion_mnist", torchvision="FashionMNIST",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
             "Bag", "Ankle boot"),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    install_hint="on Debian/Ubuntu: apt-get install -y dataset-fashion-mnist",
)
MNIST = IdxDataset(name="mnist", torchvision="MNIST", classes=tuple(str(i) for i in range(10)))
KMNIST = IdxDataset(name="kmnist", torchvision="KMNIST",
                    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"))
IDX_DATASETS: dict[str, IdxDataset] = {d.name: d for d in (FASHION_MNIST, MNIST, KMNIST)}


def _file_in(folder: Path, base: str) -> Path | None:
    for name in (f"{base}.gz", base):
        if (folder / name).is_file():
            return folder / name
    return None


def _all_files(folder: Path) -> dict[str, Path] | None:
    """base name -> file for the four files in ``folder``; None when none is there; an error
    naming the missing ones when only some are."""
    bases = [b for pair in FILES.values() for b in pair]
    found = {b: _file_in(folder, b) for b in bases}
    if not any(found.values()):
        return None
    missing = [b for b, p in found.items() if p is None]
    if missing:
        raise DataError(f"{folder} holds some but not all of the four IDX files: missing "
                        f"{', '.join(m + '[.gz]' for m in missing)}")
    return {b: p for b, p in found.items() if p is not None}


def _download(ds: IdxDataset, folder: Path) -> None:
    from resnetlab.data.download import created_folders_removed_on_error, fetch_file

    mirrors, resources = ds.official_files()
    with created_folders_removed_on_error(folder):
        for filename, md5 in resources:
            dest = folder / filename
            if not dest.is_file():
                fetch_file([m.rstrip("/") + "/" + filename for m in mirrors], dest, md5)


def locate(ds: IdxDataset, cfg: DataConfig) -> dict[str, Path]:
    """The four files of ``ds`` (downloaded first with ``data.download=true`` when none is found);
    an error listing every folder tried, and how to get the files, when they are nowhere."""
    tried = ds.candidates(cfg.root)
    for folder in tried:
        try:
            found = _all_files(folder)
        except DataError:  # some files only: an interrupted download is completed below
            if not (cfg.download and folder == ds.download_dir(cfg.root)):
                raise
            found = None
        if found is not None:
            return found
    if cfg.download:
        folder = ds.download_dir(cfg.root)
        _download(ds, folder)
        found = _all_files(folder)
        if found is not None:
            return found
    names = ", ".join(f"{b}[.gz]" for pair in FILES.values() for b in pair)
    hints = [h for h in (ds.install_hint,) if h]
    hints += ["set data.root to a folder holding them",
              "or set data.download=true where there is network"]
    raise DataError(f"data.name={ds.name}: the IDX files ({names}) are in none of "
                    f"{', '.join(str(p) + '/' for p in tried)}; " + "; ".join(hints))


def load(cfg: DataConfig, seed: int, needs: frozenset[str]) -> Datasets:
    """Train (minus a stratified, seeded validation share) and the official test split, as
    uint8 ``[n, 1, 28, 28]`` in memory (``needs`` is ignored: the whole set is 55 MB)."""
    import torch

    from resnetlab.data.splits import from_train_test

    ds = IDX_DATASETS[cfg.name]
    files = locate(ds, cfg)
    n_classes = len(ds.classes)
    train_x, train_y = read_pair(files[FILES["train"][0]], files[FILES["train"][1]], n_classes)
    test_x, test_y = read_pair(files[FILES["test"][0]], files[FILES["test"][1]], n_classes)
    for split, x in (("train", train_x), ("test", test_x)):
        if x.shape[1:] != (28, 28):
            raise DataError(f"{files[FILES[split][0]]}: images are {x.shape[1]}x{x.shape[2]} pixels; "
                            f"{ds.name}'s are 28x28: is it the right file?")

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y)  # [n, 1, h, w] uint8, [n]

    return from_train_test(cfg, seed, *tensors(train_x, train_y), *tensors(test_x, test_y),
                           classes=ds.classes)


_FILES = ("IDX files ({names}, gzip or not) in data.root or <data.root>/{tv}/raw/; with no root "
          "{system}./data/{tv}/raw/; data.download=true fetches them")
for _ds, _summary in (
    (FASHION_MNIST, "Zalando's 70k 28x28 grey clothing images, 10 classes"),
    (MNIST, "LeCun's 70k 28x28 grey handwritten digits, 10 classes"),
    (KMNIST, "70k 28x28 grey cursive Japanese characters (Kuzushiji), 10 classes"),
):
    register_source(Source(
        name=_ds.name, summary=_summary, load=load, can_download=True, in_chans=1,
        image_size=(28, 28), classes=_ds.classes, eval_resample="bilinear",
        files=_FILES.format(names="train-/t10k-images-idx3-ubyte, train-/t10k-labels-idx1-ubyte",
                            tv=_ds.torchvision,
                            system="".join(f"{d}/, then " for d in _ds.system_dirs)),
    ))


__all__ = ["FASHION_MNIST", "FILES", "IDX_DATASETS", "KMNIST", "MNIST", "IdxDataset", "load",
           "locate", "read_idx", "read_pair", "write_idx"]
