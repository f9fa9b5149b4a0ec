"""``resnetlab predict``: top-k class names and probabilities for image files and folders.

Images are preprocessed exactly as evaluation did for the run (:func:`resnetlab.data.preprocess`
with the checkpoint's meta: resize + centre crop for image-folder runs, the digits and CIFAR
formats for theirs; any PIL mode), then normalised and fed to the fused network. A file that
cannot be read is reported with its reason; the other files are still predicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from resnetlab.data import DataError, DataMeta, load_image, normalize, preprocess
from resnetlab.data.images import is_image_file
from resnetlab.inference import load_for_inference


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    file: str
    classes: list[str]  # class names
    indices: list[int]  # label ids
    probs: list[float]  # softmax probabilities, 0..1


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
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and is_image_file(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                errors.append((str(p), "folder holds no image files"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            errors.append((str(p), "no such file or folder"))
    return files, errors


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
            device: str | torch.device = "cpu", batch_size: int = 64) -> PredictResult:
    """Top-``topk`` predictions of the network at ``path`` (run folder or checkpoint) for
    ``inputs`` (image files and folders). Unreadable files land in ``result.errors``."""
    if topk < 1:
        raise DataError(f"--topk must be >= 1, got {topk}")
    model, _cfg, meta = load_for_inference(path, device=device)
    device = next(model.parameters()).device
    files, errors = collect_images(inputs)
    result = PredictResult(errors=errors)
    for chunk in _chunks(files, batch_size):  # bounded memory for large folders
        good: list[Path] = []
        pixels: list[torch.Tensor] = []  # [c, h, w] uint8 each
        for f in chunk:
            try:
                pixels.append(preprocess([load_image(f)], meta)[0])
                good.append(f)
            except DataError as e:  # BadImageError says "<path>: <reason>"
                result.errors.append((str(f), str(e).removeprefix(f"{f}: ")))
            except (OSError, ValueError) as e:  # decoded, but PIL cannot convert or resize it
                result.errors.append((str(f), f"cannot preprocess image ({e})"))
        if not good:
            continue
        probs, ids = _topk(model, meta, torch.stack(pixels), topk, device)
        for f, p, i in zip(good, probs.tolist(), ids.tolist(), strict=True):
            result.predictions.append(Prediction(str(f), [meta.classes[j] for j in i], i, p))
    return result


def format_predictions(result: PredictResult) -> str:
    """One line per image: ``file: name 0.912 | name 0.051 | ...``."""
    return "\n".join(f"{p.file}: " + " | ".join(f"{c} {q:.3f}" for c, q in zip(p.classes, p.probs, strict=True))
                     for p in result.predictions)


__all__ = ["Prediction", "PredictResult", "collect_images", "format_predictions", "predict",
           "predict_images"]
