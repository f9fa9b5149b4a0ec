"""What a training run reports as it goes: the progress bar, the epoch row, and the run's logs.

:class:`RunLog` is rank 0's one writer of a run's records: ``metrics.jsonl``, ``summary.csv``,
the epoch log line and TensorBoard's event files under ``tb/`` (per-epoch scalars, the per-step
loss and the config as hparams). Nothing else in resnetlab writes event files. :class:`Progress`
is the tqdm bar of one epoch. Both are off on the other ranks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resnetlab import checkpoint as ckpt
from resnetlab.config import Config, to_dict
from resnetlab.engine.dist import DistInfo
from resnetlab.engine.metrics import append_jsonl, read_jsonl, write_csv
from resnetlab.engine.state import TrainState

log = logging.getLogger("resnetlab")

LOSS_POINT_EVERY = 10  # steps between points of TensorBoard's train/loss_step (at the next sync step)

# metrics.jsonl column -> TensorBoard tag: grouped sections so runs compare side by side
_TB_TAGS = {"lr": "opt/lr", "images_per_s": "speed/images_per_s", "seconds": "speed/epoch_seconds"}


def someone_watches(stream: Any) -> bool:
    """True in a terminal or a Jupyter/Colab kernel (whose stderr is no tty); False when piped or logged."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return True
    ipython = sys.modules.get("IPython")  # only look if the user's process already imported it
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return getattr(shell, "kernel", None) is not None  # terminal IPython has no kernel attribute


class Progress:
    """tqdm.auto bar for one epoch (a widget in notebooks): loss, images/s, ETA. Off when quiet,
    when nobody watches (output piped or to a file), or not rank 0."""

    def __init__(self, cfg: Config, dist: DistInfo, epoch: int, total: int, start: int) -> None:
        self.bar = None
        if cfg.train.quiet or not dist.is_main or not someone_watches(sys.stderr):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                        unit="batch", leave=False, dynamic_ncols=True)
        self.t0, self.images, self.batch_size = time.perf_counter(), 0, cfg.train.batch_size
        self.shown = 0.0  # when the numbers were last refreshed (perf_counter seconds)

    def update(self, info: dict[str, Any], loss: float | None = None) -> None:
        """One step done; ``loss`` (a float the guard read at a sync step, else None) refreshes the
        numbers. The bar never reads a device tensor itself: that would wait for the device."""
        if self.bar is None:
            return
        self.bar.update(1)
        self.images += self.batch_size
        if loss is not None and time.perf_counter() - self.shown >= 0.5:
            self.shown = time.perf_counter()
            rate = self.images / max(self.shown - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}", lr=f"{info['lr']:.3g}")

    def close(self) -> None:
        """Remove the bar (``leave=False``): the epoch's log line replaces it."""
        if self.bar is not None:
            self.bar.close()


def epoch_row(epoch: int, state: TrainState, lr_fn: Callable[[int], float], sums: torch.Tensor,
              out: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """The epoch's ``metrics.jsonl`` row from the meter's all-reduced ``sums`` (loss sum, top-1
    correct, top-5 correct, count) and the loop's ``out`` (images, seconds on this rank)."""
    loss_sum, c1, _c5, n = sums.tolist()
    images_per_s = out["images"] * dist.world_size / max(out["seconds"], 1e-9)
    return {"epoch": epoch + 1, "step": state.step, "lr": lr_fn(max(state.step - 1, 0)),
            "train_loss": loss_sum / max(n, 1), "train_err": 100.0 * (1 - c1 / max(n, 1)),
            "images_per_s": images_per_s, "seconds": out["seconds"]}


def tensorboard_tag(column: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_top1_err`` -> ``val/top1_err``, ``lr`` -> ``opt/lr``."""
    if column in _TB_TAGS:
        return _TB_TAGS[column]
    for split in ("train", "val", "test"):
        if column.startswith(split + "_"):
            return f"{split}/{column[len(split) + 1:]}"
    return f"other/{column}"


def _hparams(cfg: Config) -> dict[str, Any]:
    """Flat ``section.key -> value`` of the config, as TensorBoard's HParams tab takes them."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                out[f"{prefix}{k}"] = v
            else:  # None, lists: shown as text
                out[f"{prefix}{k}"] = str(v)
    walk(to_dict(cfg), "")
    return out


def open_tensorboard(cfg: Config, run_dir: Path, dist: DistInfo) -> Any:
    """Rank 0's event writer for ``run_dir/tb`` (None when off or not installed), with the config
    as hparams: the HParams tab lists every config key against the final validation metrics."""
    if not (cfg.train.tensorboard and dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:  # tensorboard is optional: say so once, rather than a tb/ folder that never appears
        log.info("TensorBoard logging is off (the tensorboard package is not installed); "
                 "pip install 'resnetlab[tensorboard]' to get %s/tb, or set train.tensorboard=false "
                 "to silence this line", run_dir)
        return None
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    metrics = {tag: 0.0 for tag in ("val/top1_err", "val/top5_err", "val/loss", "train/err", "train/loss")}
    file_writer = writer.file_writer  # created by SummaryWriter's constructor
    if file_writer is not None:
        for summary in hparams(_hparams(cfg), metrics):  # the metrics' values are the scalars of this run
            file_writer.add_summary(summary)
    return writer


class RunLog:
    """Rank 0's records of one run: ``metrics.jsonl``, ``summary.csv``, the epoch log line and the
    TensorBoard events (epoch scalars under ``train/``, ``val/``, ``test/``, ``opt/``, ``speed/``;
    ``train/loss_step`` every :data:`LOSS_POINT_EVERY` steps, at the next sync step)."""

    def __init__(self, cfg: Config, run_dir: Path, dist: DistInfo) -> None:
        self.run_dir, self.dist = run_dir, dist
        self.writer = open_tensorboard(cfg, run_dir, dist)
        self.next_loss_point = LOSS_POINT_EVERY  # the first sync step at or after it gets a point

    def step_loss(self, step: int, loss: float) -> None:
        """``loss``: the mean over the sync window that ended at ``step`` (read by the guard)."""
        if self.writer is not None and step >= self.next_loss_point:
            self.writer.add_scalar("train/loss_step", loss, step)
            self.next_loss_point = (step // LOSS_POINT_EVERY + 1) * LOSS_POINT_EVERY

    def epoch(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl, rewrite summary.csv, log the line, add the scalars."""
        if not self.dist.is_main:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        write_csv(self.run_dir / "summary.csv", read_jsonl(self.run_dir / "metrics.jsonl"))
        val = f" | val loss {row['val_loss']:.4f} err {row['val_top1_err']:.2f}%" if "val_loss" in row else ""
        log.info("epoch %d | lr %.4g | train loss %.4f err %.2f%%%s | %.0f img/s, %.1fs", row["epoch"],
                 row["lr"], row["train_loss"], row["train_err"], val, row["images_per_s"], row["seconds"])
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    self.writer.add_scalar(tensorboard_tag(k), v, row["epoch"])
            self.writer.flush()

    def interrupted(self, reason: str | None, state: TrainState) -> None:
        """The stop line: where the run was saved and how to resume it (rank 0, stderr)."""
        if self.dist.is_main:
            print(f"{reason}: saved {self.run_dir / ckpt.CHECKPOINT_DIR / ckpt.LAST} at epoch "
                  f"{state.epoch + 1}, step {state.step}; resume with: resnetlab train --resume "
                  f"{self.run_dir}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()


__all__ = ["LOSS_POINT_EVERY", "Progress", "RunLog", "epoch_row", "open_tensorboard", "someone_watches",
           "tensorboard_tag"]
