"""The README's "Evaluate, predict, export" section (up to its first subsection), run as written and
in order in a fresh folder: its shell lines (the training line with a one-epoch budget added),
then its Python blocks.
A file one example writes must not break the next (an export that already exists, an image the
text uses but never makes)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from resnetlab.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Evaluate, predict, export"
QUICK = ["train.epochs=1", "train.quiet=true", "train.tensorboard=false"]  # appended to the train line


def _section_blocks() -> list[tuple[str, list[str]]]:
    text = README.read_text()
    start = text.index(SECTION)
    end = start + len(SECTION) + re.search(r"\n#{2,} ", text[start + len(SECTION):]).start()  # next heading
    blocks, lang, lines = [], None, []
    for line in text[start:end].splitlines():
        fence = re.match(r"^```(\w*)", line)
        if fence and lang is None:
            lang, lines = fence.group(1) or "sh", []
        elif fence:
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


@pytest.mark.slow
def test_the_section_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    ran = 0
    for lang, lines in _section_blocks():
        if lang == "python":
            exec(compile("\n".join(lines), f"README python block at {lines[0]!r}", "exec"), {})
            ran += 1
            continue
        if lang not in ("sh", "bash"):
            continue
        for line in lines:
            tokens = shlex.split(line, comments=True)
            if tokens[:2] == ["python", "-c"]:
                exec(tokens[2], {})
            elif tokens and tokens[0] == "resnetlab":
                argv = [tok.replace("/tmp/", f"{tmp_path}/") for tok in tokens[1:]]  # stay in tmp
                if argv[0] == "train":
                    argv += QUICK
                assert main(argv) == 0, f"README line failed: {line}\n{capsys.readouterr().err}"
            else:
                continue
            ran += 1
    assert ran >= 14  # every shell line and both Python blocks
    assert (tmp_path / "exports" / "digits.safetensors").is_file() and (tmp_path / "scan.png").is_file()
