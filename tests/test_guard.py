"""Per-step checks (StepGuard): the sync interval, checkpoints on sync steps, and a stop that
reaches every rank at the same step instead of deadlocking the collectives."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
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
    import importlib, json, os, signal, sys, time

    import resnetlab

    out, kill_at, kill_in_validation = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    rank = int(os.environ["RANK"])
    fit = importlib.import_module("resnetlab.engine.fit")
    evaluate = fit.evaluate

    def slow_evaluate(*args, **kwargs):
        # validation takes seconds on a real dataset: the signal lands on one rank in the middle
        if kill_in_validation and rank == 1:
            with open(f"{out}.signalled", "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        return evaluate(*args, **kwargs)

    fit.evaluate = slow_evaluate

    def on_step(info):
        with open(f"{out}.losses.{rank}", "a") as f:  # this rank's loss of every step
            f.write(f"{info['step']} {info['loss'].item()!r}\\n")
        if rank == 1 and info["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice to one process
        return False

    result = resnetlab.train(None, sys.argv[4:], on_step=on_step)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"steps": result.steps, "interrupted": result.interrupted, "exit": result.exit_code}, f)
    sys.exit(result.exit_code)
""")
BATCH = 64  # global: 32 per rank
DDP_STEPS = 1258 // BATCH  # 19 steps per epoch


def _launch(tmp_path: Path, out: Path, kill_at: int, kill_in_validation: bool,
            sync_every: int) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "sigterm.py"
    wrapper.write_text(SIGTERM_WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(wrapper), str(out), str(kill_at), str(int(kill_in_validation)),
           "model.name=resnet20", "data.name=digits", "train.device=cpu", f"train.batch_size={BATCH}",
           "train.epochs=2", f"train.sync_every={sync_every}", "train.quiet=true", "train.resume=auto",
           "train.tensorboard=false", "train.test_at_end=false", f"run.root={tmp_path / 'runs'}",
           "run.name=preempted"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("2-process run with a SIGTERM on one rank hung (mismatched collectives)")


def _results(out: Path, proc: subprocess.CompletedProcess) -> list[dict]:
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1) if Path(f"{out}.{r}").is_file()]
    assert len(results) == 2, proc.stderr[-3000:]
    for r in (0, 1):
        Path(f"{out}.{r}").unlink()
    return results


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_ranks_together_mid_epoch_and_during_validation(tmp_path: Path) -> None:
    # 1. The signal at an odd step. Before the fix the signalled rank all-reduced its flags at
    # once while the other was in DDP's gradient all-reduce: mismatched collectives, a hang or a
    # crash, and no checkpoint.
    out = tmp_path / "result"
    sync_every, kill_at = 4, 5
    proc = _launch(tmp_path, out, kill_at, False, sync_every)
    results = _results(out, proc)
    stop_step = (kill_at // sync_every + 1) * sync_every  # the next sync step: 8
    assert [r["steps"] for r in results] == [stop_step, stop_step]
    assert all(r["interrupted"] == "SIGTERM" and r["exit"] == 143 for r in results)
    run = tmp_path / "runs" / "preempted"
    saved = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["state"]["step"] == stop_step
    assert saved["rng"]["world_size"] == 2 and len(saved["rng"]["ranks"]) == 2  # one state per rank
    assert saved["meter"]["sums"][3].item() == stop_step * BATCH  # every rank's samples, not rank 0's
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert not (run / "metrics.jsonl").exists()  # stopped mid-epoch: no epoch row

    # 2. Resumed by 2 processes; the signal reaches rank 1 alone during validation of epoch 1,
    # after the epoch's flags were agreed. Before the fix rank 1 went home and rank 0 waited in
    # epoch 2's first all-reduce until the process group's timeout (10 minutes).
    proc = _launch(tmp_path, out, 0, True, sync_every)
    ended = time.time()
    results = _results(out, proc)
    assert [r["steps"] for r in results] == [DDP_STEPS, DDP_STEPS], proc.stderr[-3000:]
    assert all(r["interrupted"] == "SIGTERM" and r["exit"] == 143 for r in results)
    assert ended - float(Path(f"{out}.signalled").read_text()) < 60  # seconds, not the 600 s timeout
    saved = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert (saved["state"]["epoch"], saved["state"]["step"], saved["state"]["batch"]) == (1, DDP_STEPS, 0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]

    # The epoch's train loss spans both launches and both ranks: the mean of every rank's step
    # losses (32 images each), so the sums restored on resume counted each sample once.
    losses = [float(line.split()[1]) for r in (0, 1)
              for line in Path(f"{out}.losses.{r}").read_text().splitlines()]
    assert len(losses) == 2 * DDP_STEPS
    assert rows[0]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-9)
