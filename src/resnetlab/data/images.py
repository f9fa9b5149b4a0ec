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

EXIF orientation (phone photos) is applied on reading, as ``ImageOps.exif_transpose``: the
pixels come back the way a photo viewer shows them.

Only the formats in :data:`IMAGE_FORMATS` are decoded (PNG, JPEG, GIF, BMP, TIFF, WebP), decided
by the file's content, never its name: Pillow is not allowed to hand a file to any other plugin
(EPS would run Ghostscript, a program with a history of code-execution bugs; PSD, ICO, TGA, ...
are decoders nobody here tests). Every opening goes through :func:`open_image`.

Work per image is capped before decoding: at most :data:`MAX_PIXELS` pixels (PIL's own bomb
check allows up to ~179 M, which with mode conversions costs gigabytes per worker).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from resnetlab.data.errors import BadImageError, DataError, ImageTooLargeError

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)

#: Pillow format names decoded, passed as ``Image.open(..., formats=IMAGE_FORMATS)``. JPEG includes
#: MPO (phone cameras' JPEG with extra pictures: Pillow's JPEG opener hands it out).
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")

#: The same set as users read it (error messages; the README lists exactly these).
FORMAT_NAMES: str = "PNG, JPEG, GIF, BMP, TIFF or WebP"

#: Largest image decoded, in pixels (width x height): 64 Mpx covers 50 Mpx phone cameras, and
#: one decoded RGB copy is then at most 192 MiB (a 16-bit grey one 512 MiB while converting).
MAX_PIXELS: int = 64 * 2**20

# What PIL raises for unreadable files: unknown format (UnidentifiedImageError is an OSError),
# truncated data (OSError), broken headers (SyntaxError, ValueError, struct.error, EOFError,
# IndexError from some plugins), and images over Image.MAX_IMAGE_PIXELS.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, IndexError,
    Image.DecompressionBombError, struct.error,
)
# torchvision's decode_jpeg raises RuntimeError on bad data; the PIL fallback raises the above.
_JPEG_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, *_PIL_ERRORS)


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


#: Why a file none of :data:`IMAGE_FORMATS` recognises is refused.
NOT_SUPPORTED: str = f"not an image in a supported format ({FORMAT_NAMES})"


def open_image(fp: str | Path | IO[bytes]) -> ImageFile.ImageFile:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (lazy: only the header is read).

    A file in any other format (whatever its name) raises ``UnidentifiedImageError`` before
    any other Pillow plugin looks at it.
    """
    return Image.open(fp, formats=IMAGE_FORMATS)


def _describe(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):
        return NOT_SUPPORTED
    text = str(err) or type(err).__name__
    return text.split("\n", 1)[0]


def too_large(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is refused, or ``None`` when it is not."""
    if width * height > MAX_PIXELS:
        return (f"{width}x{height} = {width * height / 1e6:.0f} M pixels is over the limit of "
                f"{MAX_PIXELS / 1e6:.0f} M (decoding it would take "
                f"{3 * width * height / 2**30:.1f} GiB or more); downscale it first")
    return None


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 (upright) when absent or broken."""
    try:
        value = img.getexif().get(0x0112, 1)  # 0x0112: Orientation
        return int(value) if value in range(1, 9) else 1
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (as ``ImageOps.exif_transpose``); a no-op when upright."""
    if exif_orientation(img) == 1:
        return img
    return ImageOps.exif_transpose(img)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode the image at ``path`` (pixels loaded, file closed, EXIF
    orientation applied).

    Raises :class:`BadImageError` ``"<path>: <reason>"`` for a missing, zero-byte, truncated
    or non-image file, or one over :data:`MAX_PIXELS`. The mode is left as stored; see
    :func:`to_mode`.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as img:
                reason = too_large(*img.size)  # from the header: nothing decoded yet
                if reason:
                    raise BadImageError(f"{path}: {reason}")
                img.load()  # decode now: truncation shows up here, not in a worker later
                # copy() detaches the pixels from the file (and keeps info, e.g. transparency).
                return _upright(img).copy()
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
            with open_image(path) as img:
                reason = too_large(*img.size)
                if reason:
                    return reason
                img.verify()
            with open_image(path) as img:  # verify() leaves the image unusable: reopen
                img.load()
                to_rgb(_upright(img))  # an exotic mode PIL cannot convert fails here, not in a worker
    except FileNotFoundError:
        return "file not found"
    except _PIL_ERRORS as e:
        return f"cannot read image ({_describe(e)})"
    return None


def _draft_scale(crop_h: int, crop_w: int, size: tuple[int, int]) -> int:
    """Largest libjpeg scale-down (8, 4, 2, else 1) that keeps the crop at least ``size``."""
    for r in (8, 4, 2):
        if crop_h >= r * size[0] and crop_w >= r * size[1]:
            return r
    return 1


def _read_bytes(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except OSError as e:
        raise BadImageError(f"{path}: cannot read file ({e.strerror or e})") from None
    if not data:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    return data


def _fast_jpeg(data: bytes, path: str, in_chans: int, pick_box: BoxPicker,
               size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int, int, int]] | None:
    """``(pixels uint8 [c, h', w'], crop box in them)`` for a plain upright RGB or grey JPEG,
    else ``None`` (the caller then takes the general path)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    with open_image(io.BytesIO(data)) as img:
        # MPO: a JPEG with extra pictures (many phone cameras); the first picture is the photo.
        if img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L") \
                or exif_orientation(img) != 1:
            return None
        reason = too_large(*img.size)
        if reason:
            raise BadImageError(f"{path}: {reason}")
        width, height = img.size
        top, left, h, w = pick_box(height, width)
        r = _draft_scale(h, w, size)
        if r > 1:  # libjpeg decodes at 1/r scale: the crop shrinks before full-size conversion
            img.draft(img.mode, (math.ceil(width / r), math.ceil(height / r)))
            img.load()
            sy, sx = img.height / height, img.width / width
            box = (math.floor(top * sy), math.floor(left * sx),
                   max(1, round(h * sy)), max(1, round(w * sx)))
            return TF.pil_to_tensor(to_mode(img, in_chans)), box
    mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
    pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    return pixels, (top, left, h, w)  # [c, H, W] uint8, libjpeg-turbo straight to a tensor


#: ``pick_box(height, width) -> (top, left, h, w)``: the crop to take from an image of that size.
BoxPicker = Callable[[int, int], tuple[int, int, int, int]]


def read_resized_crop(path: str | Path, in_chans: int, pick_box: BoxPicker,
                      size: tuple[int, int]) -> torch.Tensor:
    """Decode ``path``, take the crop ``pick_box(height, width)`` chooses and resize it to
    ``size`` ``(h, w)`` (bilinear, antialiased): uint8 ``[in_chans, h, w]``.

    The training path. Plain upright RGB/grey JPEGs are read fast: the header is parsed first
    and the crop chosen; when the crop is at least twice ``size`` on both sides libjpeg decodes
    at 1/2, 1/4 or 1/8 scale (PIL's draft mode), otherwise torchvision's libjpeg-turbo
    ``decode_jpeg`` decodes straight to a tensor. Every other file (PNG, CMYK, EXIF-rotated,
    ...) goes through :func:`read_image`. Errors: :class:`BadImageError` naming the file.
    """
    from torchvision.transforms.v2 import functional as TF

    path = str(path)
    data = _read_bytes(path)
    found = None
    if data[:2] == b"\xff\xd8":  # JPEG start-of-image marker
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                found = _fast_jpeg(data, path, in_chans, pick_box, size)
        except BadImageError:
            raise
        except _JPEG_ERRORS as e:
            raise BadImageError(f"{path}: cannot read image ({_describe(e)})") from None
    if found is None:
        img = read_image(path, in_chans)
        found = TF.pil_to_tensor(img), pick_box(img.height, img.width)
    pixels, (top, left, h, w) = found
    crop = pixels[:, top : top + h, left : left + w]  # [c, h, w] view
    return TF.resize(crop, list(size), antialias=True).contiguous()  # [c, size_h, size_w] uint8


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
    "FORMAT_NAMES", "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_PIXELS", "NOT_SUPPORTED", "BadImageError",
    "DataError", "ImageTooLargeError", "check_image", "exif_orientation", "is_image_file", "load_image", "open_image",
    "read_image", "read_resized_crop",
    "to_mode", "to_rgb",
    "too_large",
]
