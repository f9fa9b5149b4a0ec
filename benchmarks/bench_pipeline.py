"""Image-folder training pipeline: resnetlab's FolderLoader vs torchvision's reference pipeline.

    python -m benchmarks.bench_pipeline            # ~2-3 min on 2 cores
    python -m benchmarks.bench_pipeline --quick    # ~1 min

1. **Throughput**, images/s of normalised float32 ``[b, 3, 224, 224]`` training batches on a
   folder of real-photo-sized JPEGs (500x375 and 375x500, quality 90), cut and resized from
   scikit-image's sample photographs (astronaut, coffee, chelsea, rocket, ...: real photos
   shipped with the package, nothing downloaded). Both sides use the same worker count and
   batch size, and persistent workers; they run in alternating rounds (one epoch each) and the
   ratio is the median of the per-round ratios.

   - resnetlab: ``build_datasets`` + ``build_loader(train=True)``: libjpeg-turbo
     ``decode_jpeg`` straight to a tensor, or reduced-scale JPEG decoding when the random crop
     allows it, uint8 crops through the workers, normalisation on the device.
   - reference: ``torchvision.datasets.ImageFolder`` + ``transforms.v2`` ``RandomResizedCrop
     (224)``, ``RandomHorizontalFlip``, ``ToImage``, ``ToDtype(float32, scale=True)``,
     ``Normalize`` (ImageNet mean/std), ``DataLoader(shuffle=True, drop_last=True)``.

2. **Start-up**, seconds from nothing to the first training batch, on a generated folder of
   100,000 small JPEGs (1,000 classes x 100; 20,000 with --quick): resnetlab (lists and labels,
   decodes as it reads), resnetlab with ``data.check_images=true`` (every file decoded first,
   what resnetlab always did before) and torchvision's ImageFolder (lists only).

Writes ``benchmarks/results/pipeline.json``; ``benchmarks/run.py`` adds its row to summary.md.
The generated folders are cached under ``$RESNETLAB_BENCH_DATA`` (default: the system temp
folder), so a second run does not write them again.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Rounds, machine_info, paired_ratio, write_json

TARGET = 1.3  # resnetlab images/s over the reference's, at least
PHOTO_SIZE = (500, 375)  # (w, h) landscape; portrait files are 375x500
CROP = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _data_dir() -> Path:
    return Path(os.environ.get("RESNETLAB_BENCH_DATA", tempfile.gettempdir())) / "resnetlab-bench"


# ----------------------------------------------------------------------------------------------
# data


def _sources() -> list[np.ndarray]:
    """scikit-image's colour sample photographs, ``[h, w, 3]`` uint8 (shipped in the wheel)."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
             "retina", "colorwheel"]
    out = []
    for name in names:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 256:
            out.append(np.ascontiguousarray(img[..., :3]))
    if len(out) < 3:
        raise RuntimeError("fewer than 3 scikit-image sample photographs could be read")
    return out


def make_photo_folder(n_images: int, classes: int = 10, seed: int = 0) -> Path:
    """``<cache>/photos-<n>/train/<class>/<i>.jpg``: random crops (30-100% of the side) of
    the sample photographs, resized to 500x375 (3 in 4) or 375x500, JPEG quality 90."""
    root = _data_dir() / f"photos-{n_images}"
    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    sources = _sources()
    for i in range(n_images):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        s = rng.uniform(0.3, 1.0)
        ch, cw = int(h * s), int(w * s)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = PHOTO_SIZE if rng.random() < 0.75 else PHOTO_SIZE[::-1]
        img = Image.fromarray(src[top : top + ch, left : left + cw]).resize(size, Image.Resampling.BICUBIC)
        folder = root / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return root


def make_many_files(n_files: int, classes: int = 1000) -> Path:
    """``<cache>/many-<n>/train/<class>/<i>.jpg``: ``n_files`` small (32x32) JPEGs."""
    root = _data_dir() / f"many-{n_files}"
    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):  # a few distinct files, written over and over: writing is the cost here
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    per_class = n_files // classes
    for c in range(classes):
        folder = root / "train" / f"n{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{i:04d}.jpg").write_bytes(blobs[(c + i) % len(blobs)])
    done.touch()
    return root


# ----------------------------------------------------------------------------------------------
# the two pipelines


def _cfg(root: Path, workers: int, **kw: Any):
    from resnetlab.config import DataConfig

    return DataConfig(name="folder", root=str(root), image_size=CROP, resize=256, num_workers=workers,
                      val_fraction=0.0, **kw)


class Ours:
    """resnetlab: datasets + FolderLoader, as ``fit`` builds them (CPU device, channels_last)."""

    def __init__(self, root: Path, workers: int, batch: int, **kw: Any) -> None:
        from resnetlab.data import build_datasets, build_loader

        cfg = _cfg(root, workers, **kw)
        ds = build_datasets(cfg, seed=0, needs=("train",))
        self.loader = build_loader(ds.train, ds.meta, cfg, train=True, batch_size=batch,
                                   device="cpu", seed=0)
        self.epoch = 0

    def first_batch(self) -> torch.Tensor:
        return next(iter(self.loader.iterate(0)))[0]

    def epoch_pass(self) -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        for x, _ in self.loader.iterate(self.epoch):
            n += x.shape[0]
        self.epoch += 1
        return n, time.perf_counter() - t0


class Reference:
    """torchvision: ImageFolder + transforms.v2, the tutorial pipeline."""

    def __init__(self, root: Path, workers: int, batch: int) -> None:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2

        tf = v2.Compose([v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip(),
                         v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        self.loader = DataLoader(ImageFolder(str(root / "train"), transform=tf), batch_size=batch,
                                 shuffle=True, drop_last=True, num_workers=workers,
                                 persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))

    def first_batch(self) -> torch.Tensor:
        return next(iter(self.loader))[0]

    def epoch_pass(self) -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        for x, _ in self.loader:
            n += x.shape[0]
        return n, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# measurements


def throughput(n_images: int, workers: int, batch: int, rounds: int) -> dict[str, Any]:
    root = make_photo_folder(n_images)
    contenders: dict[str, Ours | Reference] = {"resnetlab": Ours(root, workers, batch),
                                                "torchvision": Reference(root, workers, batch)}
    for c in contenders.values():  # start the persistent workers, warm the page cache
        c.epoch_pass()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            images, seconds = contenders[name].epoch_pass()
            rates[name].append(images / seconds)
    ours, ref = Rounds(rates["resnetlab"]), Rounds(rates["torchvision"])
    return {"images": n_images, "photo_size": list(PHOTO_SIZE), "crop": CROP, "batch": batch,
            "workers": workers, "rounds": rounds, "resnetlab": ours.to_dict(), "torchvision": ref.to_dict(),
            "ratio": paired_ratio(ours.rates, ref.rates)}


def _startup(make) -> float:
    t0 = time.perf_counter()
    make().first_batch()
    return time.perf_counter() - t0


def startup(n_files: int, workers: int, batch: int, with_check: bool) -> dict[str, Any]:
    root = make_many_files(n_files)
    out: dict[str, Any] = {"files": n_files, "classes": 1000, "workers": workers, "batch": batch}
    # Best of 2 for each: the first listing of a cold folder also pays for the page cache.
    out["resnetlab_s"] = min(_startup(lambda: Ours(root, workers, batch)) for _ in range(2))
    out["torchvision_s"] = min(_startup(lambda: Reference(root, workers, batch)) for _ in range(2))
    if with_check:
        out["resnetlab_check_images_s"] = _startup(lambda: Ours(root, workers, batch, check_images=True))
    return out


def run(quick: bool = False, workers: int = 2) -> dict[str, Any]:
    """Both measurements; writes ``results/pipeline.json`` and returns its payload."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    tp = throughput(n_images=384 if quick else 768, workers=workers, batch=32 if quick else 64,
                    rounds=3 if quick else 4)
    su = startup(n_files=20_000 if quick else 100_000, workers=workers, batch=64, with_check=not quick)
    payload = {"case": "pipeline", "title": "image-folder training pipeline vs torchvision",
               "machine": machine_info(torch.device("cpu")), "quick": quick, "target": TARGET,
               "results": [{"throughput": tp, "startup": su}], "met": tp["ratio"] >= TARGET,
               "seconds": time.perf_counter() - t0}
    write_json("pipeline", payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images and files (~1 min)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers on both sides (default 2)")
    args = p.parse_args(argv)
    payload = run(args.quick, args.workers)
    r = payload["results"][0]
    tp, su = r["throughput"], r["startup"]
    print(f"throughput: resnetlab {tp['resnetlab']['images_per_s']:.0f} img/s, torchvision "
          f"{tp['torchvision']['images_per_s']:.0f} img/s, ratio {tp['ratio']:.2f}x (target >= {TARGET})")
    check = f", with check_images {su['resnetlab_check_images_s']:.1f} s" if "resnetlab_check_images_s" in su else ""
    print(f"start-up on {su['files']:,} files: resnetlab {su['resnetlab_s']:.1f} s{check}, "
          f"torchvision {su['torchvision_s']:.1f} s | {payload['seconds']:.0f} s in all")
    print(f"per round (img/s): resnetlab {tp['resnetlab']['rounds']}, torchvision {tp['torchvision']['rounds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
