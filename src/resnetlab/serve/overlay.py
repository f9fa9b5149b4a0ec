"""Grad-CAM drawn over the image the user gave, aligned with it (the page's heatmap).

The map is computed on the network's input (``[h, w]``); :class:`~resnetlab.predict.Geometry`
says where each pixel of the original image landed there (resize, centre crop, or the digit
framing's crop and scale), so every display pixel samples the map at its own place. Parts of
the image the network never saw (cropped away, or the margin around a framed digit) stay
untinted.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from resnetlab.data import to_rgb
from resnetlab.explain import OVERLAY_ALPHA, OVERLAY_MIN_SIDE
from resnetlab.predict import Geometry

MAX_SIDE = 448  # longer side of the drawn overlay at most, pixels (a data: URL in a JSON answer)


def overlay_on_image(img: Image.Image, cam: torch.Tensor, geometry: Geometry,
                     alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """``img`` (any mode and size) with ``cam`` (``[h, w]`` in 0..1 on the network's input)
    laid over it in matplotlib's ``jet``: RGB, longer side at most :data:`MAX_SIDE`, a small
    image upscaled (nearest) so its shorter side is at least ``OVERLAY_MIN_SIDE``."""
    from matplotlib import colormaps

    w0, h0 = img.size
    scale = min(MAX_SIDE / max(w0, h0), max(1.0, OVERLAY_MIN_SIDE / min(w0, h0)))
    dw, dh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    base = np.asarray(to_rgb(img).resize((dw, dh), resample), dtype=np.float32)  # [dh, dw, 3]
    h, w = cam.shape
    xs = (torch.arange(dw, dtype=torch.float64) + 0.5) * (w0 / dw)  # display pixel centres, image coords
    ys = (torch.arange(dh, dtype=torch.float64) + 0.5) * (h0 / dh)
    u, v = geometry.sx * xs + geometry.tx, geometry.sy * ys + geometry.ty  # network input coords
    grid = torch.stack(torch.meshgrid(v / h * 2 - 1, u / w * 2 - 1, indexing="ij")[::-1], dim=-1)  # [dh, dw, 2]
    heat = F.grid_sample(cam[None, None].float(), grid[None].float(), mode="bilinear",
                         padding_mode="border", align_corners=False)[0, 0].numpy()  # [dh, dw]
    seen = ((v >= 0) & (v <= h))[:, None] & ((u >= 0) & (u <= w))[None, :]  # [dh, dw]
    colour = colormaps["jet"](heat)[..., :3].astype(np.float32) * 255.0
    a = np.where(seen.numpy(), alpha, 0.0)[..., None]
    out = base * (1 - a) + colour * a
    return Image.fromarray((out + 0.5).clip(0, 255).astype(np.uint8), "RGB")


__all__ = ["MAX_SIDE", "overlay_on_image"]
