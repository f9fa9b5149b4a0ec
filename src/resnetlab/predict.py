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

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from resnetlab.config import Config
from resnetlab.data import DataError, DataMeta, load_image, normalize, preprocess
from resnetlab.inference import check_topk, load_for_inference, top_classes, topk_pixels
from resnetlab.outputs import printable
from resnetlab.params import named
from resnetlab.prepare import (
    INK_FRAMES,
    INVERT_CHOICES,
    Geometry,
    InkFrame,
    Invert,
    apply_polarity,
    centre_ink,
    collect_images,
    light_ground,
    prepare_image,
    prepare_image_mapped,
    resize_geometry,
)


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    file: str | None  # the path given, or a PIL image's own filename; None for in-memory images
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


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_images(model: nn.Module, meta: DataMeta, images: Sequence[Image.Image], topk: int = 5,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images (any mode, any size) -> ``(probs [n, k], ids [n, k])``, most probable first.

    ``model`` is an eval-mode network trained on ``meta``'s data (see
    :func:`resnetlab.inference.load_for_inference`); ``k = min(topk, classes)``.
    """
    return topk_pixels(model, meta, preprocess(list(images), meta), topk, device)


def predict(path: str | Path, inputs: Sequence[str | Path], topk: int = 5,
            device: str | torch.device = "cpu", batch_size: int = 64, invert: Invert = "auto",
            centre: bool = True, backend: str = "torch", model_file: str | Path | None = None) -> PredictResult:
    """Top-``topk`` predictions of the network at ``path`` (run folder or checkpoint) for
    ``inputs`` (image files and folders). Unreadable files land in ``result.errors``.
    ``invert``: see :func:`apply_polarity` (digits: dark-on-light images are inverted);
    ``centre``: see :func:`centre_ink`. ``backend``: ``torch`` or ``onnxruntime`` (the exported
    ``.onnx``; ``model_file`` picks another, e.g. the int8 one), as ``resnetlab serve`` runs them."""
    from resnetlab.serve.backends import make_backend

    check_topk(topk)  # before the network is loaded
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
        values, indices = top_classes(probs, topk)
        for f, p, i, item, ok in zip(good, values.tolist(), indices.tolist(), prepared, finite,
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

    return "\n".join(f"{printable(p.file or '<image>')}: " + " | ".join(f"{printable(c)} {q:.3f}" for c, q in zip(p.classes, p.probs, strict=True))
                     + note(p) for p in result.predictions)


# ----------------------------------------------------------------------------------------------
def _source_name(image: Any) -> str | None:
    """What a prediction names its input by: the path, or a PIL image's own ``filename``."""
    if isinstance(image, (str, Path)):
        return str(image)
    return getattr(image, "filename", None) or None  # PIL sets "" for images made in memory


# the Python API: resnetlab.load(RUN) -> Predictor


class Predictor:
    """A trained network with its classes and preprocessing: ``resnetlab.load(RUN)`` returns one.

    ``model`` is the fused eval-mode network, ``classes`` the class names, ``transforms`` turns
    images into the normalised batch the model takes, ``predict`` returns the top-k per image.
    """

    def __init__(self, model: nn.Module, cfg: Config, meta: DataMeta, invert: Invert = "auto",
                 centre: bool = True) -> None:
        if invert not in INVERT_CHOICES:
            raise named(DataError, "invert", f"must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
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
        """Top-``topk`` classes per image, most probable first, in input order (``Prediction.file``
        is the path given, a PIL image's ``filename`` when it was opened from one, else None)."""
        check_topk(topk)
        pixels, flips, steps = self._batch(images)
        if not len(pixels):
            return []
        probs, ids = topk_pixels(self.model, self.meta, pixels, topk, self.device)
        names = images if isinstance(images, (list, tuple)) else [images] * len(pixels)
        return [Prediction(_source_name(n), [self.meta.classes[j] for j in i], i, p, inv, how)
                for n, p, i, inv, how in zip(names, probs.tolist(), ids.tolist(), flips, steps, strict=True)]

    def __repr__(self) -> str:
        return (f"Predictor({self.config.model.name}, {len(self.classes)} classes, "
                f"input {self.meta.in_chans}x{self.meta.input_size[0]}x{self.meta.input_size[1]}, "
                f"invert={self.invert!r}, centre={self.centre})")


__all__ = ["INK_FRAMES", "INVERT_CHOICES", "InkFrame", "Prediction", "PredictResult", "Predictor", "apply_polarity",
           "centre_ink", "collect_images", "format_predictions", "light_ground", "predict", "predict_images",
           "prepare_image", "prepare_image_mapped", "resize_geometry", "Geometry"]
