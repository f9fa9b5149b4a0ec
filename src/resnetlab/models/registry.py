"""Model registry: every variant is a name plus the keyword arguments that build it.

    register_model("resnet56", block=BasicBlock, layers=(9, 9, 9), stem="cifar", shortcut="A")
    model = create_model("resnet56", num_classes=100)

The registered variants are at the bottom of this file, as data.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from .base import ClassifierNet
from .blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from .features import FeatureExtractor
from .resnet import ResNet

BuilderT = TypeVar("BuilderT", bound=Callable[..., ClassifierNet])


@dataclass
class ModelEntry:
    """One registered variant: ``builder(**defaults, **overrides)`` makes the model."""

    name: str
    builder: Callable[..., ClassifierNet] = ResNet
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, /, **defaults: Any) -> Callable[[BuilderT], BuilderT]:
    """Register ``name`` as ``ResNet(**defaults)``; the return value is an optional decorator.

    Call style (a variant is data)::

        register_model("resnet20", block=BasicBlock, layers=(3, 3, 3), stem="cifar", shortcut="A")

    Decorator style (a custom builder; ``defaults`` become its default keyword arguments)::

        @register_model("resnet20_wide", block=BasicBlock, layers=(3, 3, 3), stem="cifar")
        def resnet20_wide(**kwargs) -> ResNet:
            return ResNet(stem_width=64, **kwargs)

    Raises ``ValueError`` if the name is taken.
    """
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    entry = ModelEntry(name, ResNet, dict(defaults))
    _REGISTRY[name] = entry

    def use_builder(builder: BuilderT) -> BuilderT:
        entry.builder = builder
        return builder

    return use_builder


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (list_models() gives all {len(_REGISTRY)})"
        ) from None


def _check_overrides(entry: ModelEntry, overrides: dict[str, Any]) -> None:
    params = inspect.signature(entry.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the builder forwards **kwargs; let the callee judge
    valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"create_model({entry.name!r}) got an unknown argument {key!r}{hint} "
                f"(valid: {', '.join(valid)})"
            )


@overload
def create_model(name: str, /, *, features_only: Literal[False] = False,
                 out_indices: Sequence[int] | None = None, **overrides: Any) -> ClassifierNet: ...


@overload
def create_model(name: str, /, *, features_only: Literal[True],
                 out_indices: Sequence[int] | None = None, **overrides: Any) -> FeatureExtractor: ...


def create_model(name: str, /, *, features_only: bool = False, out_indices: Sequence[int] | None = None,
                 **overrides: Any) -> ClassifierNet | FeatureExtractor:
    """Build the registered model ``name``; ``overrides`` replace its registered defaults.

    Unknown names raise ``ValueError`` naming the closest registered ones; unknown keyword
    arguments raise ``TypeError`` naming the closest valid one. The model gets ``.arch = name``.
    ``features_only=True`` returns the stem and stages as a :class:`FeatureExtractor` whose
    forward gives the feature maps of ``out_indices`` (0 = stem, i = stage i; default all), as
    timm's ``create_model`` does.
    """
    entry = _entry(name)
    if overrides.pop("pretrained", False) or overrides.pop("weights", None) is not None:
        # weights live a layer above the models (their cards need the data meta)
        raise TypeError(f"resnetlab.models.create_model({name!r}) builds the network only; for "
                        f"weights call resnetlab.create_model({name!r}, pretrained=True) or "
                        "weights=NAME (`resnetlab weights` lists what ships)")
    _check_overrides(entry, overrides)
    model = entry.builder(**{**entry.defaults, **overrides})
    model.arch = name
    if features_only:
        return FeatureExtractor(model, out_indices)
    if out_indices is not None:
        raise TypeError("create_model: out_indices needs features_only=True")
    return model


def model_defaults(name: str) -> dict[str, Any]:
    """A copy of the keyword arguments registered for ``name``."""
    return dict(_entry(name).defaults)


def _natural_key(name: str) -> list[Any]:
    # "resnet20" < "resnet110": compare digit runs as numbers.
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern``, in natural order (20 < 110)."""
    return sorted(fnmatch.filter(_REGISTRY, pattern), key=_natural_key)


# ----------------------------------------------------------------------------------------
# The variants. CIFAR nets (He et al. 2015, Sec. 4.2): depth 6n+2 and option A shortcuts, so a
# resnet has exactly its plain twin's parameters (Table 6 counts). Plain twins stop at 110 like
# the paper's Fig. 6; a plain 1202-layer net's gradients overflow float32 at init.
for _depth in (20, 32, 44, 56, 110, 1202):
    _n = (_depth - 2) // 6
    register_model(
        f"resnet{_depth}", block=BasicBlock, layers=(_n, _n, _n), stem="cifar", shortcut="A"
    )
    if _depth <= 110:
        register_model(
            f"plain{_depth}", block=BasicBlock, layers=(_n, _n, _n), stem="cifar", plain=True
        )

# Pre-activation CIFAR nets (He et al. 2016). Shortcut B: the authors' code
# (KaimingHe/resnet-1k-layers) uses a 1x1 conv projection, fed by the unit's shared BN-ReLU,
# exactly where the dimensions increase, and bare identities elsewhere.
for _depth in (20, 56, 110):
    _n = (_depth - 2) // 6
    register_model(
        f"preact_resnet{_depth}",
        block=PreActBasicBlock,
        layers=(_n, _n, _n),
        stem="cifar",
        shortcut="B",
    )

# ImageNet nets (He et al. 2015, Table 1), torchvision-compatible: option B shortcuts.
_IMAGENET_DEPTHS: dict[int, tuple[type, tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
for _depth, (_block, _layers) in _IMAGENET_DEPTHS.items():
    register_model(f"resnet{_depth}", block=_block, layers=_layers, stem="imagenet", shortcut="B")
for _depth in (18, 34, 50):
    _block, _layers = _IMAGENET_DEPTHS[_depth]
    register_model(f"plain{_depth}", block=_block, layers=_layers, stem="imagenet", plain=True)

register_model(
    "preact_resnet18", block=PreActBasicBlock, layers=(2, 2, 2, 2), stem="imagenet", shortcut="B"
)
register_model(
    "preact_resnet50", block=PreActBottleneck, layers=(3, 4, 6, 3), stem="imagenet", shortcut="B"
)
# Wide ResNet-50-2 (Zagoruyko & Komodakis 2016, torchvision's layout): 2x the bottleneck width.
register_model(
    "wide_resnet50_2", block=Bottleneck, layers=(3, 4, 6, 3), stem="imagenet", width_per_group=128
)
# ResNeXt (Xie et al. 2017): cardinality x width of the grouped 3x3.
register_model(
    "resnext50_32x4d",
    block=Bottleneck,
    layers=(3, 4, 6, 3),
    stem="imagenet",
    groups=32,
    width_per_group=4,
)

# The lesson's own network (models/lesson.py): its state-dict names, its ResBlk (conv biases, no
# ReLU after the addition, projection only where the channels change), its broadcasting block 4.
from .lesson import LessonResNet  # noqa: E402

register_model("lesson_resnet18", stem="cifar", layers=(1, 1, 1, 1))(LessonResNet)
register_model("lesson_resnet18_corrected", stem="cifar", layers=(1, 1, 1, 1), corrected=True)(
    LessonResNet
)
register_model("lesson_plain18", stem="cifar", layers=(1, 1, 1, 1), plain=True)(LessonResNet)

# DenseNet (models/densenet.py), dense connectivity as the third pattern. DenseNet-BC for CIFAR
# (Huang et al. 2017, Table 2: depth 100, k=12, 0.8M parameters; depth = 6n + 4 with n layers per
# block) and the ImageNet nets with torchvision's parameter names.
from .densenet import DenseNet  # noqa: E402

register_model("densenet_bc100", stem="cifar", layers=(16, 16, 16), growth_rate=12)(DenseNet)
for _name, (_k, _layers, _init) in {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}.items():
    register_model(
        _name, stem="imagenet", layers=_layers, growth_rate=_k, num_init_features=_init
    )(DenseNet)
