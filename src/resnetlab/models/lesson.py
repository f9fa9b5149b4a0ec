"""The lesson's own network, exactly as its code computes (the course page "ResNet and DenseNet"
this project grew from).

The lesson's ``ResBlk`` is not the paper's BasicBlock:

- its convolutions have biases (the BNs after them make those redundant, but they are
  parameters, and the lesson's state dict has them);
- nothing follows the addition: ``out = extra(x) + out`` is the block's output, no ReLU;
- the 1x1 projection ``extra`` (conv with bias + BN) exists whenever the channel counts differ,
  and is an empty ``nn.Sequential`` (the identity) otherwise, whatever the stride.

The course stacks four of them into a small "ResNet18" for 32x32 CIFAR images::

    conv1 = Sequential(Conv2d(3, 64, 3, stride=3, padding=0), BatchNorm2d(64)), then ReLU
    blk1..blk4 = ResBlk(64, 128, 2), ResBlk(128, 256, 2), ResBlk(256, 512, 2), ResBlk(512, 512, 2)
    adaptive average pool to 1x1, outlayer = Linear(512, 10)

Spatial sizes on a 32x32 input: stem 10x10, blk1 5x5, blk2 3x3, blk3 2x2, blk4 1x1. Block 4
keeps 512 channels but has stride 2, so its ``extra`` is empty: the branch gives
``[b, 512, 1, 1]`` while ``x`` is ``[b, 512, 2, 2]`` and the addition *broadcasts* the branch
over the 2x2 map (every position gets the same branch value added). That is what the lesson's
code computes, so ``lesson_resnet18`` does it too (``broadcast=True``). The corrected variant
``lesson_resnet18_corrected`` gives block 4 an option-B projection (1x1 stride-2 conv + BN),
used whenever the stride or the channels change, so the shapes agree and nothing broadcasts.
``lesson_plain18`` is the plain twin: the same layers with no ``extra`` and no addition.

State-dict names are the lesson's (``conv1.0``, ``conv1.1``, ``blk1.conv1``, ``blk1.bn1``,
``blk1.conv2``, ``blk1.bn2``, ``blk1.extra.0``, ``blk1.extra.1``, ..., ``outlayer``), so the
lesson's own weights load with ``strict=True``.

Small inputs: the stride-3 stem on an 8x8 digit leaves a 2x2 map and every later block sees
1x1, which is not the lesson's geometry. Inputs smaller than ``min_input`` (default 32) pixels
on a side are therefore resized bilinearly to ``min_input`` x ``min_input`` first; this layer
has no parameters and does nothing to 32x32 CIFAR images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierNet
from .resnet import _checkpoint_segment


class ResBlk(nn.Module):
    """The lesson's residual block: conv(bias)-BN-ReLU, conv(bias)-BN, ``+ extra(x)``, no ReLU.

    Args:
        ch_in, ch_out: channels in and out.
        stride: stride of the first conv (and of the projection, where there is one).
        plain: no shortcut and no addition (the plain twin).
        project_on_stride: also project when only the stride changes (the corrected variant);
            the lesson projects only when ``ch_in != ch_out``.
    """

    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, ch_in: int, ch_out: int, stride: int = 1, *, plain: bool = False,
                 project_on_stride: bool = False) -> None:
        super().__init__()
        self.plain = plain
        self.conv1 = nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_out)
        if plain:
            return  # no `extra` at all: a plain block has no shortcut parameters
        # The lesson: "if the shortcut's channels differ, a 1x1 conv makes them equal".
        self.extra = nn.Sequential()
        if ch_out != ch_in or (project_on_stride and stride != 1):
            # [b, ch_in, h, w] => [b, ch_out, h/s, w/s]
            self.extra = nn.Sequential(nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=stride),
                                       nn.BatchNorm2d(ch_out))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual function F(x): ``[b, ch_in, h, w]`` -> ``[b, ch_out, h/s, w/s]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, ch_in, h, w]
        out = self.branch(x)  # [b, ch_out, h/s, w/s]
        if self.plain:
            return out
        # element-wise add; with an empty `extra` and stride 2 this broadcasts a 1x1 branch
        # over a larger x (the lesson's block 4), exactly as the lesson's code does
        return self.extra(x) + out


class LessonResNet(ClassifierNet):
    """The lesson's "ResNet18": stride-3 stem, four ResBlks, average pool, linear layer.

    Args:
        num_classes: outputs of ``outlayer`` (the lesson: 10).
        in_chans: image channels (the lesson: 3).
        widths: stem width then the four blocks' widths (the lesson: 64, 128, 256, 512, 512).
        plain: drop every shortcut (``lesson_plain18``).
        corrected: project whenever the stride changes too, so block 4 does not broadcast.
        min_input: inputs with a side below this many pixels are resized to it first (0: never).
        grad_checkpointing: recompute each block's activations in backward (less memory).
        drop_rate: dropout before ``outlayer``.
        stem, layers: registry bookkeeping (``"cifar"``; one block per stage); fixed.
        zero_init_residual: zero each block's ``bn2`` weight so blocks start as their shortcut.
        checkpoint_every, checkpoint_stages: accepted for the common model interface; each block
            is its own checkpoint segment here.
    """

    def __init__(self, num_classes: int | None = None, in_chans: int = 3, *,
                 widths: Sequence[int] = (64, 128, 256, 512, 512), plain: bool = False,
                 corrected: bool = False, min_input: int = 32, grad_checkpointing: bool = False,
                 drop_rate: float = 0.0, stem: str = "cifar", layers: Sequence[int] = (1, 1, 1, 1),
                 zero_init_residual: bool = False, checkpoint_every: int = 0,
                 checkpoint_stages: int | None = -1) -> None:
        super().__init__()
        if stem != "cifar" or tuple(layers) != (1, 1, 1, 1):
            raise ValueError("the lesson's network has a fixed stem and one ResBlk per stage")
        if len(widths) != 5:
            raise ValueError(f"widths must be the stem's and four blocks' widths, got {tuple(widths)}")
        if plain and (corrected or zero_init_residual):
            raise ValueError("plain=True has no shortcuts to correct or to start from")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        num_classes = 10 if num_classes is None else num_classes
        self.arch: str | None = None
        self.num_classes = num_classes
        self.input_size = (in_chans, 32, 32)  # native [c, h, w]: CIFAR
        self.min_input = min_input
        self.plain = plain
        self.corrected = corrected
        self.drop_rate = drop_rate
        self.grad_checkpointing = grad_checkpointing
        self.checkpoint_every = checkpoint_every
        self.checkpoint_stages = checkpoint_stages
        self.num_features = widths[-1]

        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=3, padding=0),
                                   nn.BatchNorm2d(widths[0]))
        # [b, 64, h, w] => [b, 128, h/2, w/2] => ... => [b, 512, h/16, w/16]
        for i in range(4):
            self.add_module(f"blk{i + 1}", ResBlk(widths[i], widths[i + 1], stride=2, plain=plain,
                                                  project_on_stride=corrected))
        self.stage_names = ["blk1", "blk2", "blk3", "blk4"]
        self.outlayer: nn.Module = self._make_fc(num_classes)
        if zero_init_residual:
            for b in self.blocks():
                nn.init.zeros_(b.bn2.weight)

    def _make_fc(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def blocks(self) -> list[ResBlk]:
        """The four ResBlks, in forward order."""
        return [getattr(self, n) for n in self.stage_names]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``outlayer``)."""
        return self.outlayer

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``outlayer`` with a fresh one of ``num_classes`` outputs (0: none)."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.outlayer = self._make_fc(num_classes).to(device=ref.device, dtype=ref.dtype)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.min_input and (h < self.min_input or w < self.min_input):
            return F.interpolate(x, size=(self.min_input, self.min_input), mode="bilinear",
                                 align_corners=False)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, c, h, w]`` -> the unpooled feature map ``[b, 512, h', w']`` (timm's
        convention; :meth:`forward_head` pools it)."""
        x = F.relu(self.conv1(self._resize(x)))  # [b, 64, 10, 10] at 32x32
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks():
            # 5x5, 3x3, 2x2, then 2x2 again: block 4 broadcasts (see the module doc). Checkpointed,
            # BN running statistics are still updated once per step, as in ResNet.
            x = _checkpoint_segment([blk], x) if use_ckpt else blk(x)
        return x  # [b, 512, h', w']

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map ``[b, 512, h', w']`` -> logits ``[b, num_classes]`` (with ``pre_logits``:
        the pooled features ``[b, 512]``)."""
        x = F.adaptive_avg_pool2d(x, (1, 1))  # [b, 512, 1, 1]
        x = x.view(x.size(0), -1)  # [b, 512]
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.outlayer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, c, h, w]`` -> logits ``[b, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """Ordered pieces (stem, blk1..blk4, pool, fc); chaining them equals ``forward`` in eval."""
        stem = nn.Sequential(_Resize(self.min_input), self.conv1, nn.ReLU())
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return [("stem", stem), *((n, getattr(self, n)) for n in self.stage_names),
                ("pool", pool), ("fc", self.outlayer)]


class _Resize(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.size and (h < self.size or w < self.size):
            return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


__all__ = ["LessonResNet", "ResBlk"]
