"""Open a trained run: a run folder or a checkpoint file -> model, config, meta and its own data.

The one way every use command opens a run (``eval``, ``predict``, ``serve``, ``export`` and the
analyses): :func:`open_run`. Everything needed to rebuild the network (the
resolved :class:`~resnetlab.config.Config` and the :class:`~resnetlab.data.DataMeta` with its
classes and preprocessing) travels inside the checkpoint, so no flag is ever needed:

    run = open_run("runs/resnet20-digits")      # fused, eval, on the CPU
    run.model, run.config, run.meta, run.loader("val")

Accepted sources: a run folder (``checkpoints/best.pt``, else ``last.pt``), any ``.pt``
checkpoint written by training or by ``resnetlab import``, a ``.safetensors`` file written
by ``resnetlab export`` (its header carries the config and meta), and a folder written by
``resnetlab publish`` (its ``model.safetensors``), which is also how shipped weights are stored.

Running the opened network on prepared pixels has one owner too: :func:`class_probs` (softmax
probabilities) and :func:`top_classes` (the top-k, ``topk`` checked by :func:`check_topk`), which
``predict``, ``explain`` and ``resnetlab.load(RUN).predict`` share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab import checkpoint as ckpt
from resnetlab.calibration import apply_temperature, read_temperature
from resnetlab.config import Config, ConfigError, apply_overrides
from resnetlab.data import (
    ArraySplit,
    DataError,
    DataMeta,
    FileSplit,
    Loader,
    build_datasets,
    build_loader,
    normalize,
)
from resnetlab.data.sources import get_source
from resnetlab.models import build_model, fuse_for_inference
from resnetlab.params import named
from resnetlab.runtime import non_finite_forward, probe_pixels, select_device

SPLITS = ("train", "val", "test")

PUBLISHED_MODEL = "model.safetensors"  # the weights in a `resnetlab publish` folder (the hubs' name)


def published_model(path: str | Path) -> Path | None:
    """``FOLDER/model.safetensors`` when ``path`` is a folder written by ``resnetlab publish``
    (or a shipped weight), else None; a run folder (with ``checkpoints/``) is never one."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / PUBLISHED_MODEL).is_file() and not (p / ckpt.CHECKPOINT_DIR).is_dir():
        return p / PUBLISHED_MODEL
    return None


def output_dir(path: str | Path) -> Path:
    """Where outputs about ``path`` go: the run folder itself, or the checkpoint file's folder."""
    p = Path(path).expanduser()
    return p if p.is_dir() else p.parent


def parse_meta(meta: Mapping[str, Any], source: str | Path) -> DataMeta:
    """A checkpoint's stored data meta as a :class:`DataMeta`; errors name ``source``."""
    try:
        return DataMeta.from_dict(meta)
    except DataError as e:
        raise ckpt.CheckpointError(f"{source}: {e}") from None


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], Config, DataMeta]:
    """Resolve ``path`` and read ``(checkpoint file, weights, config, meta)`` without a model.

    Weights are the EMA copy when training kept one. Errors (:class:`CheckpointError`) name
    the file and say what to do, e.g. run ``resnetlab import`` for a bare state dict.
    """
    file = published_model(path) or ckpt.resolve(path)
    found = ckpt.read(file)
    cfg, meta = found.parsed_config(), parse_meta(found.meta, file)
    return file, found.weights, cfg, meta


def build_inference_model(state: Mapping[str, torch.Tensor], cfg: Config, meta: DataMeta, *,
                          source: str = "checkpoint") -> nn.Module:
    """The network ``cfg`` names, sized by ``meta``, with ``state`` loaded strictly, in eval mode."""
    model = build_model(cfg, meta)
    ckpt.load_weights(model, state, source=source)
    check_forward(model, meta, source)
    return model.eval()


class NonFiniteOutputError(ckpt.CheckpointError):
    """The network's outputs are NaN or infinite (diverged weights); the message names the file."""


def check_forward(model: nn.Module, meta: DataMeta, source: str | Path) -> None:
    """Refuse ``model`` when its forward pass on a blank and a noise image is not finite
    (:func:`resnetlab.runtime.non_finite_forward`, the check training applies before each save)."""
    device = next(model.parameters()).device
    x = normalize(probe_pixels(meta.in_chans, meta.input_size).to(device), meta)  # [2, c, h, w]
    problem = non_finite_forward(model, x)
    if problem is not None:
        raise NonFiniteOutputError(f"{source}: {problem} (a blank and a noise image): its weights diverged; "
                                   f"use an earlier checkpoint or retrain with a lower optim.lr")


@dataclass
class OpenRun:
    """A trained network opened for use (what :func:`open_run` returns): the model, its
    resolved config (overrides applied) and data meta, and its own data, split by split."""

    file: Path  # the checkpoint read
    model: nn.Module  # eval mode, gradients off, on ``device``
    config: Config
    meta: DataMeta  # as trained: classes, channels, normalisation
    device: torch.device

    def split(self, name: str) -> tuple[ArraySplit | FileSplit, DataMeta]:
        """Split ``name`` of the run's own data (the one training held out) and the data's meta,
        whose geometry follows the (possibly overridden) data config and whose normalisation is
        the training's. DataError, with what to do, when the split is empty or absent."""
        if name not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        cfg = self.config
        data = build_datasets(cfg.data, seed=cfg.seed, needs=(name,))
        subset = getattr(data, name)
        if subset is None or len(subset) == 0:
            hint = ("add a test/ folder next to train/" if name == "test" else
                    "add a val/ folder or set data.val_fraction > 0") if get_source(cfg.data.name).split_folders else \
                "set data.val_fraction > 0" if name == "val" else "this source has no test split"
            raise DataError(f"{cfg.data.name} data under {cfg.data.root or 'the defaults'} has no "
                            f"{name} split ({hint})")
        if data.meta.in_chans != self.meta.in_chans:
            raise DataError(f"data has {data.meta.in_chans} channel(s) but {self.file} was trained on "
                            f"{self.meta.in_chans}")
        return subset, replace(data.meta, mean=self.meta.mean, std=self.meta.std)

    def loader(self, split: str, *, batch_size: int | None = None, channels_last: bool = True) -> Loader:
        """Batches of ``split`` in order, normalised as in training, on ``device``;
        ``batch_size`` defaults to ``train.eval_batch_size``."""
        subset, meta = self.split(split)
        cfg = self.config
        return build_loader(subset, meta, cfg.data, train=False, batch_size=batch_size or cfg.train.eval_batch_size,
                            device=self.device, seed=cfg.seed, channels_last=channels_last)


def open_run(path: str | Path, device: str | torch.device | None = "cpu", *, fuse: bool = True,
             overrides: Sequence[str] = (), calibrated: bool = True) -> OpenRun:
    """Open the network saved at ``path`` (run folder, .pt checkpoint or exported .safetensors).

    The model is in eval mode on ``device`` (``"auto"`` picks cuda, mps, cpu; None: the config's
    ``train.device``) with gradients off; with ``fuse`` (default) every BatchNorm is folded into
    its convolution and the weights are channels_last (:func:`resnetlab.models.fuse_for_inference`).
    ``overrides`` are ``key=value`` strings applied to the stored config (a new ``data.root``).
    With ``calibrated`` (default), a temperature stored by ``resnetlab calibrate``
    (``calibration.json`` in the run folder) is folded into the classifier, so the softmax of the
    logits is the calibrated probability; ``calibrated=False`` gives the raw network.
    """
    file, state, cfg, meta = read_checkpoint(path)
    cfg = apply_overrides(cfg, overrides)
    model = build_inference_model(state, cfg, meta, source=str(file))
    temperature = read_temperature(path, file) if calibrated else None  # `resnetlab calibrate`: logits / T
    if temperature is not None:
        model = apply_temperature(model, temperature)
    if fuse:
        model = fuse_for_inference(model)
    model.requires_grad_(False)
    dev = select_device(str(device) if device is not None else cfg.train.device)
    return OpenRun(file, model.to(dev), cfg, meta, dev)


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       fuse: bool = True) -> tuple[nn.Module, Config, DataMeta]:
    """``(model, config, meta)`` of :func:`open_run` (for callers that need no data)."""
    run = open_run(path, device, fuse=fuse)
    return run.model, run.config, run.meta


# ---------------------------------------------------------------------------------------------- running it


def check_topk(topk: int) -> int:
    """``topk`` when it is at least 1; else a DataError naming the parameter ``topk``."""
    if topk < 1:
        raise named(DataError, "topk", f"must be >= 1, got {topk}")
    return topk


@torch.no_grad()
def class_probs(model: nn.Module, meta: DataMeta, x_uint8: torch.Tensor,
                device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``[n, c, h, w]`` -> softmax probabilities float32 ``[n, classes]`` on ``device``
    (default: the model's). The pixels are normalised with ``meta``'s statistics and fed to the
    eval-mode network in channels_last, the fused network's layout."""
    device = next(model.parameters()).device if device is None else device
    x = normalize(x_uint8.to(device), meta)  # [n, c, h, w] float32
    x = x.contiguous(memory_format=torch.channels_last)
    return model(x).float().softmax(dim=1)


def top_classes(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[n, classes]`` -> ``(probs [n, k], ids [n, k])``, most probable first,
    ``k = min(topk, classes)``: the one top-k of ``predict``, ``explain`` and ``resnetlab.load(RUN).predict``."""
    values, indices = probs.topk(min(check_topk(topk), probs.shape[1]), dim=1)
    return values, indices


def topk_pixels(model: nn.Module, meta: DataMeta, x_uint8: torch.Tensor, topk: int = 5,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[n, c, h, w]`` -> ``(probs [n, k], ids [n, k])`` on ``device`` (default: the
    model's), most probable first: :func:`class_probs` then :func:`top_classes`."""
    return top_classes(class_probs(model, meta, x_uint8, device), topk)


__all__ = ["PUBLISHED_MODEL", "SPLITS", "NonFiniteOutputError", "OpenRun", "build_inference_model", "check_forward",
           "check_topk", "class_probs", "load_for_inference", "open_run", "output_dir", "parse_meta", "published_model",
           "read_checkpoint", "top_classes", "topk_pixels"]
