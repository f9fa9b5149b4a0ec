"""``model.init_from``: start a new run from weights trained elsewhere.

Accepted sources (the kind is read off the file, not its name):

- a resnetlab run folder (``checkpoints/best.pt``, else ``last.pt``) or checkpoint ``.pt``, a
  ``.safetensors`` from ``resnetlab export`` (EMA weights when the run kept them), or a folder
  written by ``resnetlab publish`` (its ``model.safetensors``);
- a torchvision state dict (``torch.save(model.state_dict(), "resnet50.pth")``, as
  ``weights.get_state_dict()`` returns it), also wrapped as ``{"state_dict": ...}`` or with a DDP
  ``module.`` prefix;
- a timm ResNet ``model.safetensors`` / ``pytorch_model.bin`` (timm's ``ResNet`` uses torchvision's
  parameter names: ``conv1``, ``bn1``, ``layer1.0.downsample.0``, ``fc``), or a Hugging Face
  transformers ``ResNetForImageClassification`` file (``resnet.embedder.embedder.convolution``,
  ``resnet.encoder.stages.0.layers.0.shortcut``, ``classifier.1``), whose names are mapped to ours.

Only the weights are taken: optimiser, schedule and epoch start afresh in a new run folder. The
resolved file and its SHA-256 are written into the run's config (``model.init_from``,
``model.init_sha256``), so ``config.yaml`` says exactly where the weights came from. Files are
read with ``weights_only=True`` or as safetensors: no pickled code ever runs.

When the classes differ (another count, or for a resnetlab source other class names) the
classifier is re-initialised and the log says so in one line; any other mismatch is an error that
lists the missing, unexpected and mis-shaped keys. Preprocessing follows the weights (as timm's
pretrained config and torchvision's ``weights.transforms()`` do): ImageNet mean/std for ImageNet
weights, the source run's normalisation (and, for image folders, crop sizes) for a resnetlab run;
``model.init_preprocess=data`` keeps the dataset's own instead.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from resnetlab import checkpoint as ckpt
from resnetlab.config import Config, ConfigError
from resnetlab.data import DataMeta
from resnetlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from resnetlab.inference import parse_meta, published_model
from resnetlab.weights.zoo import get as get_weights
from resnetlab.weights.zoo import list_weights

log = logging.getLogger("resnetlab")

HEAD_PREFIX = "fc."  # the classifier's keys in every resnetlab network


@dataclass
class InitSource:
    """Weights read from ``model.init_from`` and the preprocessing they were trained with."""

    path: Path  # the file actually read (a run folder resolves to its checkpoint)
    sha256: str
    kind: str  # "resnetlab" | "torchvision" | "timm" | "transformers"
    state: dict[str, torch.Tensor]  # our parameter names
    meta: DataMeta | None  # a resnetlab run's data meta; None for foreign weights
    model_name: str | None = None  # the source run's model.name, when known


# ----------------------------------------------------------------------------------------------
# provenance


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_file(path: str | Path) -> Path:
    """The weights file ``path`` names: a run folder's best.pt (else last.pt), a published
    folder's model.safetensors, the file, or a shipped weight by name (``resnet20.digits``)."""
    p = Path(path).expanduser()
    published = published_model(p)  # a `resnetlab publish` folder
    if published is not None:
        return published.resolve()
    if p.is_dir():
        return ckpt.resolve(p).resolve()
    if not p.exists() and str(path) in list_weights():  # a name from `resnetlab weights`
        return get_weights(str(path)).file.resolve()
    if not p.is_file():
        raise ConfigError(f"model.init_from: {p} is neither a file nor a run folder, nor the name of "
                          f"shipped weights ({', '.join(list_weights()) or 'none ship'})")
    return p.resolve()


def resolve_init_from(cfg: Config) -> Config:
    """``cfg`` with ``model.init_from`` as the absolute file path and ``model.init_sha256`` as
    its hash, so config.yaml records the provenance. A given ``init_sha256`` must match."""
    if cfg.model.init_from is None:
        return cfg
    file = resolve_file(cfg.model.init_from)
    digest = file_sha256(file)
    if cfg.model.init_sha256 is not None and cfg.model.init_sha256 != digest:
        raise ConfigError(f"model.init_from: {file} has SHA-256 {digest}, but model.init_sha256 "
                          f"is {cfg.model.init_sha256}; the file changed since the run started")
    return replace(cfg, model=replace(cfg.model, init_from=str(file), init_sha256=digest))


# ----------------------------------------------------------------------------------------------
# reading and naming


_HF_STAGE = re.compile(r"resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)")
_HF_CONV = re.compile(r"layer\.(\d+)\.(convolution|normalization)\.(.*)")


def _map_transformers_key(key: str) -> str | None:
    """A transformers ResNet key -> ours, or None when it has no counterpart."""
    if key.startswith("resnet.embedder.embedder."):
        rest = key.removeprefix("resnet.embedder.embedder.")
        part, _, tail = rest.partition(".")
        return {"convolution": "conv1", "normalization": "bn1"}.get(part, part) + "." + tail
    if key.startswith("classifier.1."):
        return HEAD_PREFIX + key.removeprefix("classifier.1.")
    m = _HF_STAGE.fullmatch(key)
    if m is None:
        return None
    stage, block, rest = int(m[1]) + 1, int(m[2]), m[3]
    prefix = f"layer{stage}.{block}."
    if rest.startswith("shortcut."):
        part, _, tail = rest.removeprefix("shortcut.").partition(".")
        return prefix + {"convolution": "downsample.0", "normalization": "downsample.1"}[part] + "." + tail
    c = _HF_CONV.fullmatch(rest)
    if c is None:
        return None
    index = int(c[1]) + 1  # layer.0 -> conv1/bn1, layer.1 -> conv2/bn2, ...
    return f"{prefix}{'conv' if c[2] == 'convolution' else 'bn'}{index}.{c[3]}"


def to_our_names(obj: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], str]:
    """Foreign parameter names -> ours; returns ``(state, kind)``; entries that are not tensors
    (a trainer's step counter, say) are dropped.

    Strips the usual wrappers' prefixes (``module.`` from DDP, ``_orig_mod.`` from
    torch.compile, ``model.`` from some trainers); maps transformers' ResNet names; timm's and
    torchvision's ResNet names are already ours. Keys that map to nothing are kept as they are,
    so the load names them as unexpected. ``kind`` is "transformers" or "resnet".
    """
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    if any(k.startswith("resnet.embedder.") for k in state):
        out = {}
        for k, v in state.items():
            ours = _map_transformers_key(k)
            out[ours if ours is not None else k] = v
        return out, "transformers"
    return state, "resnet"


def _unwrap(obj: Mapping[str, object]) -> Mapping[str, object]:
    """The state dict inside the usual wrappers: {"state_dict": ...}, {"model": ...}."""
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def read_init_from(cfg: Config) -> InitSource | None:
    """Read ``cfg.model.init_from`` (after :func:`resolve_init_from`), or None when unset.

    Raises :class:`~resnetlab.checkpoint.CheckpointError` naming the file when it cannot
    be read safely, and :class:`ConfigError` when its hash differs from ``model.init_sha256``.
    """
    if cfg.model.init_from is None:
        return None
    file = resolve_file(cfg.model.init_from)
    digest = file_sha256(file)
    if cfg.model.init_sha256 is not None and digest != cfg.model.init_sha256:
        raise ConfigError(f"model.init_from: {file} has SHA-256 {digest}, but model.init_sha256 "
                          f"is {cfg.model.init_sha256}; the file changed since the run started")
    if file.suffix == ".safetensors":
        if ckpt.SAFETENSORS_CONFIG_KEY in ckpt.read_safetensors_header(file):
            return _resnetlab_source(ckpt.read(file), file, digest)
        state, kind = to_our_names(ckpt.load_safetensors(file))
        return InitSource(file, digest, "timm" if kind == "resnet" else kind, state, None)
    obj = ckpt.load_checkpoint(file)  # weights_only=True: a pickled gadget is refused here
    if ckpt.is_resnetlab(obj):
        return _resnetlab_source(ckpt.Checkpoint.from_dict(obj, file), file, digest)
    state, kind = to_our_names(_unwrap(obj))
    if not state:
        raise ckpt.CheckpointError(f"{file}: holds no tensors; expected a state dict saved with "
                                   "torch.save(model.state_dict(), path) or a resnetlab checkpoint")
    return InitSource(file, digest, "torchvision" if kind == "resnet" else kind, state, None)


def _resnetlab_source(found: ckpt.Checkpoint, file: Path, digest: str) -> InitSource:
    """A resnetlab checkpoint as init weights: its (EMA) weights, data meta and model name."""
    cfg, meta = found.parsed_config(), parse_meta(found.meta, file)
    return InitSource(file, digest, "resnetlab", found.weights, meta, cfg.model.name)


# ----------------------------------------------------------------------------------------------
# using them


def preprocessing_meta(meta: DataMeta, source: InitSource | None, cfg: Config) -> DataMeta:
    """The data meta to train with: ``meta`` with the normalisation the weights expect.

    resnetlab source: its mean/std (and for image folders its crop and resize); foreign
    (ImageNet) weights: ImageNet mean/std for RGB. ``model.init_preprocess=data`` or no source:
    ``meta`` unchanged.
    """
    if source is None or cfg.model.init_preprocess == "data":
        return meta
    if source.meta is not None:
        src = source.meta
        if len(src.mean) != meta.in_chans:
            raise ConfigError(f"model.init_from: {source.path} was trained on {len(src.mean)}-channel "
                              f"images, the data has {meta.in_chans}; set model.init_preprocess=data "
                              "if the weights fit anyway")
        new = replace(meta, mean=src.mean, std=src.std)
        if meta.resize is not None and src.resize is not None:  # both sized by data.image_size
            new = replace(new, input_size=src.input_size, resize=src.resize)
        return new
    if meta.in_chans == 3:
        return replace(meta, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return meta


def resumed_preprocessing_meta(meta: DataMeta, checkpoint: Path, cfg: Config) -> DataMeta:
    """The data meta a resumed fine-tune trains with: :func:`preprocessing_meta`'s fields as the
    run's own ``checkpoint`` saved them, so a resume needs no ``model.init_from`` file any more.
    Without ``init_from`` (or with ``init_preprocess=data``), ``meta`` unchanged."""
    if cfg.model.init_from is None or cfg.model.init_preprocess == "data":
        return meta
    saved = ckpt.load_checkpoint(checkpoint).get("meta")
    if not isinstance(saved, Mapping):
        raise ckpt.CheckpointError(f"{checkpoint}: has no 'meta' entry; cannot resume the fine-tune "
                                   "with the preprocessing it started with")
    src = DataMeta.from_dict(saved)
    new = replace(meta, mean=src.mean, std=src.std)
    if meta.resize is not None and src.resize is not None:  # both sized by data.image_size
        new = replace(new, input_size=src.input_size, resize=src.resize)
    return new


def _classes_differ(model: nn.Module, source: InitSource, meta: DataMeta) -> bool:
    own = model.state_dict()
    head = HEAD_PREFIX + "weight"
    if head in own and head in source.state and own[head].shape != source.state[head].shape:
        return True
    # a resnetlab source knows its class names: the same count of other classes is a new head too
    return source.meta is not None and tuple(source.meta.classes) != tuple(meta.classes)


def load_init_weights(model: nn.Module, source: InitSource, meta: DataMeta) -> None:
    """Load ``source`` into ``model`` strictly; re-initialise the classifier when the classes
    differ (one log line). Any other mismatch raises CheckpointError listing the keys."""
    state = dict(source.state)
    own = model.state_dict()
    # BN step counters only matter for momentum=None; files saved without them (timm's hub
    # files, transformers) still fit.
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    new_head = _classes_differ(model, source, meta)
    if new_head:
        for k in [k for k in own if k.startswith(HEAD_PREFIX)]:
            state[k] = own[k]  # keep the model's freshly initialised classifier
        for k in [k for k in state if k.startswith(HEAD_PREFIX) and k not in own]:
            del state[k]
    ckpt.load_weights(model, state, source=f"model.init_from {source.path}")
    n_src = source.state.get(HEAD_PREFIX + "weight")
    src_classes = int(n_src.shape[0]) if n_src is not None else "?"
    if new_head:
        log.info("init_from %s (%s): classifier re-initialised for %d classes (the weights had %s)",
                 source.path, source.kind, len(meta.classes), src_classes)
    else:
        log.info("init_from %s (%s): all weights loaded, classifier included", source.path, source.kind)


def apply_init_from(model: nn.Module, source: InitSource | None, meta: DataMeta) -> nn.Module:
    """``model`` with the ``init_from`` weights loaded (unchanged when ``source`` is None)."""
    if source is not None:
        load_init_weights(model, source, meta)
    return model


__all__ = [
    "InitSource", "apply_init_from", "file_sha256", "load_init_weights", "preprocessing_meta",
    "read_init_from", "resolve_file", "resolve_init_from", "resumed_preprocessing_meta", "to_our_names",
]
