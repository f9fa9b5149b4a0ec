"""Robust image reading: open, decode, and convert any common PIL mode to RGB or L.

Every failure names the file. Mode conversion rules (all to 8 bits per channel):

- ``L``, ``1``: grey as is (``1`` becomes 0/255); to RGB by copying the channel.
- ``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa`` and palette (``P``) images with a transparent
  colour: alpha-composited **on white** (a transparent background reads as paper, not as black).
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to RGB.
- 16-bit (``I;16``, ``I;16B``, ``I;16L``): ``round(v / 257)``, so 65535 -> 255.
- 32-bit integer ``I`` (how some decoders hand out 16-bit PNGs): values <= 255 are taken as
  8-bit, <= 65535 as 16-bit (``/ 257``), larger ranges are scaled by their maximum.
- 32-bit float ``F``: values in [0, 1] are scaled by 255, otherwise clipped to [0, 255].
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)

# What PIL raises for unreadable files: unknown format (UnidentifiedImageError is an OSError),
# truncated data (OSError), broken headers (SyntaxError, ValueError, struct.error, EOFError,
# IndexError from some plugins), and images over Image.MAX_IMAGE_PIXELS.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, IndexError,
    Image.DecompressionBombError, struct.error,
)


class DataError(ValueError):
    """A data file, folder or setting is wrong; the message names the one at fault."""


class BadImageError(DataError):
    """An image file cannot be read; the message starts with the file's path."""


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _describe(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can identify"
    text = str(err) or type(err).__name__
    return text.split("\n", 1)[0]


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode the image at ``path`` (pixels loaded, file closed).

    Raises :class:`BadImageError` ``"<path>: <reason>"`` for a missing, zero-byte, truncated
    or non-image file. The mode is left as stored; see :func:`to_mode`.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncation shows up here, not in a worker later
                # copy() detaches the pixels from the file (and keeps info, e.g. transparency).
                return img.copy()
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except _PIL_ERRORS as e:
        raise BadImageError(f"{path}: cannot read image ({_describe(e)})") from None


def check_image(path: str | Path) -> str | None:
    """Return ``None`` when ``path`` decodes cleanly, else the reason it does not.

    Runs PIL's ``verify()`` (structure and checksums, e.g. PNG CRCs), a full decode
    (``verify`` alone does not notice a truncated JPEG) and the RGB conversion the loaders do.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:  # verify() leaves the image unusable: reopen
                img.load()
                to_rgb(img)  # an exotic mode PIL cannot convert fails here, not in a worker
    except FileNotFoundError:
        return "file not found"
    except _PIL_ERRORS as e:
        return f"cannot read image ({_describe(e)})"
    return None


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float single-channel images -> ``L`` with a sensible scale."""
    a = np.asarray(img)  # [h, w] uint16 / int32 / float32
    if img.mode.startswith("I;16"):
        a = (a.astype(np.uint32) + 128) // 257  # round(v / 257): 65535 -> 255
    elif img.mode == "I":
        a = a.astype(np.int64)
        top = int(a.max()) if a.size else 0
        if top > 65535:
            a = np.round(np.clip(a, 0, None) * (255.0 / top)).astype(np.int64)
        elif top > 255:
            a = (np.clip(a, 0, None) + 128) // 257
    else:  # "F"
        a = a.astype(np.float64)
        finite_max = float(np.nanmax(a)) if a.size else 0.0
        a = np.nan_to_num(a, nan=0.0)
        a = np.round(a * 255.0) if finite_max <= 1.0 else np.round(a)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert ``img`` of any common mode to 8-bit ``RGB`` (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _to_8bit_grey(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in img.info
    ):
        return _composite_on_white(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert ``img`` to ``RGB`` (``in_chans == 3``) or ``L`` (``in_chans == 1``).

    Grey sources stay exact; colour sources go through RGB (transparency on white) and then
    PIL's ITU-R 601-2 luma transform.
    """
    if in_chans == 3:
        return to_rgb(img)
    if in_chans != 1:
        raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _to_8bit_grey(img)
    if img.mode == "1":
        return img.convert("L")
    return to_rgb(img).convert("L")


def read_image(path: str | Path, in_chans: int = 3) -> Image.Image:
    """:func:`load_image` then :func:`to_mode`: the one call the loaders use."""
    img = load_image(path)
    try:
        return to_mode(img, in_chans)
    except _PIL_ERRORS as e:
        raise BadImageError(f"{path}: cannot convert mode {img.mode} ({_describe(e)})") from None


__all__ = [
    "IMAGE_EXTENSIONS", "BadImageError", "DataError", "check_image", "is_image_file",
    "load_image", "read_image", "to_mode", "to_rgb",
]
