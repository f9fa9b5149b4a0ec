"""The speedrun recipe's choice table: generated from its committed rows, never typed."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks import speedrun_choice as sc


def _row(**kw: object) -> dict[str, object]:
    base = {"seed": 0, "batch": 128, "lr": 0.2, "crop_padding": 1, "epochs": 6, "test_acc": 93.0,
            "test_acc_flip": 93.25, "seconds": 530.4, "threads": 0, "note": "n"}
    return base | kw


def test_committed_table_is_generated_from_the_committed_rows() -> None:
    assert sc.TABLE.read_text() == sc.table(sc.read_rows(sc.ROWS))


def test_table_states_how_each_row_was_timed() -> None:
    md = sc.table([_row(seed=1), _row(threads=1, test_acc_flip=None), _row(seconds=621.5, epochs=7)])
    lines = md.splitlines()
    assert lines[2].startswith("| 0 | 128 | 0.2 | 1 | 6 | 93.00% | not measured | 1 thread: not a speedrun time")
    assert "| 622 s on 2 threads (over the 10 minutes) |" in lines[3]
    assert lines[4].startswith("| 1 |") and "| 530 s on 2 threads |" in lines[4]  # sorted by seed


def test_a_bad_row_names_the_file_and_line(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"seed": 0}\n\n{"seed": \n')
    with pytest.raises(SystemExit, match=r"rows\.jsonl, line 3: not JSON"):
        sc.read_rows(rows)
