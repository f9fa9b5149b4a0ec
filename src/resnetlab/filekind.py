"""What a file given as a checkpoint really is, read from its first bytes (a leaf: no resnetlab
imports, no torch).

``torch.load`` reports any file that is not a zip archive as a pickle it refused, so a damaged
``best.pt`` or an ``.onnx`` model read as "holds pickled objects which could run code": true of
neither. :func:`not_a_checkpoint` says what such a file is before ``torch.load`` sees it, and
:func:`unpickling_detail` keeps the line of a refused pickle that names what it wanted to load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

_HEAD = 512  # bytes read to recognise a format


def not_a_checkpoint(path: str | Path) -> str | None:
    """Why the file at ``path`` is plainly not a PyTorch checkpoint, or ``None`` when it may be
    one (a zip archive holding ``data.pkl``, or a pickle: ``torch.load`` decides).

    Recognised: an empty file, an ONNX model, a safetensors file, a zip archive that is damaged
    or holds no ``data.pkl``, and anything neither zip nor pickle.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if not head:
        return "an empty file (0 bytes), not a checkpoint: it was not saved completely"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # zip: torch.save's format since 1.6
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return ("a damaged zip archive (truncated or overwritten?), not a readable checkpoint: "
                    "save it again or use another checkpoint of the run")
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a zip archive, but not a PyTorch checkpoint (it holds no data.pkl)"
        return None
    if head[0] == 0x80:  # pickle protocol 2 and later: torch's legacy format, or a plain pickle
        return None
    if path.suffix.lower() == ".onnx" or (head[0] == 0x08 and (b"pytorch" in head or b"onnx" in head.lower())):
        return ("an ONNX model, not a PyTorch checkpoint: run it with onnxruntime, or give the run "
                "folder (or its checkpoints/best.pt) that it was exported from")
    if len(head) >= 10 and head[8:10] in (b'{"', b"{}"):  # 8-byte header length, then JSON
        return "a safetensors file, not a .pt checkpoint: give it a .safetensors name to load it as one"
    return (f"not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with "
            f"{head[:8]!r}): the file is damaged or is something else")


def unpickling_detail(message: str) -> str:
    """The line of ``torch.load``'s weights-only refusal that names what the pickle asked for
    (e.g. ``Trying to load unsupported GLOBAL posix.system ...``), not its advice to retry
    with ``weights_only=False``."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln
    return lines[-1] if lines else "refused by the weights-only unpickler"


__all__ = ["not_a_checkpoint", "unpickling_detail"]
