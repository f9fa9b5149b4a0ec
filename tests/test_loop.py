"""The training step: no host synchronisation after the first step, fused EMA, EMA through
DDP/compile wrappers, and the speed switches (cuDNN autotuning, TF32)."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

import resnetlab
from resnetlab.config import TrainConfig
from resnetlab.engine.optim import ModelEMA
from resnetlab.runtime import apply_speed_flags

# steps 2..17 of the first epoch (19 steps of 64): the first step may build caches; before the
# bar and TensorBoard read the loss at sync steps, each read it every 10 steps (steps 10, 11)
ARMED_STEPS = range(2, 18)
SYNC_EVERY = 4  # the guard reads its flags at steps 4, 8, 12, 16: inside the armed steps


def test_steps_after_the_first_make_no_host_sync(tmp_path, monkeypatch) -> None:
    # On a GPU each of these waits for the device (or copies host memory to it): the step loop
    # must not call them. On the CPU they are free, so the test traps the entry points instead.
    # Default settings (progress bar on, TensorBoard on), with the sync interval a GPU gets by
    # default, shortened so that the armed steps hold one sync step: the only host reads allowed
    # are the guard's, at that step (the bar's and TensorBoard's losses are read there too).
    from resnetlab.engine import runlog  # the progress bar's owner
    from resnetlab.runtime import SYNC_EVERY_AUTO

    monkeypatch.setitem(SYNC_EVERY_AUTO, "cpu", SYNC_EVERY)
    monkeypatch.setattr(runlog, "someone_watches", lambda stream: True)  # the bar is shown
    armed, step, calls, at_sync = [False], [0], [], []

    def trap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if armed[0]:
                frames = traceback.extract_stack()[:-1]
                if any(f.name == "sync" and f.filename.endswith("guard.py") for f in frames):
                    at_sync.append((step[0], name))
                else:
                    calls.append(f"{name} at step {step[0]}\n" + "".join(traceback.format_list(frames[-6:])))
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, trap(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):  # a tensor made from Python values: a host-to-device copy
        monkeypatch.setattr(torch, name, trap(f"torch.{name}", getattr(torch, name)))
    cuda = torch.cuda.is_available()

    def on_step(info: dict[str, Any]) -> bool:
        step[0] = info["step"]
        armed[0] = info["step"] + 1 in ARMED_STEPS  # arm after step 1, disarm during the last
        if cuda:
            torch.cuda.set_sync_debug_mode("error" if armed[0] else "default")
        return False

    cfg = resnetlab.load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=nosync", "train.epochs=1",
                                "train.batch_size=64", "optim.ema_decay=0.9"])
    assert not cfg.train.quiet and cfg.train.tensorboard and cfg.train.sync_every == 0  # defaults
    try:
        result = resnetlab.train(cfg, on_step=on_step)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert result.steps == 19
    assert not calls, "host syncs inside steps 2..17:\n" + "\n".join(calls[:3])
    # one read of the flags per sync step, and nothing else
    assert at_sync == [(s, "Tensor.tolist") for s in range(SYNC_EVERY, 18, SYNC_EVERY)]
    assert (tmp_path / "runs" / "nosync" / "tb").is_dir()


def test_ema_updates_with_one_fused_kernel_and_equals_the_formula(monkeypatch) -> None:
    torch.manual_seed(0)
    model = resnetlab.create_model("resnet20")
    ema = ModelEMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    lerps = []
    original = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: lerps.append(1) or original(*a, **k))
    ema.update(model)
    assert len(lerps) == 1  # one multi-tensor call, not one per tensor
    params = dict(model.named_parameters())
    for k, v in ema.state_dict().items():
        if k in params:  # ema + (w - ema) * 0.1, exactly as torch.lerp computes it per tensor
            assert torch.equal(v, torch.lerp(before[k], params[k].detach(), 0.1)), k
        else:  # buffers are copied
            assert torch.equal(v, model.state_dict()[k]), k


class _Wrapper(torch.nn.Module):
    """Stands for DDP (``module.``) and torch.compile (``_orig_mod``): both prefix the keys."""

    def __init__(self, inner: torch.nn.Module, attr: str) -> None:
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("attr", ["_orig_mod"])
def test_ema_accepts_a_wrapped_model(attr: str) -> None:
    model = resnetlab.create_model("resnet20")
    wrapped = _Wrapper(model, attr)
    assert next(iter(wrapped.state_dict())).startswith(f"{attr}.")  # what broke the old update
    ema = ModelEMA(wrapped, 0.5)
    assert list(ema.state_dict()) == list(model.state_dict())  # clean keys, for checkpoints
    with torch.no_grad():
        next(model.parameters()).add_(2.0)
    ema.update(wrapped)
    first = next(iter(ema.state_dict()))
    torch.testing.assert_close(ema.state_dict()[first], model.state_dict()[first] - 1.0)


def test_ema_through_ddp_trains(quick: list[str]) -> None:
    # A one-process gloo group: the model is wrapped in DistributedDataParallel, keys `module.*`.
    import torch.distributed as tdist

    from resnetlab.engine.dist import DistInfo, wrap_ddp

    tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        model = resnetlab.create_model("resnet20", num_classes=3, in_chans=1)
        net = wrap_ddp(model, DistInfo(0, 2, 0), torch.device("cpu"), sync_bn=False)
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
        ema = ModelEMA(net, 0.9)
        net(torch.randn(4, 1, 8, 8)).sum().backward()
        ema.update(net)  # KeyError 'module.conv1.weight' before
        assert list(ema.state_dict()) == list(model.state_dict())
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("on", [True, False])
def test_speed_switches_follow_the_config(on: bool) -> None:
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        apply_speed_flags(TrainConfig(cudnn_benchmark=on, tf32=on), torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is on
        assert torch.backends.cudnn.allow_tf32 is on
        assert torch.backends.cuda.matmul.allow_tf32 is on
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved
    assert TrainConfig().cudnn_benchmark and TrainConfig().tf32  # the documented defaults


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_train_step_is_one_sgd_step_on_the_batch_loss(clip: float | None) -> None:
    # train_step (the step train_one_epoch and the cifar-table estimate share) against the
    # textbook update w <- w - lr * g, with g clipped to global L2 norm `clip` when set.
    from torch import nn

    from resnetlab.engine.loop import train_step

    torch.manual_seed(0)
    model = nn.Linear(5, 3)  # float64 below: the only rounding is the update's own
    model.double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    w0 = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    if clip is not None:
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        grads = tuple(g * min(1.0, clip / (float(norm) + 1e-6)) for g in grads)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ModelEMA(model, 0.5)
    loss, logits = train_step(model, x, y, opt, nn.CrossEntropyLoss(), clip_grad_norm=clip, ema=ema)
    assert logits.shape == (8, 3) and loss.requires_grad
    for p, w, g in zip(model.parameters(), w0, grads, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.5 * g, rtol=0, atol=1e-12)
    # the EMA saw the updated weights: halfway from its copy of w0 to w1
    for e, p, w in zip(ema.module.parameters(), model.parameters(), w0, strict=True):
        torch.testing.assert_close(e.detach(), (0.5 * w + 0.5 * p.detach()).to(e.dtype), rtol=0, atol=1e-6)


def test_fit_compiled_through_freeze_and_unfreeze(tmp_path) -> None:
    # train.compile=true through fit() itself, on aot_eager (AOTAutograd's tracing of forward and
    # backward, as inductor sees them, without generating code): the frozen BN layers' forward
    # pre-hooks, the recompilation when layers unfreeze at epoch 2, and the optimiser/EMA around it.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from resnetlab.engine.dist import unwrap

    torch._dynamo.reset()
    counters.clear()
    seen: dict[str, Any] = {}

    def on_step(info: dict[str, Any]) -> bool:
        model = unwrap(info["model"])
        seen.setdefault("compiled", type(info["model"]).__name__)
        if info["step"] == 1:  # after the first step of epoch 1: the backbone is frozen
            seen["conv1"] = model.conv1.weight.detach().clone()
            seen["bn1_mean"] = model.bn1.running_mean.clone()
            seen["fc"] = model.fc.weight.detach().clone()
        if info["step"] == 2:  # the last step of epoch 1
            seen["conv1_end1"] = model.conv1.weight.detach().clone()
            seen["bn1_mean_end1"] = model.bn1.running_mean.clone()
            seen["fc_end1"] = model.fc.weight.detach().clone()
        seen["conv1_last"] = model.conv1.weight.detach().clone()
        return False

    cfg = resnetlab.load_config(None, [f"run.root={tmp_path / 'runs'}", "train.quiet=true", "train.tensorboard=false",
                                "model.name=resnet20", "data.name=digits", "data.train_per_class=8",
                                "train.batch_size=32", "train.epochs=2", "train.test_at_end=false",
                                "train.compile=true", "train.compile_backend=aot_eager",
                                "train.freeze=[backbone]", "train.unfreeze_at_epoch=1", "optim.ema_decay=0.9"])
    result = resnetlab.train(cfg, on_step=on_step)
    assert result.steps == 4  # 80 images, batch 32: 2 steps per epoch
    assert seen["compiled"] == "OptimizedModule"
    assert torch.equal(seen["conv1_end1"], seen["conv1"])  # frozen: no update in epoch 1
    assert torch.equal(seen["bn1_mean_end1"], seen["bn1_mean"])  # frozen BN kept its statistics
    assert not torch.equal(seen["fc_end1"], seen["fc"])  # the head trained
    assert not torch.equal(seen["conv1_last"], seen["conv1"])  # unfrozen in epoch 2: trains
    # one graph per phase: the unfrozen parameters (requires_grad) made dynamo compile again
    assert counters["stats"]["unique_graphs"] >= 2
    assert all(math.isfinite(v) for v in (result.val["loss"],))


def test_fp16_with_an_unfused_optimiser_on_a_gpu_warns() -> None:
    # GradScaler.step reads found_inf on the host unless the optimiser is fused; only a GPU pays.
    from resnetlab.engine.fit import fp16_sync_warning

    params = [torch.nn.Parameter(torch.zeros(2))]
    plain, fused = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.1, fused=True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    fp16, bf16 = resnetlab.load_config(None, ["train.amp=fp16"]), resnetlab.load_config(None, ["train.amp=bf16"])
    assert "optim.fused=true" in (fp16_sync_warning(fp16, plain, cuda) or "")
    assert fp16_sync_warning(fp16, fused, cuda) is None
    assert fp16_sync_warning(bf16, plain, cuda) is None
    assert fp16_sync_warning(fp16, plain, cpu) is None
