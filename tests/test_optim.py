"""Schedules as pure functions of the step, parameter groups, EMA."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from resnetlab.config import OptimConfig
from resnetlab.engine.optim import ModelEMA, build_optimizer, lr_at, param_groups


def test_paper_step_schedule_divides_by_ten_at_half_and_three_quarters() -> None:
    cfg = OptimConfig(lr=0.1, schedule="step", milestones=(0.5, 0.75))
    total = 64_000
    assert lr_at(0, total, 351, cfg) == pytest.approx(0.1)
    assert lr_at(31_999, total, 351, cfg) == pytest.approx(0.1)
    assert lr_at(32_000, total, 351, cfg) == pytest.approx(0.01)
    assert lr_at(48_000, total, 351, cfg) == pytest.approx(0.001)


def test_constant_warmup_is_the_papers_resnet110_trick() -> None:
    cfg = OptimConfig(lr=0.1, warmup="constant", warmup_epochs=1, warmup_lr=0.01)
    assert lr_at(0, 1000, 100, cfg) == 0.01
    assert lr_at(99, 1000, 100, cfg) == 0.01
    assert lr_at(100, 1000, 100, cfg) == pytest.approx(0.1)


def test_cosine_with_linear_warmup() -> None:
    cfg = OptimConfig(lr=0.2, schedule="cosine", warmup="linear", warmup_epochs=1, warmup_lr=0.0)
    lrs = [lr_at(s, 1000, 100, cfg) for s in range(1000)]
    assert lrs[0] == 0.0 and lrs[50] == pytest.approx(0.1)
    assert lrs[100] == pytest.approx(0.2)
    assert lrs[550] == pytest.approx(0.1, rel=1e-2)  # half way through the cosine part
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[100:], lrs[101:], strict=False))


def test_no_weight_decay_on_bn_and_bias() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    groups = param_groups(model, OptimConfig(no_weight_decay_bn_bias=True, weight_decay=1e-4))
    assert groups[0]["weight_decay"] == 1e-4 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(build_optimizer(model, OptimConfig()).param_groups) == 1


def test_ema_moves_toward_the_weights_and_copies_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    before = ema.module[0].weight.clone()
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, before + 0.1)  # 10% of the way
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert math.isclose(ema.decay, 0.9)


def _three_steps(cfg: OptimConfig, state: dict | None = None) -> tuple[nn.Module, list[torch.Tensor]]:
    """A conv-BN-linear net after 3 steps of ``cfg``; the conv has no bias (see below)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 3, 6, 6)
    net(x)  # materialise the lazy layer
    if state is not None:
        net.load_state_dict(state)
    before = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer(net, cfg)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    assert all(bool(g["fused"]) == cfg.fused for g in opt.param_groups)
    return net, before


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="sgd", lr=0.1, nesterov=True, no_weight_decay_bn_bias=True),
        OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05),
    ],
    ids=["sgd", "adamw"],
)
def test_fused_update_equals_the_unfused_one(cfg: OptimConfig) -> None:
    """The fused kernel does the unfused update's arithmetic, up to float32 rounding.

    What the mathematics fixes, and so what is asserted: both nets start bitwise equal and see
    the same batch, so the first gradients are equal; the kernels then differ only in the order
    and fusing (FMA) of a handful of float32 operations per element, each rounding by at most
    half an ulp (2^-24 ~ 6e-8 relative). Over 3 steps that is a few ulp of each parameter
    (|p| <= ~1): rtol 1e-6 (~16 ulp) and atol 1e-7 (for entries near 0) bound it with margin
    on every SIMD path (measured: <= 6e-8 for SGD, <= 4e-9 for AdamW under
    ATEN_CPU_CAPABILITY=avx512, avx2 and default).

    No parameter may have a gradient that is pure rounding noise: a conv bias in front of
    BatchNorm has a true gradient of 0 (BN subtracts the channel mean), so its computed
    gradient is ~1e-9 noise that depends on the kernel; Adam divides it by its own RMS and
    turns it into a step of size ~lr, different on each CPU. Hence ``bias=False``, as in every
    ResNet conv.
    """
    fused, before = _three_steps(cfg)
    plain, _ = _three_steps(replace(cfg, fused=False))
    for a, b in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(a, b) for a, b in zip(fused.parameters(), before, strict=True))
    # the tolerance is tight enough to catch a real difference: weight decay halved
    other, _ = _three_steps(replace(cfg, weight_decay=cfg.weight_decay / 2))
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-7)
               for a, b in zip(fused.parameters(), other.parameters(), strict=True))
