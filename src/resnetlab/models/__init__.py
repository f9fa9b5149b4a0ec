"""Residual networks (He et al. 2015) and their plain twins: blocks, ResNet, registry, tools.

Importing the package is cheap (no torch): the names below load their modules on first use, so
``resnetlab.config`` can derive its model options from :mod:`resnetlab.models.spec` and
``resnetlab --help`` still answers without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resnetlab.lazy import attach

if TYPE_CHECKING:
    from .base import ClassifierNet
    from .blocks import (
        BasicBlock,
        Block,
        Bottleneck,
        PreActBasicBlock,
        PreActBottleneck,
        ShortcutA,
        make_shortcut,
    )
    from .factory import build_model
    from .features import FeatureExtractor
    from .fuse import fuse_for_inference
    from .registry import create_model, list_models, model_defaults, register_model
    from .resnet import ResNet, make_stages
    from .spec import ModelSpec, ModelSpecError
    from .summary import (
        count_macs,
        count_params,
        format_model_info,
        format_model_table,
        model_info,
        model_table,
    )

# name -> submodule that defines it; resolved by __getattr__ on first use (PEP 562)
_LAZY = {
    "ClassifierNet": "base",
    **dict.fromkeys(["BasicBlock", "Block", "Bottleneck", "PreActBasicBlock", "PreActBottleneck",
                     "ShortcutA", "make_shortcut"], "blocks"),
    "build_model": "factory",
    "FeatureExtractor": "features",
    "fuse_for_inference": "fuse",
    **dict.fromkeys(["create_model", "list_models", "model_defaults", "register_model"], "registry"),
    **dict.fromkeys(["ResNet", "make_stages"], "resnet"),
    **dict.fromkeys(["ModelSpec", "ModelSpecError"], "spec"),
    **dict.fromkeys(["count_macs", "count_params", "format_model_info", "format_model_table",
                     "model_info", "model_table"], "summary"),
}


__getattr__, __dir__ = attach(__name__, _LAZY)


__all__ = [  # literal, so linters see the TYPE_CHECKING imports used; equals sorted(_LAZY)
    "BasicBlock", "Block", "Bottleneck", "ClassifierNet", "FeatureExtractor", "ModelSpec", "ModelSpecError",
    "PreActBasicBlock", "PreActBottleneck", "ResNet", "ShortcutA", "build_model", "count_macs",
    "count_params", "create_model", "format_model_info", "format_model_table", "fuse_for_inference",
    "list_models", "make_shortcut", "make_stages", "model_defaults", "model_info", "model_table",
    "register_model",
]
