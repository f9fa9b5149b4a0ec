"""Serving a trained run over HTTP."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from resnetlab.params import for_cli


def _bounded(param: str) -> Callable[[str], int | float]:
    """argparse ``type=`` for the flag that sets ``param`` (its ``dest``): the parameter's bound
    from resnetlab.serve.options (checked before anything loads; the library call checks the same
    bounds again). Imported when a serve flag is parsed, not when the parser is built: other
    commands never load the server."""
    def parse(text: str) -> int | float:
        from resnetlab.serve.options import BOUNDS

        return BOUNDS[param].argtype()(text)

    parse.__name__ = param
    return parse


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--backend, --model-file and --no-centre: shared by serve and predict."""
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="what runs the network: torch (default) or onnxruntime (CPU; the .onnx that "
                        "`resnetlab export --format onnx` or `resnetlab quantize` wrote)")
    p.add_argument("--model-file", metavar="FILE.onnx",
                   help="onnxruntime: the model file to run (default <run>/<arch>.onnx; e.g. the "
                        "<arch>.int8.onnx of resnetlab quantize)")
    p.add_argument("--no-centre", dest="centre", action="store_false",
                   help="digit-like runs (digits, MNIST, Fashion-MNIST): do not crop images to their "
                        "ink and centre it as the dataset was framed (the answer's preprocess field "
                        "says what was done)")


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP API + web page for a trained network (127.0.0.1:8000)",
                       description="Serve a run (or checkpoint): POST /v1/predict, POST /v1/explain, "
                                   "GET /v1/model, /healthz, /readyz, a web page at /, the Open "
                                   "Inference Protocol v2 (/v2/...: KServe, Triton clients) and "
                                   "Prometheus metrics at /metrics. Listens on "
                                   "127.0.0.1 only unless --host says otherwise. SIGTERM or Ctrl-C "
                                   "finishes the requests in flight and exits 0.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder, checkpoint file, or latest (the newest run in runs/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes "
                        "the server to the network)")
    p.add_argument("--port", type=_bounded("port"), default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")
    p.add_argument("--max-batch", type=_bounded("max_batch"), default=16,
                   help="images per forward pass at most (default 16; 1 turns micro-batching off)")
    p.add_argument("--max-wait-ms", type=_bounded("max_wait_ms"), default=5.0,
                   help="how long a batch waits for more images after its first, ms (default 5)")
    p.add_argument("--max-body-mb", type=_bounded("max_body_mb"), default=10.0,
                   help="largest request body, MiB (default 10; larger: 413)")
    p.add_argument("--max-images", type=_bounded("max_images"), default=32,
                   help="images in one request at most (default 32; more: 413)")
    p.add_argument("--max-pixels", type=_bounded("max_pixels"), default=40_000_000,
                   help="pixels (w*h) of one image at most (default 40e6; more: 400, a likely "
                        "decompression bomb)")
    p.add_argument("--threads", type=_bounded("threads"),
                   help="torch CPU threads for the network (default: one per core; 1 is steadier on a "
                        "machine shared with other busy processes)")
    add_backend_options(p)
    p.add_argument("--model-name", metavar="NAME",
                   help="the model's name in the v2 protocol's URLs (/v2/models/NAME/infer; default: "
                        "the run folder's name)")
    p.add_argument("--header-timeout-s", dest="header_s", type=_bounded("header_s"),
                   metavar="HEADER_TIMEOUT_S", default=10.0,
                   help="a request's head must arrive within this many seconds of the connection (or of "
                        "the previous answer); else 408 and the connection is closed (default 10)")
    p.add_argument("--body-timeout-s", dest="body_s", type=_bounded("body_s"),
                   metavar="BODY_TIMEOUT_S", default=60.0,
                   help="a request's body must arrive within this many seconds of its head; else 408 "
                        "and the connection is closed (default 60)")
    p.add_argument("--keep-alive-s", type=_bounded("keep_alive_s"), default=5,
                   help="an idle keep-alive connection is closed after this many seconds (default 5)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default warning; info logs every request)")


def run_serve(args: argparse.Namespace) -> int:
    from resnetlab.serve import Limits, Timeouts, serve

    limits = Limits(max_body_mb=args.max_body_mb, max_images=args.max_images, max_pixels=args.max_pixels)
    # every dest is the library's parameter name, so its errors translate to flags exactly
    timeouts = Timeouts(header_s=args.header_s, body_s=args.body_s, keep_alive_s=args.keep_alive_s)
    try:
        return serve(args.path, host=args.host, port=args.port, device=args.device,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits,
                     log_level=args.log_level, threads=args.threads, timeouts=timeouts,
                     backend=args.backend, model_file=args.model_file, model_name=args.model_name,
                     centre=args.centre)
    except OSError as e:
        print(f"resnetlab serve: error: {for_cli(e, getattr(args, '_flags', {}))}", file=sys.stderr)
        return 1


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "serve": (add_serve, run_serve),
}
