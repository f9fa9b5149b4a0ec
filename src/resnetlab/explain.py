"""``resnetlab explain``: where the network looked, as Grad-CAM heatmaps over the input.

Grad-CAM (Selvaraju et al., 2017) weights the last stage's feature maps by the spatially averaged
gradient of one class score and keeps the positive part; the maps come from Captum's
``LayerGradCam`` (not re-implemented here). Images go through exactly the preprocessing that
``predict`` uses (:func:`prepare_pixels`), so the overlay shows what the network saw:

    resnetlab explain runs/digits img.png --out cams/      # cams/img.cam.png + cams/explain.json

The same functions back ``POST /v1/explain`` of ``resnetlab serve``.
"""

from __future__ import annotations

import base64
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from resnetlab.data import DataError, DataMeta, load_image, normalize, preprocess
from resnetlab.inference import check_topk, class_probs, load_for_inference, output_dir, top_classes
from resnetlab.params import named
from resnetlab.prepare import apply_polarity, collect_images

#: Shorter side of a written overlay, pixels: an 8x8 digit is upscaled (nearest) to be seen.
OVERLAY_MIN_SIDE = 224
#: Heatmap opacity over the image, 0..1.
OVERLAY_ALPHA = 0.5


# ---------------------------------------------------------------------------------------------- pixels


def match_ink_polarity(img: Image.Image, meta: DataMeta) -> Image.Image:
    """``img`` in the ink polarity the run learned, by ``predict``'s own rule (:func:`apply_polarity`
    with ``invert="auto"``): a grey run (digits: light ink on dark) inverts a light-ground image."""
    return apply_polarity(img, meta, "auto")[0]


def prepare_pixels(images: Sequence[Image.Image], meta: DataMeta) -> torch.Tensor:
    """Decoded images (any mode, any size) -> uint8 ``[n, c, h, w]`` as ``predict`` feeds them."""
    return preprocess([match_ink_polarity(img, meta) for img in images], meta)


# ---------------------------------------------------------------------------------------------- Grad-CAM


def cam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: the last stage the model declares (``layer4`` / ``layer3``),
    else the last conv."""
    names = getattr(model, "stage_names", None)
    if names:
        return model.get_submodule(names[-1])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise DataError(f"{type(model).__name__} has no convolution for Grad-CAM to read")
    return convs[-1]


def grad_cam(model: nn.Module, meta: DataMeta, x_uint8: torch.Tensor,
             targets: Sequence[int]) -> torch.Tensor:
    """Grad-CAM maps of ``targets`` (one class id per image): ``[n, h, w]`` in 0..1, input size.

    Each map is ReLU(sum_k alpha_k A_k) on the last stage, upsampled bilinearly to the input's
    ``h, w`` and divided by its maximum (an all-zero map stays zero).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    device = next(model.parameters()).device
    x = normalize(x_uint8.to(device), meta).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)  # the fused net's weights are frozen: gradients flow through x
    target = torch.as_tensor(list(targets), dtype=torch.long, device=device)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # captum: "input tensor requires grad"
        cam = LayerGradCam(model, cam_layer(model)).attribute(x, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), "bilinear")  # [n, 1, h, w]
    cam = cam[:, 0].float().clamp_min(0).cpu()
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak


def _jet(values: np.ndarray) -> np.ndarray:
    """0..1 ``[h, w]`` -> uint8 RGB ``[h, w, 3]`` through matplotlib's ``jet`` colormap."""
    from matplotlib import colormaps

    return (colormaps["jet"](values)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(pixels: torch.Tensor, cam: torch.Tensor, min_side: int = OVERLAY_MIN_SIDE,
            alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """uint8 ``[c, h, w]`` image and ``[h, w]`` map -> RGB overlay, upscaled so its shorter side
    is at least ``min_side`` (nearest for the pixels, bilinear for the map)."""
    c, h, w = pixels.shape
    scale = max(1, -(-min_side // min(h, w)))  # ceil: integer factor keeps pixels square
    size = (w * scale, h * scale)
    img = pixels.permute(1, 2, 0).numpy()  # [h, w, c]
    base = Image.fromarray(img[..., 0] if c == 1 else img, "L" if c == 1 else "RGB").convert("RGB")
    base = base.resize(size, Image.Resampling.NEAREST)
    heat = Image.fromarray((cam.numpy() * 255.0 + 0.5).astype(np.uint8), "L").resize(
        size, Image.Resampling.BILINEAR)
    colour = Image.fromarray(_jet(np.asarray(heat, dtype=np.float32) / 255.0), "RGB")
    return Image.blend(base, colour, alpha)


def png_data_url(img: Image.Image) -> str:
    """``data:image/png;base64,...`` for an ``<img src>`` or a JSON answer."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- API


def resolve_target(target: str | int | None, meta: DataMeta) -> int | None:
    """A class name or id -> class id; ``None`` stays None (explain the top class)."""
    if target is None or target == "":
        return None
    text = str(target)
    if text in meta.classes:
        return meta.classes.index(text)
    try:
        idx = int(text)
    except ValueError:
        idx = -1
    if 0 <= idx < meta.num_classes:
        return idx
    shown = ", ".join(meta.classes[:12]) + (", ..." if meta.num_classes > 12 else "")
    raise named(DataError, "target", f"{text!r} is neither a class name ({shown}) nor an id in "
                                     f"0..{meta.num_classes - 1}")


@dataclass
class Explanation:
    """Top-k of one image and the Grad-CAM overlay of ``target``."""

    file: str
    classes: list[str]  # top-k class names, most probable first
    indices: list[int]  # top-k label ids
    probs: list[float]  # softmax probabilities, 0..1
    target: int  # class id the map explains
    target_class: str
    target_prob: float
    overlay: Image.Image = field(repr=False)


def explain_pixels(model: nn.Module, meta: DataMeta, x_uint8: torch.Tensor, names: Sequence[str],
                   target: int | None = None, topk: int = 5) -> list[Explanation]:
    """uint8 ``[n, c, h, w]`` (see :func:`prepare_pixels`) -> one :class:`Explanation` each,
    for class ``target`` or, when None, each image's most probable class."""
    probs = class_probs(model, meta, x_uint8).cpu()  # [n, classes]: target_prob may be outside the top-k
    values, indices = top_classes(probs, topk)
    targets = [target if target is not None else int(i[0]) for i in indices]
    cams = grad_cam(model, meta, x_uint8, targets)  # [n, h, w]
    return [Explanation(name, [meta.classes[j] for j in ids], ids, p, t, meta.classes[t],
                        float(probs[k, t]), overlay(x_uint8[k], cams[k]))
            for k, (name, p, ids, t) in enumerate(zip(names, values.tolist(), indices.tolist(),
                                                      targets, strict=True))]


@dataclass
class ExplainResult:
    """Written overlays, the JSON summary, and ``(file, reason)`` for unreadable inputs."""

    explanations: list[Explanation] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    summary: Path | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)


def explain(path: str | Path, inputs: Sequence[str | Path], out: str | Path | None = None,
            target: str | int | None = None, topk: int = 5, device: str = "cpu") -> ExplainResult:
    """Grad-CAM overlays (``<out>/<stem>.cam.png``) and top-k (``<out>/explain.json``) for the
    images in ``inputs`` (files and folders) with the network at ``path`` (run or checkpoint).

    ``out`` defaults to ``<run>/explain``. Unreadable images land in ``result.errors``.
    """
    check_topk(topk)  # before the network is loaded
    model, _cfg, meta = load_for_inference(path, device=device)
    target_id = resolve_target(target, meta)
    out_dir = Path(out).expanduser() if out is not None else output_dir(path) / "explain"
    files, errors = collect_images(inputs)
    result = ExplainResult(errors=errors)
    for f in files:
        try:
            pixels = prepare_pixels([load_image(f)], meta)
        except DataError as e:
            result.errors.append((str(f), str(e).removeprefix(f"{f}: ")))
            continue
        except (OSError, ValueError) as e:
            result.errors.append((str(f), f"cannot preprocess image ({e})"))
            continue
        result.explanations.extend(explain_pixels(model, meta, pixels, [str(f)], target_id, topk))
    if not result.explanations:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for ex in result.explanations:
        stem = Path(ex.file).stem
        name, k = f"{stem}.cam.png", 1
        while name in used:  # same stem in two folders: keep both
            k += 1
            name = f"{stem}-{k}.cam.png"
        used.add(name)
        ex.overlay.save(out_dir / name)
        result.written.append(out_dir / name)
        rows.append({"file": ex.file, "classes": ex.classes, "indices": ex.indices, "probs": ex.probs,
                     "target": ex.target, "target_class": ex.target_class,
                     "target_prob": ex.target_prob, "overlay": name})
    result.summary = out_dir / "explain.json"
    result.summary.write_text(json.dumps({"explanations": rows, "errors": [
        {"file": f, "error": r} for f, r in result.errors]}, indent=2) + "\n")
    return result


__all__ = ["ExplainResult", "Explanation", "cam_layer", "explain", "explain_pixels", "grad_cam",
           "match_ink_polarity", "overlay", "png_data_url", "prepare_pixels", "resolve_target"]
