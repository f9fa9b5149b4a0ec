"""Every ``resnetlab serve`` option checked up front, before the model loads or a port opens.

One :class:`~resnetlab.bounds.Bound` per numeric flag (:data:`BOUNDS`): the CLI parses with them
(argparse ``type=``) and :func:`check_options` runs them again for library callers of
:func:`resnetlab.serve.serve`, so ``--port 70000`` or ``--max-body-mb nan`` is one line naming
the flag, never a traceback at bind time or a server that answers 500.
"""

from __future__ import annotations

from resnetlab.bounds import Bound, BoundError
from resnetlab.config import ConfigError
from resnetlab.serve.app import Limits
from resnetlab.serve.timeouts import Timeouts

#: flag -> its bound. Upper bounds keep one request's work and memory in reach of one machine.
BOUNDS: dict[str, Bound] = {b.name: b for b in (
    Bound("--port", 1, 65535, why="a TCP port"),
    Bound("--max-batch", 1, 4096),
    Bound("--max-wait-ms", 0, 10_000, integer=False, why="10 s"),
    Bound("--max-body-mb", 0, 1024, integer=False, low_open=True, why="MiB; 1 GiB at most"),
    Bound("--max-images", 1, 4096),
    # Pillow itself refuses images over 2 * Image.MAX_IMAGE_PIXELS (~179 M) as bombs.
    Bound("--max-pixels", 1, 178_956_970, why="Pillow's own decompression-bomb limit"),
    Bound("--threads", 1, 1024),
    Bound("--header-timeout-s", 0, 3600, integer=False, low_open=True, why="one hour"),
    Bound("--body-timeout-s", 0, 3600, integer=False, low_open=True, why="one hour"),
    Bound("--keep-alive-s", 1, 3600, why="whole seconds, as uvicorn takes them"),
)}

LOG_LEVELS = ("debug", "info", "warning", "error")


class ServeOptionError(BoundError, ConfigError):
    """A serve option is out of range or malformed; the message names the flag (a ConfigError,
    so the CLI prints it as one line and exits 2)."""


def check_options(*, host: str, port: int, max_batch: int, max_wait_ms: float, limits: Limits,
                  timeouts: Timeouts, threads: int | None, log_level: str) -> None:
    """Raise :class:`ServeOptionError` naming the first bad option; return None when all are good."""
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise ServeOptionError(f"--host must be an address such as 127.0.0.1 or 0.0.0.0, got {host!r}")
    if log_level not in LOG_LEVELS:
        raise ServeOptionError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    values = {"--port": port, "--max-batch": max_batch, "--max-wait-ms": max_wait_ms,
              "--max-body-mb": limits.max_body_mb, "--max-images": limits.max_images,
              "--max-pixels": limits.max_pixels, "--threads": threads,
              "--header-timeout-s": timeouts.header_s, "--body-timeout-s": timeouts.body_s,
              "--keep-alive-s": timeouts.keep_alive_s}
    for flag, value in values.items():
        if value is None and flag == "--threads":  # default: one per core
            continue
        try:
            BOUNDS[flag].check(value)
        except BoundError as e:
            raise ServeOptionError(str(e)) from None


__all__ = ["BOUNDS", "LOG_LEVELS", "ServeOptionError", "check_options"]
