"""``StepGuard``: the per-step non-finite and stop checks, without making the GPU wait.

A non-finite loss is recorded on the device every step; the host reads the flags only every
``sync_every`` steps, and all ranks read them at the same steps. A stop request (SIGTERM,
SIGINT, or the ``on_step`` callback) is held until the next sync step too: a rank that all-reduced
its flags at once, while the others were inside DDP's gradient all-reduce, would mismatch the
collectives and hang until the timeout. Alone (no process group) a stop takes effect at once.
Outside the steps (after validation and the epoch's save) :meth:`StepGuard.agree` is the
stop decision: a collective too, so a signal that lands during validation on one rank stops
every rank, not just that one.

The step losses stay on the device as well: they are summed into the same flags tensor and
read with it, so the progress bar and TensorBoard's per-step loss cost no host read of their
own (:attr:`StepGuard.window_loss`: the mean loss over the steps since the last sync, over all
ranks).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from resnetlab.engine.dist import DistInfo, all_reduce_sum

CONTINUE, SYNCED, STOP = "continue", "synced", "stop"


class StepGuard:
    """Signals set a stop request; :meth:`after_step` says whether to go on, and when it is safe
    to save. Use as a context manager (it installs SIGTERM/SIGINT handlers in the main thread)."""

    def __init__(self, device: torch.device, dist: DistInfo, sync_every: int,
                 on_step: Callable[[dict[str, Any]], bool | None] | None = None) -> None:
        self.dist, self.sync_every, self.on_step = dist, sync_every, on_step
        # [first non-finite step (0 = none), stop requested, sum of step losses, steps summed]
        self.flags = torch.zeros(4, device=device)
        self.reason: str | None = None  # "SIGTERM" / "SIGINT" / "stop"
        self.bad_step: int | None = None  # set when a non-finite loss was found
        self.window_loss: float | None = None  # mean step loss between the last two syncs (all ranks)
        self._old: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        """Ask every rank to stop at the next sync step (the first reason wins)."""
        self.reason = self.reason or reason

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def after_step(self, info: dict[str, Any]) -> str:
        """Record this step's loss; every ``sync_every`` steps agree with all ranks.

        Returns ``"continue"`` (not a sync step), ``"synced"`` (all ranks agree all is well: a
        checkpoint may be saved now) or ``"stop"``; a non-finite loss sets :attr:`bad_step` and
        returns ``"stop"`` too.
        """
        loss = info["loss"].detach().float()
        bad = ~torch.isfinite(loss)
        # device-side: no host read; a Python float is a kernel argument, not a transfer
        self.flags[0] = torch.where(bad & (self.flags[0] == 0), float(info["step"]), self.flags[0])
        self.flags[2] += loss
        self.flags[3] += 1.0
        if self.on_step is not None and self.on_step(info):
            self.request("stop")
        alone_and_stopping = self.reason is not None and not self.dist.enabled
        if info["step"] % self.sync_every and not alone_and_stopping:
            return CONTINUE
        return self.sync(info["step"])

    def sync(self, step: int) -> str:
        """Agree with all ranks now (a collective: every rank must call it at the same point)."""
        self.flags[1] = float(self.reason is not None)
        all_reduce_sum(self.flags)  # any rank's NaN or stop stops every rank at the same step
        first_bad, stop, loss_sum, steps = self.flags.tolist()
        self.flags.zero_()
        if steps > 0:
            self.window_loss = loss_sum / steps
        if first_bad > 0:
            # alone, the recorded step is exact; summed over ranks it is not, so name this one
            self.bad_step = int(first_bad) if not self.dist.enabled else step
            return STOP
        if stop > 0:
            self.request(self.reason or "SIGTERM")  # another rank's signal
            return STOP
        return SYNCED

    def agree(self) -> str | None:
        """The stop decision between epochs, taken together (a collective: every rank calls it at
        the same point). Returns the stop reason when any rank was asked to stop, else None."""
        return self.reason if self.sync(-1) == STOP else None


__all__ = ["CONTINUE", "STOP", "SYNCED", "StepGuard"]
