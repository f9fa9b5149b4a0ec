"""Typed, frozen configuration: defaults <- dataset recipe <- ``-c`` recipe <- ``key=value``.

Every value carries its unit and reason in a comment (``resnetlab config keys`` lists them).
``load()`` builds a :class:`Config`: the dataclass defaults, then the packaged recipe of the
dataset that ``data.name`` ends up naming (``recipes/digits.yaml`` ...), then the ``-c`` recipe
(a packaged name such as ``cifar10_resnet56`` or a YAML path), then the overrides; the recipes
applied are recorded in ``run.recipe``. ``validate()`` checks cross-field rules, and unknown keys
are refused with the closest valid key named, so a typo such as ``optim.lr_rate=0.1`` never
silently trains with the default.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from resnetlab.data.sources.registry import Source, UnknownSourceError, get_source, list_sources
from resnetlab.models.spec import ModelSpec, ModelSpecError


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
# dict <-> dataclass, with type checking


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


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
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {_describe(tp)}, got {value!r}{hint}")
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
        return _build(typing.cast(type, tp), value, prefix=f"{key}.")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted config key of dataclass ``cls`` (``["model.name", ..., "seed"]``), in field
    order; nested dataclasses are walked, so only leaf keys are listed."""
    keys = []
    hints = _type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


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


def _unknown_key(key: str) -> ConfigError:
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


def _renamed(dotted: str) -> str:
    new = RENAMED.get(dotted)
    if new is None:
        return dotted
    import logging

    logging.getLogger("resnetlab").warning("config key %s is now %s (activation recomputation, not "
                                           "checkpoint files); the old name still works", dotted, new)
    return new


def _build(cls: type, data: Mapping[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data`` over ``base`` (or the defaults)."""
    hints = _type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for old_key, value in data.items():
        key = _renamed(f"{prefix}{old_key}").rsplit(".", 1)[-1] if isinstance(old_key, str) else old_key
        if key not in names:
            raise _unknown_key(f"{prefix}{key}")
        tp = hints[key]
        if is_dataclass(tp) and isinstance(value, Mapping):
            sub_base = getattr(base, key) if base is not None else None
            kwargs[key] = _build(typing.cast(type, tp), value, prefix=f"{prefix}{key}.", base=sub_base)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    if base is not None:
        return replace(base, **kwargs)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python dict (lists for tuples) of a config, for YAML, JSON and checkpoints."""

    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(data: Mapping[str, Any], base: Config | None = None, *, check: bool = True) -> Config:
    """Inverse of :func:`to_dict`; also merges a partial dict over ``base``. Values are
    type-checked; ``check=False`` skips :func:`validate` (for a partial recipe that overrides
    complete later, e.g. a CIFAR recipe before its ``data.root``)."""
    cfg = _build(Config, data, base=base or Config())
    return validate(cfg) if check else cfg


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
        tp = _type_hints(cls).get(part)
        if tp is None or not is_dataclass(tp):
            return None
        cls = typing.cast(type, tp)
    return _type_hints(cls).get(last)


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
        raise _unknown_key(dotted)


# ----------------------------------------------------------------------------------------------
# recipes: YAML files shipped inside the package (resnetlab/recipes/*.yaml)

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


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
        return _build(Config, data, base=cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


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
    pairs = [(_renamed(key), value) for key, value in pairs]
    for key, _ in pairs:
        _check_key(key)
    return pairs


def _apply_pairs(cfg: Config, pairs: Iterable[tuple[str, Any]]) -> Config:
    for key, value in pairs:
        cfg = _build(Config, _nest(key, value), base=cfg)
    return cfg


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
    first = _apply_pairs(_apply_file(Config(), data, file) if file else Config(), pairs)
    cfg, applied = Config(), []
    source = _data_source(first.data.name)
    ds_file, ds_label = recipe_path(source.default_recipe)
    if file is None or file.resolve() != ds_file.resolve():
        cfg = _apply_file(cfg, _read_yaml(ds_file), ds_file)
        applied.append(ds_label)
    if file is not None:
        cfg = _apply_file(cfg, data, file)
        applied.append(label)
    cfg = _apply_pairs(cfg, pairs)
    recorded = "recipe" in (data.get("run") or {}) or any(k == "run.recipe" for k, _ in pairs)
    if not recorded:
        cfg = replace(cfg, run=replace(cfg.run, recipe=" <- ".join(applied) or None))
    return validate(cfg)


def apply_overrides(cfg: Config, overrides: Overrides | None) -> Config:
    """``cfg`` with ``key=value`` strings (or a mapping) applied in order, then :func:`validate`."""
    return validate(_apply_pairs(cfg, override_pairs(overrides)))


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
    hints, comments = _type_hints(cls), _field_comments(cls)
    rows: list[dict[str, Any]] = []
    for f in fields(cls):
        tp, value = hints[f.name], getattr(base, f.name)
        if is_dataclass(tp):
            rows.extend(describe_keys(typing.cast(type, tp), f"{prefix}{f.name}.", value))
        else:
            rows.append({"key": f"{prefix}{f.name}", "type": _describe(tp),
                         "default": to_dict(value) if is_dataclass(value) else
                         (list(value) if isinstance(value, tuple) else value),
                         "comment": comments.get(f.name, "")})
    return rows


def _leaves(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a config (tuples item by item)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple):
            yield from ((f"{prefix}{f.name}[{i}]", v) for i, v in enumerate(value))
        else:
            yield f"{prefix}{f.name}", value


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
    "train.test_every_epoch", "train.resume", "train.sync_bn",  # SyncBN over W ranks = one process's BN
    "data.num_workers", "data.in_memory", "data.check_images",
    "data.root",  # the same files moved elsewhere; the split is drawn from the seed and the files
})


def resume_changes(saved: Config, new: Config, where: str) -> dict[str, tuple[Any, Any]]:
    """``{key: (run's value, new value)}`` of the keys ``new`` changes from the run's ``saved``
    config; ConfigError naming the first key that defines the run (``where``: the run folder)."""
    old, changed = dict(_leaves(saved)), {}
    for key, value in _leaves(new):
        if old.get(key, value) == value:
            continue
        base = key.split("[", 1)[0]
        if base not in RESUMABLE_KEYS:
            raise ConfigError(
                f"{base} cannot change when resuming {where}: it defines the run (the run's value: "
                f"{_shown(getattr_dotted(saved, base))}); start a new run (another run.name) to change it")
        changed[key] = (old[key], value)
    for key in old.keys() - dict(_leaves(new)).keys():  # a tuple got shorter
        base = key.split("[", 1)[0]
        raise ConfigError(f"{base} cannot change when resuming {where}: it defines the run (the run's "
                          f"value: {_shown(getattr_dotted(saved, base))}); start a new run to change it")
    return changed


def getattr_dotted(cfg: Any, dotted: str) -> Any:
    """``getattr_dotted(cfg, "data.val_fraction")`` -> ``cfg.data.val_fraction``."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _shown(value: Any) -> str:
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=10**6).strip().removesuffix("...").strip()


def _data_source(name: str) -> Source:
    """The registry's source for ``data.name``; ConfigError with the closest name otherwise."""
    try:
        return get_source(name)
    except UnknownSourceError as e:
        raise ConfigError(f"data.name: {e}") from None


def validate(cfg: Config) -> Config:
    """Cross-field checks; returns ``cfg`` unchanged or raises ConfigError naming the key."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for key, value in _leaves(cfg):  # NaN passes every comparison below: refuse it first
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    need(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    for key, value in _leaves(cfg):  # sane ranges: a typo of a few zeros must not run for years
        if key in BOUNDS and isinstance(value, int) and value > BOUNDS[key][0]:
            raise ConfigError(f"{key}={value} is above its bound of {BOUNDS[key][0]:,} ({BOUNDS[key][1]}); "
                              f"give a value up to {BOUNDS[key][0]}")
    if cfg.run.name is not None:
        problem = run_name_problem(cfg.run.name)
        shown = cfg.run.name if len(cfg.run.name) <= 60 else cfg.run.name[:57] + "..."
        need(problem is None, f"run.name={shown!r}: {problem}")
    need(0 <= cfg.seed < 2**64, f"seed must be in [0, 2**64), got {cfg.seed}")
    need(cfg.train.threads >= 0, f"train.threads must be >= 0 (0 = torch's default), got {cfg.train.threads}")
    need(0 <= cfg.optim.momentum < 1,
         f"optim.momentum must be in [0, 1) (SGD momentum, adamw's beta1), got {cfg.optim.momentum}")
    need(cfg.optim.gamma > 0, f"optim.gamma must be > 0 (the lr is multiplied by it), got {cfg.optim.gamma}")
    need(cfg.optim.min_lr >= 0, f"optim.min_lr must be >= 0, got {cfg.optim.min_lr}")
    need(cfg.optim.warmup_lr >= 0, f"optim.warmup_lr must be >= 0, got {cfg.optim.warmup_lr}")
    need(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    need(cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
    need(cfg.train.eval_every >= 1, "train.eval_every must be >= 1")
    need(cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0")
    need(cfg.train.sync_every >= 0, f"train.sync_every must be >= 0 (0 = auto), got {cfg.train.sync_every}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0")
    need(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)")
    need(all(0 < m < 1 for m in cfg.optim.milestones), "optim.milestones are fractions in (0, 1)")
    need(list(cfg.optim.milestones) == sorted(cfg.optim.milestones), "optim.milestones must increase")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    if cfg.optim.ema_decay is not None:
        need(0 < cfg.optim.ema_decay < 1, f"optim.ema_decay must be in (0, 1), got {cfg.optim.ema_decay}")
    if cfg.optim.clip_grad_norm is not None:
        need(cfg.optim.clip_grad_norm > 0, "optim.clip_grad_norm must be > 0")
    need(0 <= cfg.data.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    need(0 < cfg.data.test_fraction < 1, "data.test_fraction must be in (0, 1)")
    need(cfg.data.augment.crop_padding >= 0, "data.augment.crop_padding must be >= 0")
    need(0 < cfg.data.augment.scale_min <= 1, "data.augment.scale_min must be in (0, 1]")
    need(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    need(cfg.data.image_size >= 8, "data.image_size must be >= 8")
    need(cfg.data.resize >= cfg.data.image_size, "data.resize must be >= data.image_size")
    source = _data_source(cfg.data.name)
    if source.needs_root:
        need(cfg.data.root is not None or (cfg.data.download and source.can_download),
             f"data.root is required for data.name={cfg.data.name}"
             + (" (or data.download=true where there is network)" if source.can_download else ""))
    need(not cfg.data.download or source.can_download,
         f"data.download=true: data.name={cfg.data.name} has no official files to fetch; "
         "set data.download=false")
    need(cfg.optim.backbone_lr_scale >= 0, "optim.backbone_lr_scale must be >= 0")
    need(0 < cfg.optim.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    need(cfg.data.train_per_class >= 0, "data.train_per_class must be >= 0 (0 = all)")
    need(len(set(cfg.data.classes)) == len(cfg.data.classes), f"data.classes repeats a name: {list(cfg.data.classes)}")
    if cfg.train.unfreeze_at_epoch is not None:
        need(bool(cfg.train.freeze), "train.unfreeze_at_epoch needs train.freeze (what to unfreeze)")
        need(1 <= cfg.train.unfreeze_at_epoch <= cfg.train.epochs,
             f"train.unfreeze_at_epoch must be in [1, train.epochs={cfg.train.epochs}], "
             f"got {cfg.train.unfreeze_at_epoch}")
    if cfg.model.init_sha256 is not None:
        need(len(cfg.model.init_sha256) == 64 and all(c in "0123456789abcdef" for c in cfg.model.init_sha256),
             f"model.init_sha256 must be 64 lowercase hex digits, got {cfg.model.init_sha256!r}")
        need(cfg.model.init_from is not None, "model.init_sha256 is set but model.init_from is not")
    try:  # the network's options: ModelSpec owns their checks (imports torch for the registry)
        cfg.model.check(prefix="model.")
    except ModelSpecError as e:
        raise ConfigError(str(e)) from None
    return cfg


__all__ = [
    "AugmentConfig", "Config", "apply_overrides", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig",
    "RunConfig", "TrainConfig", "from_dict", "load", "parse_override",
    "to_dict", "validate", "DATASET_RECIPES", "RECIPE_DIR", "describe_keys", "list_recipes",
    "override_pairs", "recipe_names", "recipe_path", "BOUNDS", "RESUMABLE_KEYS", "run_name_problem",
    "resume_changes", "getattr_dotted", "flatten", "all_keys",
]
