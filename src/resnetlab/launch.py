"""Start training so that a failed start leaves nothing behind.

A run that stops before its first optimiser step (missing data, a bad image folder, a batch
larger than the split) has produced nothing worth keeping: the run folder it created (with only
``config.yaml`` and an empty ``checkpoints/``) is removed, so the next attempt with the same
``run.name`` is not refused as "already holds a training run" and ``runs/`` is not littered
(nor left behind, empty, when the failed run created it).
A folder that existed before (``--resume``, ``train.resume=auto``) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from resnetlab.config import Config


def holds_checkpoints(folder: Path) -> bool:
    """True when ``folder`` (searched recursively) holds a checkpoint file (``*.pt``)."""
    return folder.is_dir() and any(folder.rglob("*.pt"))


def discard_untrained(folder: str | Path, existed: bool) -> bool:
    """Remove ``folder`` if this process created it (``existed`` False) and it holds no checkpoint.

    Only rank 0 removes (other ranks share the folder). Returns True when it was removed.
    """
    folder = Path(folder)
    if existed or os.environ.get("RANK", "0") != "0" or not folder.is_dir() or holds_checkpoints(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@contextmanager
def removed_on_failure(folder: str | Path, existed: bool) -> Iterator[None]:
    """Run the body; if it raises, remove ``folder`` unless it ``existed`` before or holds a checkpoint."""
    folder = Path(folder).expanduser()
    try:
        yield
    except BaseException:
        discard_untrained(folder, existed)
        raise


def fit_cleanly(cfg: Config, *, on_step: Callable[[dict[str, Any]], bool | None] | None = None) -> Any:
    """:func:`resnetlab.engine.fit` that removes the run folder it created if no step ran.

    The run name is fixed before ``fit`` so the folder is known; under DDP every rank's choice is
    replaced by rank 0's inside ``fit`` (which broadcasts it), and only rank 0 removes.
    """
    from resnetlab.engine import fit
    from resnetlab.engine.errors import RunFolderGoneError
    from resnetlab.engine.fit import default_run_name

    if cfg.run.name is None:
        cfg = replace(cfg, run=replace(cfg.run, name=default_run_name(cfg)))
    root = Path(cfg.run.root).expanduser()
    run_dir = root / str(cfg.run.name)
    existed, root_existed = run_dir.exists(), root.exists()
    stepped = [False]

    def watch(info: dict[str, Any]) -> bool | None:
        stepped[0] = True
        return on_step(info) if on_step is not None else None

    try:
        return fit(cfg, on_step=watch)
    except OSError as e:
        # A write into a folder deleted mid-run fails on whatever file it was (often a temp file,
        # `.last.pt.xxxx.tmp`): name the run folder instead. config.yaml exists once a step ran.
        if not stepped[0]:  # e.g. an unreadable data.root: no step, no run folder left behind
            discard_untrained(run_dir, existed)
        elif not isinstance(e, RunFolderGoneError) and not (run_dir / "config.yaml").is_file():
            raise RunFolderGoneError(run_dir) from e
        raise
    except BaseException:
        if not stepped[0] and discard_untrained(run_dir, existed) and not root_existed:
            with contextlib.suppress(OSError):  # not empty: another run started there meanwhile
                root.rmdir()  # this run made runs/ too: leave no empty folder behind
        raise


__all__ = ["discard_untrained", "fit_cleanly", "holds_checkpoints", "removed_on_failure"]
