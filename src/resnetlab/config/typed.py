"""Plain data (YAML, JSON, a checkpoint's dict) -> config dataclasses, every value type-checked.

An unknown key is refused with the closest valid key named (or, for a key another library taught,
what resnetlab calls it); a renamed key still works with a one-line deprecation warning.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass, replace
from typing import Any, Literal, Union, get_args, get_origin

from resnetlab.config.checks import validate
from resnetlab.config.schema import Config, ConfigError, all_keys, describe_type, field_types


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {describe_type(tp)}, got {value!r}{hint}")
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {getattr(tp, '__name__', tp)} keys, got {value!r}")
        return build_dataclass(typing.cast(type, tp), value, prefix=f"{key}.")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module


# Keys other libraries taught (timm, torchvision, Lightning): what resnetlab calls them instead.
FOREIGN_KEYS: dict[str, str] = {
    "pretrained": "nothing is downloaded; start from saved weights with model.init_from "
                  "(a run folder or checkpoint), or turn torchvision weights on disk into a checkpoint "
                  "with `resnetlab import torchvision FILE.pth --arch NAME`",
    "weights": "start from saved weights with model.init_from (a run folder or checkpoint)",
    "arch": "the network is model.name (see `resnetlab models`)",
    "model": "the network is model.name (see `resnetlab models`)",
    "dataset": "the data source is data.name (`resnetlab train --help` lists the sources)",
    "lr": "the learning rate is optim.lr",
    "wd": "weight decay is optim.weight_decay",
    "max_epochs": "the number of epochs is train.epochs",
    "data_dir": "the data folder is data.root",
    "output_dir": "run folders go under run.root, named run.name",
}


def unknown_key_error(key: str) -> ConfigError:
    """The error for unknown key ``key``: what resnetlab calls a key another library taught, else
    the closest valid key."""
    last = key.rsplit(".", 1)[-1]
    if last in FOREIGN_KEYS and key not in all_keys(Config):
        return ConfigError(f"unknown config key {key!r}: {FOREIGN_KEYS[last]}")
    close = difflib.get_close_matches(key, all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


# Old key -> new key. Old names keep working (checkpoints and recipes written before the
# rename) with a one-line deprecation warning.
RENAMED = {"model.checkpoint_every": "model.recompute_every",
           "model.checkpoint_stages": "model.recompute_stages"}


def renamed_key(dotted: str) -> str:
    """The current name of ``dotted`` (:data:`RENAMED`), logging a deprecation warning when it is
    an old one; other keys come back unchanged."""
    new = RENAMED.get(dotted)
    if new is None:
        return dotted
    import logging

    logging.getLogger("resnetlab").warning("config key %s is now %s (activation recomputation, not "
                                           "checkpoint files); the old name still works", dotted, new)
    return new


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data`` over ``base`` (or the defaults)."""
    hints = field_types(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for old_key, value in data.items():
        key = renamed_key(f"{prefix}{old_key}").rsplit(".", 1)[-1] if isinstance(old_key, str) else old_key
        if key not in names:
            raise unknown_key_error(f"{prefix}{key}")
        tp = hints[key]
        if is_dataclass(tp) and isinstance(value, Mapping):
            sub_base = getattr(base, key) if base is not None else None
            kwargs[key] = build_dataclass(typing.cast(type, tp), value, prefix=f"{prefix}{key}.", base=sub_base)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    if base is not None:
        return replace(base, **kwargs)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], base: Config | None = None, *, check: bool = True) -> Config:
    """Inverse of :func:`to_dict`; also merges a partial dict over ``base``. Values are
    type-checked; ``check=False`` skips :func:`validate` (for a partial recipe that overrides
    complete later, e.g. a CIFAR recipe before its ``data.root``)."""
    cfg = build_dataclass(Config, data, base=base or Config())
    return validate(cfg) if check else cfg


__all__ = ["FOREIGN_KEYS", "RENAMED", "build_dataclass", "from_dict", "renamed_key", "unknown_key_error"]
