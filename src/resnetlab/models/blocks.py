"""Residual blocks and their shortcuts.

Four blocks, all with torchvision's attribute names so state dicts line up:

- ``BasicBlock``: two 3x3 convs (He et al. 2015, Fig. 2), the seed's ResBlk with a stride.
- ``Bottleneck``: 1x1 reduce, 3x3 (stride, groups), 1x1 expand x4 (He et al. 2015, Fig. 5);
  the stride sits on the 3x3 like torchvision ("ResNet v1.5").
- ``PreActBasicBlock`` / ``PreActBottleneck``: the same branches in BN-ReLU-conv order
  (He et al. 2016, "Identity Mappings in Deep Residual Networks"), nothing after the addition.

Every block takes ``plain=True`` to drop the shortcut entirely (the degradation experiment's
"plain" twin); a plain block has no ``downsample`` module and never adds anything.

Shortcuts (``make_shortcut``) follow the paper's options A/B/C, Sec. 3.3 and Table 3.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUT_TYPES = ("A", "B", "C")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm supplies it)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A: identity with stride-``s`` subsampling and zero-padded extra channels.

    Has no parameters, so a net with option A has exactly the parameters of its plain twin.
    The new channels are appended after the existing ones.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"shortcut A can only add channels, got {in_ch} -> {out_ch}")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, in_ch, h, w]
        x = x[:, :, :: self.stride, :: self.stride]  # [b, in_ch, h/s, w/s], 1x1 stride-s "conv"
        # F.pad pads the last dims first: (w_lo, w_hi, h_lo, h_hi, c_lo, c_hi).
        return F.pad(x, (0, 0, 0, 0, 0, self.out_ch - self.in_ch))  # [b, out_ch, h/s, w/s]

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}"


def make_shortcut(
    kind: str, in_ch: int, out_ch: int, stride: int, *, preact: bool = False
) -> nn.Module | None:
    """The shortcut module for one block, or ``None`` for the plain identity.

    ``kind`` is the paper's option: "A" zero-pad identity where the shape changes, "B" 1x1
    projection where the shape changes, "C" projection on every block. Projections are
    ``Sequential(conv, bn)`` so the names match torchvision's ``downsample.0`` / ``.1``; in a
    pre-activation block the projection sees an already normalised input, so it is conv only.
    """
    if kind not in SHORTCUT_TYPES:
        raise ValueError(f"shortcut must be one of {SHORTCUT_TYPES}, got {kind!r}")
    shape_changes = stride != 1 or in_ch != out_ch
    if kind == "A":
        return ShortcutA(in_ch, out_ch, stride) if shape_changes else None
    if kind == "B" and not shape_changes:
        return None
    if preact:
        return nn.Sequential(conv1x1(in_ch, out_ch, stride))
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class Block(nn.Module):
    """Base of all residual blocks: class constants plus the plain/shortcut bookkeeping.

    Subclasses take ``(inplanes, planes, stride, downsample, groups, base_width, plain)``.
    """

    expansion: ClassVar[int] = 1  # block output channels = planes * expansion
    preact: ClassVar[bool] = False  # BN-ReLU-conv order (He et al. 2016)
    # (conv, bn) attribute pairs where the BN reads the conv's output directly; fuse.py folds them.
    fuse_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()

    downsample: nn.Module | None

    def _set_shortcut(self, downsample: nn.Module | None, plain: bool) -> None:
        if plain and downsample is not None:
            raise ValueError("a plain block has no shortcut; pass downsample=None")
        self.plain = plain
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Zero the last layer of the residual branch so the block starts as its shortcut."""
        raise NotImplementedError


class BasicBlock(Block):
    """3x3 conv(stride)-BN-ReLU, 3x3 conv-BN, add the shortcut, ReLU."""

    expansion = 1
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        plain: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self._set_shortcut(downsample, plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, inplanes, h, w]
        out = self.relu(self.bn1(self.conv1(x)))  # [b, planes, h/s, w/s]
        out = self.bn2(self.conv2(out))  # [b, planes, h/s, w/s]: F(x)
        if self.plain:
            return self.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(Block):
    """1x1 reduce, 3x3 (stride, groups), 1x1 expand x4, each followed by BN; add; ReLU."""

    expansion = 4
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        plain: bool = False,
    ) -> None:
        super().__init__()
        # Inner width as torchvision: ResNeXt 32x4d -> 4 * 32 = 128 at planes=64; wide x2 -> 128.
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self._set_shortcut(downsample, plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, inplanes, h, w]
        out = self.relu(self.bn1(self.conv1(x)))  # [b, width, h, w]
        out = self.relu(self.bn2(self.conv2(out)))  # [b, width, h/s, w/s]
        out = self.bn3(self.conv3(out))  # [b, 4 * planes, h/s, w/s]: F(x)
        if self.plain:
            return self.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class PreActBasicBlock(Block):
    """BN-ReLU-3x3 conv(stride), BN-ReLU-3x3 conv, add the shortcut; nothing after the add.

    As in the reference code of He et al. 2016, a block whose shortcut is not the bare identity
    (it changes shape, or option C) shares the first BN-ReLU between both paths, so the
    shortcut sees the normalised input; a bare identity shortcut carries ``x`` untouched.
    """

    expansion = 1
    preact = True
    # conv1 -> bn2 is a direct conv->BN edge; bn1 follows the previous block's addition.
    fuse_pairs = (("conv1", "bn2"),)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        plain: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock supports only groups=1 and width_per_group=64")
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self._set_shortcut(downsample, plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, inplanes, h, w]
        pre = self.relu(self.bn1(x))  # [b, inplanes, h, w]
        out = self.conv1(pre)  # [b, planes, h/s, w/s]
        out = self.conv2(self.relu(self.bn2(out)))  # [b, planes, h/s, w/s]: F(x)
        if self.plain:
            return out
        shortcut = x if self.downsample is None else self.downsample(pre)
        return out + shortcut

    def zero_init_last(self) -> None:
        # No BN closes the branch, so the last conv is zeroed instead (as timm's ResNetV2).
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(Block):
    """BN-ReLU-1x1 reduce, BN-ReLU-3x3 (stride, groups), BN-ReLU-1x1 expand x4, add."""

    expansion = 4
    preact = True
    fuse_pairs = (("conv1", "bn2"), ("conv2", "bn3"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        plain: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self._set_shortcut(downsample, plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, inplanes, h, w]
        pre = self.relu(self.bn1(x))  # [b, inplanes, h, w]
        out = self.conv1(pre)  # [b, width, h, w]
        out = self.conv2(self.relu(self.bn2(out)))  # [b, width, h/s, w/s]
        out = self.conv3(self.relu(self.bn3(out)))  # [b, 4 * planes, h/s, w/s]: F(x)
        if self.plain:
            return out
        shortcut = x if self.downsample is None else self.downsample(pre)
        return out + shortcut

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

