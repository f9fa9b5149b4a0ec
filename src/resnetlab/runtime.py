"""Runtime helpers shared by training and the use/analysis commands: device, threads, speed
switches, seeding, exit codes and run names. No training here, and nothing here imports the
engine, so ``evaluate``/``predict``/``analysis`` can use these without pulling in ``fit``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from resnetlab.checkpoint import CHECKPOINT_DIR
from resnetlab.config import ConfigError
from resnetlab.exit_codes import EXIT_CODES, EXIT_FAILURE, EXIT_USER_ERROR, exit_code

if TYPE_CHECKING:
    from resnetlab.config import Config, TrainConfig

log = logging.getLogger("resnetlab")


SYNC_EVERY_AUTO = {"cpu": 1, "cuda": 20}  # steps between host reads of the step flags


def select_device(name: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu; otherwise the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (all devices) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_dir(kind: str, root: str | Path = "runs", name: str | None = None) -> Path:
    """The folder of a run or an analysis: ``<root>/<name>``, by default ``<root>/<kind>-<YYYYmmdd-HHMMSS>``
    (local time). The one place timestamped folder names are made."""
    return Path(root).expanduser() / (name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def newest_run(root: str | Path = "runs") -> Path:
    """The run folder under ``root`` (at any depth) whose checkpoint was written last: what
    ``latest`` names on the command line. ConfigError when ``root`` holds no checkpoint yet."""
    found = [p for p in Path(root).expanduser().rglob(f"{CHECKPOINT_DIR}/*.pt") if p.is_file()]
    if not found:
        raise ConfigError(f"latest: no run with a checkpoint under {root}/ yet; train one with "
                          "`resnetlab train`, or name the run folder")
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent


def default_run_name(cfg: Config) -> str:
    """``<model>-<data>-<YYYYmmdd-HHMMSS>``: the run folder name when ``run.name`` is unset."""
    return run_dir(f"{cfg.model.name}-{cfg.data.name}").name


def apply_speed_flags(train: TrainConfig, device: torch.device) -> None:
    """Threads, cuDNN autotuning and TF32 as the config says (process-wide torch switches).

    ``cudnn_benchmark``: the loaders give every training step the same shape (drop_last), so
    cuDNN's one-off search per shape pays back in the first epoch. ``tf32``: float32 matmuls and
    convolutions run on TF32 tensor cores (Ampere and newer), 10-bit mantissa products with
    float32 accumulation; off gives IEEE float32 throughout.
    """
    if train.threads:
        torch.set_num_threads(train.threads)
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = train.tf32
    torch.backends.cuda.matmul.allow_tf32 = train.tf32


def sync_interval(train: TrainConfig, device: torch.device) -> int:
    """Steps between the host's reads of the per-step flags (``train.sync_every``, 0 = auto).

    Each read waits for the device to finish its queued work, so GPUs read every 20 steps; on
    the CPU the work is done when the Python call returns, so every step costs nothing.
    """
    if train.sync_every:
        return train.sync_every
    return SYNC_EVERY_AUTO.get(device.type, SYNC_EVERY_AUTO["cuda"])


def checkpoint_interval(every: int, sync_every: int) -> int:
    """``train.checkpoint_every_steps`` rounded up to a multiple of the sync interval (0 = off).

    A mid-epoch save needs every rank to agree that no step was non-finite, which the ranks
    learn only at a sync step. So a save happens every ``ceil(every / sync_every) * sync_every``
    steps: 5 with a sync interval of 4 saves every 8 steps, 7 with 20 every 20.
    """
    if every <= 0:
        return 0
    return math.ceil(every / sync_every) * sync_every


def non_finite_forward(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` is not usable on the normalised batch ``x`` ``[b, c, h, w]``, or None.

    The one finiteness check of a network that training (before a checkpoint is kept), predict,
    eval and serve (before answering) share: finite weights are not enough, since weights of
    4.6e29 are finite and their logits are not. The forward runs in eval mode (running BN
    statistics, as inference uses them) without gradients; the mode is restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]  # per module: frozen BN layers stay in eval
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x).float()  # [b, classes]
    finally:
        for m, mode in modes:
            m.training = mode
    bad = (~torch.isfinite(logits)).sum().item()
    if bad:
        return f"its forward pass gives {bad} non-finite logit(s) of {logits.numel()} on {x.shape[0]} image(s)"
    return None


def probe_pixels(in_chans: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """uint8 ``[2, c, h, w]``: a blank image and a seeded noise image, to check a network's forward
    when no data is at hand (serve, predict)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (in_chans, *size), dtype=torch.uint8, generator=g)
    return torch.stack([torch.zeros_like(noise), noise])


__all__ = ["EXIT_CODES", "EXIT_FAILURE", "EXIT_USER_ERROR", "apply_speed_flags", "checkpoint_interval",
           "default_run_name", "exit_code", "newest_run", "non_finite_forward", "probe_pixels", "run_dir",
           "seed_everything", "select_device", "sync_interval"]
