"""Bad input on every surface: image formats, serve options and timeouts, reproduce arguments,
messages that say what a file is.

Every test here is fast (no training, no model loading beyond a tiny net): the slow server tests
live in test_serve.py.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from resnetlab.data.images import (
    FORMAT_NAMES,
    IMAGE_FORMATS,
    NOT_SUPPORTED,
    BadImageError,
    check_image,
    load_image,
    read_resized_crop,
)

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- image formats

#: Formats Pillow can write here that are NOT on the allow-list (EPS: Pillow's own EPS writer;
#: opening one would go to the EPS plugin, which runs Ghostscript to decode).
OTHER_FORMATS = ("EPS", "TGA", "ICO", "SGI", "PCX", "DDS", "IM", "SPIDER", "JPEG2000", "PPM", "QOI",
                 "XBM", "MSP", "ICNS")


def _encoded(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    img = Image.new("RGB", size, (10, 200, 30))
    if fmt in ("XBM", "MSP"):
        img = img.convert("1")
    elif fmt == "SPIDER":
        img = img.convert("F")
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def plugin_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Pillow opener outside the allow-list replaced by one that records its name and
    refuses: the list it returns stays empty while no other plugin even looks at a file."""
    Image.init()
    called: list[str] = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt in IMAGE_FORMATS:
            continue

        def spy(*_args: object, _fmt: str = fmt) -> object:
            called.append(_fmt)
            raise SyntaxError(f"{_fmt} plugin reached")

        def accept_spy(_prefix: bytes, _fmt: str = fmt) -> bool:
            called.append(_fmt)
            return False

        monkeypatch.setitem(Image.OPEN, fmt, (spy, accept_spy if accept else None))
    return called


def test_only_allowed_formats_are_decoded_by_content_not_name(tmp_path: Path, plugin_spy: list[str]) -> None:
    for fmt in OTHER_FORMATS:
        f = tmp_path / f"{fmt.lower()}-in-disguise.png"  # the name says PNG; the content decides
        f.write_bytes(_encoded(fmt))
        with pytest.raises(BadImageError) as info:
            load_image(f)
        assert str(info.value) == f"{f}: cannot read image ({NOT_SUPPORTED})"
        assert check_image(f) == f"cannot read image ({NOT_SUPPORTED})"
        with pytest.raises(BadImageError, match=re.escape(NOT_SUPPORTED)):
            read_resized_crop(f, 3, lambda h, w: (0, 0, h, w), (8, 8))
    assert plugin_spy == []


def test_the_allowed_formats_still_decode(tmp_path: Path, plugin_spy: list[str]) -> None:
    for fmt in IMAGE_FORMATS:
        f = tmp_path / f"img.{fmt.lower()}"
        f.write_bytes(_encoded(fmt))
        img = load_image(f)
        assert img.size == (16, 16)
        assert check_image(f) is None
    assert plugin_spy == []


def test_serve_refuses_other_formats_with_415_before_their_plugin(plugin_spy: list[str]) -> None:
    from resnetlab.serve.app import ApiError, decode_image

    for fmt in OTHER_FORMATS:
        with pytest.raises(ApiError) as info:
            decode_image(_encoded(fmt), "upload.png", 1_000_000)
        assert info.value.status == 415 and info.value.message == f"upload.png: {NOT_SUPPORTED}"
    assert plugin_spy == []
    assert decode_image(_encoded("PNG"), "ok.png", 1_000_000).size == (16, 16)


def test_readme_and_messages_name_exactly_the_allowed_formats() -> None:
    named = re.findall(r"\b(PNG|JPEG|GIF|BMP|TIFF|WebP)\b", FORMAT_NAMES)
    assert [n.upper() for n in named] == list(IMAGE_FORMATS)
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^- \*\*Image formats\*\*: (.*)$", readme, re.M)
    assert line, "README: the '- **Image formats**:' bullet is missing"
    assert f"{FORMAT_NAMES}, decided by content" in line.group(1)
