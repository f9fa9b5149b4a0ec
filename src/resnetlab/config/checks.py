"""Checking a built config: cross-field rules, sane ranges, run names, and what may change on resume.

:func:`validate` runs named steps in a fixed order and raises :class:`ConfigError` naming the
first key at fault; :func:`resume_changes` tells which keys a resumed run may change.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from resnetlab.config.schema import Config, ConfigError, getattr_dotted, leaves
from resnetlab.data.sources.registry import Source, UnknownSourceError, get_source
from resnetlab.models.spec import ModelSpecError

# Upper bounds of the integer keys that have a sane range: (bound, why). A value above its bound
# is a typo (train.epochs=1000000000000 would run until killed), refused with the bound named.
BOUNDS: dict[str, tuple[int, str]] = {
    "train.epochs": (100_000, "ImageNet's longest published schedules are under 1,000 epochs"),
    "train.batch_size": (1_048_576, "2**20 images per optimiser step"),
    "train.eval_batch_size": (1_048_576, "2**20 images per forward pass"),
    "data.image_size": (8_192, "pixels per side"),
    "data.resize": (16_384, "pixels on the shorter side"),
    "data.num_workers": (512, "DataLoader worker processes"),
    "train.threads": (4_096, "torch CPU threads"),
}


NAME_MAX = 255  # bytes in one path component on ext4, XFS, btrfs, APFS and NTFS


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run folder name (one path component under ``run.root``), or None."""
    if not name:
        return "empty; give a folder name, or leave run.name unset for a timestamped one"
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return ("a run name is one folder name under run.root, without '/', '\\', NUL, '.' or '..'; "
                "to put runs elsewhere set run.root")
    if name.startswith("-"):
        return "a run name may not start with '-' (commands would read it as an option); pick another name"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"{len(name.encode('utf-8', 'surrogateescape'))} bytes; file systems allow {NAME_MAX} per folder name; use a shorter name"
    return None


# Keys that may change when a run is resumed: how long it trains (train.epochs, never below the
# epochs already done), where and how fast it runs, what it logs. Every other key defines the
# run (seed, data and its split, model, batch size, optimiser): changing one mid-run would redraw
# the split (images move between train, val and test) or make the result another run's.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.device", "train.threads", "train.quiet", "train.tensorboard",
    "train.compile", "train.channels_last", "train.cudnn_benchmark", "train.tf32", "train.sync_every",
    "train.checkpoint_every_steps", "train.eval_every", "train.eval_batch_size", "train.test_at_end",
    "train.test_every_epoch", "train.test_tta", "train.resume", "train.sync_bn",  # SyncBN over W ranks = one process's BN
    "data.num_workers", "data.in_memory", "data.check_images",
    "data.root",  # the same files moved elsewhere; the split is drawn from the seed and the files
})


def resume_changes(saved: Config, new: Config, where: str) -> dict[str, tuple[Any, Any]]:
    """``{key: (run's value, new value)}`` of the keys ``new`` changes from the run's ``saved``
    config; ConfigError naming the first key that defines the run (``where``: the run folder)."""
    old, changed = dict(leaves(saved)), {}
    for key, value in leaves(new):
        if old.get(key, value) == value:
            continue
        base = key.split("[", 1)[0]
        if base not in RESUMABLE_KEYS:
            raise ConfigError(
                f"{base} cannot change when resuming {where}: it defines the run (the run's value: "
                f"{_shown(getattr_dotted(saved, base))}); start a new run (another run.name) to change it")
        changed[key] = (old[key], value)
    for key in old.keys() - dict(leaves(new)).keys():  # a tuple got shorter
        base = key.split("[", 1)[0]
        raise ConfigError(f"{base} cannot change when resuming {where}: it defines the run (the run's "
                          f"value: {_shown(getattr_dotted(saved, base))}); start a new run to change it")
    return changed


def _shown(value: Any) -> str:
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=10**6).strip().removesuffix("...").strip()


def data_source(name: str) -> Source:
    """The registry's source for ``data.name``; ConfigError with the closest name otherwise."""
    try:
        return get_source(name)
    except UnknownSourceError as e:
        raise ConfigError(f"data.name: {e}") from None


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _finite_and_in_range(cfg: Config) -> None:
    """No NaN or inf anywhere (NaN passes every comparison below), at least one epoch, and no
    integer above its :data:`BOUNDS` (a typo of a few zeros must not run for years)."""
    for key, value in leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    _need(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    for key, value in leaves(cfg):
        if key in BOUNDS and isinstance(value, int) and value > BOUNDS[key][0]:
            raise ConfigError(f"{key}={value} is above its bound of {BOUNDS[key][0]:,} ({BOUNDS[key][1]}); "
                              f"give a value up to {BOUNDS[key][0]}")


def _run_name_and_seed(cfg: Config) -> None:
    if cfg.run.name is not None:
        problem = run_name_problem(cfg.run.name)
        shown = cfg.run.name if len(cfg.run.name) <= 60 else cfg.run.name[:57] + "..."
        _need(problem is None, f"run.name={shown!r}: {problem}")
    _need(0 <= cfg.seed < 2**64, f"seed must be in [0, 2**64), got {cfg.seed}")
    _need(cfg.train.threads >= 0, f"train.threads must be >= 0 (0 = torch's default), got {cfg.train.threads}")


def _optimiser_factors(cfg: Config) -> None:
    _need(0 <= cfg.optim.momentum < 1,
          f"optim.momentum must be in [0, 1) (SGD momentum, adamw's beta1), got {cfg.optim.momentum}")
    _need(cfg.optim.gamma > 0, f"optim.gamma must be > 0 (the lr is multiplied by it), got {cfg.optim.gamma}")
    _need(cfg.optim.min_lr >= 0, f"optim.min_lr must be >= 0, got {cfg.optim.min_lr}")
    _need(cfg.optim.warmup_lr >= 0, f"optim.warmup_lr must be >= 0, got {cfg.optim.warmup_lr}")


def _batches_and_steps(cfg: Config) -> None:
    _need(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    _need(cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
    _need(cfg.train.eval_every >= 1, "train.eval_every must be >= 1")
    _need(cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0")
    _need(cfg.train.sync_every >= 0, f"train.sync_every must be >= 0 (0 = auto), got {cfg.train.sync_every}")


def _learning_rate_schedule(cfg: Config) -> None:
    _need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    _need(cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _need(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)")
    _need(all(0 < m < 1 for m in cfg.optim.milestones), "optim.milestones are fractions in (0, 1)")
    _need(list(cfg.optim.milestones) == sorted(cfg.optim.milestones), "optim.milestones must increase")
    _need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    if cfg.optim.ema_decay is not None:
        _need(0 < cfg.optim.ema_decay < 1, f"optim.ema_decay must be in (0, 1), got {cfg.optim.ema_decay}")
    if cfg.optim.clip_grad_norm is not None:
        _need(cfg.optim.clip_grad_norm > 0, "optim.clip_grad_norm must be > 0")


def _data_options(cfg: Config) -> None:
    """Fractions, augmentation and geometry, then what the data source needs (a root, a download)."""
    _need(0 <= cfg.data.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    _need(0 < cfg.data.test_fraction < 1, "data.test_fraction must be in (0, 1)")
    _need(cfg.data.augment.crop_padding >= 0, "data.augment.crop_padding must be >= 0")
    _need(0 < cfg.data.augment.scale_min <= 1, "data.augment.scale_min must be in (0, 1]")
    _need(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    _need(cfg.data.image_size >= 8, "data.image_size must be >= 8")
    _need(cfg.data.resize >= cfg.data.image_size, "data.resize must be >= data.image_size")
    source = data_source(cfg.data.name)
    if source.needs_root:
        _need(cfg.data.root is not None or (cfg.data.download and source.can_download),
              f"data.root is required for data.name={cfg.data.name}"
              + (" (or data.download=true where there is network)" if source.can_download else ""))
    _need(not cfg.data.download or source.can_download,
          f"data.download=true: data.name={cfg.data.name} has no official files to fetch; "
          "set data.download=false")


def _fine_tuning(cfg: Config) -> None:
    """Per-layer learning rates, the subset drawn, freezing, and the weights started from."""
    _need(cfg.optim.backbone_lr_scale >= 0, "optim.backbone_lr_scale must be >= 0")
    _need(0 < cfg.optim.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    _need(cfg.data.train_per_class >= 0, "data.train_per_class must be >= 0 (0 = all)")
    _need(len(set(cfg.data.classes)) == len(cfg.data.classes), f"data.classes repeats a name: {list(cfg.data.classes)}")
    if cfg.train.unfreeze_at_epoch is not None:
        _need(bool(cfg.train.freeze), "train.unfreeze_at_epoch needs train.freeze (what to unfreeze)")
        _need(1 <= cfg.train.unfreeze_at_epoch <= cfg.train.epochs,
              f"train.unfreeze_at_epoch must be in [1, train.epochs={cfg.train.epochs}], "
              f"got {cfg.train.unfreeze_at_epoch}")
    if cfg.model.init_sha256 is not None:
        _need(len(cfg.model.init_sha256) == 64 and all(c in "0123456789abcdef" for c in cfg.model.init_sha256),
              f"model.init_sha256 must be 64 lowercase hex digits, got {cfg.model.init_sha256!r}")
        _need(cfg.model.init_from is not None, "model.init_sha256 is set but model.init_from is not")


def _model_options(cfg: Config) -> None:
    try:  # the network's options: ModelSpec owns their checks (imports torch for the registry)
        cfg.model.check(prefix="model.")
    except ModelSpecError as e:
        raise ConfigError(str(e)) from None


# The steps of validate(), in the order their errors are reported (the first key at fault wins).
_STEPS = (_finite_and_in_range, _run_name_and_seed, _optimiser_factors, _batches_and_steps, _learning_rate_schedule,
          _data_options, _fine_tuning, _model_options)


def validate(cfg: Config) -> Config:
    """Cross-field checks; returns ``cfg`` unchanged or raises ConfigError naming the key."""
    for step in _STEPS:
        step(cfg)
    return cfg


__all__ = ["BOUNDS", "NAME_MAX", "RESUMABLE_KEYS", "data_source", "resume_changes", "run_name_problem", "validate"]
