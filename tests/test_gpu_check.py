"""benchmarks/gpu_check: its --dry-run runs every code path on the CPU; without CUDA (and without
--dry-run) it measures nothing, says so and exits 2. Also the window timer and peak-memory
helpers the CUDA benchmarks use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks import common, gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_exercises_every_part_and_writes_json(tmp_path: Path, capsys) -> None:
    assert gpu_check.main(["--dry-run", "--results-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-dryrun-*.json")
    out = json.loads(path.read_text())
    rows = out["throughput"]
    assert {r["status"] for r in rows} == {"ok", "not run (dry run)"}
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["model"], r["amp"]) for r in ran if not r["compile"]} == {
        (m, a) for m in ("resnet50", "resnet20") for a in ("none", "bf16", "fp16")}
    assert any(r["compile"] for r in ran)
    assert all(r["images_per_s"]["resnetlab"] > 0 and r["images_per_s"]["torchvision"] > 0 for r in ran)
    ddp = out["ddp"]
    assert ddp["ok"] and ddp["backend"] == "gloo" and ddp["compiled_around_ddp"] and ddp["syncbn_vs_torch"]["ok"]
    # compiled around DDP with SyncBatchNorm2d: no graph break per BN layer (resnet20 has 19)
    assert sum(ddp["graph_breaks"].values()) < 19
    sync = out["sync"]  # default settings: the only host reads are the guard's, at its sync steps
    assert sync["ok"] and sync["trapped_calls"] == [] and sync["defaults"] == "progress bar, tensorboard"
    assert sync["guard_reads_at"] == list(range(sync["sync_every"], sync["steps_checked"] + 1, sync["sync_every"]))
    assert out["fit_compile"]["ok"] and out["fit_compile"]["steps"] == 4
    fashion = out["fashion"]  # the end-to-end race on a few hundred Fashion-MNIST images
    assert fashion["ok"] and fashion["resnetlab"]["epochs_run"] == fashion["torchvision"]["epochs_run"] == 1
    assert 0 <= fashion["resnetlab"]["best_acc"] <= 100 and 0 <= fashion["torchvision"]["best_acc"] <= 100
    folder = out["folder"]
    assert folder["ok"] and all(folder[f"{who}_{what}_images_per_s"] > 0
                                for who in ("resnetlab", "torchvision") for what in ("fit", "loader"))
    assert out["failures"] == []
    assert "| resnet50 32px b2 fp32 |" in capsys.readouterr().out


def test_budget_and_no_compile_list_what_does_not_run(tmp_path: Path) -> None:
    # A budget of 0 s starts nothing: every part is listed as not run, none is dropped.
    assert gpu_check.main(["--dry-run", "--no-compile", "--budget", "0", "--results-dir", str(tmp_path)]) == 0
    out = json.loads(next(tmp_path.glob("gpu-dryrun-*.json")).read_text())
    assert out["fit_compile"]["status"] == "skipped (--no-compile)"
    for part in ("sync", "ddp", "fashion", "folder", "throughput"):
        assert out[part]["status"] == "not run (budget)", part
    assert not any(c.compile for c in gpu_check.cases(gpu_check.GPU_PLAN, compile=False))
    rows = gpu_check.throughput(torch.device("cpu"), gpu_check.DRY_PLAN, gpu_check.Budget(0), lambda s: None)
    assert {r["status"] for r in rows} == {"not run (budget)"}
    assert len(rows) == len(gpu_check.cases(gpu_check.DRY_PLAN))


def test_the_script_ends_the_run_at_its_timeout(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--results-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "GPU_CHECK_TIMEOUT": "1"})
    assert proc.returncode == 124, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_without_cuda_it_says_so_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={"PYTHON": sys.executable,
                                                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_window_syncs_at_its_edges_only(monkeypatch) -> None:
    syncs = []
    monkeypatch.setattr(common, "sync", lambda device: syncs.append(device))
    infos = [{"epoch": e, "batch": b, "step": e * 12 + b + 1} for e in range(3) for b in range(12)]
    pure_calls = []
    from benchmarks.bench_train import FitWindows

    windows = FitWindows(torch.device("cpu"), window=3, steps_per_epoch=12, batch=8,
                         pure=lambda: pure_calls.append(1) or (8, 0.01))
    for info in infos:
        windows(info)
    # epochs 2 and 3: windows start after batches 1, 5, 9 (each then 3 steps + 1 untimed)... and
    # each window is exactly two syncs, never one per step
    n = len(pure_calls)
    assert n >= 4 and windows.steps == 3 * n
    assert len(syncs) == 2 * n


def test_peak_memory_is_read_over_a_step_after_warmup(monkeypatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(common, "sync", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: events.append("read") or 123)
    peak = common.peak_memory_after_warmup(lambda: events.append("step"), torch.device("cuda", 0), warmup=2)
    assert peak == 123 and events == ["step", "step", "reset", "step", "read"]
