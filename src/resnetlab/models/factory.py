"""``build_model(cfg, meta)``: the network a config names, sized for its dataset.

Lives with the models (not the training engine) so ``eval``/``predict``/``export`` and the
analysis code build networks without importing ``fit``. Takes the config and data meta by their
shape (protocols), so ``models`` imports neither ``config`` nor ``data``; ``cfg.model`` is a
:class:`~resnetlab.models.spec.ModelSpec` (``resnetlab.config.ModelConfig`` derives from it).
"""

from __future__ import annotations

from typing import Protocol

from .base import ClassifierNet
from .registry import create_model
from .spec import ModelSpec


class _HasModel(Protocol):
    @property
    def model(self) -> ModelSpec: ...


class _Meta(Protocol):
    @property
    def classes(self) -> tuple[str, ...]: ...

    @property
    def in_chans(self) -> int: ...


def build_model(cfg: _HasModel, meta: _Meta) -> ClassifierNet:
    """The network ``cfg.model`` names; classes and input channels default to the dataset's."""
    spec = cfg.model
    return create_model(spec.name, **spec.create_kwargs(len(meta.classes), meta.in_chans))


__all__ = ["build_model"]
