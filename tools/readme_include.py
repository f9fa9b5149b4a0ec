"""README blocks copied from committed result files, so that no measured number is typed by hand.

A block in README.md reads::

    <!-- include docs/results/degradation-fashion/table.md -->
    ...the file's text, verbatim...
    <!-- /include -->

``python tools/readme_include.py`` rewrites every such block from its file (after a new run has
been committed); ``tests/test_readme.py`` fails while any block differs from its file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- include (?P<path>\S+) -->\n)(?P<text>.*?)(<!-- /include -->)", re.S)


def blocks(readme: str) -> list[tuple[str, str]]:
    """``(path, text)`` of every include block in ``readme``, in order."""
    return [(m["path"], m["text"]) for m in BLOCK.finditer(readme)]


def refresh(readme: Path = ROOT / "README.md") -> list[str]:
    """Rewrite each block of ``readme`` from its file; the paths whose block changed."""
    changed: list[str] = []

    def fill(m: re.Match[str]) -> str:
        source = ROOT / m["path"]
        if not source.is_file():
            raise SystemExit(f"{readme}: an include names {m['path']}, which is not a file under {ROOT}")
        text = source.read_text().strip() + "\n"
        if text != m["text"]:
            changed.append(m["path"])
        return m.group(1) + text + m.group(4)

    readme.write_text(BLOCK.sub(fill, readme.read_text()))
    return changed


if __name__ == "__main__":
    done = refresh(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md")
    print("updated: " + ", ".join(done) if done else "every include block is up to date")
