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
    assert out["ddp"]["ok"] and out["ddp"]["backend"] == "gloo"
    assert out["sync"]["ok"] and out["sync"]["trapped_calls"] == []
    assert "| resnet50 32px b2 fp32 |" in capsys.readouterr().out


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
