"""Load a trained network for inference: a run folder or a checkpoint file -> (model, config, meta).

Shared by ``eval``, ``predict`` and ``export``. Everything needed to rebuild the network (the
resolved :class:`~resnetlab.config.Config` and the :class:`~resnetlab.data.DataMeta` with its
classes and preprocessing) travels inside the checkpoint, so no flag is ever needed:

    model, cfg, meta = load_for_inference("runs/resnet20-digits")   # fused, eval, on the CPU

Accepted sources: a run folder (``checkpoints/best.pt``, else ``last.pt``), any ``.pt``
checkpoint written by training or by ``resnetlab import``, a ``.safetensors`` file written
by ``resnetlab export`` (its header carries the config and meta), and a folder written by
``resnetlab publish`` (its ``model.safetensors``), which is also how shipped weights are stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab import checkpoint as ckpt
from resnetlab.config import Config
from resnetlab.data import DataError, DataMeta, normalize
from resnetlab.models import build_model, fuse_for_inference
from resnetlab.runtime import non_finite_forward, probe_pixels, select_device

PUBLISHED_MODEL = "model.safetensors"  # the weights in a `resnetlab publish` folder (the hubs' name)

def output_dir(path: str | Path) -> Path:
    """Where outputs about ``path`` go: the run folder itself, or the checkpoint file's folder."""
    p = Path(path).expanduser()
    return p if p.is_dir() else p.parent


def published_model(path: str | Path) -> Path | None:
    """``FOLDER/model.safetensors`` when ``path`` is a folder written by ``resnetlab publish``
    (or a shipped weight), else None; a run folder (with ``checkpoints/``) is never one."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / PUBLISHED_MODEL).is_file() and not (p / ckpt.CHECKPOINT_DIR).is_dir():
        return p / PUBLISHED_MODEL
    return None


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


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       fuse: bool = True) -> tuple[nn.Module, Config, DataMeta]:
    """Load the network saved at ``path`` (run folder, .pt checkpoint or exported .safetensors).

    Returns ``(model, config, meta)``: the model in eval mode on ``device`` (``"auto"`` picks
    cuda, mps, cpu) with gradients off; with ``fuse`` (default) every BatchNorm is folded into
    its convolution and the weights are channels_last (:func:`resnetlab.models.fuse_for_inference`).
    A temperature stored by ``resnetlab calibrate`` (``calibration.json`` in the run folder) is
    folded into the classifier, so the softmax of the logits is the calibrated probability.
    """
    from resnetlab.calibration import apply_temperature, read_temperature

    file, state, cfg, meta = read_checkpoint(path)
    model = build_inference_model(state, cfg, meta, source=str(file))
    temperature = read_temperature(path, file)  # `resnetlab calibrate` fitted one: logits / T
    if temperature is not None:
        model = apply_temperature(model, temperature)
    if fuse:
        model = fuse_for_inference(model)
    model.requires_grad_(False)
    return model.to(select_device(str(device))), cfg, meta


__all__ = ["PUBLISHED_MODEL", "NonFiniteOutputError", "build_inference_model", "check_forward",
           "load_for_inference", "output_dir", "published_model", "read_checkpoint"]
