"""Weights: the ones that ship (with cards), ``model.init_from``, ``publish`` and ``verify``.

- :mod:`.zoo`: the shipped weights and the weights API (``get``, ``list_weights``, ``Weights.meta``,
  ``Weights.transforms()``); :func:`create_model` and :func:`list_models` below add
  ``weights=``/``pretrained=`` to the registry's (``resnetlab.create_model`` is this one);
- :mod:`.init_from`: start a run from weights trained elsewhere (``model.init_from``);
- :mod:`.publish`: a run -> ``model.safetensors`` + ``config.json`` + ``README.md`` (hub layout);
- :mod:`.verify`: re-measure a shipped weight on its test split and compare with its card;
- :mod:`.build`: ``resnetlab zoo build``, the recipes that made the shipped weights.
"""

from __future__ import annotations

from typing import Any

from resnetlab.weights.init_from import (
    InitSource,
    apply_init_from,
    file_sha256,
    load_init_weights,
    preprocessing_meta,
    read_init_from,
    resolve_file,
    resolve_init_from,
    resumed_preprocessing_meta,
    to_our_names,
)
from resnetlab.weights.zoo import (
    DEFAULT,
    ImageTransforms,
    Weights,
    WeightsError,
    default_weights,
    get,
    list_weights,
    resolve,
)


def create_model(name: str, /, *, weights: Weights | str | None = None, pretrained: bool = False,
                 **kwargs: Any) -> Any:
    """``resnetlab.models.create_model`` plus weights, as torchvision and timm take them.

    ``weights``: a :class:`Weights`, a tag (``"digits"``), a full name (``"resnet20.digits"``),
    ``"DEFAULT"`` or a folder written by ``resnetlab publish``; ``pretrained=True`` is
    ``weights="DEFAULT"``. Without either the network is randomly initialised. ``num_classes``
    other than the weights' keeps a fresh classifier (for fine-tuning); ``in_chans`` must match.
    The model gets ``.pretrained_cfg`` (timm's preprocessing keys) and ``.weights``.
    """
    from resnetlab.models import create_model as build

    w = resolve(name, weights, pretrained)
    if w is None:
        return build(name, **kwargs)
    in_chans = kwargs.pop("in_chans", w.in_chans)
    if in_chans != w.in_chans:
        raise WeightsError(f"weights {w.name} take {w.in_chans}-channel images, not in_chans={in_chans}")
    num_classes = kwargs.pop("num_classes", w.num_classes)
    model: Any = build(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    w.load_into(model, num_classes=num_classes)
    model.weights = w
    model.pretrained_cfg = {**w.transforms().data_config(), "num_classes": w.num_classes,
                            "label_names": w.meta["categories"], "tag": w.tag}
    return model


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching ``pattern``; with ``pretrained`` the shipped weights'
    names instead (``"resnet20.digits"``), as timm's ``list_models(pretrained=True)`` gives."""
    import fnmatch

    from resnetlab.models import list_models as registered

    if not pretrained:
        return registered(pattern)
    return [n for n in list_weights() if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n.split(".")[0], pattern)]


__all__ = [
    "DEFAULT", "ImageTransforms", "InitSource", "Weights", "WeightsError", "apply_init_from", "create_model",
    "default_weights", "file_sha256", "get", "list_models", "list_weights", "load_init_weights",
    "preprocessing_meta", "read_init_from", "resolve", "resolve_file", "resolve_init_from",
    "resumed_preprocessing_meta", "to_our_names",
]
