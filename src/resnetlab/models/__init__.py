"""Residual networks (He et al. 2015) and their plain twins: blocks, ResNet, registry, tools."""

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
from .fuse import fuse_for_inference
from .registry import create_model, list_models, model_defaults, register_model
from .resnet import ResNet, make_stages
from .summary import (
    count_macs,
    count_params,
    format_model_info,
    format_model_table,
    model_info,
    model_table,
)

__all__ = [
    "BasicBlock",
    "Block",
    "ClassifierNet",
    "Bottleneck",
    "build_model",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "ShortcutA",
    "count_macs",
    "count_params",
    "create_model",
    "format_model_info",
    "format_model_table",
    "fuse_for_inference",
    "list_models",
    "make_shortcut",
    "make_stages",
    "model_defaults",
    "model_info",
    "model_table",
    "register_model",
]
