"""The checkpoint format (resnetlab.checkpoint): a leaf module that owns the schema and every read
and write; serving and prediction load no training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnetlab import checkpoint as ckpt
from resnetlab.config import load, to_dict

SRC = Path(__file__).resolve().parents[1] / "src" / "resnetlab"


def _resnetlab_imports(file: str) -> set[str]:
    tree = ast.parse((SRC / file).read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m for m in found if m.startswith("resnetlab")}


def test_the_format_module_imports_nothing_of_resnetlab_but_config_and_version() -> None:
    # filekind (what a file that is no checkpoint is) is a leaf of its own: it imports nothing
    assert _resnetlab_imports("checkpoint.py") == {"resnetlab.config", "resnetlab.filekind", "resnetlab.version"}
    assert _resnetlab_imports("filekind.py") == set()


def test_predictor_and_server_load_no_training_code() -> None:
    code = ("import sys, resnetlab.inference, resnetlab.predict, resnetlab.serve, resnetlab.export; "
            "print(sorted(m for m in sys.modules if m.startswith('resnetlab.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout  # resnetlab.engine.fit in particular


def test_old_import_path_is_the_same_module() -> None:
    from resnetlab.engine import checkpoint as old

    assert old is ckpt  # monkeypatching either reaches the code that saves


def _checkpoint() -> ckpt.Checkpoint:
    cfg = load(None, ["model.name=resnet20", "model.num_classes=3"])
    weights = {"fc.weight": torch.arange(6.0).reshape(3, 2), "fc.bias": torch.zeros(3)}
    return ckpt.Checkpoint(model=weights, config=to_dict(cfg), meta={"name": "digits", "classes": ["a"]},
                           state={"epoch": 1, "batch": 0, "step": 9})


def test_write_then_read_gives_the_same_checkpoint(tmp_path: Path) -> None:
    written = _checkpoint()
    path = ckpt.write(tmp_path / "a.pt", written)
    read = ckpt.read(path)
    assert read.path == path and read.schema == ckpt.SCHEMA_VERSION
    assert read.config == written.config and read.meta == written.meta and read.state == written.state
    assert read.weights.keys() == written.model.keys()
    assert all(torch.equal(read.weights[k], v) for k, v in written.model.items())
    assert read.parsed_config().model.name == "resnet20"
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: not a training checkpoint .*optimizer"):
        ckpt.read_training(path)


def test_files_older_than_the_schema_field_read_and_newer_ones_are_refused(tmp_path: Path) -> None:
    payload = _checkpoint().to_dict()
    del payload["schema"]  # as written before the field existed
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert ckpt.read(old).schema == 1
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "schema": ckpt.SCHEMA_VERSION + 1}, newer)
    with pytest.raises(ckpt.CheckpointError, match=f"{newer}: checkpoint schema {ckpt.SCHEMA_VERSION + 1} .*upgrade"):
        ckpt.read(newer)


def test_bare_state_dict_names_the_import_command(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bare)
    with pytest.raises(ckpt.CheckpointError, match="resnetlab import torchvision"):
        ckpt.read(bare)


def test_safetensors_header_carries_config_and_meta(tmp_path: Path) -> None:
    written = _checkpoint()
    cfg = written.parsed_config()
    path = tmp_path / "m.safetensors"
    ckpt.save_safetensors(written.model, path, ckpt.safetensors_header(cfg, written.meta))
    header = ckpt.read_safetensors_header(path)
    assert header[ckpt.SAFETENSORS_ARCH_KEY] == "resnet20"
    read = ckpt.read(path)
    assert read.config == written.config and read.meta == written.meta
    assert torch.equal(read.weights["fc.weight"], written.model["fc.weight"])
    plain = tmp_path / "plain.safetensors"
    ckpt.save_safetensors(written.model, plain)
    with pytest.raises(ckpt.CheckpointError, match=f"{plain}: safetensors header has no"):
        ckpt.read(plain)
