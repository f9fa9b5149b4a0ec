"""Per-step checks (StepGuard): the sync interval, checkpoints on sync steps, and a stop that
reaches every rank at the same step instead of deadlocking the collectives."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.runtime import checkpoint_interval, sync_interval

STEPS_PER_EPOCH = 1258 // 128  # digits train split, batch 128, drop_last: 9


def test_checkpoint_interval_rounds_up_to_the_sync_interval() -> None:
    assert checkpoint_interval(5, 4) == 8
    assert checkpoint_interval(7, 20) == 20
    assert checkpoint_interval(8, 4) == 8
    assert checkpoint_interval(41, 20) == 60
    assert checkpoint_interval(3, 1) == 3
    assert checkpoint_interval(0, 4) == 0  # off stays off
    cfg = resnetlab.load(None, ["train.sync_every=7"])
    assert sync_interval(cfg.train, torch.device("cpu")) == 7
    auto = resnetlab.load(None, [])
    assert sync_interval(auto.train, torch.device("cpu")) == 1
    assert sync_interval(auto.train, torch.device("cuda")) == 20


def test_mid_epoch_saves_happen_every_rounded_interval(quick: list[str], monkeypatch, caplog) -> None:
    saves: list[tuple[str, int, int]] = []
    real = ckpt.save_checkpoint

    def recording(state, path):
        saves.append((Path(path).name, state["state"]["step"], state["state"]["batch"]))
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", recording)
    cfg = resnetlab.load(None, [*quick, "run.name=every", "train.epochs=2", "train.sync_every=4",
                                "train.checkpoint_every_steps=5"])
    with caplog.at_level(logging.INFO, logger="resnetlab"):
        resnetlab.train(cfg)
    last = [(step, batch) for name, step, batch in saves if name == "last.pt"]
    # every 8 steps mid-epoch (steps 8 and 16), plus every epoch end (9, 18)
    assert last == [(8, 8), (9, 0), (16, 7), (18, 0)]
    assert "checkpoint_every_steps=5 rounded up to 8" in caplog.text


def test_nan_found_at_a_sync_step_after_it_happened(quick: list[str]) -> None:
    # With sync_every=4 the NaN of step 2 is read at step 4; the error still names step 2 and
    # nothing was saved over with the NaN weights.
    def poison(info):
        if info["step"] == 2:
            with torch.no_grad():
                next(info["model"].parameters()).fill_(float("nan"))
        return False

    cfg = resnetlab.load(None, [*quick, "run.name=late", "train.sync_every=4"])
    with pytest.raises(resnetlab.engine.NonFiniteLossError, match="step 3"):
        resnetlab.train(cfg, on_step=poison)


SIGTERM_WRAPPER = textwrap.dedent("""
    import json, os, signal, sys

    import resnetlab

    out, kill_at = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ["RANK"])

    def on_step(info):
        if rank == 1 and info["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice to one process
        return False

    result = resnetlab.train(None, sys.argv[3:], on_step=on_step)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"steps": result.steps, "interrupted": result.interrupted}, f)
    sys.exit(result.exit_code)
""")


@pytest.mark.slow
def test_sigterm_on_one_rank_at_an_odd_step_stops_all_ranks_together(tmp_path: Path) -> None:
    # Before the fix the signalled rank all-reduced its flags at once while the other was in
    # DDP's gradient all-reduce: mismatched collectives, a hang or a crash, and no checkpoint.
    wrapper, out = tmp_path / "sigterm.py", tmp_path / "result"
    wrapper.write_text(SIGTERM_WRAPPER)
    sync_every, kill_at = 4, 5
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(wrapper), str(out), str(kill_at),
           "model.name=resnet20", "data.name=digits", "train.device=cpu", "train.batch_size=64",
           "train.epochs=1", f"train.sync_every={sync_every}", "train.quiet=true",
           "train.tensorboard=false", f"run.root={tmp_path / 'runs'}", "run.name=preempted"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("2-process run with a SIGTERM on one rank hung (mismatched collectives)")
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1) if Path(f"{out}.{r}").is_file()]
    assert len(results) == 2, proc.stderr[-3000:]
    stop_step = (kill_at // sync_every + 1) * sync_every  # the next sync step: 8
    assert [r["steps"] for r in results] == [stop_step, stop_step]
    assert all(r["interrupted"] == "SIGTERM" for r in results)
    run = tmp_path / "runs" / "preempted"
    saved = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["state"]["step"] == stop_step
    assert saved["rng"]["world_size"] == 2 and len(saved["rng"]["ranks"]) == 2  # one state per rank
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert not (run / "metrics.jsonl").exists()  # stopped mid-epoch: no epoch row
