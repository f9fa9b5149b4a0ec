"""A new image prepared the way the run's own data was: input files collected, polarity (digits
learned light ink on dark), ink framing for digit-like runs, and where the pixels land in the
network's input (:class:`Geometry`). Shared by ``predict``, ``explain`` and the serving backends,
below all of them, so none of them imports another to get it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from resnetlab.data import DataError, DataMeta, preprocess
from resnetlab.data.images import is_image_file, to_mode
from resnetlab.params import named

Invert = Literal["auto", "yes", "no"]
INVERT_CHOICES = ("auto", "yes", "no")


def collect_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively, sorted, image extensions only) into files.

    A file named explicitly is kept whatever its extension (reading it will tell). Missing
    paths and folders without images come back as ``(path, reason)`` errors.
    """
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            denied: list[OSError] = []  # folders that could not be listed: said, never hidden
            found = []
            for root, dirs, names in os.walk(p, onerror=denied.append):  # symlinked folders: not entered
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [f for n in names if not n.startswith(".")
                          and (f := Path(root) / n).is_file() and is_image_file(f)]
            for e in denied:
                errors.append((str(e.filename or p), f"cannot read this folder: {e.strerror} (no permission "
                                                     f"to read it: check its owner and mode)"
                               if e.errno in (errno.EACCES, errno.EPERM) else f"cannot read this folder: {e.strerror}"))
            if not found and not denied:
                errors.append((str(p), "folder holds no image files"))
            files.extend(sorted(found))
        elif p.exists():
            files.append(p)
        else:
            errors.append((str(p), "no such file or folder"))
    return files, errors


def light_ground(img: Image.Image) -> bool:
    """True when the image's border (one pixel wide, as grey) is mostly light: dark ink on paper.

    The border is the ground a character sits on; its mean grey level above mid-grey (127.5 of
    255) says the ground is light.
    """
    grey = to_mode(img, 1)
    w, h = grey.size
    px = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(h, w).float()  # [h, w]
    border = torch.cat([px[0], px[-1], px[:, 0], px[:, -1]])
    return bool(border.mean() > 127.5)


def apply_polarity(img: Image.Image, meta: DataMeta, invert: Invert = "auto") -> tuple[Image.Image, bool | None]:
    """``(image, inverted)`` in the polarity the run learned.

    Grey runs (digits: light ink on dark) with ``"auto"`` invert a light-ground image; ``"yes"``
    and ``"no"`` force it for any run. ``inverted`` is None for a colour run left as it was.
    """
    if invert not in INVERT_CHOICES:
        raise named(DataError, "invert", f"must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    grey_run = meta.in_chans == 1
    if invert == "no" or (invert == "auto" and not grey_run):
        return img, (False if grey_run else None)
    if invert == "auto" and not light_ground(img):
        return img, False
    mode_img = to_mode(img, meta.in_chans)  # invert in the run's own mode (no alpha left)
    return ImageOps.invert(mode_img), True


@dataclass(frozen=True)
class InkFrame:
    """How a digit-like dataset framed its characters (see :func:`centre_ink`)."""

    fill: float  # the ink box's longer side, as a fraction of the frame
    by_mass: bool  # centre the centre of mass (MNIST) rather than the box (digits)
    scale: int  # the frame is drawn at ``scale`` x the input size, then downsampled as usual


#: Datasets whose images are single characters framed by their ink. scikit-learn's digits: 32x32
#: bitmaps with the character filling the height (measured: every one of the 1,797 images has
#: ink in all 8 rows), averaged down 4x4; MNIST/KMNIST: the ink box fitted into 20x20, centred
#: by mass in 28x28 (LeCun et al.); Fashion-MNIST: the product's longer side fitted to 28.
INK_FRAMES: dict[str, InkFrame] = {
    "digits": InkFrame(fill=1.0, by_mass=False, scale=4),
    "mnist": InkFrame(fill=20 / 28, by_mass=True, scale=4),
    "kmnist": InkFrame(fill=20 / 28, by_mass=True, scale=4),
    "fashion_mnist": InkFrame(fill=1.0, by_mass=False, scale=4),
}
#: Ink is what stands above the ground by this fraction of the image's ground-to-peak contrast.
INK_THRESHOLD = 0.35
#: Below this ground-to-peak contrast (of 255) the image is taken as blank and left alone.
MIN_CONTRAST = 24


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels land in the network's input: ``u = sx * x + tx``, ``v = sy * y + ty``
    (continuous pixel coordinates, 0 at the top-left edge; ``x, y`` in the image as given)."""

    sx: float = 1.0
    sy: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    def then(self, other: Geometry) -> Geometry:
        """This mapping followed by ``other``."""
        return Geometry(other.sx * self.sx, other.sy * self.sy, other.sx * self.tx + other.tx,
                        other.sy * self.ty + other.ty)


def resize_geometry(size: tuple[int, int], meta: DataMeta) -> Geometry:
    """The geometry of the run's evaluation resize (and centre crop) for an image of ``size`` (w, h),
    following :func:`resnetlab.data.datasets.eval_transform` (torchvision's resize and crop rounding)."""
    w0, h0 = size
    h, w = meta.input_size
    if meta.resize is not None:
        short, long_ = min(w0, h0), max(w0, h0)
        other = int(meta.resize * long_ / short)
        w1, h1 = (meta.resize, other) if w0 <= h0 else (other, meta.resize)
        top, left = int(round((h1 - h) / 2.0)), int(round((w1 - w) / 2.0))
        return Geometry(w1 / w0, h1 / h0, -float(left), -float(top))
    return Geometry(w / w0, h / h0, 0.0, 0.0)


def centre_ink(img: Image.Image, meta: DataMeta) -> tuple[Image.Image, str]:
    """Frame a light-on-dark character as ``meta``'s dataset did: ``(image, what was done)``.

    Crops to the bounding box of the ink (pixels above the ground, the median of the border,
    by :data:`INK_THRESHOLD` of the contrast), stretches ground..peak to 0..255, scales the
    box, aspect kept, so its longer side
    fills the dataset's box, and centres it (by box or by centre of mass) on a dark frame of
    ``scale`` x the input size; the usual resize then brings it to the input size. Datasets not
    in :data:`INK_FRAMES`, images already at the input size and blank images come back as given.
    """
    framed, how, _ = _frame_ink(img, meta)
    return framed, how


def _frame_ink(img: Image.Image, meta: DataMeta) -> tuple[Image.Image, str, Geometry]:
    """:func:`centre_ink` and where the image's pixels went in the frame."""
    frame = INK_FRAMES.get(meta.name)
    h, w = meta.input_size
    same = Geometry()
    if frame is None or meta.in_chans != 1:
        return img, "as given", same
    if img.size == (w, h):
        return img, "already at the input size: taken as it is", same
    grey = np.asarray(to_mode(img, 1), dtype=np.float32)  # [H, W], 0..255
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ground, peak = float(np.median(border)), float(grey.max())
    if peak - ground < MIN_CONTRAST:
        return img, "no ink found: taken as it is", same
    ink = grey > ground + INK_THRESHOLD * (peak - ground)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # The ground becomes 0 and the darkest ink 255, as in the datasets (full-contrast strokes).
    box = np.clip((grey[y0:y1, x0:x1] - ground) * (255.0 / (peak - ground)), 0, 255)
    bh, bw = box.shape
    fh, fw = h * frame.scale, w * frame.scale
    k = frame.fill * min(fh, fw) / max(bh, bw)  # longer side of the box -> fill of the frame
    sh, sw = max(1, round(bh * k)), max(1, round(bw * k))
    glyph = Image.fromarray(box.astype(np.uint8), "L").resize((sw, sh), Image.Resampling.BILINEAR)
    if frame.by_mass:
        g = np.asarray(glyph, dtype=np.float64)
        total = g.sum() or 1.0
        cy = float((g.sum(axis=1) * np.arange(sh)).sum() / total)
        cx = float((g.sum(axis=0) * np.arange(sw)).sum() / total)
    else:
        cy, cx = (sh - 1) / 2, (sw - 1) / 2
    top = min(max(round((fh - 1) / 2 - cy), 0), fh - sh)  # centred, never cut off
    left = min(max(round((fw - 1) / 2 - cx), 0), fw - sw)
    canvas = Image.new("L", (fw, fh), 0)
    canvas.paste(glyph, (left, top))
    how = "centre of mass" if frame.by_mass else "box"
    kx, ky = sw / bw, sh / bh  # the box's pixels -> the glyph's; x0 lands on left
    return canvas, (f"ink box {bw}x{bh} at ({x0},{y0}) fitted to {sw}x{sh} of {fw}x{fh}, "
                    f"centred by {how}"), Geometry(kx, ky, left - kx * x0, top - ky * y0)


def prepare_image(img: Image.Image, meta: DataMeta, invert: Invert = "auto",
                  centre: bool = True) -> tuple[torch.Tensor, bool | None, str]:
    """One decoded image -> ``(uint8 [c, h, w], inverted, what was done)``, as predict feeds it.

    Polarity (:func:`apply_polarity`), then for digit-like runs the dataset's framing
    (:func:`centre_ink`, unless ``centre`` is False), then the run's evaluation resize.
    """
    pixels, inverted, steps, _ = prepare_image_mapped(img, meta, invert, centre)
    return pixels, inverted, steps


def prepare_image_mapped(img: Image.Image, meta: DataMeta, invert: Invert = "auto", centre: bool = True
                         ) -> tuple[torch.Tensor, bool | None, str, Geometry]:
    """:func:`prepare_image` and the :class:`Geometry` from ``img`` to the network's input (to
    draw what the network computed, e.g. a Grad-CAM map, back over the image as given)."""
    img, inverted = apply_polarity(img, meta, invert)
    steps = ["inverted" if inverted else "polarity kept" if inverted is False else "colour"]
    geometry = Geometry()
    if meta.name in INK_FRAMES and meta.in_chans == 1:
        if centre:
            img, how, geometry = _frame_ink(img, meta)
            steps.append(how)
        else:
            steps.append("ink framing off")
    geometry = geometry.then(resize_geometry(img.size, meta))
    return preprocess([img], meta)[0], inverted, "; ".join(steps), geometry


__all__ = [
    "Geometry",
    "INK_FRAMES",
    "INK_THRESHOLD",
    "INVERT_CHOICES",
    "InkFrame",
    "Invert",
    "MIN_CONTRAST",
    "apply_polarity",
    "centre_ink",
    "collect_images",
    "light_ground",
    "prepare_image",
    "prepare_image_mapped",
    "resize_geometry",
]
