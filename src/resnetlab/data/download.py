"""Fetching official dataset files: checksummed, atomic, and tidy when it fails.

``data.download=true`` calls :func:`fetch_file` for every missing file. A file is written to a
``.part`` file beside its destination and renamed into place only after its MD5 matches the
published one, so a wrong checksum, a dropped connection or a full disk leaves nothing half
written; :func:`created_folders_removed_on_error` removes the folders the download made when it
fails, so ``data.download=true`` without a network does not leave an empty data folder behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from resnetlab.data.images import DataError

CHUNK = 1 << 20  # bytes read per network call
TIMEOUT_S = 30.0  # seconds without data before a mirror is given up


def md5_of(path: Path) -> str:
    """Hex MD5 of the file at ``path`` (the checksums torchvision publishes are MD5)."""
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _download_once(url: str, part: Path, md5: str) -> None:
    """``url`` -> ``part``; raises OSError/URLError on transfer errors, ValueError on a bad MD5."""
    h = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "resnetlab"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, part.open("wb") as out:
        for block in iter(lambda: response.read(CHUNK), b""):
            h.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != md5:
        raise ValueError(f"MD5 {h.hexdigest()} does not match the published {md5}")


def fetch_file(urls: Sequence[str], dest: Path, md5: str) -> None:
    """Download ``dest`` from the first of ``urls`` (mirrors, in order) whose bytes have ``md5``.

    Nothing appears at ``dest`` unless its checksum matched; the ``.part`` file is removed on
    every failure. Raises :class:`DataError` listing each mirror's failure.
    """
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            _download_once(url, part, md5)
        except (OSError, ValueError) as e:  # URLError (no network, 404) is an OSError
            part.unlink(missing_ok=True)
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        except BaseException:  # Ctrl-C mid-transfer: no .part left behind either
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        return
    raise DataError(f"data.download=true could not fetch {dest.name}: " + "; ".join(failures))


@contextlib.contextmanager
def created_folders_removed_on_error(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and missing parents) for the block; if the block raises, remove the
    folders this call created, deepest first, as long as they are empty."""
    created = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        created.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()  # only succeeds when empty: files already fetched stay
        raise


__all__ = ["created_folders_removed_on_error", "fetch_file", "md5_of"]
