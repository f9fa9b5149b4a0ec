"""The IDX (MNIST) file format and the sources on it: fashion_mnist, mnist, kmnist.

Format tests use small files written here; one test reads Debian's real Fashion-MNIST files
(.ci/run installs the package dataset-fashion-mnist) once.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetlab.config import ConfigError, load
from resnetlab.data import DataError, build_datasets
from resnetlab.data.sources.idx import FASHION_MNIST, FILES, read_idx, read_pair, write_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _write_dataset(folder: Path, n_train: int = 60, n_test: int = 20, size: int = 28,
                   gz: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four IDX files of random images, labels cycling 0..9; returns the training arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = None
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / (FILES[split][0] + ext), images)
        write_idx(folder / (FILES[split][1] + ext), labels)
        if split == "train":
            out = (images, labels)
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------- the format


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip_gzip_or_not(tmp_path: Path, gz: bool) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if gz else "a")
    write_idx(path, a)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is gz
    np.testing.assert_array_equal(read_idx(path, 3), a)
    # the header is the documented one: 0x00000803, then big-endian dims
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 4)


def _raw(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_refuses_wrong_magic_truncation_and_length(tmp_path: Path) -> None:
    header = bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 2, 2)
    cases = {
        "magic": (b"<htm" + header[4:] + bytes(8), "wrong magic number"),
        "dims": (bytes([0, 0, 8, 1]) + struct.pack(">I", 8) + bytes(8), "wrong magic number"),
        "short": (header + bytes(7), "truncated"),  # 8 bytes announced, 7 there
        "header": (header[:9], "truncated inside its header"),
        "empty": (b"", "truncated"),
        "long": (header + bytes(9), "disagrees with the file's length"),
    }
    for name, (data, needle) in cases.items():
        path = _raw(tmp_path, name, data)
        with pytest.raises(DataError) as e:
            read_idx(path, 3)
        msg = str(e.value)
        assert msg.startswith(str(path)) and needle in msg and "\n" not in msg, (name, msg)
    # a gzip stream cut short is truncated too
    cut = _raw(tmp_path, "cut.gz", gzip.compress(header + bytes(8))[:-12])
    with pytest.raises(DataError, match=rf"^{cut}: .*truncated"):
        read_idx(cut, 3)


def test_label_file_must_match_its_image_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "y", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'y'}: 4 labels but .* 5 images"):
        read_pair(tmp_path / "x", tmp_path / "y", 10)
    write_idx(tmp_path / "y", np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(DataError, match=r"label 10 is outside 0\.\.9"):
        read_pair(tmp_path / "x", tmp_path / "y", 10)


# ---------------------------------------------------------------------------------------------- the sources


def test_source_reads_a_root_and_splits_like_digits(tmp_path: Path) -> None:
    images, labels = _write_dataset(tmp_path / "fm", gz=False)
    cfg = load(None, ["data.name=mnist", f"data.root={tmp_path / 'fm'}", "data.val_fraction=0.1"])
    assert cfg.run.recipe == "mnist" and cfg.data.augment.flip is False
    ds = build_datasets(cfg.data, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54, 6, 20)
    assert ds.meta.in_chans == 1 and ds.meta.input_size == (28, 28) and ds.meta.num_classes == 10
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(ds.val.labels, minlength=10).max() == 1  # stratified: 6 classes, 1 each
    # train + val are exactly the training file, each image with its label
    both = torch.cat([ds.train.images, ds.val.images])[:, 0].numpy()
    both_y = torch.cat([ds.train.labels, ds.val.labels]).numpy()
    order = np.lexsort(both.reshape(len(both), -1).T)
    ref = np.lexsort(images.reshape(len(images), -1).T)
    np.testing.assert_array_equal(both[order], images[ref])
    np.testing.assert_array_equal(both_y[order], labels[ref])
    again = build_datasets(cfg.data, seed=0)
    assert torch.equal(again.val.labels, ds.val.labels) and torch.equal(again.val.images, ds.val.images)


def test_torchvision_layout_is_found_and_missing_files_named(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "KMNIST" / "raw")
    ds = build_datasets(load(None, ["data.name=kmnist", f"data.root={tmp_path}"]).data, seed=0)
    assert ds.meta.classes[:3] == ("o", "ki", "su") and len(ds.test) == 20
    (tmp_path / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        build_datasets(load(None, ["data.name=kmnist", f"data.root={tmp_path}"]).data, seed=0)


def test_nothing_found_names_every_path_tried_and_the_remedies(tmp_path: Path) -> None:
    cfg = load(None, ["data.name=fashion_mnist", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(DataError) as e:
        build_datasets(cfg.data, seed=0)
    msg = str(e.value)
    for needle in (f"{tmp_path / 'none'}/", f"{tmp_path / 'none' / 'FashionMNIST' / 'raw'}/",
                   "apt-get install -y dataset-fashion-mnist", "data.download=true"):
        assert needle in msg, msg
    assert not (tmp_path / "none").exists()
    # without a root: Debian's folder first, then torchvision's layout under ./data
    assert FASHION_MNIST.candidates(None) == [DEBIAN, Path("data/FashionMNIST/raw")]


def test_unknown_name_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="fashion_mnist"):
        load(None, ["data.name=fashion_mnst"])


def test_real_fashion_mnist_from_debian() -> None:
    """Debian's dataset-fashion-mnist: counts, class balance, a known pixel statistic."""
    assert (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), (
        "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does)")
    ds = build_datasets(load(None, ["data.name=fashion_mnist"]).data, seed=0)
    assert ds.meta.classes[0] == "T-shirt/top" and ds.meta.classes[9] == "Ankle boot"
    assert (len(ds.train) + len(ds.val), len(ds.test)) == (60000, 10000)
    assert len(ds.val) == 6000
    all_y = torch.cat([ds.train.labels, ds.val.labels])
    assert torch.bincount(all_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert torch.bincount(ds.val.labels).tolist() == [600] * 10  # stratified
    # Mean pixel of all 60k training images, 0..1 scale: 0.2860 (72.94 / 255), the value every
    # Fashion-MNIST normalisation uses; computed exactly in integers.
    total = int(ds.train.images.sum(dtype=torch.int64)) + int(ds.val.images.sum(dtype=torch.int64))
    assert round(total / (60000 * 784 * 255), 4) == 0.2860


# ---------------------------------------------------------------------------------------------- data.download


@pytest.fixture
def http_server(tmp_path: Path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields its base URL."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", www
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens


def _official(monkeypatch, mirrors: list[str], resources: list[tuple[str, str]]) -> None:
    from resnetlab.data.sources import idx

    monkeypatch.setattr(idx.IdxDataset, "official_files", lambda self: (mirrors, resources))


def test_download_fetches_checks_md5_and_reads(http_server, tmp_path: Path, monkeypatch) -> None:
    from resnetlab.data.download import md5_of

    url, www = http_server
    _write_dataset(www)
    names = [f"{b}.gz" for pair in FILES.values() for b in pair]
    dead = f"http://127.0.0.1:{_closed_port()}/"  # the first mirror is down: the next is used
    _official(monkeypatch, [dead, url], [(n, md5_of(www / n)) for n in names])
    root = tmp_path / "data"
    cfg = load(None, ["data.name=mnist", f"data.root={root}", "data.download=true"])
    ds = build_datasets(cfg.data, seed=0)
    assert len(ds.train) + len(ds.val) == 60 and len(ds.test) == 20
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(names)  # torchvision's layout, no .part
    (raw / names[3]).unlink()  # an interrupted download: the missing file is fetched again
    assert len(build_datasets(cfg.data, seed=0).test) == 20
    assert sorted(p.name for p in raw.iterdir()) == sorted(names)


def test_download_refuses_a_wrong_checksum_and_leaves_nothing(http_server, tmp_path: Path,
                                                              monkeypatch) -> None:
    url, www = http_server
    _write_dataset(www)
    names = [f"{b}.gz" for pair in FILES.values() for b in pair]
    _official(monkeypatch, [url], [(n, "0" * 32) for n in names])
    root = tmp_path / "data"
    cfg = load(None, ["data.name=kmnist", f"data.root={root}", "data.download=true"])
    with pytest.raises(DataError, match=r"could not fetch train-images-idx3-ubyte\.gz: .*MD5 \w+ does "
                                        r"not match the published 0{32}"):
        build_datasets(cfg.data, seed=0)
    assert not root.exists()  # no half-written file, no empty folder


def test_download_without_network_leaves_no_empty_folder(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    dead = f"http://127.0.0.1:{_closed_port()}/"
    _official(monkeypatch, [dead], [("train-images-idx3-ubyte.gz", "0" * 32)])
    root = tmp_path / "new" / "fm"
    cfg = load(None, ["data.name=fashion_mnist", f"data.root={root}", "data.download=true"])
    with pytest.raises(DataError, match="data.download=true could not fetch"):
        build_datasets(cfg.data, seed=0)
    assert not (tmp_path / "new").exists()
    # CIFAR too: its archive URL is torchvision's; point it at the closed port
    monkeypatch.setattr(CIFAR10, "url", dead + CIFAR10.filename)
    cfg = load(None, ["data.name=cifar10", f"data.root={root}", "data.download=true"])
    with pytest.raises(DataError, match="data.download=true could not fetch"):
        build_datasets(cfg.data, seed=0)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "mine"  # a folder the user made stays, even empty
    existing.mkdir()
    cfg = load(None, ["data.name=cifar10", f"data.root={existing}", "data.download=true"])
    with pytest.raises(DataError):
        build_datasets(cfg.data, seed=0)
    assert existing.is_dir() and not any(existing.iterdir())
