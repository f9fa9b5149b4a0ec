"""What a ``resnetlab serve`` request may carry, and reading it: limits, body, images, top-k.

The routes (:mod:`resnetlab.serve.app`) call these; each refuses with an
:class:`~resnetlab.serve.errors.ApiError` whose message names what was wrong and which server
limit it broke, by the name ``GET /v1/model`` reports it under (``limits.max_body_mb`` ...):
body over the size limit or too many images 413; not an image or an unsupported mode 415;
truncated, empty or over the pixel limit (decompression bombs) 400.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from resnetlab.data.images import NOT_SUPPORTED, ImageTooLargeError, open_image
from resnetlab.serve.backends import Backend, PreparedImage
from resnetlab.serve.errors import ApiError


@dataclass(frozen=True)
class Limits:
    """Request limits (``serve(limits=...)``); the CLI sets each field with the flag of the same
    name (``max_body_mb``: ``--max-body-mb``)."""

    max_body_mb: float = 10.0  # whole request body, MiB
    max_images: int = 32  # images in one request
    max_pixels: int = 40_000_000  # per decoded image (w * h); above: refused as a likely bomb
    max_topk: int = 100

    @property
    def body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes -> fully decoded PIL image, or :class:`ApiError` naming ``name`` and the reason."""
    if not data:
        raise ApiError(400, f"{name}: empty image (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
        try:
            img = open_image(io.BytesIO(data))  # only the allowed formats, judged by content
        except UnidentifiedImageError:
            raise ApiError(415, f"{name}: {NOT_SUPPORTED}") from None
        except Image.DecompressionBombError as e:
            raise ApiError(400, f"{name}: refused as a decompression bomb ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ApiError(400, f"{name}: corrupt image header ({e})") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ApiError(400, f"{name}: {w}x{h} pixels ({w * h / 1e6:.1f} Mpixel) is over the limit of "
                                f"{max_pixels / 1e6:.1f} Mpixel (the server's max_pixels): refused as a "
                                "possible decompression bomb")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            raise ApiError(400, f"{name}: truncated or corrupt image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return img


def decode_and_prepare(data: bytes, name: str, backend: Backend, max_pixels: int) -> PreparedImage:
    """Bytes -> the backend's :class:`PreparedImage` (runs in the decode pool)."""
    img = decode_image(data, name, max_pixels)
    try:
        return backend.preprocess(img)
    except ImageTooLargeError as e:  # readable, but over a preprocessing limit: like max_pixels
        raise ApiError(400, f"{name}: {e}") from None
    except (OSError, ValueError) as e:  # DataError is a ValueError too
        raise ApiError(415, f"{name}: unsupported image mode {img.mode} ({e})") from None


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, at most ``limits.max_body_mb``; over it: 413.

    An oversized body is still read (and dropped) up to 4x the limit before the answer, so
    the client, which is usually still sending, reads the 413 instead of a reset connection;
    beyond that the connection is closed after the answer.
    """
    limit = limits.body_bytes
    drain = 4 * limit
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else None
    too_big = f"over the limit of {_mb(limit)} (the server's max_body_mb)"
    if size is not None and size > drain:
        raise ApiError(413, f"request body of {_mb(size)} is {too_big}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
        elif total > drain:
            break
    if total > limit:
        raise ApiError(413, f"request body{f' of {_mb(size)}' if size else ''} is {too_big}")
    return b"".join(chunks)


async def read_images(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """``[(name, bytes)]`` and the form/query fields of a predict or explain request: a raw
    ``image/*`` body, or the file parts of ``multipart/form-data``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limits)
    fields = dict(request.query_params)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [("body", body)], fields
    if ctype != "multipart/form-data":
        raise ApiError(415, f"content type {ctype or '(none)'!r}: send an image/* body or "
                            "multipart/form-data with image files")

    async def replay() -> dict[str, Any]:  # the body again, for the multipart parser
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=float("inf"), max_fields=100)
    images: list[tuple[str, bytes]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            else:
                images.append((value.filename or key, await value.read()))
    finally:
        await form.close()
    if not images:
        raise ApiError(400, "no image in the request: add a file part (e.g. -F file=@img.png)")
    return images, fields


def check_image_count(n: int, max_images: int) -> None:
    """413 when ``n`` images are more than one request may carry (``max_images``)."""
    if n > max_images:
        raise ApiError(413, f"{n} images in one request; the limit is {max_images} (the server's max_images)")


def parse_topk(fields: dict[str, str], limits: Limits, num_classes: int) -> int:
    """The request's ``topk`` field (default 5), at most the number of classes; 400 when bad."""
    text = fields.get("topk", "5")
    try:
        k = int(text)
    except ValueError:
        k = 0
    if not 1 <= k <= limits.max_topk:
        raise ApiError(400, f"topk={text!r}: expected an integer from 1 to {limits.max_topk}")
    return min(k, limits.max_topk, num_classes)


def inflate(request: Request, body: bytes, limits: Limits) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), never
    past the body limit (a compressed bomb is a 413, not a full memory)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r}: send gzip, deflate or none")
    limit = limits.body_bytes
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ApiError(400, f"body is not valid {encoding} data ({e})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ApiError(413, f"decompressed request body is over the limit of {_mb(limit)} "
                            "(the server's max_body_mb)")
    return out


__all__ = ["Limits", "check_image_count", "decode_and_prepare", "decode_image", "inflate", "parse_topk",
           "read_body", "read_images"]
