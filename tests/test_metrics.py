"""engine/metrics: top-k counting, the on-device running sums, and the metrics.jsonl files."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from resnetlab.engine.metrics import SumMeter, append_jsonl, read_jsonl, topk_correct, write_csv


def test_topk_counts_and_caps_k_at_the_class_count() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])  # [3, 3]
    target = torch.tensor([1, 2, 0])
    top1, top5 = topk_correct(logits, target)
    assert int(top1) == 1 and int(top5) == 3  # 3 classes: top-5 counts every sample


def test_sum_meter_accumulates_on_the_device_without_building_tensors(monkeypatch) -> None:
    meter = SumMeter(torch.device("cpu"))
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    logits = torch.eye(4)  # sample i predicts class i
    meter.update(torch.tensor(2.0), logits, torch.tensor([0, 1, 0, 0]))
    meter.update(torch.tensor(1.0), logits[:2], torch.tensor([0, 1]))
    assert len(made) == 4  # only this test's own torch.tensor calls: none inside update()
    monkeypatch.undo()
    s = meter.summary()
    # loss: (2*4 + 1*2) / 6; top-1 hits: 2 + 2 of 6
    assert s["count"] == 6 and math.isclose(s["loss"], 10 / 6)
    assert math.isclose(s["top1_acc"], 100 * 4 / 6)
    again = SumMeter(torch.device("cpu"))
    again.load_state_dict(meter.state_dict())
    assert again.summary() == s


def test_empty_meter_reports_nan_and_zero_count() -> None:
    s = SumMeter(torch.device("cpu")).summary()
    assert s["count"] == 0 and math.isnan(s["loss"])


def test_jsonl_ignores_a_half_written_last_line_and_csv_unions_columns(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1, "loss": 0.5})
    append_jsonl(path, {"epoch": 2, "loss": 0.4, "val_loss": 0.6})
    with open(path, "a") as f:
        f.write('{"epoch": 3, "lo')  # a crash mid-write
    rows = read_jsonl(path)
    assert [r["epoch"] for r in rows] == [1, 2]
    write_csv(tmp_path / "summary.csv", rows)
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "epoch,loss,val_loss"
