"""The CLI and resume passing typed values: no key=value round trip turns a folder name or a
flag into something else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import resnetlab
from resnetlab.cli import main
from resnetlab.engine import resume_config


@pytest.mark.parametrize("name", ["0x10", "010", "null", "true", "1e3"])
def test_resume_keeps_a_run_folder_name_that_looks_like_yaml(quick: list[str], name: str) -> None:
    run = resnetlab.train(None, [*quick, f"run.name={name!r}" if name in ("null", "true") else f"run.name='{name}'",
                                 "train.epochs=1"]).run_dir
    assert run.name == name
    cfg = resume_config(run, ["train.epochs=2"])
    assert cfg.run.name == name and cfg.train.resume == "auto"  # was "16", "8", None (a new run)...
    assert resnetlab.train(cfg).run_dir == run


def test_cli_quiet_is_a_typed_value_in_the_saved_config(quick: list[str], tmp_path: Path) -> None:
    args = [a for a in quick if not a.startswith("train.quiet")]
    assert main(["train", "--quiet", *args, "run.name=q", "train.epochs=1"]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "q" / "config.yaml").read_text())
    assert saved["train"]["quiet"] is True
