"""DenseNet (Huang et al., CVPR 2017, "Densely Connected Convolutional Networks").

The lesson's other half: where a residual block *adds* its input to its output, a dense layer
*concatenates* it, so layer ``l`` of a block sees the feature maps of every layer before it.
Each layer adds ``growth_rate`` (k) channels; the "BC" form has a 1x1 bottleneck conv of ``4k``
channels before each 3x3 (B) and transitions that halve the channels (C, compression 0.5).

Two stems:

- ``"cifar"`` (paper Sec. 3, "DenseNet-BC" on CIFAR): a 3x3 conv to ``2k`` channels, three dense
  blocks on 32x32, 16x16, 8x8 maps. ``densenet_bc100`` (k=12, depth 100, 16 layers per block):
  0.77M parameters; the paper's Table 2 lists 0.8M and 4.51% error on C10+.
- ``"imagenet"``: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, four dense blocks; densenet121/161/
  169/201 as in torchvision.

Parameter names are torchvision's (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``), so a state dict of
``torchvision.models.densenet121()`` loads with ``strict=True`` and gives the same outputs.

Memory: concatenation makes every layer's input a new tensor of all earlier features, so
storing those for backward costs memory quadratic in the block length. With
``grad_checkpointing`` each layer's concatenation + BN-ReLU-1x1 bottleneck is recomputed in
backward instead of stored (Pleiss et al. 2017, "Memory-efficient implementation of DenseNets";
torchvision's ``memory_efficient``); BN running statistics are updated once per step, not twice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .base import ClassifierNet
from .resnet import _checkpoint_contexts

STEMS = ("cifar", "imagenet")


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * k`` channels), BN-ReLU-3x3 conv (``k`` channels).

    Input: the list of all earlier feature maps of the block (concatenated here); output: the
    ``k`` new channels ``[b, k, h, w]``.
    """

    # conv1 -> norm2 is a direct conv->BN edge (fuse.py folds it for inference)
    fuse_pairs = (("conv1", "norm2"),)

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = False

    def bottleneck(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Concatenate ``inputs`` (``[b, c_i, h, w]`` each) and apply BN-ReLU-1x1 conv."""
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))  # [b, bn_size*k, h, w]

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if (self.memory_efficient and self.training and torch.is_grad_enabled()
                and any(t.requires_grad for t in inputs)):
            # keep only the inputs (already stored by earlier layers); recompute cat + 1x1
            out = checkpoint(self.bottleneck, *inputs, use_reentrant=False,
                             context_fn=functools.partial(_checkpoint_contexts, [self.norm1]))
        else:
            out = self.bottleneck(*inputs)
        new = self.conv2(self.relu2(self.norm2(out)))  # [b, k, h, w]
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return new


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; output: the input and every layer's ``k`` channels, concatenated."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, c, h, w]
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)  # [b, c + num_layers * k, h, w]


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression), 2x2 average pool: channels and resolution shrink."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(ClassifierNet):
    """DenseNet / DenseNet-BC with torchvision's parameter names.

    Args:
        layers: dense layers per block, e.g. ``(16, 16, 16)`` for DenseNet-BC-100,
            ``(6, 12, 24, 16)`` for densenet121 (torchvision's ``block_config``).
        growth_rate: k, channels each dense layer adds.
        num_init_features: stem output channels (default ``2k``, torchvision's 64/96 for ImageNet).
        bn_size: bottleneck width as a multiple of k (4: the "B" of BC).
        compression: transition output = ``floor(compression * channels)`` (0.5: the "C").
        stem: ``"cifar"`` (3x3 conv, 32x32 native) or ``"imagenet"`` (7x7/2 conv + pool, 224).
        num_classes: classifier outputs; default 10 (CIFAR stem) or 1000; 0: features out.
        in_chans: image channels.
        layer_drop_rate: dropout on each layer's new features (torchvision's ``drop_rate``).
        drop_rate: dropout before the classifier (the project's ``model.drop_rate``).
        grad_checkpointing: recompute concatenations and bottlenecks in backward (less memory).
        zero_init_residual, checkpoint_every, checkpoint_stages: the common model interface;
            DenseNet has no residual branch (``zero_init_residual`` must be False) and checkpoints
            per layer.
    """

    def __init__(self, layers: Sequence[int] = (16, 16, 16), *, growth_rate: int = 12,
                 num_init_features: int | None = None, bn_size: int = 4, compression: float = 0.5,
                 stem: str = "cifar", num_classes: int | None = None, in_chans: int = 3,
                 layer_drop_rate: float = 0.0, drop_rate: float = 0.0,
                 grad_checkpointing: bool = False, zero_init_residual: bool = False,
                 checkpoint_every: int = 0, checkpoint_stages: int | None = -1) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if not layers or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be positive layer counts, got {tuple(layers)}")
        if zero_init_residual:
            raise ValueError("zero_init_residual needs residual branches; DenseNet has none")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        cifar = stem == "cifar"
        num_classes = (10 if cifar else 1000) if num_classes is None else num_classes
        num_init_features = 2 * growth_rate if num_init_features is None else num_init_features
        self.arch: str | None = None
        self.stem_type = stem
        self.input_size = (in_chans, 32, 32) if cifar else (in_chans, 224, 224)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.growth_rate = growth_rate
        self.checkpoint_every = checkpoint_every
        self.checkpoint_stages = checkpoint_stages

        self.features = nn.Sequential()
        if cifar:  # the paper's CIFAR nets: one 3x3 conv; the first dense layer does BN-ReLU
            self.features.add_module("conv0", nn.Conv2d(in_chans, num_init_features, 3, padding=1,
                                                        bias=False))
        else:
            self.features.add_module("conv0", nn.Conv2d(in_chans, num_init_features, 7, stride=2,
                                                        padding=3, bias=False))
            self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
            self.features.add_module("relu0", nn.ReLU(inplace=True))
            self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        ch = num_init_features
        self.stage_names = []
        for i, n in enumerate(layers):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(int(n), ch, growth_rate, bn_size, layer_drop_rate))
            self.stage_names.append(f"features.denseblock{i + 1}")
            ch += int(n) * growth_rate
            if i != len(layers) - 1:
                out = int(ch * compression)
                self.features.add_module(f"transition{i + 1}", Transition(ch, out))
                ch = out
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.num_features = ch
        self.classifier: nn.Module = self._make_fc(num_classes)
        self.grad_checkpointing = grad_checkpointing
        self._init_weights()

    def _make_fc(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        # torchvision's: He-normal (fan_in) convs, BN 1/0, classifier bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def grad_checkpointing(self) -> bool:
        """Recompute each layer's concatenation and bottleneck in backward (less memory)."""
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self._grad_checkpointing = bool(enable)
        for m in self.modules():
            if isinstance(m, DenseLayer):
                m.memory_efficient = bool(enable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Same as setting ``grad_checkpointing``."""
        self.grad_checkpointing = enable

    def blocks(self) -> list[DenseLayer]:
        """Every dense layer, in forward order."""
        return [m for m in self.modules() if isinstance(m, DenseLayer)]

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``classifier``)."""
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``classifier`` with a fresh one of ``num_classes`` outputs (0: none)."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.classifier = self._make_fc(num_classes).to(device=ref.device, dtype=ref.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, c, h, w]`` -> the unpooled feature map ``[b, num_features, h', w']``
        (timm's convention; :meth:`forward_head` pools it)."""
        return F.relu(self.features(x))  # [b, num_features, h', w']

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits ``[b, num_classes]`` (with ``pre_logits``: pooled features)."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)  # [b, num_features]
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, c, h, w]`` -> logits ``[b, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """Ordered pieces (stem, denseblock/transition.., pool, fc); chained = ``forward`` in eval."""
        mods = dict(self.features.named_children())
        stem_names = [n for n in mods if not n.startswith(("denseblock", "transition", "norm5"))]
        out: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(*(mods[n] for n in stem_names)))]
        out += [(n, m) for n, m in mods.items() if n.startswith(("denseblock", "transition"))]
        pool = nn.Sequential(mods["norm5"], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return [*out, ("pool", pool), ("fc", self.classifier)]


__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "Transition"]
