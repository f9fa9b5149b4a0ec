"""Recipes, the YAML files shipped inside the package (``resnetlab/recipes/*.yaml``), and :func:`load`:
defaults <- dataset recipe <- ``-c`` recipe <- ``key=value``.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from resnetlab.config.checks import data_source, validate
from resnetlab.config.overrides import Overrides, apply_pairs, override_pairs
from resnetlab.config.schema import Config, ConfigError
from resnetlab.config.typed import build_dataclass
from resnetlab.data.sources.registry import UnknownSourceError, get_source, list_sources

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # resnetlab/recipes


class _DatasetRecipes(Mapping[str, str]):
    """data.name -> the packaged recipe applied before any -c file, so that every dataset trains
    with settings that fit it (no 4-pixel shifts or flips on 8x8 digits) whatever the user
    passes. Read from the source registry each time: each source declares its recipe."""

    def __getitem__(self, name: str) -> str:
        try:
            return str(get_source(name).default_recipe)
        except UnknownSourceError:
            raise KeyError(name) from None

    def __iter__(self) -> typing.Iterator[str]:
        return iter([s.name for s in list_sources()])

    def __len__(self) -> int:
        return len(list_sources())


DATASET_RECIPES: Mapping[str, str] = _DatasetRecipes()


def recipe_names() -> list[str]:
    """Names of the packaged recipes (``-c NAME``), sorted."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(recipe: str | Path) -> tuple[Path, str]:
    """``(file, label)`` of ``recipe``: an existing YAML path, else a packaged recipe's name.

    ``label`` is what ``run.recipe`` records: the name for a packaged recipe, else the path.
    A path that does not exist and is not a recipe name raises ConfigError naming the recipes.
    """
    text = str(recipe)
    path = Path(text).expanduser()
    if path.is_file():
        packaged = path.resolve().parent == RECIPE_DIR
        return path, (path.stem if packaged else str(path))
    name = Path(text).name.removesuffix(".yaml").removesuffix(".yml")
    candidate = RECIPE_DIR / f"{name}.yaml"
    if candidate.is_file() and ("/" not in text and "\\" not in text):
        return candidate, name
    names = recipe_names()
    if candidate.is_file():  # e.g. the old configs/digits_resnet20.yaml, from a folder without it
        raise ConfigError(f"config file {text} does not exist; the packaged recipe of that name is "
                          f"`-c {name}`")
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"cannot read config file {text}: no such file, and no packaged recipe has that name; {hint}"
                      f"recipes: {', '.join(names)} (`resnetlab recipes`)")


def recipe_description(path: str | Path) -> str:
    """The first comment line of a recipe file (what it is), without the ``#``."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_recipes() -> list[dict[str, Any]]:
    """One row per packaged recipe: ``{"name", "path", "dataset_default", "description"}``.

    ``dataset_default`` is the ``data.name`` whose recipe it is (applied with no ``-c``), else None.
    """
    defaults: dict[str, str] = {}
    for source, recipe in DATASET_RECIPES.items():
        defaults.setdefault(recipe, source)
    return [{"name": n, "path": str(RECIPE_DIR / f"{n}.yaml"), "dataset_default": defaults.get(n),
             "description": recipe_description(RECIPE_DIR / f"{n}.yaml")} for n in recipe_names()]


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:  # e.g. a binary file written over it
        raise ConfigError(f"{path}: not a YAML text file (it holds binary data); restore it, e.g. "
                          f"from the config inside a checkpoint") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _apply_file(cfg: Config, data: Mapping[str, Any], path: Path) -> Config:
    try:
        return build_dataclass(Config, data, base=cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load(path: str | Path | None = None, overrides: Overrides | None = ()) -> Config:
    """Defaults <- dataset recipe <- recipe ``path`` <- ``overrides``, then :func:`validate`.

    ``path`` is a YAML file or the name of a packaged recipe (``resnetlab recipes``); the dataset
    recipe is the one the source registry declares for the ``data.name`` that the recipe and
    overrides select (``DATASET_RECIPES``). ``run.recipe`` records the recipes applied, unless the file or the
    overrides set it (a run's own ``config.yaml`` keeps its record when resumed).
    """
    pairs = override_pairs(overrides)
    file: Path | None = None
    label = ""
    data: Mapping[str, Any] = {}
    if path is not None:
        file, label = recipe_path(path)
        data = _read_yaml(file)
    # first pass: which dataset do the recipe and the overrides choose?
    first = apply_pairs(_apply_file(Config(), data, file) if file else Config(), pairs)
    cfg, applied = Config(), []
    source = data_source(first.data.name)
    ds_file, ds_label = recipe_path(source.default_recipe)
    if file is None or file.resolve() != ds_file.resolve():
        cfg = _apply_file(cfg, _read_yaml(ds_file), ds_file)
        applied.append(ds_label)
    if file is not None:
        cfg = _apply_file(cfg, data, file)
        applied.append(label)
    cfg = apply_pairs(cfg, pairs)
    recorded = "recipe" in (data.get("run") or {}) or any(k == "run.recipe" for k, _ in pairs)
    if not recorded:
        cfg = replace(cfg, run=replace(cfg.run, recipe=" <- ".join(applied) or None))
    return validate(cfg)


__all__ = ["DATASET_RECIPES", "RECIPE_DIR", "list_recipes", "load", "recipe_description", "recipe_names", "recipe_path"]
