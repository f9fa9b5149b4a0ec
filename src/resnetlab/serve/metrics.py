"""Prometheus metrics of ``resnetlab serve`` (``GET /metrics``) and the page's last-minute numbers.

Exposed in Prometheus' text format by ``prometheus-client``, from a registry of the app's own
(two apps in one process never share counters)::

    resnetlab_requests_total{route, method, status}      answered requests
    resnetlab_request_duration_seconds{route}            latency histogram (receive -> last byte)
    resnetlab_requests_in_flight                         requests being handled now
    resnetlab_queue_wait_seconds                         image queued -> its forward pass starts
    resnetlab_batch_size                                 realised images per forward pass
    resnetlab_forward_seconds                            one forward pass
    resnetlab_images_total                               images predicted (rate() gives images/s)
    resnetlab_images_per_second                          over the last 60 s, for a glance
    resnetlab_model_load_seconds                         loading the model at start-up
    resnetlab_model_info{model, backend, ...}            what is served

``route`` is the route's template (``/v2/models/{name}/infer``), never the raw path, so a client
probing random URLs cannot grow the label set (unmatched paths count as ``other``).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WINDOW_S = 60.0  # the page's "last minute"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Routes whose latency the page shows (the ones that run the network).
PREDICT_ROUTES = ("/v1/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

# The *_created series (a timestamp per label set) double the exposition and nobody graphs them.
disable_created_metrics()


class ServeMetrics:
    """The server's Prometheus metrics and a 60-second window of batches and latencies."""

    def __init__(self, labels: dict[str, str], load_seconds: float) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("resnetlab_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("resnetlab_request_duration_seconds",
                                 "Request latency from the first byte received to the last byte sent",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("resnetlab_requests_in_flight", "Requests being handled now", registry=r)
        self.queue_wait = Histogram("resnetlab_queue_wait_seconds",
                                    "Time an image waits in the micro-batcher before its forward pass",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("resnetlab_batch_size", "Images per forward pass (realised batch size)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.forward = Histogram("resnetlab_forward_seconds", "Duration of one forward pass",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("resnetlab_images", "Images predicted", registry=r)
        Gauge("resnetlab_images_per_second", f"Images predicted per second over the last {WINDOW_S:g} s",
              registry=r).set_function(lambda: self.last_minute()["images_per_second"])
        Gauge("resnetlab_model_load_seconds", "Seconds spent loading the model at start-up",
              registry=r).set(load_seconds)
        Info("resnetlab_model", "The model served", registry=r).info(labels)
        self._lock = threading.Lock()  # batches are recorded from the loop, read by scrapes
        self._batches: deque[tuple[float, int, float]] = deque()  # (time, size, forward s)
        self._latencies: deque[tuple[float, float]] = deque()  # (time, s) of predict requests

    # ------------------------------------------------------------------ recording

    def on_batch(self, size: int, waits: Sequence[float], forward_s: float) -> None:
        """The micro-batcher's observer: one forward pass of ``size`` images."""
        self.batch_size.observe(size)
        self.forward.observe(forward_s)
        self.images.inc(size)
        for w in waits:
            self.queue_wait.observe(max(0.0, w))
        with self._lock:
            self._batches.append((time.monotonic(), size, forward_s))

    def on_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if route in PREDICT_ROUTES and status == 200:
            with self._lock:
                self._latencies.append((time.monotonic(), seconds))

    # ------------------------------------------------------------------ reading

    def last_minute(self) -> dict[str, Any]:
        """Batches, images/s and predict latency over the last :data:`WINDOW_S` seconds."""
        cutoff = time.monotonic() - WINDOW_S
        with self._lock:
            for q in (self._batches, self._latencies):
                while q and q[0][0] < cutoff:
                    q.popleft()
            sizes = [n for _, n, _ in self._batches]
            lat = sorted(s for _, s in self._latencies)

        def pct(p: float) -> float | None:  # nearest-rank percentile, ms
            return None if not lat else 1000.0 * lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))]

        return {"window_s": WINDOW_S, "batches": len(sizes), "images": sum(sizes),
                "images_per_second": sum(sizes) / WINDOW_S,
                "mean_batch_size": statistics.fmean(sizes) if sizes else None,
                "max_batch_size": max(sizes) if sizes else None,
                "requests": len(lat), "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99)}}

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """``(body, content type)`` of ``GET /metrics``, in the format the scraper's ``Accept``
        header asks for (Prometheus text, or OpenMetrics), as prometheus-client negotiates it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class MetricsMiddleware:
    """Pure ASGI wrapper: counts requests by route template and status, times them, in flight."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", "other"))
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]  # what the client sees if the app dies before answering

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.on_request(self._route(scope), scope.get("method", ""), status[0],
                                    time.perf_counter() - start)


__all__ = ["MetricsMiddleware", "ServeMetrics", "WINDOW_S"]
