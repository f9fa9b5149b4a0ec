"""``resnetlab predict``: top-k class names and probabilities for image files and folders.

Images are preprocessed exactly as evaluation did for the run (:func:`resnetlab.data.preprocess`
with the checkpoint's meta: resize + centre crop for image-folder runs, the digits and CIFAR
formats for theirs; any PIL mode), then normalised and fed to the fused network. A file that
cannot be read is reported with its reason; the other files are still predicted.

Digits runs learned light ink on a dark ground (scikit-learn's digits: 0 = paper). A scan or a
drawing is usually dark ink on white, so with ``invert="auto"`` the polarity is read from the
image border (the ground): a light border means dark-on-light, and the image is inverted before
prediction; each prediction says whether it was. ``"yes"``/``"no"`` force it.

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
            device: str | torch.device = "cpu", batch_size: int = 64, invert: Invert = "auto") -> PredictResult:
    """Top-``topk`` predictions of the network at ``path`` (run folder or checkpoint) for
    ``inputs`` (image files and folders). Unreadable files land in ``result.errors``.
    ``invert``: see :func:`apply_polarity` (digits: dark-on-light images are inverted)."""
    if topk < 1:
        raise DataError(f"--topk must be >= 1, got {topk}")
    if invert not in INVERT_CHOICES:
        raise DataError(f"--invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    model, _cfg, meta = load_for_inference(path, device=device)
    device = next(model.parameters()).device
    files, errors = collect_images(inputs)
    result = PredictResult(errors=errors)
    for chunk in _chunks(files, batch_size):  # bounded memory for large folders
        good: list[Path] = []
        flips: list[bool | None] = []
        pixels: list[torch.Tensor] = []  # [c, h, w] uint8 each
        for f in chunk:
            try:
                img, inverted = apply_polarity(load_image(f), meta, invert)
                pixels.append(preprocess([img], meta)[0])
                flips.append(inverted)
                good.append(f)
            except DataError as e:  # BadImageError says "<path>: <reason>"
                result.errors.append((str(f), str(e).removeprefix(f"{f}: ")))
            except (OSError, ValueError) as e:  # decoded, but PIL cannot convert or resize it
                result.errors.append((str(f), f"cannot preprocess image ({e})"))
        if not good:
            continue
        probs, ids = _topk(model, meta, torch.stack(pixels), topk, device)
        finite = torch.isfinite(probs).all(dim=1).tolist()
        for f, p, i, inv, ok in zip(good, probs.tolist(), ids.tolist(), flips, finite, strict=True):
            if ok:
                result.predictions.append(Prediction(str(f), [meta.classes[j] for j in i], i, p, inv))
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

    def __init__(self, model: nn.Module, cfg: Config, meta: DataMeta, invert: Invert = "auto") -> None:
        if invert not in INVERT_CHOICES:
            raise DataError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
        self.model, self.config, self.meta, self.invert = model, cfg, meta, invert

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu", invert: Invert = "auto") -> Predictor:
        """Load a run folder, ``.pt`` checkpoint or exported ``.safetensors`` file."""
        model, cfg, meta = load_for_inference(path, device=device)
        return cls(model, cfg, meta, invert)

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

    def _batch(self, images: Any) -> tuple[list[Image.Image], list[bool | None]]:
        if isinstance(images, torch.Tensor) and images.ndim == 4:  # uint8 [n, c, h, w]
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        pairs = [apply_polarity(self._pil(im), self.meta, self.invert) for im in images]
        return [im for im, _ in pairs], [inv for _, inv in pairs]

    def transforms(self, images: Any) -> torch.Tensor:
        """PIL image(s), path(s) or uint8 tensor(s) -> float32 ``[n, c, h, w]``, normalised.

        The run's own evaluation preprocessing (resize/crop, grey or RGB, polarity), then
        ``(x / 255 - mean) / std`` with the training split's statistics.
        """
        pil, _ = self._batch(images)
        return normalize(preprocess(pil, self.meta), self.meta)

    @torch.no_grad()
    def predict(self, images: Any, topk: int = 5) -> list[Prediction]:
        """Top-``topk`` classes per image, most probable first (``Prediction.file`` is the index
        or the path given)."""
        if topk < 1:
            raise DataError(f"topk must be >= 1, got {topk}")
        pil, flips = self._batch(images)
        if not pil:
            return []
        probs, ids = _topk(self.model, self.meta, preprocess(pil, self.meta), topk, self.device)
        names = images if isinstance(images, (list, tuple)) else [images] * len(pil)
        return [Prediction(str(n) if isinstance(n, (str, Path)) else str(k), [self.meta.classes[j] for j in i],
                           i, p, inv)
                for k, (n, p, i, inv) in enumerate(zip(names, probs.tolist(), ids.tolist(), flips, strict=True))]

    def __repr__(self) -> str:
        return (f"Predictor({self.config.model.name}, {len(self.classes)} classes, "
                f"input {self.meta.in_chans}x{self.meta.input_size[0]}x{self.meta.input_size[1]}, "
                f"invert={self.invert!r})")


__all__ = ["INVERT_CHOICES", "Prediction", "PredictResult", "Predictor", "apply_polarity", "collect_images",
           "format_predictions", "light_ground", "predict", "predict_images"]
