"""Writing the files that ``export``, ``import`` and ``eval`` produce: never over a run's
checkpoint, never over an existing file without ``force``, and operating-system errors as one
line that names the path (disk full, read-only folder, permission denied, a file where a
folder should be).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from resnetlab.checkpoint import CHECKPOINT_DIR, atomic_write
from resnetlab.config import ConfigError
from resnetlab.params import mention


class OutputError(ConfigError):
    """An output path is refused (it exists, or it is a run's checkpoint); nothing was written."""


class OutputWriteError(OSError):
    """The operating system refused a write; ``str()`` is one line naming the path."""

    def __str__(self) -> str:  # a write, known to be one: its permission hint says so
        hint = _WRITE_DENIED if self.errno in (errno.EACCES, errno.EPERM) else _HINTS.get(self.errno or 0, "")
        return f"{self.filename}: {self.strerror}{hint}"


_HINTS = {
    errno.ENOSPC: " (disk full: free space or write elsewhere; nothing already saved was changed)",
    errno.EDQUOT: " (disk quota exceeded; nothing already saved was changed)",
    errno.EROFS: " (read-only file system: write elsewhere)",
    errno.ENOTDIR: " (a file stands where a folder should be)",
    errno.EEXIST: " (a file stands where a folder should be)",
}


_EFFECTIVE = os.access in os.supports_effective_ids  # judge as the process acts (set-uid, seteuid)
_WRITE_DENIED = " (no permission to write there: write elsewhere)"


def _denied(where: str | Path | None) -> str:
    """What a permission error on ``where`` denied, read from the path's own permissions (an
    OSError does not say whether it was a read or a write)."""
    if where is None:
        return " (permission denied)"
    p = Path(where)
    try:
        return _denied_at(p)
    except OSError:  # cannot even look at it: a folder on the way is closed to us
        return " (no permission to read it, or a folder above it: check their owner and mode)"


def _can(p: Path, mode: int) -> bool:
    return os.access(p, mode, effective_ids=_EFFECTIVE)


def _denied_at(p: Path) -> str:
    if p.exists():
        if not _can(p, os.R_OK) or (p.is_dir() and not _can(p, os.X_OK)):
            return " (no permission to read it: check its owner and mode)"
        if not _can(p, os.W_OK):
            return _WRITE_DENIED
    elif p.parent.exists() and not _can(p.parent, os.W_OK):
        return _WRITE_DENIED
    return " (permission denied)"


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """``"<path>: <reason> (<hint>)"`` for ``err``, naming ``err.filename`` or else ``path``."""
    where = err.filename if err.filename is not None else path
    reason = err.strerror or str(err)
    hint = _denied(where) if err.errno in (errno.EACCES, errno.EPERM) else _HINTS.get(err.errno or 0, "")
    return f"{where}: {reason}{hint}" if where is not None else f"{reason}{hint}"


def is_run_checkpoint(path: str | Path) -> bool:
    """True for a file inside a run folder's ``checkpoints/`` folder (``last.pt``, ``best.pt``,
    ``epoch_*.pt``): such files are never overwritten by an export or import."""
    p = Path(path).expanduser().absolute()
    return p.parent.name == CHECKPOINT_DIR


# A training run's own files, beside its checkpoints/ folder: never an export's or import's output.
RUN_OWN_FILES = ("config.yaml", "history.jsonl", "metrics.jsonl", "summary.csv", "result.json", ".lock")


def is_run_file(path: str | Path) -> bool:
    """True for a run folder's own record (``config.yaml``, ``metrics.jsonl``, ``result.json``...):
    the folder holds ``config.yaml`` and ``checkpoints/``. Links are followed."""
    p = Path(path).expanduser().absolute()
    for q in (p, p.resolve()):
        folder = q.parent
        if q.name in RUN_OWN_FILES and (folder / "config.yaml").is_file() and (folder / CHECKPOINT_DIR).is_dir():
            return True
    return False


def check_output(path: str | Path, *, force: bool, sources: Iterable[str | Path] = (),
                 what: str = "output") -> Path:
    """Refuse ``path`` as an output when it is a run's checkpoint or one of ``sources`` (always),
    or an existing file (unless ``force``). Returns ``path`` expanded."""
    p = Path(path).expanduser()
    real = p.resolve()
    for src in sources:
        if Path(src).expanduser().resolve() == real:
            raise OutputError(f"{p} is the file being read; write the {what} to another path")
    if is_run_file(p):
        raise mention(OutputError, f"{p} is one of a training run's own files and is never overwritten, "
                      f"even with force=True; write the {what} to another path", force="force=True")
    if is_run_checkpoint(p) or is_run_checkpoint(real):
        raise OutputError(f"{p} is a training run's checkpoint and is never overwritten; write "
                          f"the {what} to another path")
    if p.is_dir():
        raise OutputError(f"{p} is a folder; name a file for the {what}")
    if p.exists() and not force:
        raise mention(OutputError, f"{p} already exists; pass force=True to overwrite it, or choose "
                      "another path", force="force=True")
    return p


def write_output(path: str | Path, write_fn: Callable[[IO[bytes]], object]) -> None:
    """:func:`~resnetlab.checkpoint.atomic_write` (temp file, fsync, rename: an existing
    file is untouched on failure), with OS errors raised as :class:`OutputWriteError` naming
    ``path``."""
    try:
        atomic_write(path, write_fn)
    except OSError as e:
        if isinstance(e, OutputWriteError):
            raise
        code = e.errno or errno.EIO
        where = Path(path)
        if e.filename is not None and not Path(str(e.filename)).name.startswith(f".{where.name}."):
            where = Path(str(e.filename))  # e.g. the file standing where a folder should be
        raise OutputWriteError(code, e.strerror or os.strerror(code), str(where)) from None


def printable(text: str) -> str:
    """``text`` with every non-printable character (newline, carriage return, tab, the escape
    that starts a terminal colour code, a byte that was not UTF-8) as a Python escape: a file
    name printed in a line of text output can then neither forge lines nor recolour the screen,
    nor fail to encode. Printable text (any script, spaces) is left as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


__all__ = ["OutputError", "OutputWriteError", "RUN_OWN_FILES", "check_output", "describe_os_error",
           "is_run_checkpoint", "is_run_file", "printable", "write_output"]
