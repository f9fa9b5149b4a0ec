"""``resnetlab serve``: a trained network behind an HTTP API and a web page.

    resnetlab serve runs/digits                  # http://127.0.0.1:8000
    curl -F file=@digit.png http://127.0.0.1:8000/v1/predict

Built on Starlette (the ASGI app, :mod:`resnetlab.serve.app`) and uvicorn (the HTTP server).
Concurrent requests are micro-batched (:mod:`resnetlab.serve.batcher`); the network runs on a
backend (:mod:`resnetlab.serve.backends`: torch or onnxruntime); the Open Inference Protocol v2
routes (:mod:`resnetlab.serve.v2`) serve KServe/Triton clients; ``GET /metrics`` is Prometheus'
(:mod:`resnetlab.serve.metrics`). SIGTERM or Ctrl-C stops accepting, finishes the requests in
flight, and exits 0.
"""

from __future__ import annotations

import signal
from pathlib import Path

from resnetlab.serve.app import (
    ApiError,
    Limits,
    ServeApp,
    ServedModel,
    create_app,
    load_served_model,
)
from resnetlab.serve.backends import BackendName
from resnetlab.serve.options import ServeOptionError, check_options
from resnetlab.serve.timeouts import Timeouts, server_config


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          max_batch: int = 16, max_wait_ms: float = 5.0, limits: Limits | None = None,
          log_level: str = "warning", graceful_timeout_s: int | None = 30,
          threads: int | None = None, timeouts: Timeouts | None = None, backend: BackendName = "torch",
          model_file: str | Path | None = None, model_name: str | None = None, centre: bool = True) -> int:
    """Load the network at ``path`` and serve it until SIGTERM/SIGINT; returns the exit code 0.

    Loading errors (a missing run, a broken checkpoint) raise before anything listens.
    ``graceful_timeout_s`` bounds how long shutdown waits for requests in flight (whole seconds,
    as uvicorn takes it; None: no bound). ``threads`` sets the backend's intra-op CPU threads
    (default: one per core). ``timeouts``: the slow-client deadlines
    (:class:`~resnetlab.serve.timeouts.Timeouts`). Every option is checked first
    (:func:`~resnetlab.serve.options.check_options`: ``ServeOptionError`` naming the parameter).
    ``backend``: ``torch`` or ``onnxruntime`` (``model_file``: the ``.onnx`` to run, default
    ``<run>/<arch>.onnx``). ``model_name``: the v2 protocol's name (default: the run folder's
    name). ``centre``: digit-like runs frame the ink as their dataset did (see
    :func:`resnetlab.predict.centre_ink`).
    """
    import torch
    import uvicorn

    limits, timeouts = limits or Limits(), timeouts or Timeouts()
    check_options(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, limits=limits,
                  timeouts=timeouts, threads=threads, log_level=log_level)
    if threads:
        torch.set_num_threads(threads)
    served = load_served_model(path, device=device, backend=backend, model_file=model_file,
                               model_name=model_name, centre=centre, threads=threads)
    state = ServeApp(served, max_batch=max_batch, max_wait_ms=max_wait_ms, limits=limits)
    app = state.build()
    config = server_config(app, host, port, timeouts, log_level=log_level, lifespan="on",
                           timeout_graceful_shutdown=graceful_timeout_s, server_header=False)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {served.backend.arch} from {path} as {served.name!r} on http://{shown}:{port} "
          f"({served.backend.name}, max batch {max_batch}, max wait {max_wait_ms:g} ms; "
          f"v2 at /v2/models/{served.name}, metrics at /metrics); Ctrl-C or SIGTERM stops", flush=True)
    # uvicorn drains the requests in flight, then re-raises the signal it caught so the process
    # dies of it; with these no-op handlers in place that re-raise is a no-op and we exit 0.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: caught.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (see the message above)")
    print(f"stopped ({', '.join(signal.Signals(s).name for s in dict.fromkeys(caught)) or 'shut down'}); "
          f"answered {state.batcher.images} images", flush=True)
    return 0


__all__ = ["ApiError", "Limits", "ServeApp", "ServeOptionError", "ServedModel", "Timeouts", "create_app",
           "load_served_model", "serve"]
