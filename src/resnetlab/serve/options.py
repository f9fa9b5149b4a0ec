"""Every ``resnetlab serve`` option checked up front, before the model loads or a port opens.

One :class:`~resnetlab.bounds.Bound` per numeric parameter (:data:`BOUNDS`, keyed by the Python
name: ``max_batch``, ``max_body_mb``, ``header_s`` ...): the CLI parses with them (argparse
``type=``) and :func:`check_options` runs them again for library callers of
:func:`resnetlab.serve.serve`, so ``port=70000`` or ``max_body_mb=nan`` is one line naming the
parameter (the CLI shows its flag, ``--port``: :mod:`resnetlab.params`), never a traceback at bind
time or a server that answers 500.
"""

from __future__ import annotations

from resnetlab.bounds import Bound, BoundError
from resnetlab.config import ConfigError
from resnetlab.params import named, param_of
from resnetlab.serve.request import Limits
from resnetlab.serve.timeouts import Timeouts

#: parameter -> its bound. Upper bounds keep one request's work and memory in reach of one machine.
#: The names are serve()'s keywords and the fields of Limits and Timeouts; the CLI's dests match.
BOUNDS: dict[str, Bound] = {b.name: b for b in (
    Bound("port", 1, 65535, why="a TCP port"),
    Bound("max_batch", 1, 4096),
    Bound("max_wait_ms", 0, 10_000, integer=False, why="10 s"),
    Bound("max_body_mb", 0, 1024, integer=False, low_open=True, why="MiB; 1 GiB at most"),
    Bound("max_images", 1, 4096),
    # Pillow itself refuses images over 2 * Image.MAX_IMAGE_PIXELS (~179 M) as bombs.
    Bound("max_pixels", 1, 178_956_970, why="Pillow's own decompression-bomb limit"),
    Bound("threads", 1, 1024),
    Bound("header_s", 0, 3600, integer=False, low_open=True, why="one hour"),
    Bound("body_s", 0, 3600, integer=False, low_open=True, why="one hour"),
    Bound("keep_alive_s", 1, 3600, why="whole seconds, as uvicorn takes them"),
)}

LOG_LEVELS = ("debug", "info", "warning", "error")


class ServeOptionError(BoundError, ConfigError):
    """A serve option is out of range or malformed; the message names the parameter (a
    ConfigError, so the CLI prints it as one line, with the flag, and exits 2)."""


def check_options(*, host: str, port: int, max_batch: int, max_wait_ms: float, limits: Limits,
                  timeouts: Timeouts, threads: int | None, log_level: str) -> None:
    """Raise :class:`ServeOptionError` naming the first bad option; return None when all are good."""
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise named(ServeOptionError, "host", f"must be an address such as 127.0.0.1 or 0.0.0.0, got {host!r}")
    if log_level not in LOG_LEVELS:
        raise named(ServeOptionError, "log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    values = {"port": port, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
              "max_body_mb": limits.max_body_mb, "max_images": limits.max_images,
              "max_pixels": limits.max_pixels, "threads": threads,
              "header_s": timeouts.header_s, "body_s": timeouts.body_s, "keep_alive_s": timeouts.keep_alive_s}
    for param, value in values.items():
        if value is None and param == "threads":  # default: one per core
            continue
        try:
            BOUNDS[param].check(value)
        except BoundError as e:
            raise named(ServeOptionError, param_of(e) or param, getattr(e, "detail", str(e))) from None


__all__ = ["BOUNDS", "LOG_LEVELS", "ServeOptionError", "check_options"]
