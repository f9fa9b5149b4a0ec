"""The ASGI app of ``resnetlab serve`` (Starlette): JSON API, web page, limits, readiness.

Routes::

    GET  /                 the web page (static/index.html, app.js, style.css: no CDN, no build)
    GET  /healthz          200 while the process serves
    GET  /readyz           200 once the weights are loaded and a warm-up batch ran, else 503
    GET  /v1/model         name, classes, input size, mean/std, parameters, checkpoint SHA-256
    GET  /v1/stats         the last minute: realised batch sizes, images/s, latency (the page)
    POST /v1/predict       top-k per image           (?topk=5)
    POST /v1/explain       top-k + Grad-CAM overlay over the image as given, aligned, and over
                           the network's view               (?topk=5&target=CLASS)
    GET  /metrics          Prometheus text format (:mod:`resnetlab.serve.metrics`)
    /v2/...                the Open Inference Protocol v2 (:mod:`resnetlab.serve.v2`):
                           health/live, health/ready, server and model metadata, model ready,
                           models/{name}[/versions/1]/infer (JSON or binary tensor data)

An image is sent as a raw body with an ``image/*`` content type, or as one or more file parts
of ``multipart/form-data``; reading it against the :class:`~resnetlab.serve.request.Limits` is
:mod:`resnetlab.serve.request`'s. Every error is JSON ``{"error": "...", "status": N}``. Preprocessing is the run's own
(the backend's ``preprocess``: :func:`resnetlab.predict.prepare_image`, the one ``predict``
uses) and runs in a thread pool; the network (a :mod:`~resnetlab.serve.backends` backend: torch
or onnxruntime, the routes do not know which) runs in one model thread behind a
:class:`~resnetlab.serve.batcher.MicroBatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnetlab.data import DataError, DataMeta
from resnetlab.explain import overlay, png_data_url, resolve_target
from resnetlab.inference import top_classes
from resnetlab.params import named
from resnetlab.prepare import INK_FRAMES
from resnetlab.serve import v2
from resnetlab.serve.backends import Backend, BackendName, PreparedImage, file_sha256, make_backend
from resnetlab.serve.batcher import MicroBatcher
from resnetlab.serve.errors import ApiError
from resnetlab.serve.metrics import MetricsMiddleware, ServeMetrics
from resnetlab.serve.overlay import overlay_on_image
from resnetlab.serve.request import (
    Limits,
    check_image_count,
    decode_and_prepare,
    decode_image,
    inflate,
    parse_topk,
    read_body,
    read_images,
)

STATIC_DIR = Path(str(resources.files("resnetlab.serve") / "static"))
# The page loads only its own files; images come back as data: URLs, drawings as blob:.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'")


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def default_model_name(source: str | Path) -> str:
    """The Open Inference Protocol's model name for ``source``: the run folder's name (the
    checkpoint's folder for a run's checkpoint, else the file's stem), made URL-safe."""
    p = Path(source).expanduser().resolve()
    if p.is_file():
        p = p.parent.parent if p.parent.name == "checkpoints" else p.with_name(p.name.split(".")[0])
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", p.name).strip("-.") or "model"
    return name[:128]


def check_model_name(name: str) -> str:
    """``name`` if it can stand in a URL path segment, else a one-line :class:`DataError`."""
    if not _MODEL_NAME.fullmatch(name):
        raise named(DataError, "model_name", f"must be letters, digits, '_', '.' and '-' (at most 128, "
                    f"starting with a letter or digit), got {name!r}")
    return name


@dataclass
class ServedModel:
    """A loaded backend and the name clients call it by."""

    backend: Backend
    source: str  # the run folder or checkpoint the user named
    name: str  # the Open Inference Protocol model name

    @property
    def meta(self) -> DataMeta:
        return self.backend.meta

    @property
    def checkpoint(self) -> Path:
        return self.backend.file

    @property
    def sha256(self) -> str:
        return self.backend.sha256

    def info(self) -> dict[str, Any]:
        """The ``GET /v1/model`` answer."""
        b, m = self.backend, self.backend.meta
        return {"model": b.arch, "name": self.name, "run": self.source, "checkpoint": str(b.file),
                "checkpoint_sha256": b.sha256, "parameters": b.parameters, "dataset": m.name,
                "classes": list(m.classes), "num_classes": m.num_classes, "in_chans": m.in_chans,
                "input_size": list(m.input_size), "mean": list(m.mean), "std": list(m.std),
                "resize": m.resize, **b.describe(), "invert": b.invert, "centre": b.centre,
                "digit_like": m.name in INK_FRAMES and m.in_chans == 1}


def load_served_model(path: str | Path, device: str = "cpu", backend: BackendName = "torch",
                      model_file: str | Path | None = None, model_name: str | None = None,
                      centre: bool = True, threads: int | None = None) -> ServedModel:
    """Load the network at ``path`` (run folder or checkpoint; for onnxruntime also a ``.onnx``
    file) with ``backend``, as ``predict`` does. A network whose forward pass is not finite is
    refused here, before anything listens (:meth:`~resnetlab.serve.backends.Backend.load`)."""
    name = check_model_name(model_name) if model_name is not None else default_model_name(path)  # before loading
    b = make_backend(path, backend, device=device, model_file=model_file, centre=centre,
                     threads=threads).load()
    return ServedModel(b, str(path), name)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


# ---------------------------------------------------------------------------------------------- app


class ServeApp:
    """State and handlers of one served model; :meth:`build` makes the Starlette app."""

    def __init__(self, served: ServedModel, max_batch: int = 16, max_wait_ms: float = 5.0,
                 limits: Limits | None = None, decode_workers: int | None = None) -> None:
        self.served = served
        self.backend = served.backend
        self.limits = limits or Limits()
        self.ready = False
        b = self.backend
        self.metrics = ServeMetrics({"model": b.arch, "name": served.name, "backend": b.name,
                                     "dataset": b.meta.name, "sha256": b.sha256}, b.load_seconds)
        # One model thread: forward passes never overlap (they would only fight for the cores).
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resnetlab-model")
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_workers or min(4, os.cpu_count() or 1),
                                              thread_name_prefix="resnetlab-decode")
        self.batcher = MicroBatcher(b.predict_batch, self.model_pool, max_batch, max_wait_ms / 1000.0,
                                    on_batch=self.metrics.on_batch)

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
        """One batch through the batcher and (where the backend can) one Grad-CAM, then ready."""
        m = self.backend.meta
        blank = torch.zeros(m.in_chans, *m.input_size, dtype=torch.uint8)
        try:
            # the output's finiteness was checked once, when the backend loaded (Backend.load)
            await self.batcher.predict(torch.zeros(blank.shape))
            if self.backend.explains:  # Grad-CAM's first backward pass allocates too
                await asyncio.get_running_loop().run_in_executor(self.model_pool, self.backend.cams, blank[None], [0])
        except Exception as e:  # stays not ready (503) and says why
            logging.getLogger("resnetlab.serve").error("warm-up failed, not ready: %s: %s",
                                                       type(e).__name__, e)
            return
        self.ready = True

    # ------------------------------------------------------------------ request parsing

    def _check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "the model is still warming up; retry when GET /readyz answers 200")

    async def _decode_all(self, images: list[tuple[str, bytes]], batched: bool) -> list[PreparedImage]:
        """Decode and preprocess in the decode pool; the first refused image names the reason."""
        check_image_count(len(images), self.limits.max_images)
        loop = asyncio.get_running_loop()
        if batched:
            self.batcher.announce(len(images))  # the collector may wait for these
        try:
            jobs = [loop.run_in_executor(self.decode_pool, decode_and_prepare, data, name, self.backend,
                                         self.limits.max_pixels) for name, data in images]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        except BaseException:
            if batched:
                self.batcher.withdraw(len(images))
            raise
        return list(results)  # type: ignore[arg-type]

    async def _prepare(self, request: Request, batched: bool
                       ) -> tuple[list[str], list[PreparedImage], dict[str, str], int]:
        """Names, prepared images, fields and top-k of a request's images."""
        self._check_ready()
        images, fields = await read_images(request, self.limits)
        prepared = await self._decode_all(images, batched)
        try:
            k = parse_topk(fields, self.limits, self.backend.meta.num_classes)
        except ApiError:
            if batched:
                self.batcher.withdraw(len(images))
            raise
        return [n for n, _ in images], prepared, fields, k

    def _header(self) -> dict[str, Any]:
        s = self.served
        return {"model": self.backend.arch, "run": s.source, "checkpoint_sha256": s.sha256,
                "backend": self.backend.name}

    def _top(self, probs: list[float], ids: list[int]) -> list[dict[str, Any]]:
        classes = self.backend.meta.classes
        return [{"label": classes[i], "index": i, "probability": p} for p, i in zip(probs, ids, strict=True)]

    # ------------------------------------------------------------------ v1 handlers

    async def predict(self, request: Request) -> Response:
        names, prepared, _fields, k = await self._prepare(request, batched=True)
        answers = await asyncio.gather(*(self.batcher.predict(p.x) for p in prepared))
        results = []
        for n, p, (probs, batch) in zip(names, prepared, answers, strict=True):
            values, ids = top_classes(probs[None], k)  # one image's [classes] -> [1, k]
            results.append({"name": n, "top": self._top(values[0].tolist(), ids[0].tolist()),
                            "inverted": p.inverted, "preprocess": p.preprocess, "batch_size": batch})
        return JSONResponse({**self._header(), "results": results})

    async def explain(self, request: Request) -> Response:
        if not self.backend.explains:
            raise ApiError(501, f"Grad-CAM needs gradients: the {self.backend.name} backend has none; "
                                "serve with the torch backend to explain")
        names, prepared, fields, k = await self._prepare(request, batched=False)
        try:
            target = resolve_target(fields.get("target"), self.backend.meta)
        except DataError as e:
            raise ApiError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        b = self.backend
        probs = await loop.run_in_executor(self.model_pool, b.predict_batch, torch.stack([p.x for p in prepared]))
        top_p, top_i = top_classes(probs, k)  # [n, k] each
        targets = [target if target is not None else int(i[0]) for i in top_i]
        cams = await loop.run_in_executor(self.model_pool, b.cams, torch.stack([p.pixels for p in prepared]),
                                          targets)  # [n, h, w]

        def draw(i: int) -> tuple[str, str]:  # over the image as given, and over the network's view
            p = prepared[i]
            return (png_data_url(overlay_on_image(p.source, cams[i], p.geometry)),
                    png_data_url(overlay(p.pixels, cams[i])))

        drawn = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, draw, i) for i in range(len(prepared))))
        classes = b.meta.classes
        results = [{"name": n, "top": self._top(vals, ids),
                    "target": {"label": classes[t], "index": t, "probability": float(probs[i, t])},
                    "overlay_png": on_image, "network_overlay_png": on_input, "inverted": p.inverted,
                    "preprocess": p.preprocess}
                   for i, (n, p, vals, ids, t, (on_image, on_input)) in enumerate(zip(
                       names, prepared, top_p.tolist(), top_i.tolist(), targets, drawn, strict=True))]
        return JSONResponse({**self._header(), "results": results})

    async def model_info(self, _request: Request) -> Response:
        return JSONResponse({**self.served.info(), "ready": self.ready,
                             "limits": {"max_body_mb": self.limits.max_body_mb,
                                        "max_images": self.limits.max_images,
                                        "max_pixels": self.limits.max_pixels},
                             "batching": {"max_batch": self.batcher.max_batch,
                                          "max_wait_ms": self.batcher.max_wait_s * 1000.0,
                                          "batches": self.batcher.batches, "images": self.batcher.images}})

    async def stats(self, _request: Request) -> Response:
        return JSONResponse({**self.metrics.last_minute(), "max_batch": self.batcher.max_batch,
                             "batches_total": self.batcher.batches, "images_total": self.batcher.images})

    async def prometheus(self, request: Request) -> Response:
        body, ctype = self.metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=ctype)

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ready"})
        return _error(503, "warming up")

    async def index(self, _request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ Open Inference Protocol v2

    def _v2_model(self, request: Request) -> None:
        """404 unless the path names the served model (and, if given, its one version)."""
        name = request.path_params.get("name")
        version = request.path_params.get("version")
        if name != self.served.name:
            raise ApiError(404, f"unknown model {name!r}; this server serves {self.served.name!r}")
        if version is not None and version != v2.VERSION:
            raise ApiError(404, f"model {name!r} has no version {version!r}; its version is {v2.VERSION!r}")

    async def v2_server(self, _request: Request) -> Response:
        return JSONResponse(v2.server_metadata())

    async def v2_live(self, _request: Request) -> Response:
        return JSONResponse({"live": True})

    async def v2_ready(self, _request: Request) -> Response:
        # Triton answers 400 while not ready; probes only look at 200 or not.
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 400)

    async def v2_model_ready(self, request: Request) -> Response:
        self._v2_model(request)
        return JSONResponse({"name": self.served.name, "ready": self.ready},
                            status_code=200 if self.ready else 400)

    async def v2_model(self, request: Request) -> Response:
        self._v2_model(request)
        return JSONResponse(v2.model_metadata(self.served.name, self.backend.platform, self.backend.meta))

    async def v2_infer(self, request: Request) -> Response:
        self._v2_model(request)
        self._check_ready()
        body = inflate(request, await read_body(request, self.limits), self.limits)
        doc, tail = v2.split_body(body, request.headers.get(v2.HEADER_LENGTH))
        meta = self.backend.meta
        req = v2.parse_infer(doc, tail, meta, self.limits.max_images)
        if req.tensor is not None:
            xs = list(req.tensor)  # [c, h, w] each, already normalised
            self.batcher.announce(len(xs))
        else:
            xs = [p.x for p in await self._decode_all(
                [(f"{v2.INPUT_BYTES}[{i}]", data) for i, data in enumerate(req.images)], batched=True)]
        answers = await asyncio.gather(*(self.batcher.predict(x) for x in xs))
        probs = torch.stack([p for p, _ in answers])  # [N, classes]
        payload, headers = v2.encode_infer(req, self.served.name, probs, meta.classes)
        ctype = headers.pop("content-type")
        return Response(payload, media_type=ctype, headers=headers)

    # ------------------------------------------------------------------ app

    def build(self) -> ASGIApp:
        """The Starlette app: routes, JSON errors, metrics, security headers on the page."""

        async def api_error(_r: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return _error(exc.status, exc.message)

        async def http_error(_r: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            return _error(exc.status_code, str(exc.detail))

        async def server_error(_r: Request, exc: Exception) -> Response:
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

        model = "/v2/models/{name}"
        version = model + "/versions/{version}"
        app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.prometheus),
                Route("/v1/model", self.model_info),
                Route("/v1/stats", self.stats),
                Route("/v1/predict", self.predict, methods=["POST"]),
                Route("/v1/explain", self.explain, methods=["POST"]),
                Route("/v2", self.v2_server),
                Route("/v2/health/live", self.v2_live),
                Route("/v2/health/ready", self.v2_ready),
                Route(model, self.v2_model),
                Route(version, self.v2_model),
                Route(model + "/ready", self.v2_model_ready),
                Route(version + "/ready", self.v2_model_ready),
                Route(model + "/infer", self.v2_infer, methods=["POST"]),
                Route(version + "/infer", self.v2_infer, methods=["POST"]),
                Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            ],
            exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
            lifespan=self.lifespan,
        )

        return _SecurityHeaders(MetricsMiddleware(app, self.metrics, lambda: app.routes))


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


__all__ = ["ApiError", "Limits", "ServeApp", "ServedModel", "check_model_name", "create_app", "decode_image",
           "default_model_name", "file_sha256", "load_served_model"]
