"""Shared fixtures: tiny budgets so the whole suite stays well under 5 minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: one intra-op thread per test process is faster than two fighting.
torch.set_num_threads(int(os.environ.get("RESNETLAB_TEST_THREADS", "1")))


@pytest.fixture
def quick(tmp_path):
    """Overrides for a seconds-long digits run in ``tmp_path/runs``."""
    return [f"run.root={tmp_path / 'runs'}", "train.quiet=true", "train.tensorboard=false",
            "train.epochs=2", "train.batch_size=128", "optim.schedule=constant", "optim.warmup=none"]


# The one-process reference runs of the DDP tests (tests/test_distributed.py, tests/test_multinode.py):
# the same global batch and settings as their 2-process runs. Shared by the session, and one
# uninterrupted run of 3 epochs gives all three: its folder is copied as each epoch ends, when the
# files on disk are exactly those of a run of that many epochs (constant lr, no warm-up, so the
# number of epochs changes nothing before the end).
DDP_BATCH = 512  # global batch: 256 per rank with 2 ranks
DDP_STEPS_PER_EPOCH = 1258 // DDP_BATCH  # digits train split, drop_last: 2 steps
DDP_COMMON = [
    "model.name=resnet20", "model.drop_rate=0", "data.name=digits", "seed=0",
    "train.device=cpu", f"train.batch_size={DDP_BATCH}", "train.channels_last=false",
    "optim.lr=0.001", "optim.schedule=constant", "optim.warmup=none",
    "train.quiet=true", "train.tensorboard=false",
]


@pytest.fixture(scope="session")
def ddp_common() -> list[str]:
    """The settings of :func:`ddp_reference`'s runs (the DDP tests assert theirs are the same)."""
    return list(DDP_COMMON)


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, object]:
    """``{epochs: run folder}`` for 1, 2 and 3 epochs of one process with ``DDP_COMMON``."""
    import shutil

    import resnetlab

    root = tmp_path_factory.mktemp("ddp-reference")
    runs: dict[int, object] = {}

    def snapshot(info: dict) -> None:
        if info["batch"] == 0 and info["epoch"] > 0:  # the first step of an epoch: the last one is on disk
            runs[info["epoch"]] = shutil.copytree(root / "one-3", root / f"one-{info['epoch']}",
                                                  ignore=shutil.ignore_patterns(".lock"))

    cfg = resnetlab.load(None, [*DDP_COMMON, f"run.root={root}", "run.name=one-3", "train.epochs=3"])
    result = resnetlab.train(cfg, on_step=snapshot)
    assert result.steps == 3 * DDP_STEPS_PER_EPOCH and sorted(runs) == [1, 2]
    runs[3] = result.run_dir
    return runs
