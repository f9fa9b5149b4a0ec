"""The model catalog: parameters and multiply-adds of every registered network, without torch.

Counting resnet1202's multiply-adds takes seconds and importing torch takes more, so
``resnetlab models`` reads them from ``models/catalog.json``, which the package ships. The file
is computed once per architecture by :func:`resnetlab.models.summary.write_catalog`
(``python -m resnetlab.models``) and carries a fingerprint of the model sources: when a
model file changes, the catalog no longer matches and the counts are computed afresh (slow but
right) until it is regenerated; ``tests/test_models.py`` recomputes entries and compares.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parent / "models"
CATALOG_FILE = MODELS_DIR / "catalog.json"
REGENERATE = "python -m resnetlab.models"


def models_fingerprint(folder: Path = MODELS_DIR) -> str:
    """sha256 over the names and bytes of ``models/*.py``: what the counts depend on."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def read_catalog(path: Path = CATALOG_FILE) -> dict[str, Any] | None:
    """The catalog document (``{"fingerprint", "models": [rows]}``), or None if absent or unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("models"), list) else None


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def cached_rows(pattern: str = "*", path: Path = CATALOG_FILE) -> list[dict[str, Any]] | None:
    """Catalog rows whose name matches ``pattern``, if the catalog matches the model sources.

    Rows: ``{"name", "params", "macs", "input_size"}`` (input size a tuple), natural name order.
    None when the catalog is missing or stale: the caller computes the counts instead.
    """
    doc = read_catalog(path)
    if doc is None or doc.get("fingerprint") != models_fingerprint():
        return None
    rows = [{**r, "input_size": tuple(r["input_size"])} for r in doc["models"]
            if fnmatch.fnmatchcase(r["name"], pattern)]
    return sorted(rows, key=lambda r: _natural_key(r["name"]))


def cached_names() -> list[str] | None:
    """Every registered name, from a fresh catalog (None when stale)."""
    rows = cached_rows("*")
    return None if rows is None else [r["name"] for r in rows]



# ----------------------------------------------------------------------------------------------
# text tables (torch-free, so `resnetlab models` never imports torch)


def format_params(n: int) -> str:
    """A parameter count in millions: ``272474`` -> ``"0.27M"``."""
    return f"{n / 1e6:.2f}M"


def format_macs(n: int) -> str:
    """Multiply-adds in billions from 1e9 up, else millions: ``"4.09G"``, ``"40.8M"``."""
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_shape(shape: Sequence[int]) -> str:
    """A tensor shape as ``"3x32x32"``."""
    return "x".join(str(s) for s in shape)


def render_table(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned text table; the first ``left`` columns are left-aligned, the rest right."""
    table = [list(header), *[list(r) for r in body]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render ``model_table()`` rows: name, parameters (M), multiply-adds (M/G), input size."""
    body = [
        (r["name"], format_params(r["params"]), format_macs(r["macs"]), format_shape(r["input_size"]))
        for r in rows
    ]
    return render_table(("model", "params", "MACs", "input"), body)


__all__ = ["CATALOG_FILE", "REGENERATE", "cached_names", "cached_rows", "format_macs", "format_model_table",
           "format_params", "format_shape", "models_fingerprint", "read_catalog", "render_table"]
