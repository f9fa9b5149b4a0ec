"""The configuration's schema: typed, frozen dataclasses, one per section, and what can be read
off them without parsing anything (every key, its type, default and comment, a config's leaves).

Every value carries its unit and reason in a trailing comment: ``resnetlab config keys`` shows them
(:func:`describe_keys` reads the comments from this source).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

from resnetlab.models.spec import ModelSpec


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the one at fault."""


@dataclass(frozen=True)
class ModelConfig(ModelSpec):
    # The network's options (name, num_classes, ..., drop_rate) and their checks are
    # resnetlab.models.spec.ModelSpec's; these are the fine-tuning ones.
    # Fine-tuning: start from these weights (run folder, .pt/.safetensors checkpoint, torchvision
    # .pth state dict, timm / Hugging Face model.safetensors). Weights only: a new run.
    init_from: str | None = None
    init_sha256: str | None = None  # SHA-256 of the init_from file; filled in at the start, or set to pin it
    init_preprocess: Literal["weights", "data"] = "weights"  # normalise as the weights were trained, or by the data


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4  # pixels of zero padding before the random crop (paper: 4 on 32x32)
    flip: bool = True  # random horizontal flip with p=0.5 (off for digits: a 2 is not a mirrored 2)
    scale_min: float = 0.08  # folder data: smallest area fraction of the random-resized crop


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # data source, one of the registry's (resnetlab/data/sources/; `resnetlab train --help` lists them)
    root: str | None = None  # folder with the files; cifar: batches or the official .tar.gz
    download: bool = False  # fetch the official files (checksummed) where the source can: needs network
    val_fraction: float = 0.1  # share of the training set held out for model choice (cifar: 5k/50k)
    test_fraction: float = 0.2  # digits only: share held out as the test split
    image_size: int = 224  # folder data: training crop and evaluation crop, pixels
    resize: int = 256  # folder data: shorter side before the evaluation centre crop, pixels
    num_workers: int = 2  # folder data: DataLoader worker processes
    in_memory: bool = True  # keep small datasets on the device as one uint8 tensor
    on_bad_image: Literal["error", "skip"] = "error"  # unreadable image files: stop, or count and skip
    check_images: bool = False  # folder data: decode every file before training (default: as read)
    balance: bool = False  # draw classes equally often in training (seeded weighted sampler)
    classes: tuple[str, ...] = ()  # keep only these class names, relabelled 0..k-1 in this order; () = all
    train_per_class: int = 0  # keep this many training images per class (seeded draw); 0 = all
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # peak learning rate for the batch size in train.batch_size
    momentum: float = 0.9  # SGD momentum (adamw: beta1)
    nesterov: bool = False
    weight_decay: float = 1e-4  # L2 on the weights (decoupled for adamw)
    no_weight_decay_bn_bias: bool = False  # exclude BN weights and all biases from weight decay
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training, lr *= gamma
    gamma: float = 0.1  # step schedule: factor at each milestone
    min_lr: float = 0.0  # cosine schedule: floor, absolute
    warmup: Literal["none", "linear", "constant"] = "none"  # constant: paper's resnet110 trick
    warmup_epochs: float = 0.0  # length of the warm-up, epochs (fractions allowed)
    warmup_lr: float = 0.01  # constant warm-up lr; linear warm-up starts here
    label_smoothing: float = 0.0  # cross-entropy target smoothing, 0 = off
    clip_grad_norm: float | None = None  # max global L2 norm of the gradients, None = off
    ema_decay: float | None = None  # exponential moving average of weights per step, e.g. 0.999
    fused: bool = True  # torch's fused update kernel (CPU, CUDA) where the parameters allow it
    backbone_lr_scale: float = 1.0  # lr of everything but the classifier = optim.lr * this
    layer_decay: float = 1.0  # lr *= this per stage below the head (stem lowest); 1 = off


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # global batch, images per optimiser step (split across ranks)
    eval_batch_size: int = 512  # images per forward pass in evaluation
    device: str = "auto"  # auto: cuda, then mps, then cpu; or any torch device string
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype; for GPUs (slow on CPU)
    compile: bool = False  # torch.compile the model; for GPUs
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager/eager: no code generation (debugging, CPU tests)
    channels_last: bool = True  # NHWC memory format: ~15% faster on CPU, faster on tensor cores
    sync_bn: bool = False  # DDP only: synchronise BN statistics across ranks
    resume: Literal["never", "auto"] = "never"  # auto: continue when the run folder has last.pt
    checkpoint_every_steps: int = 0  # also save last.pt every N steps mid-epoch, 0 = epoch ends only
    eval_every: int = 1  # validate every N epochs (and always after the last)
    test_at_end: bool = True  # evaluate the test split once, after training
    test_every_epoch: bool = False  # also test after every epoch, for figures; models are chosen on val
    test_tta: Literal["flip"] | None = None  # flip: the final test also scores image + mirror (test.top1_acc_flip)
    quiet: bool = False  # no progress bar
    tensorboard: bool = True  # write event files when tensorboard is installed
    threads: int = 0  # torch CPU threads, 0 = torch's default
    sync_every: int = 0  # steps between host reads of the NaN/stop flags; 0 = auto: 1 on CPU, 20 on GPUs
    cudnn_benchmark: bool = True  # cuDNN picks the fastest conv kernels for the (fixed) input shapes
    tf32: bool = True  # CUDA: float32 matmuls/convs on TF32 tensor cores (Ampere+), ~10 bits of mantissa
    freeze: tuple[str, ...] = ()  # module prefixes kept fixed: stem, layer1.., backbone (all but fc)
    unfreeze_at_epoch: int | None = None  # two-phase: train.freeze holds for epochs [0, this), then all train


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None  # run folder name; None: <model>-<data>-<timestamp>
    root: str = "runs"  # parent folder of the run folders
    recipe: str | None = None  # recipes load() applied, in order ("digits <- cifar10_resnet56"); set by load()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0  # drives the split, the init, the batch order and the augmentation


# ----------------------------------------------------------------------------------------------
# reading the schema

def field_types(cls: type) -> dict[str, Any]:
    """Field name -> declared type of dataclass ``cls`` (annotations resolved: ``str | None``)."""
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    """A declared type as users read it: ``'sgd' | 'adamw'``, ``list of float``, ``int | null``."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {describe_type(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted config key of dataclass ``cls`` (``["model.name", ..., "seed"]``), in field
    order; nested dataclasses are walked, so only leaf keys are listed."""
    keys = []
    hints = field_types(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python dict (lists for tuples) of a config, for YAML, JSON and checkpoints."""

    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def leaves(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a config (tuples item by item)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple):
            yield from ((f"{prefix}{f.name}[{i}]", v) for i, v in enumerate(value))
        else:
            yield f"{prefix}{f.name}", value


def getattr_dotted(cfg: Any, dotted: str) -> Any:
    """``getattr_dotted(cfg, "data.val_fraction")`` -> ``cfg.data.val_fraction``."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------------------------
# every key, its type, default and comment (``resnetlab config keys``)

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in the source of ``cls`` and of the dataclasses
    it derives from (ModelConfig's network options are ModelSpec's): units and reasons."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if not is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (frozen app): keys still list, without comments
            continue
        for line in lines:
            m = _FIELD_LINE.match(line)
            if m and m.group(1) not in out:
                out[m.group(1)] = (m.group(2) or "").strip()
    return out


def describe_keys(cls: type = Config, prefix: str = "", base: Any = None) -> list[dict[str, Any]]:
    """One row per config key: ``{"key", "type", "default", "comment"}`` (defaults of ``cls()``)."""
    base = cls() if base is None else base
    hints, comments = field_types(cls), _field_comments(cls)
    rows: list[dict[str, Any]] = []
    for f in fields(cls):
        tp, value = hints[f.name], getattr(base, f.name)
        if is_dataclass(tp):
            rows.extend(describe_keys(typing.cast(type, tp), f"{prefix}{f.name}.", value))
        else:
            rows.append({"key": f"{prefix}{f.name}", "type": describe_type(tp),
                         "default": to_dict(value) if is_dataclass(value) else
                         (list(value) if isinstance(value, tuple) else value),
                         "comment": comments.get(f.name, "")})
    return rows


__all__ = ["AugmentConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "all_keys", "describe_keys", "describe_type", "field_types", "getattr_dotted", "leaves", "to_dict"]
