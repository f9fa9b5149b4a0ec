"""The engine's exceptions (a module of their own so every engine module can raise them)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss, a weight or a statistic became NaN or infinite; the last good checkpoint is kept."""


class RunFolderBusyError(TrainingError):
    """Another process holds the run folder's lock; the message names it."""


__all__ = ["NonFiniteLossError", "RunFolderBusyError", "TrainingError"]
