"""The engine's exceptions (a module of their own so every engine module can raise them)."""

from __future__ import annotations

import errno
from pathlib import Path


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss, a weight or a statistic became NaN or infinite; the last good checkpoint is kept."""


class RunFolderBusyError(TrainingError):
    """Another process holds the run folder's lock; the message names it."""


class RunFolderGoneError(OSError):
    """The run folder was deleted or moved while training. An OSError (exit 1, as every
    operating-system error) whose ``filename`` is the run folder, not the file being written."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(errno.ENOENT, "the run folder was deleted or moved while training, so nothing "
                                       "more can be saved there; start a new run, or put the folder "
                                       "back and resume it", str(run_dir))


__all__ = ["NonFiniteLossError", "RunFolderBusyError", "RunFolderGoneError", "TrainingError"]
