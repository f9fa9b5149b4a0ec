"""The ASGI app of ``resnetlab serve`` (Starlette): JSON API, web page, limits, readiness.

Routes::

    GET  /                 the web page (static/index.html, app.js, style.css: no CDN, no build)
    GET  /healthz          200 while the process serves
    GET  /readyz           200 once the weights are loaded and a warm-up batch ran, else 503
    GET  /v1/model         name, classes, input size, mean/std, parameters, checkpoint SHA-256
    POST /v1/predict       top-k per image           (?topk=5)
    POST /v1/explain       top-k + Grad-CAM overlay  (?topk=5&target=CLASS)

An image is sent as a raw body with an ``image/*`` content type, or as one or more file parts
of ``multipart/form-data``. Every error is JSON ``{"error": "...", "status": N}``: body over
the size limit or too many images 413; not an image or an unsupported mode 415; truncated,
empty or over the pixel limit (decompression bombs) 400. Preprocessing is the run's own
(:func:`resnetlab.explain.prepare_pixels`, the one ``predict`` uses) and runs in a thread pool;
the network runs in one model thread behind a :class:`~resnetlab.serve.batcher.MicroBatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from resnetlab.config import Config
from resnetlab.data import DataError, DataMeta
from resnetlab.data.images import NOT_SUPPORTED, ImageTooLargeError, open_image
from resnetlab.explain import (
    explain_pixels,
    png_data_url,
    prepare_pixels,
    resolve_target,
    topk_pixels,
)
from resnetlab.serve.batcher import MicroBatcher

STATIC_DIR = Path(str(resources.files("resnetlab.serve") / "static"))
# The page loads only its own files; images come back as data: URLs, drawings as blob:.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Limits:
    """Request limits; each has a CLI flag of the same name."""

    max_body_mb: float = 10.0  # whole request body, MiB
    max_images: int = 32  # images in one request
    max_pixels: int = 40_000_000  # per decoded image (w * h); above: refused as a likely bomb
    max_topk: int = 100


@dataclass
class ServedModel:
    """A loaded network and where it came from."""

    model: nn.Module  # fused, eval, frozen
    config: Config
    meta: DataMeta
    source: str  # the run folder or checkpoint the user named
    checkpoint: Path  # the resolved checkpoint file
    sha256: str  # of ``checkpoint``
    parameters: int

    def info(self) -> dict[str, Any]:
        """The ``GET /v1/model`` answer."""
        m = self.meta
        return {"model": self.config.model.name, "run": self.source, "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": self.sha256, "parameters": self.parameters, "dataset": m.name,
                "classes": list(m.classes), "num_classes": m.num_classes, "in_chans": m.in_chans,
                "input_size": list(m.input_size), "mean": list(m.mean), "std": list(m.std),
                "resize": m.resize, "device": str(next(self.model.parameters()).device)}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_served_model(path: str | Path, device: str = "cpu") -> ServedModel:
    """Load the network at ``path`` (run folder or checkpoint) as ``predict`` does, fused; a
    checkpoint whose forward pass is not finite is refused here, before anything listens
    (:class:`~resnetlab.inference.NonFiniteOutputError`)."""
    from resnetlab.checkpoint import resolve
    from resnetlab.inference import load_for_inference

    file = resolve(path)
    model, cfg, meta = load_for_inference(path, device=device)
    return ServedModel(model, cfg, meta, str(path), file, file_sha256(file),
                       sum(p.numel() for p in model.parameters()))


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------------- images


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
                                f"{max_pixels / 1e6:.1f} Mpixel (--max-pixels): refused as a possible "
                                "decompression bomb")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            raise ApiError(400, f"{name}: truncated or corrupt image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return img


def decode_and_prepare(data: bytes, name: str, meta: DataMeta, max_pixels: int) -> torch.Tensor:
    """Bytes -> uint8 ``[c, h, w]`` with the run's preprocessing (runs in the decode pool)."""
    img = decode_image(data, name, max_pixels)
    try:
        return prepare_pixels([img], meta)[0]
    except ImageTooLargeError as e:  # readable, but over a preprocessing limit: like --max-pixels
        raise ApiError(400, f"{name}: {e}") from None
    except (OSError, ValueError) as e:  # DataError is a ValueError too
        raise ApiError(415, f"{name}: unsupported image mode {img.mode} ({e})") from None


# ---------------------------------------------------------------------------------------------- app


class ServeApp:
    """State and handlers of one served model; :meth:`build` makes the Starlette app."""

    def __init__(self, served: ServedModel, max_batch: int = 16, max_wait_ms: float = 5.0,
                 limits: Limits | None = None, decode_workers: int | None = None) -> None:
        self.served = served
        self.limits = limits or Limits()
        self.ready = False
        # One model thread: forward passes never overlap (they would only fight for the cores).
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resnetlab-model")
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_workers or min(4, os.cpu_count() or 1),
                                              thread_name_prefix="resnetlab-decode")
        self.batcher = MicroBatcher(self._forward, self.model_pool, max_batch, max_wait_ms / 1000.0)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # All classes come back; each request cuts its own top-k.
        s = self.served
        return topk_pixels(s.model, s.meta, x, topk=s.meta.num_classes)

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.batcher.start()
        warm = asyncio.get_running_loop().create_task(self._warm_up())
        try:
            yield
        finally:  # uvicorn has drained the in-flight requests by now
            warm.cancel()
            await self.batcher.stop()
            self.model_pool.shutdown(wait=True)
            self.decode_pool.shutdown(wait=True)

    async def _warm_up(self) -> None:
        """One batch through the batcher and one Grad-CAM, then ready."""
        m = self.served.meta
        blank = torch.zeros(m.in_chans, *m.input_size, dtype=torch.uint8)
        try:
            probs, _ = await self.batcher.predict(blank)
            if not torch.isfinite(probs).all():  # a diverged checkpoint: answering would give 500s
                raise ValueError("the network's output is not finite (NaN or inf); its weights diverged")
            await asyncio.get_running_loop().run_in_executor(
                self.model_pool, explain_pixels, self.served.model, m, blank[None], ["warm-up"], None, 1)
        except Exception as e:  # stays not ready (503) and says why
            logging.getLogger("resnetlab.serve").error("warm-up failed, not ready: %s: %s",
                                                       type(e).__name__, e)
            return
        self.ready = True

    # ------------------------------------------------------------------ request parsing

    async def _body(self, request: Request) -> bytes:
        """The request body, at most ``--max-body-mb``; over it: 413.

        An oversized body is still read (and dropped) up to 4x the limit before the answer, so
        the client, which is usually still sending, reads the 413 instead of a reset connection;
        beyond that the connection is closed after the answer.
        """
        limit = int(self.limits.max_body_mb * 2**20)
        drain = 4 * limit
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else None
        too_big = f"over the limit of {_mb(limit)} (--max-body-mb)"
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

    async def _images(self, request: Request) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
        """``[(name, bytes)]`` and the form/query fields of a predict or explain request."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await self._body(request)
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

    def _topk(self, fields: dict[str, str]) -> int:
        text = fields.get("topk", "5")
        top = min(self.limits.max_topk, self.served.meta.num_classes)
        try:
            k = int(text)
        except ValueError:
            k = 0
        if not 1 <= k <= self.limits.max_topk:
            raise ApiError(400, f"topk={text!r}: expected an integer from 1 to {self.limits.max_topk}")
        return min(k, top)

    async def _prepare(self, request: Request, batched: bool
                       ) -> tuple[list[str], list[torch.Tensor], dict[str, str], int]:
        """Names, uint8 ``[c, h, w]`` pixels, fields and top-k of a request's images."""
        if not self.ready:
            raise ApiError(503, "the model is still warming up; retry when GET /readyz answers 200")
        images, fields = await self._images(request)
        if len(images) > self.limits.max_images:
            raise ApiError(413, f"{len(images)} images in one request; the limit is "
                                f"{self.limits.max_images} (--max-images)")
        loop = asyncio.get_running_loop()
        meta, max_px = self.served.meta, self.limits.max_pixels
        if batched:
            self.batcher.announce(len(images))  # the collector may wait for these
        try:
            jobs = [loop.run_in_executor(self.decode_pool, decode_and_prepare, data, name, meta, max_px)
                    for name, data in images]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for r in results:  # the first refused image names the reason
                if isinstance(r, BaseException):
                    raise r
            k = self._topk(fields)
        except BaseException:
            if batched:
                self.batcher.withdraw(len(images))
            raise
        return [n for n, _ in images], list(results), fields, k  # type: ignore[arg-type]

    def _header(self) -> dict[str, Any]:
        s = self.served
        return {"model": s.config.model.name, "run": s.source, "checkpoint_sha256": s.sha256}

    def _top(self, probs: list[float], ids: list[int]) -> list[dict[str, Any]]:
        classes = self.served.meta.classes
        return [{"label": classes[i], "index": i, "probability": p} for p, i in zip(probs, ids, strict=True)]

    # ------------------------------------------------------------------ handlers

    async def predict(self, request: Request) -> Response:
        names, pixels, _fields, k = await self._prepare(request, batched=True)
        answers = await asyncio.gather(*(self.batcher.predict(p) for p in pixels))
        results = [{"name": n, "top": self._top(probs[:k].tolist(), ids[:k].tolist())}
                   for n, (probs, ids) in zip(names, answers, strict=True)]
        return JSONResponse({**self._header(), "results": results})

    async def explain(self, request: Request) -> Response:
        names, pixels, fields, k = await self._prepare(request, batched=False)
        try:
            target = resolve_target(fields.get("target"), self.served.meta)
        except DataError as e:
            raise ApiError(400, str(e)) from None
        s = self.served
        explanations = await asyncio.get_running_loop().run_in_executor(
            self.model_pool, explain_pixels, s.model, s.meta, torch.stack(pixels), names, target, k)
        results = [{"name": e.file, "top": self._top(e.probs, e.indices),
                    "target": {"label": e.target_class, "index": e.target, "probability": e.target_prob},
                    "overlay_png": png_data_url(e.overlay)} for e in explanations]
        return JSONResponse({**self._header(), "results": results})

    async def model_info(self, _request: Request) -> Response:
        return JSONResponse({**self.served.info(), "ready": self.ready,
                             "limits": {"max_body_mb": self.limits.max_body_mb,
                                        "max_images": self.limits.max_images,
                                        "max_pixels": self.limits.max_pixels},
                             "batching": {"max_batch": self.batcher.max_batch,
                                          "max_wait_ms": self.batcher.max_wait_s * 1000.0,
                                          "batches": self.batcher.batches, "images": self.batcher.images}})

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ready"})
        return _error(503, "warming up")

    async def index(self, _request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ app

    def build(self) -> ASGIApp:
        """The Starlette app: routes, JSON errors, security headers on the page."""

        async def api_error(_r: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return _error(exc.status, exc.message)

        async def http_error(_r: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            return _error(exc.status_code, str(exc.detail))

        async def server_error(_r: Request, exc: Exception) -> Response:
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

        app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/v1/model", self.model_info),
                Route("/v1/predict", self.predict, methods=["POST"]),
                Route("/v1/explain", self.explain, methods=["POST"]),
                Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            ],
            exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
            lifespan=self.lifespan,
        )

        return _SecurityHeaders(app)


class _SecurityHeaders:
    """Pure ASGI wrapper adding CSP and nosniff to every response (no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"content-security-policy", _CSP.encode()),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(served: ServedModel, max_batch: int = 16, max_wait_ms: float = 5.0,
               limits: Limits | None = None) -> ASGIApp:
    """The ASGI app for ``served`` (see the module docstring for routes and limits)."""
    return ServeApp(served, max_batch, max_wait_ms, limits).build()


__all__ = ["ApiError", "Limits", "ServeApp", "ServedModel", "create_app", "decode_image",
           "file_sha256", "load_served_model"]
