"""Fold BatchNorm into the convolution that feeds it, for inference.

In eval mode a BN is a per-channel affine map ``y = g * (x - mu) / sqrt(var + eps) + b``; when
``x`` is a conv's output, the map can be merged into the conv's weight and bias, removing one
memory pass per BN. Only a BN that reads a conv's output *directly* can be folded:

- post-activation blocks: conv1->bn1, conv2->bn2 (conv3->bn3), the stem, ``downsample.0->.1``;
- pre-activation blocks: conv1->bn2 (conv2->bn3); their first BN reads the previous block's
  sum, not a conv. Folding a BN *forward* into the following conv would be wrong at the
  borders, because that conv zero-pads the normalised input, not the raw one, so those BNs
  (and the final BN of a pre-activation net) are left as they are.

Which pairs are direct is declared by each module in ``fuse_pairs``; for an ``nn.Sequential``
the children run in order, so an adjacent (conv, BN) pair there is direct too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval


def direct_pairs(module: nn.Module) -> Iterator[tuple[str, str]]:
    """Names of (conv, bn) children of ``module`` where the BN reads the conv's output."""
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        yield from zip(names, names[1:], strict=False)
    else:
        yield from getattr(module, "fuse_pairs", ())


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An inference copy of ``model``: BatchNorm folded into convs, eval, channels_last, frozen.

    The input model is not modified. Every BN that directly follows a conv (see module doc)
    becomes ``nn.Identity`` and its conv gains a bias. Outputs equal the eval-mode original up
    to float rounding.
    """
    fused = copy.deepcopy(model).eval()
    for parent in list(fused.modules()):
        for conv_name, bn_name in list(direct_pairs(parent)):
            conv = getattr(parent, conv_name, None)
            bn = getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                if bn.running_mean is None or conv.out_channels != bn.num_features:
                    continue  # no running stats to fold (track_running_stats=False)
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    fused = fused.to(memory_format=torch.channels_last)
    fused.requires_grad_(False)
    return fused
