"""The ResNet: a stem, stages of residual blocks, global average pool, linear classifier.

Two stems (He et al. 2015):

- ``"cifar"`` (Sec. 4.2): 3x3 conv to 16 channels, BN, ReLU; three stages of 16/32/64 channels
  at strides 1/2/2; 6n+2 weighted layers for ``layers=(n, n, n)``.
- ``"imagenet"`` (Table 1): 7x7/2 conv to 64, BN, ReLU, 3x3/2 max pool; four stages of
  64/128/256/512 planes.

Attribute names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``), so ``torchvision.models.resnet50().state_dict()`` loads
into ``create_model("resnet50")`` with ``strict=True``.

Pre-activation nets (He et al. 2016) use the stem conv alone (plus the max pool for
ImageNet): every block starts with its own BN-ReLU, and one BN-ReLU (``final_bn``,
``final_act``) closes the last stage before the pool, as in timm's ResNetV2.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .base import ClassifierNet
from .blocks import SHORTCUT_TYPES, Block, make_shortcut

STEMS = ("cifar", "imagenet")


def make_stages(
    block: type[Block],
    layers: Sequence[int],
    planes: Sequence[int],
    *,
    in_ch: int,
    shortcut: str = "B",
    plain: bool = False,
    groups: int = 1,
    width_per_group: int = 64,
) -> list[nn.Sequential]:
    """Build the stages as a pure function of the spec (no state threaded through ``self``).

    Stage ``i`` has ``layers[i]`` blocks of ``planes[i]`` planes, i.e. ``planes[i] *
    block.expansion`` output channels; its first block has stride 2 (stride 1 in the first
    stage, which follows the stem) and takes ``in_ch`` channels for ``i == 0``.
    """
    if len(layers) != len(planes):
        raise ValueError(f"layers {tuple(layers)} and planes {tuple(planes)} differ in length")
    stages = []
    for i, (depth, stage_planes) in enumerate(zip(layers, planes, strict=True)):
        out_ch = stage_planes * block.expansion
        blocks = []
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0) else 1
            downsample = (
                None
                if plain
                else make_shortcut(shortcut, in_ch, out_ch, stride, preact=block.preact)
            )
            blocks.append(
                block(
                    in_ch,
                    stage_planes,
                    stride=stride,
                    downsample=downsample,
                    groups=groups,
                    base_width=width_per_group,
                    plain=plain,
                )
            )
            in_ch = out_ch
        stages.append(nn.Sequential(*blocks))
    return stages


@contextlib.contextmanager
def _still_bn_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """BatchNorm layers inside ``modules`` leave their running statistics as they are while
    the context is open.

    Checkpointing runs each segment's forward a second time during backward; without this the
    running mean and variance would take a second momentum step per training step. Momentum 0
    makes that update ``1 * running + 0 * batch``, the same numbers, and the step counter is
    put back afterwards. (BN still takes the training-mode path, so it saves the same tensors
    for backward as the first pass, which checkpointing requires; nothing it saved is modified
    in place afterwards, which reentrant checkpointing requires.)
    """
    bns = [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.training  # frozen BN: no update to undo
    ]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum
                m.num_batches_tracked.sub_(1)  # type: ignore[union-attr]  # BN buffers typed Optional


def _checkpoint_contexts(
    modules: Sequence[nn.Module],
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _still_bn_stats(modules)


def _run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def _run_blocks_reentrant(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    # Reentrant checkpointing runs this under no_grad first, then again with grad enabled
    # inside backward: that second run is the recomputation.
    if not torch.is_grad_enabled():
        return _run_blocks(blocks, x)
    with _still_bn_stats(blocks):
        return _run_blocks(blocks, x)


def _checkpoint_segment(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``blocks`` applied to ``x``, keeping only ``x`` for backward.

    Reentrant checkpointing where it applies: one autograd node per segment, where
    non-reentrant checkpointing runs Python hooks for every tensor saved inside it (measured
    on resnet1202, batch 16, 2 CPU cores: 1.22x the step time of no checkpointing against
    1.42x). It needs an input that requires grad, and torch.compile traces only the
    non-reentrant kind, so those cases take the non-reentrant path.
    """
    if x.requires_grad and not torch.compiler.is_compiling():
        return checkpoint(_run_blocks_reentrant, blocks, x, use_reentrant=True)
    return checkpoint(
        _run_blocks,
        blocks,
        x,
        use_reentrant=False,
        context_fn=functools.partial(_checkpoint_contexts, blocks),
    )


def checkpoint_segment_length(num_blocks: int, every: int = 0) -> int:
    """Blocks per checkpointed segment of a stage of ``num_blocks`` blocks.

    ``every > 0`` is taken as given. ``every == 0`` (auto) picks ``round(sqrt(num_blocks))``:
    a stage of ``n`` blocks in segments of ``k`` keeps ``n / k`` segment inputs plus, while one
    segment is recomputed, ``k`` blocks' activations, and ``n / k + k`` is smallest at
    ``k = sqrt(n)`` (Chen et al. 2016, "Training deep nets with sublinear memory cost"). Fewer,
    longer segments also cost less bookkeeping per step than one checkpoint per block.
    """
    return every if every > 0 else max(1, round(math.sqrt(num_blocks)))


def _check_args(stem: str, shortcut: str, layers: Sequence[int], plain: bool, zero_init_residual: bool,
                drop_rate: float) -> None:
    """Refuse :class:`ResNet` arguments that build no sensible network, naming the argument."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if shortcut not in SHORTCUT_TYPES:
        raise ValueError(f"shortcut must be one of {SHORTCUT_TYPES}, got {shortcut!r}")
    if not layers or any(int(n) < 1 for n in layers):
        raise ValueError(f"layers must be positive block counts, got {tuple(layers)}")
    if plain and zero_init_residual:
        # relu(0 * F(x)) with no shortcut would make every plain block output zeros.
        raise ValueError("zero_init_residual needs shortcuts; it is meaningless with plain=True")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


class ResNet(ClassifierNet):
    """A residual network (or its plain twin) for CIFAR-size or ImageNet-size images.

    Args:
        block: block class (``BasicBlock``, ``Bottleneck``, ``PreActBasicBlock``, ...).
        layers: blocks per stage, e.g. ``(3, 3, 3)`` for resnet20, ``(3, 4, 6, 3)`` for resnet50.
        stem: ``"cifar"`` (3x3 conv, native 32x32) or ``"imagenet"`` (7x7/2 conv + max pool, 224).
        num_classes: classifier outputs; default 10 for the CIFAR stem, 1000 for ImageNet;
            0 leaves ``fc`` an identity (features out).
        in_chans: input image channels.
        shortcut: paper option "A" (zero-pad identity), "B" (projection where the shape
            changes) or "C" (projection everywhere).
        plain: no shortcuts at all (the degradation experiment's baseline).
        groups, width_per_group: Bottleneck 3x3 groups and width per group (ResNeXt, wide).
        zero_init_residual: zero the last BN (last conv in pre-activation blocks) of each
            residual branch so every block starts as its shortcut (Goyal et al. 2017).
        stem_width: channels out of the stem and planes of the first stage; stage ``i`` has
            ``stem_width * 2**i`` planes. Default 16 (CIFAR) or 64 (ImageNet).
        grad_checkpointing: recompute block activations in backward (less memory).
        checkpoint_every: blocks per checkpointed segment; 0 (default) picks about the square
            root of each stage's block count (see :func:`checkpoint_segment_length`).
        checkpoint_stages: which stages checkpointing covers, as a slice ``stages[:n]``: the
            first ``n``; negative counts from the end; ``None`` is all. The default -1 leaves
            the last stage stored: it holds the fewest activations for the same compute (CIFAR:
            1/7 of them, a third of the FLOPs), so storing it buys back about a third of the
            recomputation while the peak, set by the early stages, barely moves.
        drop_rate: dropout probability before ``fc``.
    """

    def __init__(
        self,
        block: type[Block],
        layers: Sequence[int],
        *,
        stem: str = "cifar",
        num_classes: int | None = None,
        in_chans: int = 3,
        shortcut: str = "B",
        plain: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        stem_width: int | None = None,
        grad_checkpointing: bool = False,
        checkpoint_every: int = 0,
        checkpoint_stages: int | None = -1,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_args(stem, shortcut, layers, plain, zero_init_residual, drop_rate)
        cifar = stem == "cifar"
        num_classes = (10 if cifar else 1000) if num_classes is None else num_classes
        stem_width = (16 if cifar else 64) if stem_width is None else stem_width
        preact = block.preact

        self.arch: str | None = None  # registry name; create_model() fills it in
        self.stem_type = stem
        self.input_size = (in_chans, 32, 32) if cifar else (in_chans, 224, 224)  # native [c, h, w]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = grad_checkpointing
        self.checkpoint_every = checkpoint_every  # validated by the property setters
        self.preact = preact
        self.plain = plain
        self.shortcut = shortcut

        self._make_stem(in_chans, stem_width)
        planes = [stem_width * 2**i for i in range(len(layers))]
        stages = make_stages(block, [int(n) for n in layers], planes, in_ch=stem_width, shortcut=shortcut,
                             plain=plain, groups=groups, width_per_group=width_per_group)
        self.stage_names = [f"layer{i + 1}" for i in range(len(stages))]
        for name, stage in zip(self.stage_names, stages, strict=True):
            self.add_module(name, stage)
        self.checkpoint_stages = checkpoint_stages
        self.num_features = planes[-1] * block.expansion

        # Pre-activation nets end on an addition; normalise and rectify before pooling.
        self.final_bn: nn.Module = nn.BatchNorm2d(self.num_features) if preact else nn.Identity()
        self.final_act: nn.Module = nn.ReLU(inplace=True) if preact else nn.Identity()
        self.global_pool = "avg"  # timm's name: "avg" or "max" over h and w
        self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)  # torchvision's name; holds no weights
        self.fc: nn.Module = self._make_fc(num_classes)

        self._init_weights(zero_init_residual)

    def _make_stem(self, in_chans: int, stem_width: int) -> None:
        """conv1, bn1, relu, maxpool (in this order: the state dict's). Pre-activation nets leave
        BN-ReLU to the first block (bn1/relu are identities, so they add no state-dict keys)."""
        cifar = self.stem_type == "cifar"
        if cifar:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1: nn.Module = nn.Identity() if self.preact else nn.BatchNorm2d(stem_width)
        self.relu: nn.Module = nn.Identity() if self.preact else nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )

    def _make_fc(self, num_classes: int) -> nn.Module:
        # torchvision keeps nn.Linear's default (uniform fan-in) init for the classifier.
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He et al. 2015 (arXiv:1502.01852) init; fan_out as in torchvision and the paper's code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Block):
                    m.zero_init_last()

    @property
    def fuse_pairs(self) -> tuple[tuple[str, str], ...]:
        """(conv, bn) attribute pairs where the BN reads the conv directly (see fuse.py)."""
        return () if self.preact else (("conv1", "bn1"),)

    def blocks(self) -> Iterator[Block]:
        """All residual blocks, in forward order."""
        for name in self.stage_names:
            yield from getattr(self, name)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them (see
        ``checkpoint_every`` and ``checkpoint_stages`` for how the blocks are grouped)."""
        self.grad_checkpointing = enable

    @property
    def checkpoint_every(self) -> int:
        """Blocks per checkpointed segment; 0 = about sqrt(blocks in the stage)."""
        return self._checkpoint_every

    @checkpoint_every.setter
    def checkpoint_every(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0 (0 = auto), got {every!r}")
        self._checkpoint_every = every

    @property
    def checkpoint_stages(self) -> int | None:
        """Checkpointing covers ``stage_names[:checkpoint_stages]``."""
        return self._checkpoint_stages

    @checkpoint_stages.setter
    def checkpoint_stages(self, stages: int | None) -> None:
        n = len(self.stage_names)
        if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int)
                                   or not -n <= stages <= n):
            raise ValueError(
                f"checkpoint_stages must be None (all) or an int in [{-n}, {n}] for this "
                f"{n}-stage net, got {stages!r}"
            )
        self._checkpoint_stages = stages
        self._checkpointed = frozenset(self.stage_names[:stages])

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``fc`` with a freshly initialised one of ``num_classes`` outputs (0: none, the
        head then returns pooled features); ``global_pool`` ("avg" or "max") changes the pooling,
        None keeps it (timm's signature)."""
        if global_pool is not None:
            pools = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
            if global_pool not in pools:
                raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
            self.global_pool, self.avgpool = global_pool, pools[global_pool](1)
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes).to(device=ref.device, dtype=ref.dtype)

    def _run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        stage = getattr(self, name)
        if not (
            self.grad_checkpointing
            and name in self._checkpointed
            and self.training
            and torch.is_grad_enabled()
        ):
            return stage(x)
        blocks = list(stage)
        k = checkpoint_segment_length(len(blocks), self.checkpoint_every)
        for i in range(0, len(blocks), k):
            x = _checkpoint_segment(blocks[i : i + k], x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, in_chans, h, w]`` -> the unpooled feature map ``[b, num_features, h', w']``
        (timm's convention; :meth:`forward_head` pools it)."""
        # cifar: [b, 16, h, w]; imagenet: [b, 64, h/4, w/4]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = self._run_stage(name, x)  # channels x2, h and w /2 per stage
        return self.final_act(self.final_bn(x))  # [b, num_features, h', w']

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map ``[b, num_features, h', w']`` -> logits ``[b, num_classes]``, or with
        ``pre_logits`` the pooled features ``[b, num_features]`` (before dropout and ``fc``)."""
        x = torch.flatten(self.avgpool(x), 1)  # [b, num_features]
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[b, in_chans, h, w]`` -> logits ``[b, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """The network as ordered pieces: stem, layer1.., pool, fc.

        Chaining them equals ``forward`` in eval mode (no checkpointing, no dropout); used
        by ``summary.model_info`` for per-stage shapes, parameters and multiply-adds.
        """
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        pool = nn.Sequential(self.final_bn, self.final_act, self.avgpool, nn.Flatten(1))
        layers = [(name, getattr(self, name)) for name in self.stage_names]
        return [("stem", stem), *layers, ("pool", pool), ("fc", self.fc)]
