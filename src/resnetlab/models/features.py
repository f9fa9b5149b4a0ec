"""``create_model(name, features_only=True, out_indices=...)``: the network as a feature pyramid.

timm's convention, for detection and segmentation users: the model returns a list of feature maps
instead of logits, one per requested level; level 0 is the stem's output and level ``i`` the
``i``-th stage the network declares (``stage_names``). ``feature_info`` lists each returned
level's channels and reduction (input size / map size), as timm's ``feature_info`` does::

    backbone = create_model("resnet50", features_only=True, out_indices=(2, 3, 4))
    c3, c4, c5 = backbone(images)                     # [b, 512, h/8, w/8], ... [b, 2048, h/32, w/32]
    backbone.feature_info.channels()                  # [512, 1024, 2048]

The extractor holds the network's own modules under their own names (``conv1``, ``layer1``, ...),
so a classifier's state dict loads into it with ``strict=False`` (the head is left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import ClassifierNet


@dataclass(frozen=True)
class FeatureLevel:
    """One returned level: its index, the piece that makes it, channels and reduction."""

    index: int  # 0 = stem, i = i-th stage
    module: str  # the stage's path (``layer2``), or "stem"
    num_chs: int
    reduction: int  # input height / feature-map height


class FeatureInfo(list[FeatureLevel]):
    """The returned levels, in order; ``channels()`` and ``reduction()`` as in timm."""

    def channels(self) -> list[int]:
        """Channels of each returned map."""
        return [f.num_chs for f in self]

    def reduction(self) -> list[int]:
        """Downsampling factor of each returned map."""
        return [f.reduction for f in self]


class FeatureExtractor(nn.Module):
    """``model``'s stem and stages up to the deepest requested level; ``forward`` returns the
    feature maps of ``out_indices`` (see the module doc)."""

    def __init__(self, model: ClassifierNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        pieces = model.named_stages()  # stem, stage pieces (DenseNet: transitions too), pool, fc
        stage_modules = [m for _, m in model.stages()]
        # level i ends after pieces[ends[i]]: the stem, then each declared stage
        ends = [0] + [next(j for j, (_, m) in enumerate(pieces) if m is s) for s in stage_modules]
        n = len(ends)
        wanted = tuple(range(n)) if out_indices is None else tuple(out_indices)
        if not wanted or any(isinstance(i, bool) or not -n <= i < n for i in wanted):
            raise ValueError(f"out_indices must be levels in [0, {n - 1}] (0 = stem, i = stage i) "
                             f"for {model.arch or type(model).__name__}, got {tuple(wanted)}")
        self.out_indices = tuple(sorted({i % n for i in wanted}))
        self._ends = [ends[i] for i in self.out_indices]
        self._pieces = [m for _, m in pieces[: self._ends[-1] + 1]]  # not registered: see below
        # Register the network's own children that these pieces use, under their own names.
        used = {id(t) for piece in self._pieces for t in [*piece.parameters(), *piece.buffers()]}
        for name, child in model.named_children():
            if any(id(t) in used for t in [*child.parameters(), *child.buffers()]):
                self.add_module(name, child)
        c, h, w = model.input_size
        was_training = model.training
        model.eval()
        with torch.no_grad():
            ref = next(model.parameters())
            maps = self(torch.zeros(1, c, h, w, device=ref.device, dtype=ref.dtype))
        model.train(was_training)
        self.train(was_training)
        names = ["stem", *model.stage_names]
        self.feature_info = FeatureInfo(
            FeatureLevel(i, names[i], int(f.shape[1]), max(1, round(h / f.shape[-2])))
            for i, f in zip(self.out_indices, maps, strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``[b, c, h, w]`` -> one ``[b, ch_i, h_i, w_i]`` map per level of ``out_indices``."""
        out = []
        ends = iter(self._ends)
        end = next(ends)
        for j, piece in enumerate(self._pieces):
            x = piece(x)
            if j == end:
                out.append(x)
                end = next(ends, -1)
        return out


__all__ = ["FeatureExtractor", "FeatureInfo", "FeatureLevel"]
