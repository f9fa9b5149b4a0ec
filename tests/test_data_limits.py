"""Inputs that used to mislabel, hang or exhaust memory (symlink loops, thin images, archive
bombs, EXIF orientation), the fast training decode, and data.balance.

Every input here is tiny on disk; the ones that claim to be large (a 100 MiB archive member,
a sparse file, a 72 M pixel bi-level PNG, a pickle asking for 1 GB) cost at most ~10 MB of
memory each once refused.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from resnetlab.config import DataConfig
from resnetlab.data import (
    BadImageError,
    DataError,
    DataMeta,
    build_datasets,
    build_loader,
    load_image,
)
from resnetlab.data import images as images_module
from resnetlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD, preprocess
from resnetlab.data.images import read_image, read_resized_crop
from resnetlab.data.loaders import balance_weights
from resnetlab.data.sources import folder as folder_source
from resnetlab.data.sources.cifar import safe_unpickle

CPU = torch.device("cpu")


def _folder(root: Path, per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / "train" / cls / f"{i}.png")


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(name="folder", root=str(root), image_size=8, resize=10, num_workers=0,
                val_fraction=0.0)
    return DataConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- item 4: links


def test_symlink_loop_in_a_class_folder_is_an_error(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "train" / "cat" / "again").symlink_to(tmp_path / "train" / "cat")
    with pytest.raises(DataError, match=r"train/cat/again leads to .*symlink loop"):
        build_datasets(_cfg(tmp_path), seed=0)


@pytest.mark.parametrize("kind", ["folder", "file", "other_split", "class"])
def test_links_leaving_their_class_inside_the_root_are_errors(tmp_path: Path, kind: str) -> None:
    _folder(tmp_path)
    cat, dog = tmp_path / "train" / "cat", tmp_path / "train" / "dog"
    if kind == "folder":  # dog images would be labelled cat
        (cat / "dogs").symlink_to(dog)
    elif kind == "file":
        (cat / "x.png").symlink_to(dog / "0.png")
    elif kind == "other_split":  # test images would leak into training
        (tmp_path / "test" / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "test" / "cat" / "t.png")
        (cat / "t.png").symlink_to(tmp_path / "test" / "cat" / "t.png")
    else:  # a class folder that is another class
        (tmp_path / "train" / "puma").symlink_to(cat)
    with pytest.raises(DataError, match=r"link|already listed"):
        build_datasets(_cfg(tmp_path), seed=0)


def test_links_to_outside_the_root_are_followed(tmp_path: Path) -> None:
    """A link farm over a central image store is a normal way to build splits."""
    store = tmp_path / "store"
    store.mkdir()
    Image.new("RGB", (9, 9)).save(store / "s.png")
    root = tmp_path / "data"
    _folder(root)
    (root / "train" / "cat" / "linked").symlink_to(store)
    (root / "train" / "dog" / "s.png").symlink_to(store / "s.png")
    ds = build_datasets(_cfg(root), seed=0)
    assert len(ds.train) == 10 and sum(ds.train.labels.tolist()) == 5  # 4 + 1 dog images


def test_unreadable_sub_folder_is_an_error_or_listed(tmp_path: Path, monkeypatch) -> None:
    """Listing errors used to vanish (os.walk ignores them). Root ignores permissions, so the
    refusal is simulated where the listing asks the OS."""
    _folder(tmp_path)
    locked = tmp_path / "train" / "cat" / "locked"
    locked.mkdir()
    Image.new("RGB", (8, 8)).save(locked / "hidden.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder_source.os, "scandir", scandir)
    with pytest.raises(DataError, match=rf"^{locked}: cannot list folder \(Permission denied\)"):
        build_datasets(_cfg(tmp_path), seed=0)
    ds = build_datasets(_cfg(tmp_path, on_bad_image="skip"), seed=0)
    assert ds.bad_files() == [(str(locked), "cannot list folder (Permission denied)")]
    assert len(ds.train) == 8


# ---------------------------------------------------------------------------------------------- item 13: EXIF


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str) -> None:
    """Orientation 6: the camera was turned, a viewer rotates 90 degrees clockwise."""
    px = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high; left half red
    px[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"phone.{fmt.lower()}"
    Image.fromarray(px).save(path, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    img = load_image(path)
    assert img.size == (20, 40)  # upright: 20 wide, 40 high
    top = np.asarray(img.convert("RGB"))[:20].astype(int)  # the stored left half is now on top
    assert top[..., 0].mean() > 200 and np.asarray(img.convert("RGB"))[20:, :, 0].mean() < 50
    seen = []
    read_resized_crop(path, 3, lambda h, w: seen.append((h, w)) or (0, 0, h, w), (8, 8))
    assert seen == [(40, 20)]  # the training path crops the upright image too


# ---------------------------------------------------------------------------------------------- item 11: caps


def test_thin_image_is_refused_before_the_resize(tmp_path: Path) -> None:
    """A 20000x1 PNG is ~100 bytes; resizing its short side to 256 would make 5,120,000x256."""
    path = tmp_path / "thin.png"
    Image.new("RGB", (20000, 1), (255, 0, 0)).save(path)
    assert path.stat().st_size < 500
    meta = DataMeta("folder", ("a", "b"), 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, resize=256)
    with pytest.raises(DataError, match=r"20000x1 image .*aspect ratio 20000:1.*over the limit"):
        preprocess([load_image(path)], meta)
    ok = tmp_path / "wide.png"  # a panorama is fine
    Image.new("RGB", (2000, 200)).save(ok)
    assert preprocess([load_image(ok)], meta).shape == (1, 3, 224, 224)


def test_thin_image_is_a_bad_file_for_the_eval_loader(tmp_path: Path) -> None:
    _folder(tmp_path)
    Image.new("RGB", (20000, 1)).save(tmp_path / "train" / "cat" / "thin.png")
    cfg = _cfg(tmp_path, on_bad_image="skip", resize=256, image_size=224)
    ds = build_datasets(cfg, seed=0)
    loader = build_loader(ds.train, ds.meta, cfg, train=False, batch_size=16, device=CPU, seed=0)
    assert sum(x.shape[0] for x, _ in loader.iterate(0)) == 8
    assert [f for f, _ in ds.bad_files()] == [str(tmp_path / "train" / "cat" / "thin.png")]


def test_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path: Path) -> None:
    """9000x8000 = 72 M pixels: under PIL's bomb limit (89 M warns, 179 M errors), but decoded
    and converted to RGB it takes 216 MB per worker. The file is ~0.1 MB."""
    path = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(path)
    with pytest.raises(BadImageError, match=rf"^{path}: 9000x8000 = 72 M pixels is over the limit"):
        load_image(path)
    assert "over the limit" in images_module.check_image(path)
    with pytest.raises(BadImageError, match="over the limit"):
        read_resized_crop(path, 3, lambda h, w: (0, 0, h, w), (8, 8))


def test_pickle_asking_for_a_gigabyte_is_refused() -> None:
    """``bytearray(10**9)`` in 40 bytes of pickle: refused before anything is allocated."""
    bomb = (b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01cbuiltins\nbytearray\nJ"
            + struct.pack("<i", 10**9) + b"\x85R\x73.")
    with pytest.raises(DataError, match=r"refused to load: bytearray\(1000000000\)"):
        safe_unpickle(bomb, "data_batch_1")
    # Protocol-2 pickles of b"" call bytes() with no size: still read.
    assert safe_unpickle(pickle.dumps({b"k": b""}, protocol=2), "x") == {b"k": b""}


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_cifar_archive_member_expanding_to_100_mib_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # ~100 KB on disk
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 100 * 2**20
        tar.addfile(info, _Zeros(info.size))
    assert archive.stat().st_size < 2**20
    with pytest.raises(DataError, match=r"member cifar-10-batches-py/data_batch_1 is 100 MiB, over the 64 MiB"):
        build_datasets(DataConfig(name="cifar10", root=str(archive)), seed=0)


def test_cifar_batch_file_over_the_cap_is_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"")
    with open(folder / "batches.meta", "wb") as f:
        f.truncate(5 * 2**30)  # sparse: 5 GiB long, nothing on disk
    with pytest.raises(DataError, match=r"batches.meta is 5120 MiB, over the 64 MiB"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------- fast decode


def _photo(w: int, h: int) -> np.ndarray:
    """A smooth image with some texture (JPEG-friendly, like a photo)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(1)
    px = np.stack([128 + 100 * np.sin(x / 17.0), 128 + 100 * np.cos(y / 23.0), (x + y) % 256], -1)
    return np.clip(px + rng.normal(0, 4, px.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("size", "box", "in_chans", "mode"), [
    ((64, 64), (0, 0, 600, 800), 3, "RGB"),  # crop 600x800 >= 8x the output: libjpeg at 1/8
    ((64, 64), (100, 50, 150, 140), 3, "RGB"),  # small crop: decode_jpeg, full size
    ((32, 32), (10, 10, 300, 300), 1, "RGB"),  # colour JPEG for a grey network, at 1/8
    ((32, 32), (10, 10, 50, 60), 3, "L"),  # grey JPEG for a colour network
])
def test_fast_jpeg_path_matches_the_pil_reference(tmp_path: Path, size, box, in_chans: int, mode: str) -> None:
    """The fast path against full decode + crop + antialiased resize. Reduced-scale decoding
    is libjpeg's DCT-domain downscale, another low-pass filter than the bilinear antialias, so
    pixels differ by a few levels; a wrong box, channel order or scale would differ by tens
    (the image's sine waves swing 200 levels)."""
    path = tmp_path / "p.jpg"
    img = Image.fromarray(_photo(800, 600))
    (img.convert("L") if mode == "L" else img).save(path, quality=92)
    fast = read_resized_crop(path, in_chans, lambda h, w: box, size)
    ref = TF.resized_crop(TF.pil_to_tensor(read_image(path, in_chans)), *box, list(size), antialias=True)
    assert fast.dtype == torch.uint8 and fast.shape == ref.shape == (in_chans, *size)
    diff = (fast.int() - ref.int()).abs().float()
    assert diff.mean() < 3.0 and diff.quantile(0.99) < 16


def test_fast_jpeg_path_names_truncated_files(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 48)).save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError, match=rf"^{path}: cannot read image"):
        read_resized_crop(path, 3, lambda h, w: (0, 0, h, w), (8, 8))


# ---------------------------------------------------------------------------------------------- balance


def test_balance_draws_classes_equally_and_resumes_exactly(tmp_path: Path) -> None:
    from resnetlab.data import ArraySplit

    labels = torch.tensor([0] * 90 + [1] * 10)
    split = ArraySplit(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).clone(),
                       labels)
    meta = DataMeta("digits", ("a", "b"), 1, (2, 2), (0.0,), (1.0,))
    w = balance_weights(labels)
    assert torch.allclose(w[:90].sum(), w[90:].sum())
    cfg = DataConfig(balance=True, augment=DataConfig().augment.__class__(crop_padding=0, flip=False))
    loader = build_loader(split, meta, cfg, train=True, batch_size=10, device=CPU, seed=3)
    ys = torch.cat([y for e in range(4) for _, y in loader.iterate(e)])
    # 400 draws at p = 1/2: std 10, so 200 +- 50 is a 5-sigma band; unbalanced would give 40.
    assert 150 <= int((ys == 1).sum()) <= 250
    full = [x.flatten(1)[:, 0].tolist() for x, _ in loader.iterate(2)]
    again = build_loader(split, meta, cfg, train=True, batch_size=10, device=CPU, seed=3)
    tail = [x.flatten(1)[:, 0].tolist() for x, _ in again.iterate(2, start_batch=6)]
    assert tail == full[6:]  # resume at batch 6 of epoch 2: the same samples, without replay
    assert full != [x.flatten(1)[:, 0].tolist() for x, _ in loader.iterate(3)]
    plain = build_loader(split, meta, DataConfig(), train=True, batch_size=10, device=CPU, seed=3)
    assert int(torch.cat([y for _, y in plain.iterate(0)]).sum()) == 10  # off: a permutation


def test_balanced_run_resumed_mid_epoch_draws_the_same_samples(quick: list[str]) -> None:
    """Stop a data.balance=true run mid-epoch and resume it: every step's loss (so every batch)
    equals the straight run's, bit for bit; and balance really changes the draw."""
    import resnetlab
    from resnetlab.engine import resume_config

    def run(overrides: list[str], stop_at: int | None = None, resume=None, losses=None):
        losses = [] if losses is None else losses

        def on_step(info) -> bool:
            losses.append(info["loss"].item())
            return stop_at is not None and info["step"] == stop_at

        cfg = resume_config(resume, overrides) if resume else resnetlab.load(None, overrides)
        return resnetlab.train(cfg, on_step=on_step), losses

    common = [*quick, "train.epochs=1", "data.balance=true", "model.name=plain20",
              "train.test_at_end=false", "data.val_fraction=0"]
    _, straight = run([*common, "run.name=straight"])
    first, losses = run([*common, "run.name=split"], stop_at=4)
    assert first.interrupted == "stop" and len(losses) == 4
    run([], resume=first.run_dir, losses=losses)
    assert [float.hex(x) for x in losses] == [float.hex(x) for x in straight]
    _, unbalanced = run([*common, "run.name=plain", "data.balance=false"])
    assert unbalanced[1:] != straight[1:]


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalize_batch_equals_normalize_bitwise(channels_last: bool) -> None:
    """The CPU folder path normalises in the workers with a one-allocation variant: it must
    give exactly normalize()'s floats (same float32 constants, same two roundings)."""
    from resnetlab.data import normalize
    from resnetlab.data.loaders import normalize_batch

    meta = DataMeta("folder", ("a",), 3, (5, 7), IMAGENET_MEAN, IMAGENET_STD, 8)
    x = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = normalize_batch(x, meta, channels_last)
    assert torch.equal(got, normalize(x, meta))
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
