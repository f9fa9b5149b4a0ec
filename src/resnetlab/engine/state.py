"""``TrainState``: where a run is (epoch, batch, step) and the best validation so far."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    """The counters a checkpoint needs to continue a run exactly where it stopped.

    ``batch`` is the next batch of epoch ``epoch`` (0 at an epoch boundary); ``step`` counts
    optimiser steps since the start of the run. Random states live in the checkpoint's ``rng``
    entry, one per rank (see :class:`~resnetlab.engine.checkpointer.Checkpointer`).
    """

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch completed
    step: int = 0  # optimiser steps completed
    best_val_err: float = math.inf  # lowest validation top-1 error, percent
    best_epoch: int = 0  # the epoch (1-based) that reached it; 0 = none yet

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers, as checkpoints store them (key names unchanged since version 0.1)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; unknown keys are ignored, missing ones keep defaults."""
        for key in ("epoch", "batch", "step", "best_epoch"):
            if key in state:
                setattr(self, key, int(state[key]))
        if "best_val_err" in state:
            self.best_val_err = float(state["best_val_err"])

    def best(self) -> dict[str, Any]:
        """``{"val_top1_err", "epoch"}`` of the best validation, or ``{}`` before any."""
        if math.isinf(self.best_val_err):
            return {}
        return {"val_top1_err": self.best_val_err, "epoch": self.best_epoch}
