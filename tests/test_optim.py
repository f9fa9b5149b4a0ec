"""Schedules as pure functions of the step, parameter groups, EMA."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="sgd", lr=0.1, nesterov=True, no_weight_decay_bn_bias=True),
        OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05),
    ],
    ids=["sgd", "adamw"],
)
def test_fused_update_equals_the_unfused_one(cfg: OptimConfig) -> None:
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
            for _ in range(2)]
    x = torch.randn(4, 3, 6, 6)
    for net in nets:
        net(x)  # materialise the lazy layer
    nets[1].load_state_dict(nets[0].state_dict())
    before = [p.detach().clone() for p in nets[0].parameters()]
    fused = build_optimizer(nets[0], cfg)
    plain = build_optimizer(nets[1], OptimConfig(**{**cfg.__dict__, "fused": False}))
    assert all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    for _ in range(3):
        for net, opt in ((nets[0], fused), (nets[1], plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(a, b) for a, b in zip(nets[0].parameters(), before, strict=True))
