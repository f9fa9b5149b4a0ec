"""``key=value`` words (and mappings of dotted keys) -> checked ``(key, value)`` pairs, applied in order.

Values are read as YAML scalars, except in string fields, which take the text as given
(``run.name=007`` is the string ``"007"``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import is_dataclass
from typing import Any, Union, get_args, get_origin

import yaml

from resnetlab.config.checks import validate
from resnetlab.config.schema import Config, ConfigError, all_keys, field_types
from resnetlab.config.typed import RENAMED, build_dataclass, renamed_key, unknown_key_error


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _field_type(dotted: str) -> Any:
    """The declared type of config key ``dotted`` (``run.name`` -> ``str | None``), or None."""
    cls: Any = Config
    *path, last = dotted.split(".")
    for part in path:
        tp = field_types(cls).get(part)
        if tp is None or not is_dataclass(tp):
            return None
        cls = typing.cast(type, tp)
    return field_types(cls).get(last)


def _text_kind(tp: Any) -> str | None:
    """``"str"``, ``"optional"`` (``str | None``) or ``"tuple"`` (``tuple[str, ...]``) for the
    string fields whose command-line text is taken literally; None for every other type."""
    if tp is str:
        return "str"
    if get_origin(tp) in (Union, types.UnionType) and set(get_args(tp)) == {str, type(None)}:
        return "optional"
    if get_origin(tp) is tuple and get_args(tp)[:1] == (str,):
        return "tuple"
    return None


def _unquote(text: str) -> str:
    """``'0x10'`` or ``"null"`` -> the text inside the quotes (how to spell a literal ``null``)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return loaded if isinstance(loaded, str) else text
    return text


# Command-line text of a ``str | None`` field that means None (the field's "unset" default):
# exactly these words; anything else, ``~`` included, is the literal text.
NULL_WORDS = ("", "null")


def _literal(raw: str, kind: str) -> Any:
    """The value of a string field's command-line text, taken literally (not by YAML's scalar
    rules, which turn ``0x10`` into 16, ``007`` into 7 and ``yes`` into True)."""
    if kind == "optional" and raw.strip() in NULL_WORDS:
        return None
    if kind == "tuple":
        inner = raw.strip()
        if inner.startswith("[") and inner.endswith("]"):  # YAML flow syntax: [cat, dog]
            inner = inner[1:-1]
        return [_unquote(v) for v in inner.replace(",", " ").split() if v]
    return _unquote(raw)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.05"`` -> ``("optim.lr", 0.05)``: values are read as YAML scalars, except in
    string fields, which take the text as given (``run.name=007`` is the string ``"007"``; quotes
    are removed; in a ``str | None`` field ``null`` or an empty value means None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    kind = _text_kind(_field_type(RENAMED.get(key, key)))
    if kind is not None:
        return key, _literal(raw, kind)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_key(dotted: str) -> None:
    if dotted not in all_keys(Config):
        raise unknown_key_error(dotted)


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"train": {"epochs": 5}}`` -> ``[("train.epochs", 5)]``: nested mappings as dotted keys."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.extend(flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


Overrides = Iterable[str] | Mapping[str, Any]


def override_pairs(overrides: Overrides | None) -> list[tuple[str, Any]]:
    """``key=value`` strings, or a mapping (``{"train.epochs": 5}`` or nested), as checked pairs.

    A bare string is refused: iterating it would apply one character at a time.
    """
    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides must be a list of 'key=value' strings or a dict, not the string "
                          f"{overrides!r}; write [{overrides!r}]")
    if isinstance(overrides, Mapping):
        pairs = flatten(overrides)
    else:
        pairs = []
        for item in overrides:
            if not isinstance(item, str):
                raise ConfigError(f"override {item!r} is not a 'key=value' string")
            pairs.append(parse_override(item))
    pairs = [(renamed_key(key), value) for key, value in pairs]
    for key, _ in pairs:
        _check_key(key)
    return pairs


def apply_pairs(cfg: Config, pairs: Iterable[tuple[str, Any]]) -> Config:
    """``cfg`` with checked ``(dotted key, value)`` pairs (:func:`override_pairs`) applied in order,
    each value type-checked; not validated (the caller validates the result once)."""
    for key, value in pairs:
        cfg = build_dataclass(Config, _nest(key, value), base=cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: Overrides | None) -> Config:
    """``cfg`` with ``key=value`` strings (or a mapping) applied in order, then :func:`validate`."""
    return validate(apply_pairs(cfg, override_pairs(overrides)))


__all__ = ["NULL_WORDS", "Overrides", "apply_overrides", "apply_pairs", "flatten", "override_pairs", "parse_override"]
