"""The mathematics of the loss landscape (Li et al. 2018), with no files and no runs: random
filter-normalised directions, the loss at many grid points per batched forward pass, and the
roughness numbers (mean second difference, Hessian extremes by power iteration).

:mod:`resnetlab.analysis.landscape` turns a run folder into landscape files with these; its
docstring states the method (filter normalisation, the BatchNorm modes, roughness).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from resnetlab.analysis import args
from resnetlab.analysis.errors import AnalysisError
from resnetlab.params import named

BN_MODES = ("batch", "eval")
BN_LABELS = {"batch": "BN: statistics of the evaluated images (recomputed per point)",
             "eval": "BN: the model's running statistics (eval mode)"}

Directions = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# directions


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> Directions:
    """A random direction over ``model``'s parameters, filter-normalised (Li et al. 2018, Sec. 4).

    Parameters with ``ndim >= 2`` (conv ``[out, in, kh, kw]``, linear ``[out, in]``) get a
    Gaussian direction whose every filter ``[i]`` has the norm of the weight's filter ``[i]``;
    BN weights and biases and every bias (``ndim < 2``) get zeros. Drawn on the CPU from
    ``generator`` (so a seed gives the same direction on any device), then moved beside the weight.
    """
    out: Directions = {}
    for name, w in model.named_parameters():
        if w.ndim < 2:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w)
        w_norm = w.detach().flatten(1).norm(dim=1)  # [out]: one norm per filter
        d_norm = d.flatten(1).norm(dim=1)
        scale = w_norm / d_norm.clamp_min(1e-12)
        out[name] = d * scale.view(-1, *([1] * (w.ndim - 1)))
    return out


# ----------------------------------------------------------------------------------------------
# batched evaluation


@contextmanager
def bn_mode(model: nn.Module, mode: args.BnMode):
    """Put ``model`` in the evaluation mode for ``mode`` for the block, then restore it.

    ``"eval"``: ``model.eval()``. ``"batch"``: ``model.eval()`` except that every BN normalises
    with batch statistics and does not touch its running buffers (``track_running_stats=False``
    in training mode), so the landscape sees the images' own statistics.
    """
    if mode not in BN_MODES:
        args.one_of(mode, "mode", BN_MODES)
    was_training = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    tracked = {m: m.track_running_stats for m in bns}
    model.eval()
    if mode == "batch":
        for m in bns:
            m.train()
            m.track_running_stats = False  # batch statistics, buffers left as they are
    try:
        yield model
    finally:
        for m in bns:
            m.track_running_stats = tracked[m]
        for mod, t in was_training.items():
            mod.train(t)


def _loss_acc(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # logits [..., n, classes], y [n] -> mean cross-entropy and accuracy (fraction) per leading index
    lp = logits.float().log_softmax(-1)
    loss = -lp.gather(-1, y.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)
    acc = (logits.argmax(-1) == y).float().mean(-1)
    return loss, acc


def grid_points(coords_a: Sequence[float], coords_b: Sequence[float] | None) -> list[tuple[float, float]]:
    """All (a, b) pairs, row-major over b then a (b = 0 everywhere for a 1-D landscape)."""
    if coords_b is None:
        return [(float(a), 0.0) for a in coords_a]
    return [(float(a), float(b)) for b in coords_b for a in coords_a]


def landscape_batched(model: nn.Module, x: torch.Tensor, y: torch.Tensor, d1: Directions,
                      d2: Directions | None, points: Sequence[tuple[float, float]], *,
                      bn: args.BnMode = "batch", chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at ``w + a d1 + b d2`` for every ``(a, b)`` in ``points``.

    ``chunk`` grid points at a time share one vmapped forward pass over the images ``x``
    (``[n, c, h, w]``, labels ``y`` ``[n]``). Returns ``(loss [P], acc [P])`` on the CPU.
    """
    if chunk < 1:
        raise named(AnalysisError, "chunk", f"must be >= 1, got {chunk}")
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    coef = torch.tensor(points, dtype=torch.float32, device=x.device)  # [P, 2]

    def run_one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, (p, buffers), (x,))  # [n, classes]

    batched = vmap(run_one)
    losses, accs = [], []
    with bn_mode(model, bn), torch.no_grad():
        for i in range(0, len(points), chunk):
            c = coef[i:i + chunk]  # [p, 2]
            shape = (-1,)
            stacked = {}
            for k, w in params.items():
                view = c.shape[:1] + (1,) * w.ndim
                delta = c[:, 0].view(view) * d1[k]
                if d2 is not None:
                    delta = delta + c[:, 1].view(view) * d2[k]
                stacked[k] = w.unsqueeze(0) + delta  # [p, *w.shape]
            logits = batched(stacked)  # [p, n, classes]
            loss, acc = _loss_acc(logits, y)
            losses.append(loss.reshape(shape).cpu())
            accs.append(acc.reshape(shape).cpu())
    return torch.cat(losses), torch.cat(accs)


def landscape_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, d1: Directions,
                   d2: Directions | None, points: Sequence[tuple[float, float]], *,
                   bn: args.BnMode = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward reference: per grid point, load the perturbed state dict and run.

    Same results as :func:`landscape_batched`, one point at a time; ``model`` is not changed.
    """
    net = copy.deepcopy(model)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses, accs = [], []
    with bn_mode(net, bn), torch.no_grad():
        for a, b in points:
            state = dict(base)
            for k in d1:
                state[k] = base[k] + a * d1[k] + (b * d2[k] if d2 is not None else 0)
            net.load_state_dict(state)
            loss, acc = _loss_acc(net(x), y)
            losses.append(float(loss))
            accs.append(float(acc))
    return torch.tensor(losses), torch.tensor(accs)


# ----------------------------------------------------------------------------------------------
# roughness


def second_difference(loss: torch.Tensor, step: float) -> float:
    """Mean ``|L[i+1] - 2 L[i] + L[i-1]| / step^2`` along every axis of the grid ``loss``
    (``[g]`` or ``[g, g]``); loss units per squared unit of filter-normalised distance."""
    diffs = []
    for dim in range(loss.ndim):
        if loss.shape[dim] < 3:
            continue
        n = loss.shape[dim]
        second = loss.narrow(dim, 2, n - 2) - 2 * loss.narrow(dim, 1, n - 2) + loss.narrow(dim, 0, n - 2)
        diffs.append(second.abs().flatten())
    if not diffs:
        raise named(AnalysisError, "loss", f"needs 3 or more points along an axis for a second difference, got shape {tuple(loss.shape)}")
    return float(torch.cat(diffs).double().mean()) / step**2


def hessian_extremes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bn: args.BnMode = "batch",
                     iters: int = 20, seed: int = 0) -> dict[str, float]:
    """Largest and smallest Hessian eigenvalues of the mean cross-entropy at ``model``'s weights.

    Power iteration on Hessian-vector products (double backward) gives the eigenvalue of
    largest magnitude, ``lambda_max``; power iteration on ``H - lambda_max I`` then gives the
    other end of the spectrum, ``lambda_min = mu + lambda_max``. ``iters`` products each.
    Returns ``lambda_max``, ``lambda_min``, ``ratio = |lambda_min / lambda_max|`` and ``hvps``.
    """
    net = copy.deepcopy(model)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        with bn_mode(net, bn):
            loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return list(torch.autograd.grad(grads, params, grad_outputs=v))

    def normalise(v: list[torch.Tensor]) -> list[torch.Tensor]:
        n = torch.stack([(t.double() ** 2).sum() for t in v]).sum().sqrt()  # global L2 norm
        return [t / n.to(t.dtype) for t in v]

    def dot(u: list[torch.Tensor], v: list[torch.Tensor]) -> float:
        return float(sum((a.double() * b.double()).sum() for a, b in zip(u, v, strict=True)))

    def power(shift: float) -> float:
        v = normalise([torch.randn(p.shape, generator=g).to(p) for p in params])
        lam = 0.0
        for _ in range(iters):
            hv = [h - shift * t for h, t in zip(hvp(v), v, strict=True)]
            lam = dot(v, hv)  # Rayleigh quotient of the shifted operator
            v = normalise(hv)
        return lam

    lam_max = power(0.0)
    lam_min = power(lam_max) + lam_max
    lam_max, lam_min = max(lam_max, lam_min), min(lam_max, lam_min)
    ratio = abs(lam_min / lam_max) if lam_max != 0 else math.nan
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio": ratio, "hvps": 2 * iters}


__all__ = ["BN_LABELS", "BN_MODES", "Directions", "bn_mode", "filter_normalized_direction", "grid_points",
           "hessian_extremes", "landscape_batched", "landscape_loop", "second_difference"]
