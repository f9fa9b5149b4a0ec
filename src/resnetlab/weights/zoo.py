"""The weights that ship with the package, in torchvision's spirit.

Each shipped weight is a folder in the layout ``resnetlab publish`` writes (``model.safetensors``
with the config and data meta in its header, ``config.json`` in timm's ``save_for_hf`` shape, a
``README.md`` model card) under ``resnetlab/weights/files/<arch>.<tag>/``::

    w = resnetlab.weights.get("resnet20.digits")
    w.meta["metrics"]["test"]["top1_acc"], w.meta["num_params"], w.meta["command"]
    model = resnetlab.create_model("resnet20", weights="digits")   # or pretrained=True
    x = w.transforms()(pil_image)                                   # [c, h, w] float, normalised

``transforms()`` is the evaluation preprocessing the weights were measured with
(:func:`resnetlab.data.preprocess` then :func:`resnetlab.data.normalize` with the training split's
mean/std), so a prediction made through it equals what ``resnetlab weights verify`` measures.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.data import DataError, DataMeta

FILES = Path(__file__).resolve().parent / "files"  # package data: one folder per shipped weight
MODEL_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
DEFAULT = "DEFAULT"  # weights="DEFAULT": the model's default weights, as in torchvision


class WeightsError(ValueError):
    """Unknown weights, weights that do not fit the model asked for, or an unreadable card."""


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """A published folder's ``config.json`` (errors name the file)."""
    path = Path(folder) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read the weights' config ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("resnetlab"), dict):
        raise WeightsError(f"{path}: no 'resnetlab' section; expected a folder written by "
                           "`resnetlab publish`")
    return doc


class ImageTransforms:
    """Images -> the normalised float tensor the weights expect (``weights.transforms()``).

    A PIL image (any mode) or a uint8 tensor ``[c, h, w]`` gives ``[c, h, w]``; a list of them,
    or a uint8 ``[n, c, h, w]`` batch, gives ``[n, c, h, w]``. Geometry as evaluation had it
    (digits: grey, box-filtered to 8x8; Fashion-MNIST: grey 28x28; image folders: resize the
    shorter side, centre crop), then ``(x / 255 - mean) / std``.
    Grey digits weights learned light ink on a dark ground: invert dark-on-light scans first
    (``resnetlab predict`` and :class:`resnetlab.Predictor` do it from the image border).
    """

    def __init__(self, meta: DataMeta) -> None:
        self.meta = meta

    def __call__(self, images: Any) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2.functional import to_pil_image

        from resnetlab.data import normalize, preprocess

        single = isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3)
        items = [images] if single else list(images)
        pil = []
        for im in items:
            if isinstance(im, torch.Tensor):
                if im.dtype != torch.uint8 or im.ndim != 3:
                    raise DataError(f"transforms(): expected uint8 [c, h, w] tensors, got {im.dtype} "
                                    f"{list(im.shape)}")
                im = to_pil_image(im)
            if not isinstance(im, Image.Image):
                raise DataError(f"transforms(): expected PIL images or uint8 tensors, got {type(im).__name__}")
            pil.append(im)
        x = normalize(preprocess(pil, self.meta), self.meta)  # [n, c, h, w] float32
        return x[0] if single else x

    def data_config(self) -> dict[str, Any]:
        """timm's ``resolve_data_config`` keys: input_size (c, h, w), interpolation, crop_pct,
        crop_mode, mean, std."""
        return pretrained_cfg(self.meta)

    def __repr__(self) -> str:
        cfg = self.data_config()
        return (f"ImageTransforms(input_size={cfg['input_size']}, interpolation={cfg['interpolation']!r}, "
                f"crop_pct={cfg['crop_pct']}, mean={cfg['mean']}, std={cfg['std']})")


def pretrained_cfg(meta: DataMeta) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` preprocessing fields for ``meta`` (what ``data_config`` gives).

    ``crop_pct`` is crop / resize for image folders (224 / 256 = 0.875) and 1.0 for datasets whose
    images already have the input size; ``interpolation`` names the filter evaluation uses.
    """
    h, w = meta.input_size
    crop_pct = round(min(h, w) / meta.resize, 4) if meta.resize else 1.0
    from resnetlab.data.sources import find_source

    source = find_source(meta.name)  # the dataset declares how evaluation resamples
    interpolation = "box" if source is not None and source.eval_resample == "box" else "bilinear"
    return {"input_size": [meta.in_chans, h, w], "interpolation": interpolation, "crop_pct": crop_pct,
            "crop_mode": "center", "mean": [round(m, 6) for m in meta.mean],
            "std": [round(s, 6) for s in meta.std]}


@dataclass(frozen=True)
class Weights:
    """One set of weights in a published folder: its card (``meta``), file and preprocessing.

    ``meta`` holds what torchvision's ``Weights.meta`` does and more: categories, num_params,
    macs (multiply-adds at the input size), file_size (bytes), dataset, recipe, command, budget,
    metrics (``{"test": {"top1_acc": ..., "ece": ...}}``) and the resnetlab version.
    """

    name: str  # "resnet20.digits": <arch>.<tag>
    folder: Path

    @property
    def config(self) -> dict[str, Any]:
        return read_config_json(self.folder)

    @property
    def arch(self) -> str:
        return str(self.config["architecture"])

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1] if "." in self.name else ""

    @property
    def file(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def meta(self) -> dict[str, Any]:
        doc = self.config
        card = dict(doc["resnetlab"])
        card.pop("data_meta", None)
        card.pop("config", None)
        card["categories"] = list(doc.get("label_names", []))
        card["file_size"] = self.file.stat().st_size if self.file.is_file() else None
        return card

    def data_meta(self) -> DataMeta:
        """The data meta the weights were trained and measured with."""
        try:
            return DataMeta.from_dict(self.config["resnetlab"]["data_meta"])
        except (KeyError, DataError, TypeError, ValueError) as e:
            raise WeightsError(f"{self.folder / CONFIG_FILE}: no usable resnetlab.data_meta ({e})") from None

    @property
    def num_classes(self) -> int:
        return len(self.data_meta().classes)

    @property
    def in_chans(self) -> int:
        return self.data_meta().in_chans

    def transforms(self) -> ImageTransforms:
        """The preprocessing these weights expect (see :class:`ImageTransforms`)."""
        return ImageTransforms(self.data_meta())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights, under the model's parameter names (read as safetensors: no code runs)."""
        from resnetlab import checkpoint as ckpt

        return ckpt.load_safetensors(self.file)

    def load_into(self, model: nn.Module, num_classes: int | None = None) -> nn.Module:
        """Load into ``model`` strictly; with another ``num_classes`` the classifier keeps the
        model's fresh initialisation (fine-tuning, as timm does for ``num_classes=``)."""
        from resnetlab import checkpoint as ckpt

        state = self.state_dict()
        if num_classes is not None and num_classes != self.num_classes:
            head = {k for k in state if k.startswith("fc.")}
            own = model.state_dict()
            state = {k: v for k, v in state.items() if k not in head} | {k: own[k] for k in own if k.startswith("fc.")}
        ckpt.load_weights(model, state, source=f"weights {self.name} ({self.file})")
        return model

    def __repr__(self) -> str:
        return f"Weights({self.name!r})"


# ----------------------------------------------------------------------------------------------
# the registry: the folders under FILES


@cache
def _shipped() -> dict[str, Weights]:
    if not FILES.is_dir():
        return {}
    return {d.name: Weights(d.name, d) for d in sorted(FILES.iterdir())
            if (d / CONFIG_FILE).is_file() and (d / MODEL_FILE).is_file()}


def list_weights(arch: str | None = None) -> list[str]:
    """Names of the shipped weights (``"resnet20.digits"``, ...), for one ``arch`` if given."""
    return [n for n, w in _shipped().items() if arch is None or n.split(".", 1)[0] == arch]


def default_weights(arch: str) -> Weights | None:
    """``arch``'s default weights: the first tag in the card order (``"default": true`` wins)."""
    names = list_weights(arch)
    marked = [n for n in names if _shipped()[n].config["resnetlab"].get("default")]
    return _shipped()[(marked or names)[0]] if names else None


def _shipped_summary() -> str:
    return ", ".join(list_weights()) or "none"


def get(name: str) -> Weights:
    """The shipped weights ``name`` (``"resnet56.fashion_mnist"``), or a published folder path.

    A bare model name (``"resnet20"``) gives its default weights. Unknown names raise
    :class:`WeightsError` naming the closest shipped ones.
    """
    shipped = _shipped()
    if name in shipped:
        return shipped[name]
    path = Path(name).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        read_config_json(path)  # a clear error for a folder that is not ours
        return Weights(path.name, path.resolve())
    if "." not in name:
        w = default_weights(name)
        if w is not None:
            return w
    close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise WeightsError(f"no weights named {name!r}{hint} (shipped: {_shipped_summary()}; "
                       "or a folder written by `resnetlab publish`)")


def resolve(arch: str, weights: Weights | str | None, pretrained: bool = False) -> Weights | None:
    """The :class:`Weights` that ``create_model(arch, weights=..., pretrained=...)`` asks for.

    ``weights``: a :class:`Weights`, a tag (``"fashion_mnist"``), a full name, ``"DEFAULT"``, or a
    published folder; ``pretrained=True`` means ``"DEFAULT"``. Weights for another architecture,
    or none shipped for ``arch``, raise :class:`WeightsError` saying what does ship.
    """
    if weights is None and not pretrained:
        return None
    if weights is None or weights == DEFAULT:
        w = default_weights(arch)
        if w is None:
            raise WeightsError(
                f"no pretrained weights ship for {arch!r}; shipped: {_shipped_summary()}. For "
                f"ImageNet weights on disk, import them as {arch} (`resnetlab import torchvision FILE.pth`; "
                f"in Python resnetlab.importers.import_torchvision(FILE, {arch!r})) or use model.init_from=FILE")
        return w
    if isinstance(weights, Weights):
        w = weights
    else:
        text = str(weights)
        tagged = _shipped().get(f"{arch}.{text}")  # a tag first, then a name or a folder
        if tagged is None and "." not in text and not Path(text).expanduser().is_dir():
            raise WeightsError(f"no {arch} weights tagged {text!r}; {arch} has: "
                               f"{', '.join(list_weights(arch)) or 'none'} (all shipped: {_shipped_summary()})")
        w = tagged or get(text)
    if w.arch != arch:
        raise WeightsError(f"weights {w.name} are for {w.arch}, not {arch}; "
                           f"{arch} has: {', '.join(list_weights(arch)) or 'none shipped'}")
    return w


def describe(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per shipped weight (name, dataset, metric, parameters, file size, and whether it is
    its architecture's default: what ``pretrained=True`` loads), for listings."""
    rows = []
    for name in names if names is not None else list_weights():
        w = _shipped()[name]
        m = w.meta
        test = m.get("metrics", {}).get("test", {})
        default = default_weights(w.arch)
        rows.append({"name": name, "arch": w.arch, "dataset": m.get("dataset"),
                     "top1_acc": test.get("top1_acc"), "num_params": m.get("num_params"),
                     "file_size": m.get("file_size"), "budget": m.get("budget"),
                     "default": default is not None and default.name == name})
    return rows


def markdown_table() -> str:
    """The README's table of shipped weights, read from their cards (never typed by hand)."""
    lines = ["| weights | test top-1 | ECE before -> after T | parameters | file | budget |",
             "|---|---|---|---|---|---|"]
    for name in list_weights():
        m = _shipped()[name].meta
        test = m.get("metrics", {}).get("test", {})
        b = m.get("budget", {})
        per_class = f", {b['train_per_class']:,} images per class" if b.get("train_per_class") else ""
        lines.append(f"| `{name}` | {test.get('top1_acc', float('nan')):.2f}% of {test.get('count', 0):,} | "
                     f"{test.get('ece_before', test.get('ece', float('nan'))):.2f}% -> {test.get('ece', float('nan')):.2f}% | "
                     f"{m['num_params']:,} | {m['file_size'] / 2**20:.2f} MB | "
                     f"{b.get('epochs_run', b.get('epochs'))} epochs{per_class} |")
    return "\n".join(lines)


__all__ = ["DEFAULT", "ImageTransforms", "Weights", "WeightsError", "default_weights", "describe", "get",
           "list_weights", "markdown_table", "pretrained_cfg", "read_config_json", "resolve"]
