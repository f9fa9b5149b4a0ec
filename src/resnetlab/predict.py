"""``resnetlab predict``: top-k class names and probabilities for image files and folders.

Images are preprocessed exactly as evaluation did for the run (:func:`resnetlab.data.preprocess`
with the checkpoint's meta: resize + centre crop for image-folder runs, the digits and CIFAR
formats for theirs; any PIL mode), then normalised and fed to the fused network. A file that
cannot be read is reported with its reason; the other files are still predicted.

Digits runs learned light ink on a dark ground (scikit-learn's digits: 0 = paper). A scan or a
drawing is usually dark ink on white, so with ``invert="auto"`` the polarity is read from the
image border (the ground): a light border means dark-on-light, and the image is inverted before
prediction; each prediction says whether it was. ``"yes"``/``"no"`` force it.

Digit-like runs (digits, MNIST, Fashion-MNIST) were trained on characters cropped to their ink,
scaled into a fixed box and centred. A photo or a drawing is rarely framed like that (a small
digit in a wide margin, off centre), so by default the same framing is applied to it
(:func:`centre_ink`): crop to the ink's bounding box, scale it, aspect kept, into the box the
dataset used, centre it. ``Prediction.preprocess`` says what was done; ``centre=False`` turns
it off. Images already at the network's input size are taken as they are (a dataset image).

From Python, in three lines::

    p = resnetlab.load("runs/digits")              # a Predictor
    print(p.classes, p.transforms(img).shape)       # PIL image or uint8 tensor -> normalised batch
    print(p.predict([img], topk=3)[0])
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from resnetlab.config import Config
from resnetlab.data import DataError, DataMeta, load_image, normalize, preprocess
from resnetlab.data.images import is_image_file, to_mode
from resnetlab.inference import load_for_inference
from resnetlab.outputs import printable

Invert = Literal["auto", "yes", "no"]
INVERT_CHOICES = ("auto", "yes", "no")


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    file: str
    classes: list[str]  # class names
    indices: list[int]  # label ids
    probs: list[float]  # softmax probabilities, 0..1
    inverted: bool | None = None  # grey runs: whether the image was inverted first; None: not grey
    preprocess: str | None = None  # what was done before the network: polarity, ink framing


@dataclass
class PredictResult:
    """Predictions for the readable files and ``(file, reason)`` for the others."""

    predictions: list[Prediction] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        """JSON-ready: ``{"predictions": [...], "errors": [{"file", "error"}]}``."""
        return {"predictions": [asdict(p) for p in self.predictions],
                "errors": [{"file": f, "error": e} for f, e in self.errors]}


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
        raise DataError(f"--invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
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


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def _topk(model: nn.Module, meta: DataMeta, x_uint8: torch.Tensor, topk: int,
          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[n, c, h, w]`` -> ``(probs [n, k], ids [n, k])``, most probable first."""
    x = normalize(x_uint8.to(device), meta)  # [n, c, h, w] float32
    x = x.contiguous(memory_format=torch.channels_last)  # the fused net's layout
    probs = model(x).float().softmax(dim=1)  # [n, classes]
    return probs.topk(min(topk, probs.shape[1]), dim=1)


def predict_images(model: nn.Module, meta: DataMeta, images: Sequence[Image.Image], topk: int = 5,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images (any mode, any size) -> ``(probs [n, k], ids [n, k])``, most probable first.

    ``model`` is an eval-mode network trained on ``meta``'s data (see
    :func:`resnetlab.inference.load_for_inference`); ``k = min(topk, classes)``.
    """
    return _topk(model, meta, preprocess(list(images), meta), topk, device)


def predict(path: str | Path, inputs: Sequence[str | Path], topk: int = 5,
            device: str | torch.device = "cpu", batch_size: int = 64, invert: Invert = "auto",
            centre: bool = True, backend: str = "torch", model_file: str | Path | None = None) -> PredictResult:
    """Top-``topk`` predictions of the network at ``path`` (run folder or checkpoint) for
    ``inputs`` (image files and folders). Unreadable files land in ``result.errors``.
    ``invert``: see :func:`apply_polarity` (digits: dark-on-light images are inverted);
    ``centre``: see :func:`centre_ink`. ``backend``: ``torch`` or ``onnxruntime`` (the exported
    ``.onnx``; ``model_file`` picks another, e.g. the int8 one), as ``resnetlab serve`` runs them."""
    from resnetlab.serve.backends import make_backend

    if topk < 1:
        raise DataError(f"--topk must be >= 1, got {topk}")
    runner = make_backend(path, backend, device=str(device), model_file=model_file, invert=invert,
                          centre=centre).load()
    meta = runner.meta
    files, errors = collect_images(inputs)
    result = PredictResult(errors=errors)
    for chunk in _chunks(files, batch_size):  # bounded memory for large folders
        good: list[Path] = []
        prepared = []
        for f in chunk:
            try:
                prepared.append(runner.preprocess(load_image(f)))
                good.append(f)
            except DataError as e:  # BadImageError says "<path>: <reason>"
                result.errors.append((str(f), str(e).removeprefix(f"{f}: ")))
            except (OSError, ValueError) as e:  # decoded, but PIL cannot convert or resize it
                result.errors.append((str(f), f"cannot preprocess image ({e})"))
        if not good:
            continue
        probs = runner.predict_batch(torch.stack([p.x for p in prepared]))  # [n, classes]
        finite = torch.isfinite(probs).all(dim=1).tolist()
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for f, p, i, item, ok in zip(good, top.values.tolist(), top.indices.tolist(), prepared, finite,
                                     strict=True):
            if ok:
                result.predictions.append(Prediction(str(f), [meta.classes[j] for j in i], i, p, item.inverted,
                                                     item.preprocess))
            else:  # never a NaN probability (nor a bare NaN in the JSON): the file is an error
                result.errors.append((str(f), "the network's output for it is not finite (NaN or inf); "
                                              "the checkpoint's weights diverged: use an earlier one"))
    return result


def format_predictions(result: PredictResult) -> str:
    """One line per image: ``file: name 0.912 | name 0.051 | ...``, plus the polarity applied.
    File and class names are shown :func:`~resnetlab.outputs.printable` (a newline in a name
    cannot start a line of its own)."""
    def note(p: Prediction) -> str:
        return "  (dark on light: inverted)" if p.inverted else ""

    return "\n".join(f"{printable(p.file)}: " + " | ".join(f"{printable(c)} {q:.3f}" for c, q in zip(p.classes, p.probs, strict=True))
                     + note(p) for p in result.predictions)


# ----------------------------------------------------------------------------------------------
# the Python API: resnetlab.load(RUN) -> Predictor


class Predictor:
    """A trained network with its classes and preprocessing: ``resnetlab.load(RUN)`` returns one.

    ``model`` is the fused eval-mode network, ``classes`` the class names, ``transforms`` turns
    images into the normalised batch the model takes, ``predict`` returns the top-k per image.
    """

    def __init__(self, model: nn.Module, cfg: Config, meta: DataMeta, invert: Invert = "auto",
                 centre: bool = True) -> None:
        if invert not in INVERT_CHOICES:
            raise DataError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
        self.model, self.config, self.meta, self.invert, self.centre = model, cfg, meta, invert, centre

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu", invert: Invert = "auto",
                  centre: bool = True) -> Predictor:
        """Load a run folder, ``.pt`` checkpoint or exported ``.safetensors`` file."""
        model, cfg, meta = load_for_inference(path, device=device)
        return cls(model, cfg, meta, invert, centre)

    @property
    def classes(self) -> list[str]:
        """Label id -> class name."""
        return list(self.meta.classes)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pil(self, image: Any) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, Path)):
            return load_image(image)
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim in (2, 3):
            from torchvision.transforms.v2.functional import to_pil_image

            return to_pil_image(image if image.ndim == 3 else image[None])  # [c, h, w] or [h, w]
        raise DataError(f"expected a PIL image, an image path or a uint8 tensor [c, h, w], got "
                        f"{type(image).__name__}{' ' + str(image.dtype) if isinstance(image, torch.Tensor) else ''}")

    def _batch(self, images: Any) -> tuple[torch.Tensor, list[bool | None], list[str]]:
        """uint8 ``[n, c, h, w]``, polarity flags and what was done, per image."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:  # uint8 [n, c, h, w]
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        done = [prepare_image(self._pil(im), self.meta, self.invert, self.centre) for im in images]
        h, w = self.meta.input_size
        pixels = (torch.stack([p for p, _, _ in done]) if done
                  else torch.empty(0, self.meta.in_chans, h, w, dtype=torch.uint8))
        return pixels, [inv for _, inv, _ in done], [how for _, _, how in done]

    def transforms(self, images: Any) -> torch.Tensor:
        """PIL image(s), path(s) or uint8 tensor(s) -> float32 ``[n, c, h, w]``, normalised.

        The run's own evaluation preprocessing (polarity, digit-like framing, resize/crop, grey
        or RGB), then ``(x / 255 - mean) / std`` with the training split's statistics.
        """
        pixels, _, _ = self._batch(images)
        return normalize(pixels, self.meta)

    @torch.no_grad()
    def predict(self, images: Any, topk: int = 5) -> list[Prediction]:
        """Top-``topk`` classes per image, most probable first (``Prediction.file`` is the index
        or the path given)."""
        if topk < 1:
            raise DataError(f"topk must be >= 1, got {topk}")
        pixels, flips, steps = self._batch(images)
        if not len(pixels):
            return []
        probs, ids = _topk(self.model, self.meta, pixels, topk, self.device)
        names = images if isinstance(images, (list, tuple)) else [images] * len(pixels)
        return [Prediction(str(n) if isinstance(n, (str, Path)) else str(k), [self.meta.classes[j] for j in i],
                           i, p, inv, how)
                for k, (n, p, i, inv, how) in enumerate(zip(names, probs.tolist(), ids.tolist(), flips, steps,
                                                            strict=True))]

    def __repr__(self) -> str:
        return (f"Predictor({self.config.model.name}, {len(self.classes)} classes, "
                f"input {self.meta.in_chans}x{self.meta.input_size[0]}x{self.meta.input_size[1]}, "
                f"invert={self.invert!r}, centre={self.centre})")


__all__ = ["INK_FRAMES", "INVERT_CHOICES", "InkFrame", "Prediction", "PredictResult", "Predictor", "apply_polarity",
           "centre_ink", "collect_images", "format_predictions", "light_ground", "predict", "predict_images",
           "prepare_image", "prepare_image_mapped", "resize_geometry", "Geometry"]
