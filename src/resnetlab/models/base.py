"""``ClassifierNet``: what every registered network provides (timm's model API), as a type.

ResNet, LessonResNet and DenseNet derive from it, so ``create_model`` can promise these
attributes and methods to its callers (summary, analysis, export) and the type checker sees them.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn


class ClassifierNet(nn.Module, metaclass=ABCMeta):
    """An image classifier: ``forward_head(forward_features(x))`` gives the logits."""

    arch: str | None  # registry name; create_model() fills it in
    input_size: tuple[int, int, int]  # native [c, h, w]
    num_classes: int  # classifier outputs (0: the head returns pooled features)
    num_features: int  # channels of the unpooled feature map
    drop_rate: float  # dropout before the classifier, probability

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, c, h, w]`` -> the unpooled feature map ``[b, num_features, h', w']``."""

    @abstractmethod
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits ``[b, num_classes]`` (``pre_logits``: pooled ``[b, num_features]``)."""

    @abstractmethod
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""

    @abstractmethod
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer with a fresh one of ``num_classes`` outputs (0: none)."""

    @abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of storing them (activation checkpointing)."""

    @abstractmethod
    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """Ordered pieces (stem, stages.., pool, fc); chained they equal ``forward`` in eval."""


__all__ = ["ClassifierNet"]
