"""Tests for resnetlab.data: sources, splits, bad input, image modes, loaders, augmentation.

Every fixture is made here, in tmp_path: a CIFAR archive in the official pickle format, real
PNG/JPEG files in every common mode, and broken files. Nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.config import AugmentConfig, DataConfig
from resnetlab.data import (
    ArraySplit,
    BadImageError,
    DataError,
    DataMeta,
    FileSplit,
    build_datasets,
    build_loader,
    load_image,
    normalize,
    preprocess,
    to_mode,
    to_rgb,
)
from resnetlab.data.augment import CropFlip, apply_crop_flip, random_crop_flip
from resnetlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from resnetlab.data.sources import folder as folder_source

CPU = torch.device("cpu")


def collect(loader, epoch: int = 0, start_batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader.iterate(epoch, start_batch))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def sample_keys(split: ArraySplit) -> Counter:
    """Multiset of (pixels, label): splits partition the data iff these add up exactly."""
    return Counter(
        (img.numpy().tobytes(), int(y)) for img, y in zip(split.images, split.labels, strict=True)
    )


# ----------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> object:
    return build_datasets(DataConfig(), seed=0)


def test_digits_split_sizes_stratified_and_disjoint(digits) -> None:
    from sklearn.datasets import load_digits

    n_train, n_val, n_test = len(digits.train), len(digits.val), len(digits.test)
    assert n_train + n_val + n_test == 1797
    assert (n_val, n_test) == (180, 359)  # 10% and 20% of the total, rounded
    assert digits.train.images.dtype == torch.uint8
    assert digits.train.images.shape[1:] == (1, 8, 8)
    assert int(digits.train.images.max()) == 255  # 16 -> 255

    # Stratified: every class's share in each split is within one sample of its ideal share.
    full = np.bincount(load_digits().target, minlength=10)
    for split, size in ((digits.val, n_val), (digits.test, n_test)):
        counts = np.bincount(split.labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - full * size / 1797) <= 1.0)

    # Disjoint and complete: the three multisets add up to the whole data set, exactly.
    bunch = load_digits()
    pixels = np.round(bunch.images * 255 / 16).astype(np.uint8)[:, None]
    everything = Counter(
        (p.tobytes(), int(y)) for p, y in zip(pixels, bunch.target, strict=True)
    )
    parts = sample_keys(digits.train) + sample_keys(digits.val) + sample_keys(digits.test)
    assert parts == everything


def test_digits_split_depends_only_on_seed(digits) -> None:
    again = build_datasets(DataConfig(), seed=0)
    other = build_datasets(DataConfig(), seed=1)
    assert torch.equal(again.test.images, digits.test.images)
    assert torch.equal(again.val.labels, digits.val.labels)
    assert not torch.equal(other.test.images, digits.test.images)
    assert sample_keys(other.test) != sample_keys(digits.test)
    no_val = build_datasets(DataConfig(val_fraction=0.0), seed=0)
    assert no_val.val is None and len(no_val.train) == 1797 - 359


def test_digits_split_is_scikit_learns_stratified_split_seeded_by_the_config_seed(digits) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from resnetlab.data.augment import derive_seed

    y = load_digits().target
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=359, stratify=y,
                                  random_state=derive_seed(0, "digits", "test") % 2**32)
    rest = np.sort(rest)
    _, val = train_test_split(rest, test_size=180, stratify=y[rest],
                              random_state=derive_seed(0, "digits", "val") % 2**32)
    pixels = torch.from_numpy(np.round(load_digits().images * 255 / 16).astype(np.uint8))[:, None]
    assert torch.equal(digits.test.images, pixels[np.sort(test)])
    assert torch.equal(digits.val.images, pixels[np.sort(val)])


def test_stratified_split_of_sets_too_small_for_scikit_learn() -> None:
    from resnetlab.data.splits import stratified_split

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # class 2 has one sample: sklearn refuses
    for seed in range(20):
        kept, held = stratified_split(labels, 2, seed)
        assert len(held) == 2 and sorted(np.concatenate([kept, held]).tolist()) == list(range(10))
        assert 9 in kept  # quotas 1.2 / 0.6 / 0.2: the single sample of class 2 stays for training
        assert sorted(labels[held].tolist()) == [0, 1]
    assert np.array_equal(stratified_split(labels, 2, 7)[1], stratified_split(labels, 2, 7)[1])
    kept, held = stratified_split(labels, 0, 0)
    assert len(held) == 0 and kept.tolist() == list(range(10))


def test_digits_meta_stats_and_round_trip(digits) -> None:
    x = digits.train.images.double() / 255
    meta = digits.meta
    assert meta.in_chans == 1 and meta.input_size == (8, 8) and meta.resize is None
    assert meta.classes == tuple(str(i) for i in range(10))
    assert meta.mean[0] == pytest.approx(float(x.mean()), abs=1e-9)
    assert meta.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-9)
    assert DataMeta.from_dict(meta.to_dict()) == meta
    with pytest.raises(DataError, match="classes"):
        DataMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "classes"})


# ----------------------------------------------------------------------------------------------
# CIFAR, written in the official python format


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                 b"dog", b"frog", b"horse", b"ship", b"truck"]


def _batch(rng: np.random.Generator, n: int, classes: int, key: bytes) -> dict:
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        key: [int(i % classes) for i in range(n)],
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar(root: Path, name: str = "cifar10", *, per_batch: int = 20,
                archive: bool = False) -> dict[str, dict]:
    """Tiny CIFAR-10/100 in the official layout (protocol-2 pickles of dicts with bytes keys)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, tar_name = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        files = {f"data_batch_{i}": _batch(rng, per_batch, 10, b"labels") for i in range(1, 6)}
        files["test_batch"] = _batch(rng, per_batch, 10, b"labels")
        files["batches.meta"] = {b"label_names": CIFAR10_NAMES, b"num_vis": 3072}
    else:
        folder, tar_name = "cifar-100-python", "cifar-100-python.tar.gz"
        files = {s: _batch(rng, 2 * per_batch * (5 if s == "train" else 1), 100, b"fine_labels")
                 for s in ("train", "test")}
        files["meta"] = {b"fine_label_names": [b"class%02d" % i for i in range(100)],
                         b"coarse_label_names": [b"super%02d" % i for i in range(20)]}
    blobs = {f: pickle.dumps(d, protocol=2) for f, d in files.items()}
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / tar_name, "w:gz") as tar:
            for f, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{f}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / folder).mkdir()
        for f, blob in blobs.items():
            (root / folder / f).write_bytes(blob)
    return files


@pytest.mark.parametrize("layout", ["folder", "archive", "batches_dir"])
def test_cifar10_official_format(tmp_path: Path, layout: str) -> None:
    files = write_cifar(tmp_path, archive=layout == "archive")
    root = tmp_path / "cifar-10-batches-py" if layout == "batches_dir" else tmp_path
    ds = build_datasets(DataConfig(name="cifar10", root=str(root)), seed=0)
    assert ds.meta.classes[:3] == ("airplane", "automobile", "bird")
    assert ds.meta.in_chans == 3 and ds.meta.input_size == (32, 32) and len(ds.meta.classes) == 10
    assert len(ds.train) == 90 and len(ds.val) == 10 and len(ds.test) == 20  # 100 -> 90 / 10
    assert ds.train.images.shape == (90, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert torch.bincount(ds.val.labels, minlength=10).tolist() == [1] * 10  # stratified carve
    # Pixel layout: a row of 3072 bytes is the R plane, then G, then B, each row-major 32x32.
    first = files["test_batch"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(ds.test.images[0].numpy(), first)
    assert ds.test.labels.tolist() == files["test_batch"][b"labels"]
    # Train + val together are exactly the five training batches.
    written = Counter()
    for i in range(1, 6):
        b = files[f"data_batch_{i}"]
        written.update((row.reshape(3, 32, 32).tobytes(), y)
                       for row, y in zip(b[b"data"], b[b"labels"], strict=True))
    assert sample_keys(ds.train) + sample_keys(ds.val) == written
    x = ds.train.images.double() / 255
    assert ds.meta.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-9)
    cfg = DataConfig(name="cifar10", root=str(root))
    loader = build_loader(ds.train, ds.meta, cfg, train=False, batch_size=32, device=CPU, seed=0)
    x, _ = collect(loader)  # normalised with the train split's own statistics
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("archive", [False, True])
def test_cifar100_official_format(tmp_path: Path, archive: bool) -> None:
    files = write_cifar(tmp_path, "cifar100", archive=archive)
    ds = build_datasets(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0.5), seed=3)
    assert len(ds.meta.classes) == 100 and ds.meta.classes[7] == "class07"
    assert len(ds.train) + len(ds.val) == 200 and len(ds.val) == 100
    assert torch.bincount(ds.val.labels, minlength=100).tolist() == [1] * 100
    assert ds.test.labels.tolist() == files["test"][b"fine_labels"]


def test_cifar_missing_batch_names_the_file(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_3.*batches\.meta"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)


def test_cifar_missing_root_explains_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*cifar-10-python\.tar\.gz"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataError, match=r"holds no CIFAR files.*cifar-100-python/"):
        build_datasets(DataConfig(name="cifar100", root=str(tmp_path)), seed=0)


def test_cifar_download_without_network_says_where_to_put_files(tmp_path, monkeypatch) -> None:
    from torchvision.datasets import utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=True)
    with pytest.raises(DataError) as err:
        build_datasets(cfg, seed=0)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "data_batch_1" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cifar_corrupt_batch_names_the_file(tmp_path: Path, damage: str) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(DataError, match=r"data_batch_2.*corrupt"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)


def test_cifar_corrupt_archive_names_it(tmp_path: Path) -> None:
    write_cifar(tmp_path, archive=True)
    tar = tmp_path / "cifar-10-python.tar.gz"
    tar.write_bytes(tar.read_bytes()[:500])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*corrupt"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)


class _SystemGadget:
    """Unpickling this runs a shell command (``posix.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecGadget(_SystemGadget):
    """Unpickling this runs Python code (``builtins.exec``)."""

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("gadget", [_SystemGadget, _ExecGadget])
def test_cifar_pickle_gadget_is_refused_and_never_runs(tmp_path: Path, gadget) -> None:
    # The gadget is live: plain pickle would run it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(gadget(probe), protocol=2))
    assert probe.exists()

    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(pickle.dumps({b"data": gadget(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_4.*refused"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Image modes


def _roundtrip(img: Image.Image, fmt: str, tmp_path: Path) -> Image.Image:
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return load_image(path)


def _palette_image() -> Image.Image:
    """2x1 palette image: index 0 opaque red, index 1 (black in the palette) transparent."""
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1
    return img


def test_modes_convert_to_sensible_rgb(tmp_path: Path) -> None:
    grey = _roundtrip(Image.new("L", (2, 2), 77), "PNG", tmp_path)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 128))  # half-transparent red
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black: reads as white paper
    rgb = to_rgb(_roundtrip(rgba, "PNG", tmp_path))
    assert rgb.getpixel((1, 0)) == (255, 255, 255)
    r, g, b = rgb.getpixel((0, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1

    pal = to_rgb(_roundtrip(_palette_image(), "PNG", tmp_path))
    assert pal.getpixel((0, 0)) == (255, 0, 0) and pal.getpixel((1, 0)) == (255, 255, 255)

    cmyk = _roundtrip(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", tmp_path)
    assert cmyk.mode == "CMYK"
    assert all(abs(a - e) <= 3 for a, e in zip(to_rgb(cmyk).getpixel((4, 4)), (0, 255, 255),
                                                strict=True))

    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    sixteen = _roundtrip(Image.fromarray(deep), "PNG", tmp_path)
    assert sixteen.mode in ("I;16", "I")
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 100, 255]
    assert np.asarray(to_mode(sixteen, 1)).tolist() == [[0, 100, 255]]
    as_int32 = Image.fromarray(deep.astype(np.int32))  # mode "I", 16-bit range
    assert np.asarray(to_mode(as_int32, 1)).tolist() == [[0, 100, 255]]

    red = Image.new("RGB", (1, 1), (255, 0, 0))
    assert to_mode(red, 1).getpixel((0, 0)) == 76  # ITU-R 601-2 luma of pure red


@pytest.mark.parametrize("kind", ["zero_byte", "truncated_jpeg", "text_as_png", "missing"])
def test_load_image_errors_name_the_file(tmp_path: Path, kind: str) -> None:
    path = _bad_file(tmp_path, kind)
    with pytest.raises(BadImageError, match=str(path)):
        load_image(path)


def _bad_file(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "zero_byte":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        path = folder / "cut.jpg"
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "text_as_png":
        path = folder / "notes.png"
        path.write_text("this is not an image\n")
    else:
        path = folder / "gone.png"
    return path


# ----------------------------------------------------------------------------------------------
# Image folders


def write_folder(root: Path, *, splits: tuple[str, ...] = ("train",)) -> None:
    """Two classes of real PNG/JPEG files in RGB, L, RGBA, P, CMYK and 16-bit modes."""
    rng = np.random.default_rng(0)

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    for split in splits:
        cat, dog = root / split / "cat", root / split / "dog"
        cat.mkdir(parents=True)
        dog.mkdir(parents=True)
        Image.fromarray(noise(20, 24, 3)).save(cat / "rgb.png")
        Image.fromarray(noise(24, 20, 1)[..., 0]).save(cat / "grey.PNG")
        Image.fromarray(noise(18, 18, 4), "RGBA").save(cat / "alpha.png")
        Image.fromarray(noise(22, 26, 3)).save(cat / "photo.jpg", quality=90)
        _palette_image().resize((20, 10)).save(dog / "palette.png")
        Image.new("CMYK", (21, 19), (0, 255, 0, 0)).save(dog / "print.jpeg", quality=90)
        deep = rng.integers(0, 65536, (19, 23), dtype=np.uint16)
        Image.fromarray(deep).save(dog / "deep.png")
        Image.new("RGB", (30, 20), (255, 0, 0)).save(dog / "red.png")
        (dog / "README.txt").write_text("not an image: ignored by extension")


def folder_cfg(root: Path, **kw) -> DataConfig:
    base = dict(name="folder", root=str(root), image_size=16, resize=20, num_workers=0,
                val_fraction=0.25)
    return DataConfig(**{**base, **kw})


def test_folder_dataset_and_loaders(tmp_path: Path) -> None:
    write_folder(tmp_path)
    cfg = folder_cfg(tmp_path)
    ds = build_datasets(cfg, seed=0)
    assert ds.meta.classes == ("cat", "dog") and ds.meta.in_chans == 3
    assert ds.meta.input_size == (16, 16) and ds.meta.resize == 20
    assert ds.meta.mean == IMAGENET_MEAN and ds.meta.std == IMAGENET_STD
    assert isinstance(ds.train, FileSplit) and ds.test is None and not ds.skipped
    assert len(ds.train) + len(ds.val) == 8 and len(ds.val) == 2  # 4 + 4 files, README ignored
    assert sorted(ds.val.labels.tolist()) == [0, 1]  # stratified

    train = build_loader(ds.train, ds.meta, cfg, train=True, batch_size=3, device=CPU, seed=0)
    assert len(train) == 2 and train.num_samples() == 6
    x, y = collect(train)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(x).all()

    # Evaluation of the solid red image is exactly ImageNet-normalised (1, 0, 0).
    evaluator = build_loader(FileSplit([str(tmp_path / "train/dog/red.png")], torch.tensor([1])),
                             ds.meta, cfg, train=False, batch_size=4, device=CPU, seed=0)
    x, y = collect(evaluator)
    expected = torch.tensor([(c - m) / s for c, m, s in
                             zip((1.0, 0.0, 0.0), IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert x.shape == (1, 3, 16, 16) and y.tolist() == [1]
    assert torch.allclose(x[0].mean((1, 2)), expected, atol=1e-5)
    assert torch.allclose(x[0].std((1, 2)), torch.zeros(3), atol=1e-5)


def test_folder_val_and_test_folders(tmp_path: Path) -> None:
    write_folder(tmp_path, splits=("train", "val", "test"))
    ds = build_datasets(folder_cfg(tmp_path), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 8, 8)
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "bird" / "b.png")
    with pytest.raises(DataError, match=r"test/bird.*not a class"):
        build_datasets(folder_cfg(tmp_path), seed=0)


def test_folder_workers_and_resume_are_deterministic(tmp_path: Path) -> None:
    write_folder(tmp_path)
    cfg = folder_cfg(tmp_path, val_fraction=0.0)
    ds = build_datasets(cfg, seed=0)

    def loader(workers: int):
        c = folder_cfg(tmp_path, val_fraction=0.0, num_workers=workers)
        return build_loader(ds.train, ds.meta, c, train=True, batch_size=2, device=CPU, seed=5)

    serial = loader(0)
    x0, y0 = collect(serial, epoch=1)
    assert torch.equal(collect(serial, epoch=1)[0], x0)
    assert not torch.equal(collect(serial, epoch=2)[0], x0)  # new order and new crops
    x_tail, y_tail = collect(serial, epoch=1, start_batch=2)
    assert torch.equal(x_tail, x0[4:]) and torch.equal(y_tail, y0[4:])
    parallel = loader(2)  # each crop is seeded by its sample, not by the worker
    xp, yp = collect(parallel, epoch=1)
    assert torch.equal(xp, x0) and torch.equal(yp, y0)


@pytest.mark.parametrize("kind", ["zero_byte", "truncated_jpeg", "text_as_png"])
def test_folder_bad_image_error_or_counted_skip_up_front(tmp_path: Path, kind: str) -> None:
    write_folder(tmp_path)
    bad = _bad_file(tmp_path / "train" / "cat", kind)
    with pytest.raises(DataError, match=str(bad)):
        build_datasets(folder_cfg(tmp_path, check_images=True), seed=0)
    ds = build_datasets(folder_cfg(tmp_path, on_bad_image="skip", check_images=True), seed=0)
    assert [f for f, _ in ds.skipped] == [str(bad)] and ds.bad_files() == ds.skipped
    assert str(bad) not in ds.train.paths + ds.val.paths
    assert len(ds.train) + len(ds.val) == 8


@pytest.mark.parametrize("kind", ["zero_byte", "truncated_jpeg", "text_as_png"])
@pytest.mark.parametrize("train", [True, False])
def test_folder_bad_image_found_while_reading(tmp_path: Path, kind: str, train: bool) -> None:
    """Default start-up decodes nothing; the loader stops naming the file, or skips it,
    counts it once and lists it in bad_files() (what result.json shows)."""
    write_folder(tmp_path)
    bad = _bad_file(tmp_path / "train" / "cat", kind)
    ds = build_datasets(folder_cfg(tmp_path, val_fraction=0.0), seed=0)
    assert str(bad) in ds.train.paths and not ds.bad_files()  # listed, not decoded
    loader = build_loader(ds.train, ds.meta, folder_cfg(tmp_path), train=train, batch_size=3,
                          device=CPU, seed=0)
    with pytest.raises(BadImageError, match=rf"^{bad}: .*data.on_bad_image=skip") as err:
        for epoch in range(4):  # train drops the tail batch: some epoch reads every file
            collect(loader, epoch=epoch)
    assert "\n" not in str(err.value)  # one line, not a worker traceback

    skip_cfg = folder_cfg(tmp_path, on_bad_image="skip")
    loader = build_loader(ds.train, ds.meta, skip_cfg, train=train, batch_size=3, device=CPU, seed=0)
    sizes = [x.shape[0] for epoch in range(4) for x, _ in loader.iterate(epoch)]
    assert [f for f, _ in ds.bad_files()] == [str(bad)]
    if train:
        assert 2 in sizes and set(sizes) <= {2, 3}  # the batch that held it is one short
    else:
        assert sum(sizes) == 4 * (len(ds.train) - 1)  # evaluation sees every other file


def test_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        build_datasets(folder_cfg(tmp_path), seed=0)  # no train/ at all
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path / 'train'} has no class folders"):
        build_datasets(folder_cfg(tmp_path), seed=0)
    write_folder(tmp_path / "other")
    (tmp_path / "other" / "train" / "emu").mkdir()
    (tmp_path / "other" / "train" / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=rf"{tmp_path / 'other/train/emu'} holds no images"):
        build_datasets(folder_cfg(tmp_path / "other"), seed=0)


# ----------------------------------------------------------------------------------------------
# Preprocessing for predict


def test_preprocess_matches_the_evaluation_loader(tmp_path: Path, digits) -> None:
    write_folder(tmp_path)
    cfg = folder_cfg(tmp_path, val_fraction=0.0)
    ds = build_datasets(cfg, seed=0)
    images = [load_image(p) for p in ds.train.paths]
    batch = preprocess(images, ds.meta)
    assert batch.shape == (8, 3, 16, 16) and batch.dtype == torch.uint8
    evaluator = build_loader(ds.train, ds.meta, cfg, train=False, batch_size=8, device=CPU,
                             seed=0, channels_last=False)
    assert torch.equal(normalize(batch, ds.meta), collect(evaluator)[0])

    big = Image.fromarray(np.kron(digits.test.images[0, 0].numpy(), np.ones((4, 4), np.uint8)))
    small = preprocess([big.convert("RGB")], digits.meta)  # a 32x32 colour scan of a digit
    assert small.shape == (1, 1, 8, 8)
    assert torch.equal(small[0], digits.test.images[0])  # box filter undoes the 4x upscale

    cifar_meta = DataMeta("cifar10", tuple("abcdefghij"), 3, (32, 32), (0.5,) * 3, (0.25,) * 3)
    assert preprocess([Image.new("LA", (50, 40))], cifar_meta).shape == (1, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# In-memory loader and batched augmentation


def _reference_crop_flip(x: torch.Tensor, p: CropFlip, padding: int) -> torch.Tensor:
    """Slow per-sample reference for apply_crop_flip."""
    h, w = x.shape[-2:]
    out = []
    for i in range(x.shape[0]):
        padded = torch.nn.functional.pad(x[i], (padding,) * 4)
        crop = padded[:, int(p.dy[i]) : int(p.dy[i]) + h, int(p.dx[i]) : int(p.dx[i]) + w]
        out.append(crop.flip(-1) if bool(p.flip[i]) else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8, generator=g)
    for padding in (0, 1, 4):
        params = CropFlip(torch.randint(0, 2 * padding + 1, (16,), generator=g),
                          torch.randint(0, 2 * padding + 1, (16,), generator=g),
                          torch.rand(16, generator=g) < 0.5)
        assert torch.equal(apply_crop_flip(x, params, padding),
                           _reference_crop_flip(x, params, padding))


def test_augmentation_is_per_sample_and_seeded() -> None:
    img = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    same = img.expand(64, 3, 8, 8)  # 64 identical images
    out = random_crop_flip(same, 4, True, torch.Generator().manual_seed(1))
    distinct = {o.numpy().tobytes() for o in out}
    assert len(distinct) > 30  # 81 offsets x 2 flips: identical inputs get different crops
    again = random_crop_flip(same, 4, True, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    no_flip = random_crop_flip(same, 0, False, torch.Generator().manual_seed(1))
    assert torch.equal(no_flip, same)  # padding 0 and no flip: identity


def _array_split(n: int = 50, c: int = 3, size: int = 8) -> ArraySplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    return ArraySplit(images, torch.arange(n) % 10)


META3 = DataMeta("cifar10", tuple("abcdefghij"), 3, (8, 8), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
AUG = DataConfig(augment=AugmentConfig(crop_padding=2, flip=True))


def _mem(split: ArraySplit, *, train: bool = True, batch_size: int = 8, seed: int = 0,
         rank: int = 0, world_size: int = 1, cfg: DataConfig = AUG):
    return build_loader(split, META3, cfg, train=train, batch_size=batch_size, device=CPU,
                        seed=seed, rank=rank, world_size=world_size)


def test_in_memory_train_loader_is_reproducible_and_resumable() -> None:
    split = _array_split()
    loader = _mem(split)
    assert len(loader) == 6 and loader.num_samples() == 48  # 50 // 8, the tail is dropped
    x, y = collect(loader, epoch=3)
    assert x.shape == (48, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert len(set(y.tolist())) == 10 and y.dtype == torch.int64
    assert torch.equal(collect(_mem(split), epoch=3)[0], x)  # same seed, same batches
    assert not torch.equal(collect(loader, epoch=4)[0], x)  # another epoch
    assert not torch.equal(collect(_mem(split, seed=1), epoch=3)[0], x)  # another seed
    x_tail, y_tail = collect(loader, epoch=3, start_batch=4)
    assert torch.equal(x_tail, x[32:]) and torch.equal(y_tail, y[32:])
    host = DataConfig(augment=AUG.augment, in_memory=False)  # batches moved one at a time
    assert torch.equal(collect(_mem(split, cfg=host), epoch=3)[0], x)
    # Augmented samples differ from the stored ones, but only by crop and flip.
    plain = collect(_mem(split, cfg=DataConfig(augment=AugmentConfig(0, False))), epoch=3)
    assert torch.equal(plain[1], y) and not torch.equal(plain[0], x)


def test_rank_shards_concatenate_to_the_single_process_batch() -> None:
    split = _array_split()
    single = list(_mem(split).iterate(2))
    ranks = [list(_mem(split, rank=r, world_size=2).iterate(2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)
    with pytest.raises(DataError, match="divide"):
        _mem(split, batch_size=9, world_size=2)
    with pytest.raises(DataError, match="larger than the training split"):
        _mem(split, batch_size=64)


def test_eval_covers_every_sample_once_across_ranks() -> None:
    split = _array_split(n=23)
    ranks = [_mem(split, train=False, batch_size=6, rank=r, world_size=3) for r in range(3)]
    parts = [collect(loader) for loader in ranks]
    assert [loader.num_samples() for loader in ranks] == [8, 8, 7]
    assert torch.equal(torch.cat([y for _, y in parts]), split.labels)  # in order, all, once
    assert torch.equal(torch.cat([x for x, _ in parts]), normalize(split.images, META3))


def test_normalised_digits_have_zero_mean_unit_std(digits) -> None:
    cfg = DataConfig(augment=AugmentConfig(crop_padding=0, flip=True))  # flips keep the stats
    for train in (False, True):
        loader = build_loader(digits.train, digits.meta, cfg, train=train, batch_size=128,
                              device=CPU, seed=0)
        x, _ = collect(loader)
        assert abs(float(x.mean())) < (1e-4 if not train else 0.02)
        assert abs(float(x.std()) - 1.0) < (1e-3 if not train else 0.02)


def test_folder_decodes_only_the_needed_splits(tmp_path: Path, monkeypatch) -> None:
    write_folder(tmp_path, splits=("train", "test"))
    bad = _bad_file(tmp_path / "train" / "cat", "truncated_jpeg")
    decoded: list[str] = []
    real = folder_source.check_images
    monkeypatch.setattr(folder_source, "check_images", lambda paths: decoded.extend(paths) or real(paths))
    build_datasets(folder_cfg(tmp_path), seed=0)  # default: list and label, decode nothing
    assert decoded == []
    check = folder_cfg(tmp_path, check_images=True)
    ds = build_datasets(check, seed=0, needs=("test",))  # eval on test/
    assert decoded and all("/test/" in p for p in decoded)
    assert len(ds.test) == 8 and str(bad) in ds.train.paths + ds.val.paths  # listed, not decoded
    decoded.clear()
    with pytest.raises(DataError, match=str(bad)):  # val is held out of train/: train is checked
        build_datasets(check, seed=0, needs=("val",))
    assert any("/train/" in p for p in decoded)
    with pytest.raises(ValueError, match="unknown split"):
        build_datasets(folder_cfg(tmp_path), seed=0, needs=("tset",))
