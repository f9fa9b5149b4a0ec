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
