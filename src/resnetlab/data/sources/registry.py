"""The registry of data sources: each module of ``resnetlab/data/sources/`` declares its own.

A source is a :class:`Source` (name, where its files come from, image size, channels, classes,
evaluation resampling, default recipe, and the function that loads it) registered with
:func:`register_source` when its module is imported, as pycls's dataset dict and timm's
``create_dataset`` collect theirs. Config validation (``data.name``, did-you-mean, whether
``data.root`` is needed), the dataset's recipe, ``--help``, ``resnetlab recipes``,
``reproduce --data``, evaluation and fine-tuning all read from here; nothing else in the package
names a dataset. Adding one is a module in this folder plus its recipe YAML.

This module imports nothing of resnetlab (config, below the data layer, reads it) and the
source modules import torch only inside their loaders, so listing sources stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: How evaluation and prediction map an image of any size to the source's input size:
#: ``box`` (area average, how scikit-learn's 8x8 digits were made from 32x32 bitmaps),
#: ``bilinear`` (antialiased), or ``resize_crop`` (shorter side to data.resize, centre crop to
#: data.image_size, torchvision's ImageNet evaluation).
Resample = Literal["box", "bilinear", "resize_crop"]


@dataclass(frozen=True)
class Source:
    """What resnetlab knows about one data source, declared by its module."""

    name: str  # the value of data.name
    summary: str  # one line: what the images are (for --help and `resnetlab recipes`)
    # load(cfg: DataConfig, seed: int, needs: frozenset[str]) -> Datasets; ``needs`` are the
    # splits the caller reads (a source may skip decoding the others)
    load: Callable[[Any, int, frozenset[str]], Any]
    files: str = ""  # where the files are found or how they are read, for --help and errors
    needs_root: bool = False  # data.root is required (unless data.download can fetch them)
    can_download: bool = False  # data.download=true fetches the official files
    in_chans: int = 3  # channels the network sees
    image_size: tuple[int, int] | None = None  # (h, w) pixels; None: data.image_size
    classes: tuple[str, ...] | None = None  # label id -> name; None: found in the files
    eval_resample: Resample = "bilinear"
    stats: Literal["train", "imagenet"] = "train"  # normalise by the training split, or fixed constants
    split_folders: bool = False  # val/test come from folders beside train/ rather than a held share
    recipe: str | Path | None = None  # packaged recipe name or YAML path applied first; None: name

    @property
    def default_recipe(self) -> str | Path:
        """The recipe ``config.load`` applies before any ``-c`` file for this source."""
        return self.name if self.recipe is None else self.recipe


_SOURCES: dict[str, Source] = {}
_discovered = False


class UnknownSourceError(LookupError):
    """``data.name`` names no registered source; the message suggests the closest."""


def register_source(source: Source, *, replace: bool = False) -> Source:
    """Add ``source`` to the registry (``replace=True`` to redefine a name); returns it."""
    if not source.name or not source.name.replace("_", "").isalnum():
        raise ValueError(f"data source name {source.name!r}: letters, digits and _ only")
    if source.name in _SOURCES and not replace and _SOURCES[source.name] != source:
        raise ValueError(f"data source {source.name!r} is already registered")
    _SOURCES[source.name] = source
    return source


def unregister_source(name: str) -> None:
    """Remove ``name`` (for tests that register a throwaway source)."""
    _SOURCES.pop(name, None)


def _discover() -> None:
    """Import every module of this package once: each registers its sources."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rsplit(".", 1)[0]
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def source_names(*, split_folders: bool | None = None) -> list[str]:
    """Names of the registered sources, in registration order; ``split_folders=False``: only
    those that are one labelled set split by the seed (the experiments' ``--data`` choices)."""
    _discover()
    return [s.name for s in _SOURCES.values()
            if split_folders is None or s.split_folders == split_folders]


def list_sources() -> list[Source]:
    """The registered sources, in registration order."""
    _discover()
    return list(_SOURCES.values())


def find_source(name: str) -> Source | None:
    """The source called ``name``, or None."""
    _discover()
    return _SOURCES.get(name)


def get_source(name: str) -> Source:
    """The source called ``name``; :class:`UnknownSourceError` naming the closest otherwise."""
    source = find_source(name)
    if source is None:
        close = difflib.get_close_matches(str(name), list(_SOURCES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownSourceError(f"unknown data source {name!r}{hint}; data sources: "
                                 f"{', '.join(_SOURCES)}")
    return source


__all__ = ["Resample", "Source", "UnknownSourceError", "find_source", "get_source", "list_sources",
           "register_source", "source_names", "unregister_source"]
