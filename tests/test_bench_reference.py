"""benchmarks/reference: the torchvision-style loop both benchmarks race against. Its schedule is
resnetlab's step for step; it trains on IDX files in torchvision's layout (made here, tiny)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmarks import reference

import resnetlab
from resnetlab.data.sources.idx import FILES, write_idx
from resnetlab.engine.optim import lr_at


@pytest.mark.parametrize(("recipe", "steps_per_epoch", "epochs"),
                         [("fashion_speedrun", 234, 2), ("fashion_speedrun", 7, 3), ("fashion_mnist", 10, 3)])
def test_schedule_is_resnetlabs_step_for_step(recipe: str, steps_per_epoch: int, epochs: int) -> None:
    # 234 steps of batch 256 per 60k-image epoch (the recipe's own); 7: an odd count, where
    # half an epoch of warm-up is 3.5 steps and rounding must agree with lr_at's.
    cfg = resnetlab.load_config(recipe, [])
    o = cfg.optim
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr, momentum=o.momentum)
    sched = reference.build_scheduler(opt, o, steps_per_epoch, epochs)
    total = steps_per_epoch * epochs
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: nothing moves; the scheduler expects a step before its own
        sched.step()
    want = [lr_at(s, total, steps_per_epoch, o) for s in range(total)]
    # torch's schedulers update the lr multiplicatively, step by step: a few roundings of a
    # float64 per step, so the error grows at most ~4 eps * lr per step taken
    tol = 4 * total * sys.float_info.epsilon * o.lr
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tol
    warm = round(o.warmup_epochs * steps_per_epoch)
    assert got[0] == pytest.approx(o.warmup_lr) and got[warm] == pytest.approx(o.lr)  # not vacuous


def test_schedule_refuses_what_it_does_not_write() -> None:
    cfg = resnetlab.load_config("fashion_speedrun", ["optim.schedule=step"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optim.schedule=step"):
        reference.build_scheduler(opt, cfg.optim, 10, 2)


def _tiny_fashion(folder: Path, n_train: int, n_test: int) -> list[Path]:
    """Random 28x28 uint8 images with labels 0..9 as the four gzip IDX files."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    out = []
    for (images, labels), n in ((FILES["train"], n_train), (FILES["test"], n_test)):
        for base, array in ((images, rng.integers(0, 256, (n, 28, 28))), (labels, np.arange(n) % 10)):
            write_idx(folder / f"{base}.gz", array)
            out.append(folder / f"{base}.gz")
    return out


@pytest.mark.parametrize("amp", ["none", "bf16"])  # fp16 is for CUDA (GradScaler may skip a CPU step)
def test_reference_loop_trains_one_step(tmp_path: Path, amp: str) -> None:
    files = _tiny_fashion(tmp_path / "idx", n_train=20, n_test=12)
    root = reference.torchvision_layout(files, tmp_path / "tv")
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(
        f.name.removesuffix(".gz") for f in files)
    cfg = resnetlab.load_config("fashion_speedrun", ["train.epochs=1", "train.batch_size=16",
                                                     "train.eval_batch_size=8", f"train.amp={amp}"])
    model = resnetlab.create_model(cfg.model.name, num_classes=10, in_chans=1)
    before = [p.detach().clone() for p in model.parameters()]
    # 16 of the 20 images: one batch of 16 (drop_last), so one optimiser step
    r = reference.train(cfg, root, torch.device("cpu"), workers=0, channels_last=True, model=model,
                        subset=lambda y: range(16))
    assert (r.steps, r.epochs, r.test_images) == (1, 1, 12)
    assert r.lrs == [pytest.approx(lr_at(0, 1, 1, cfg.optim))]  # resnetlab's lr for step 0 of 1
    assert 0.0 <= r.test_acc <= 100.0 and r.seconds > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_reference_loop_scores_flips_beside_the_plain_top1(tmp_path: Path) -> None:
    files = _tiny_fashion(tmp_path / "idx", n_train=16, n_test=12)
    root = reference.torchvision_layout(files, tmp_path / "tv")
    cfg = resnetlab.load_config("fashion_speedrun", ["train.epochs=1", "train.batch_size=16",
                                                     "train.eval_batch_size=5", "train.test_tta=flip"])
    torch.manual_seed(0)
    model = resnetlab.create_model(cfg.model.name, num_classes=10, in_chans=1)
    r = reference.train(cfg, root, torch.device("cpu"), workers=0, channels_last=False, model=model)
    # 12 test images: every accuracy is a whole number of twelfths
    for acc in (r.test_acc, r.test_acc_plain):
        assert 0.0 <= acc <= 100.0 and round(acc * 12 / 100, 6).is_integer()
