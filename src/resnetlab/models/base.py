"""``ClassifierNet``: what every registered network provides (timm's model API), as a type.

ResNet, LessonResNet and DenseNet derive from it, so ``create_model`` can promise these
attributes and methods to its callers (summary, analysis, export) and the type checker sees them.
Code that needs the classifier or the stages asks the model (:meth:`ClassifierNet.classifier_name`,
:meth:`ClassifierNet.stages`), as timm's own code does, never a name pattern such as ``"fc."``:
a family may call its head ``fc``, ``classifier`` or ``outlayer``.
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
    stage_names: list[str]  # dotted module paths of the stages, in forward order (layer1, ...)

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

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of each stage named in ``stage_names``, in forward order."""
        return [(name, self.get_submodule(name)) for name in self.stage_names]

    def classifier_name(self) -> str:
        """Dotted module path of :meth:`get_classifier` (``fc`` for torchvision-style nets)."""
        return module_path(self, self.get_classifier())


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The dotted path under which ``model`` holds ``module``; ValueError when it does not."""
    for name, m in model.named_modules():
        if m is module and name:
            return name
    raise ValueError(f"{type(model).__name__} does not hold the {type(module).__name__} asked for")


def classifier_name(model: nn.Module) -> str:
    """Dotted path of ``model``'s classifier, from its :class:`ClassifierNet` contract.

    Raises TypeError for a module that does not declare one (``get_classifier``).
    """
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise TypeError(f"{type(model).__name__} declares no classifier (get_classifier); "
                        "resnetlab networks derive from ClassifierNet")
    return module_path(model, get())


def stage_names(model: nn.Module) -> list[str]:
    """Dotted paths of ``model``'s stages (its ``stage_names``); TypeError when it has none."""
    names = getattr(model, "stage_names", None)
    if names is None:
        raise TypeError(f"{type(model).__name__} declares no stages (stage_names); "
                        "resnetlab networks derive from ClassifierNet")
    return list(names)


__all__ = ["ClassifierNet", "classifier_name", "module_path", "stage_names"]
