"""export/import never overwrite without --force and never a run's checkpoint; operating-system
errors come out as one line naming the path, with every saved file intact; eval --out for
read-only runs.

Root ignores file permissions (the tests may run as root), so "read-only" and "disk full" are
made where the write asks the OS: ``tempfile.mkstemp`` and ``os.fsync`` of the atomic writer.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest

import resnetlab
from resnetlab import checkpoint as ckpt_module
from resnetlab.cli import main

QUIET = ["train.quiet=true", "train.tensorboard=false", "train.epochs=1", "optim.schedule=constant",
         "optim.warmup=none", "model.name=resnet20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run stopped after 3 steps: checkpoints/last.pt and config.yaml are all these tests need."""
    root = tmp_path_factory.mktemp("runs")
    result = resnetlab.train(None, [f"run.root={root}", "run.name=r", *QUIET],
                             on_step=lambda info: info["step"] >= 3)
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()
    return result.run_dir


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


def test_export_refuses_to_overwrite_without_force(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--output", str(out)]) == 0
    first = out.read_bytes()
    out.write_bytes(b"someone else's file")
    assert main(["export", str(run), "--format", "safetensors", "--output", str(out)]) == 2
    _one_line_error(capsys, str(out), "already exists; pass --force")
    assert out.read_bytes() == b"someone else's file"
    assert main(["export", str(run), "--format", "safetensors", "--output", str(out), "--force"]) == 0
    assert out.read_bytes()[:8] == first[:8]  # a safetensors file again (header length)


@pytest.mark.parametrize("command", ["export", "import"])
def test_a_runs_checkpoint_is_never_overwritten(run: Path, command: str, capsys) -> None:
    before = _digest(run)
    last = run / "checkpoints" / "last.pt"
    if command == "export":
        argv = ["export", str(run), "--format", "safetensors", "--output",
                str(run / "checkpoints" / "best.pt"), "--force"]
    else:
        argv = ["import", "torchvision", str(last), "--arch", "resnet18", "--output",
                str(run / "checkpoints" / "best.pt"), "--force"]
    assert main(argv) == 2
    _one_line_error(capsys, "checkpoint and is never overwritten")
    assert _digest(run) == before


def test_import_refuses_existing_output_and_its_own_source(tmp_path: Path, capsys) -> None:
    src = tmp_path / "w.pth"
    src.write_bytes(b"weights")
    out = tmp_path / "w.resnetlab.pt"  # the default output name
    out.write_bytes(b"earlier import")
    assert main(["import", "torchvision", str(src), "--arch", "resnet18"]) == 2
    _one_line_error(capsys, str(out), "already exists; pass --force")
    assert main(["import", "torchvision", str(src), "--arch", "resnet18", "--output", str(src),
                 "--force"]) == 2
    _one_line_error(capsys, "is the file being read")
    assert out.read_bytes() == b"earlier import" and src.read_bytes() == b"weights"


def test_eval_on_a_read_only_run_names_it_and_writes_elsewhere_with_out(
        run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    before = _digest(run)
    real_mkstemp = ckpt_module.tempfile.mkstemp

    def read_only(*args, dir=None, **kw):
        if Path(dir) == run:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(ckpt_module.tempfile, "mkstemp", read_only)
    assert main(["eval", str(run)]) == 1
    _one_line_error(capsys, f"{run}", "Read-only file system", "write elsewhere")
    out = tmp_path / "reports"
    assert main(["eval", str(run), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["confusion-val.json", "confusion-val.png", "eval-val.json",
                                                        "reliability-val.png"]
    assert report["files"]["json"] == str(out / "eval-val.json")
    assert _digest(run) == before


def test_file_where_a_folder_should_be(run: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "reports"
    blocker.write_text("a file, not a folder")
    assert main(["eval", str(run), "--out", str(blocker / "sub")]) == 1
    _one_line_error(capsys, str(blocker), "a file stands where a folder should be")
    assert main(["train", f"run.root={blocker}", *QUIET]) == 1
    _one_line_error(capsys, str(blocker), "Not a directory")


def test_disk_full_during_export_keeps_the_earlier_file(run: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"earlier export")
    (tmp_path / "m.onnx.json").write_text("{}")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.os, "fsync", full)
    assert main(["export", str(run), "--format", "safetensors", "--output", str(out), "--force"]) == 1
    _one_line_error(capsys, f"{out}: No space left on device", "disk full")
    assert out.read_bytes() == b"earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temp left
