"""Batched, on-device augmentation and normalisation, plus the seeding that makes it exact.

Randomness here never touches the global RNGs: every draw comes from a ``torch.Generator``
seeded by :func:`derive_seed` from a tuple such as ``(seed, "augment", epoch, batch)``. A batch's
augmentation is therefore a pure function of those numbers, so resuming at any batch, or
splitting the batch over more processes, reproduces it bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class NormStats(Protocol):
    """Per-channel mean and std on the 0..1 scale (:class:`~resnetlab.data.DataMeta` has them).
    A protocol, so this module needs nothing from ``datasets`` (which imports it)."""

    @property
    def mean(self) -> Sequence[float]: ...

    @property
    def std(self) -> Sequence[float]: ...


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``, stable across runs, machines and Python versions.

    Python's ``hash()`` is salted for strings, so a cryptographic digest is used instead.
    Integer-like parts (numpy ints, 0-d tensors) count as the same Python int.
    """
    canonical = tuple(p if isinstance(p, str) else int(p) for p in parts)
    digest = hashlib.blake2b(repr(canonical).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``.

    Draws are made on the CPU even when training on a GPU: CPU and CUDA generators give
    different streams, and the batches must not depend on the device.
    """
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


class CropFlip(NamedTuple):
    """Per-sample crop offsets and flips for one batch (CPU or device tensors)."""

    dy: torch.Tensor  # [b] int64, top row of the crop in the padded image, 0..2*padding
    dx: torch.Tensor  # [b] int64, left column of the crop in the padded image, 0..2*padding
    flip: torch.Tensor  # [b] bool, mirror left-right

    def slice(self, start: int, stop: int) -> CropFlip:
        """Parameters of samples ``start:stop`` (a rank's share of a global batch)."""
        return CropFlip(self.dy[start:stop], self.dx[start:stop], self.flip[start:stop])

    def to(self, device: torch.device) -> CropFlip:
        """Move to ``device`` in one transfer."""
        packed = torch.stack([self.dy, self.dx, self.flip.long()]).to(device, non_blocking=True)
        return CropFlip(packed[0], packed[1], packed[2].bool())


def draw_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator) -> CropFlip:
    """Draw crop offsets (uniform in ``0..2*padding``) and flips (p=0.5) for ``n`` samples."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)  # [n]
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)  # [n]
    flips = torch.rand(n, generator=generator) < 0.5  # [n]
    if not flip:
        flips = torch.zeros_like(flips)
    return CropFlip(dy, dx, flips)


def apply_crop_flip(x: torch.Tensor, params: CropFlip, padding: int) -> torch.Tensor:
    """Zero-pad ``x`` by ``padding`` pixels, crop back to its size at ``params``' offsets, flip.

    ``x`` is ``[b, c, h, w]`` (any dtype, usually uint8) on any device; ``params`` must be on the
    same device. Two ``gather`` calls with per-sample index grids: no Python loop over samples.
    """
    b, c, h, w = x.shape
    p = padding
    xp = F.pad(x, (p, p, p, p)) if p > 0 else x  # [b, c, h+2p, w+2p]
    rows = params.dy[:, None] + torch.arange(h, device=x.device)  # [b, h] rows in xp
    cols = params.dx[:, None] + torch.arange(w, device=x.device)  # [b, w] columns in xp
    cols = torch.where(params.flip[:, None], cols.flip(1), cols)  # mirrored read order
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))  # [b, c, h, w+2p]
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # [b, c, h, w]


def random_crop_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Pad + random crop + random horizontal flip, drawn per sample from ``generator``.

    ``x``: ``[b, c, h, w]``; returns the same shape, dtype and device.
    """
    params = draw_crop_flip(x.shape[0], padding, flip, generator).to(x.device)
    return apply_crop_flip(x, params, padding)


def normalize(x_uint8: torch.Tensor, meta: NormStats) -> torch.Tensor:
    """uint8 ``[..., c, h, w]`` (0..255) -> float32 ``(x / 255 - mean) / std`` per channel.

    The one normalisation used by training, evaluation, prediction and export.
    """
    c = x_uint8.shape[-3]
    if c != len(meta.mean):
        raise ValueError(f"images have {c} channels but the data meta has {len(meta.mean)}")
    scale, shift = _norm_constants(tuple(meta.mean), tuple(meta.std), x_uint8.device)
    return x_uint8.float() * scale + shift


_NORM_CACHE: dict[tuple[tuple[float, ...], tuple[float, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``[c, 1, 1]`` float32 on ``device``, built once per device.

    Building them per batch with ``torch.tensor(..., device=cuda)`` is a blocking host-to-device
    copy in every step; cached, the step issues no transfer for them at all.
    """
    key = (mean, std, device)
    hit = _NORM_CACHE.get(key)
    if hit is None:
        # float32 on the CPU, as before the cache: the same constants bit for bit on every device
        m = torch.tensor(mean, dtype=torch.float32)  # [c]
        s = torch.tensor(std, dtype=torch.float32)  # [c]
        scale = (1.0 / (255.0 * s)).view(-1, 1, 1)  # per 0..255 step, in std units
        shift = (-m / s).view(-1, 1, 1)
        hit = (scale.to(device), shift.to(device))
        if len(_NORM_CACHE) > 64:  # a process sees a handful of datasets and devices
            _NORM_CACHE.clear()
        _NORM_CACHE[key] = hit
    return hit


def sample_resized_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop, as ``RandomResizedCrop.get_params``.

    Same algorithm as torchvision (10 tries for an area fraction in ``scale`` and an aspect ratio
    in ``ratio``, log-uniform; then the centre crop), but drawn from ``generator`` instead of the
    global RNG, so a sample's crop depends only on its seed.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centre crop within `ratio`
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


__all__ = [
    "CropFlip", "NormStats", "apply_crop_flip", "derive_seed", "draw_crop_flip", "make_generator",
    "normalize", "random_crop_flip", "sample_resized_crop",
]
