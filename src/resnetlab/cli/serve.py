"""Serving a trained run over HTTP."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _positive(kind: type, name: str) -> Callable[[str], float]:
    def parse(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got {text!r}") from None
        if value <= 0 and not (name == "--max-wait-ms" and value == 0):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value

    return parse

def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP API + web page for a trained network (127.0.0.1:8000)",
                       description="Serve a run (or checkpoint): POST /v1/predict, POST /v1/explain, "
                                   "GET /v1/model, /healthz, /readyz, and a web page at /. Listens on "
                                   "127.0.0.1 only unless --host says otherwise. SIGTERM or Ctrl-C "
                                   "finishes the requests in flight and exits 0.")
    p.add_argument("path", metavar="RUN|CKPT", help="run folder or checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes "
                        "the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="cpu", help="torch device, or auto (default cpu)")
    p.add_argument("--max-batch", type=_positive(int, "--max-batch"), default=16,
                   help="images per forward pass at most (default 16; 1 turns micro-batching off)")
    p.add_argument("--max-wait-ms", type=_positive(float, "--max-wait-ms"), default=5.0,
                   help="how long a batch waits for more images after its first, ms (default 5)")
    p.add_argument("--max-body-mb", type=_positive(float, "--max-body-mb"), default=10.0,
                   help="largest request body, MiB (default 10; larger: 413)")
    p.add_argument("--max-images", type=_positive(int, "--max-images"), default=32,
                   help="images in one request at most (default 32; more: 413)")
    p.add_argument("--max-pixels", type=_positive(int, "--max-pixels"), default=40_000_000,
                   help="pixels (w*h) of one image at most (default 40e6; more: 400, a likely "
                        "decompression bomb)")
    p.add_argument("--threads", type=_positive(int, "--threads"),
                   help="torch CPU threads for the network (default: one per core; 1 is steadier on a "
                        "machine shared with other busy processes)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default warning; info logs every request)")

def run_serve(args: argparse.Namespace) -> int:
    from resnetlab.serve import Limits, serve

    limits = Limits(max_body_mb=args.max_body_mb, max_images=args.max_images, max_pixels=args.max_pixels)
    try:
        return serve(args.path, host=args.host, port=args.port, device=args.device,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits,
                     log_level=args.log_level, threads=args.threads)
    except OSError as e:
        print(f"resnetlab serve: error: {e}", file=sys.stderr)
        return 1


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "serve": (add_serve, run_serve),
}
