"""``build_model(cfg, meta)``: the network a config names, sized for its dataset.

Lives with the models (not the training engine) so ``eval``/``predict``/``export`` and the
analysis code build networks without importing ``fit``. Takes the config and data meta by their
shape (duck-typed protocols), so ``models`` imports neither ``config`` nor ``data``.
"""

from __future__ import annotations

from typing import Any, Protocol

from .base import ClassifierNet
from .registry import create_model


class _ModelOptions(Protocol):
    """What build_model reads of ``cfg.model`` (resnetlab.config.ModelConfig has it)."""

    @property
    def name(self) -> str: ...
    @property
    def num_classes(self) -> int | None: ...
    @property
    def in_chans(self) -> int | None: ...
    @property
    def shortcut(self) -> str | None: ...
    @property
    def zero_init_residual(self) -> bool: ...
    @property
    def grad_checkpointing(self) -> bool: ...
    @property
    def recompute_every(self) -> int: ...
    @property
    def recompute_stages(self) -> int | None: ...
    @property
    def drop_rate(self) -> float: ...


class _HasModel(Protocol):
    @property
    def model(self) -> _ModelOptions: ...


class _Meta(Protocol):
    @property
    def classes(self) -> tuple[str, ...]: ...

    @property
    def in_chans(self) -> int: ...


def build_model(cfg: _HasModel, meta: _Meta) -> ClassifierNet:
    """The network ``cfg.model`` names; classes and input channels default to the dataset's."""
    m = cfg.model
    kw: dict[str, Any] = {
        "num_classes": m.num_classes or len(meta.classes),
        "in_chans": m.in_chans or meta.in_chans,
        "zero_init_residual": m.zero_init_residual,
        "grad_checkpointing": m.grad_checkpointing,
        "checkpoint_every": m.recompute_every,  # the model's own (timm-style) argument names
        "checkpoint_stages": m.recompute_stages,
        "drop_rate": m.drop_rate,
    }
    if m.shortcut is not None:
        kw["shortcut"] = m.shortcut
    return create_model(m.name, **kw)


__all__ = ["build_model"]
