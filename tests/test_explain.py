"""Grad-CAM on a tiny network (Captum's LayerGradCam), targets, overlays and the polarity hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.data import DataError, DataMeta
from resnetlab.explain import (
    cam_layer,
    explain_pixels,
    grad_cam,
    match_ink_polarity,
    overlay,
    prepare_pixels,
    resolve_target,
)
from resnetlab.models import create_model, fuse_for_inference
from resnetlab.params import param_of

META = DataMeta(name="digits", classes=("zero", "one", "two"), in_chans=1, input_size=(16, 16),
                mean=(0.3,), std=(0.4,))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """resnet20 with 3 classes on 16x16 grey input, random weights, BN folded as served."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3, in_chans=1).eval()
    return fuse_for_inference(model)


def _pixels(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)  # [n, 1, 16, 16]


def test_grad_cam_has_input_size_is_finite_and_depends_on_the_target(tiny) -> None:
    x = _pixels(3)
    assert cam_layer(tiny) is tiny.layer3  # the last stage: 4x4 maps for a 16x16 input
    maps = [grad_cam(tiny, META, x, [t] * 3) for t in range(3)]
    for m in maps:
        assert m.shape == (3, 16, 16) and torch.isfinite(m).all()
        assert m.min() >= 0 and m.max() <= 1  # ReLU'd and divided by the per-image peak
    # Different class scores have different gradients, hence different channel weights.
    assert (maps[0] - maps[1]).abs().max() > 1e-3 or (maps[0] - maps[2]).abs().max() > 1e-3
    # A map is either all zero (no positive evidence) or peaks at exactly 1.
    peaks = torch.stack(maps).flatten(2).amax(dim=2)
    assert torch.all((peaks == 0) | (peaks - 1).abs().le(1e-6))


def test_explain_pixels_top_class_and_requested_target(tiny) -> None:
    x = _pixels(2)
    top = explain_pixels(tiny, META, x, ["a", "b"], target=None, topk=2)
    with torch.no_grad():
        from resnetlab.data import normalize

        probs = tiny(normalize(x, META)).softmax(dim=1)  # [2, 3]
    for e, p in zip(top, probs, strict=True):
        assert e.target == int(p.argmax()) and e.indices[0] == e.target and len(e.classes) == 2
        assert abs(e.target_prob - float(p.max())) < 1e-5
        assert e.overlay.mode == "RGB" and e.overlay.size == (224, 224)  # 16 px * 14
    forced = explain_pixels(tiny, META, x, ["a", "b"], target=2, topk=3)
    assert [e.target_class for e in forced] == ["two", "two"]
    # the target's probability is read from every class, not only the top-k shown
    narrow = explain_pixels(tiny, META, x, ["a", "b"], target=2, topk=1)
    for e, p in zip(narrow, probs, strict=True):
        assert len(e.indices) == 1 and abs(e.target_prob - float(p[2])) < 1e-5


def test_overlay_upscales_with_square_pixels_and_colours_the_map() -> None:
    pixels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    cam = torch.zeros(8, 8)
    cam[:4] = 1.0  # hot top half
    img = np.asarray(overlay(pixels, cam), dtype=np.int32)  # [224, 224, 3] (8 * 28)
    assert img.shape == (224, 224, 3)
    top, bottom = img[20, 100], img[200, 100]
    assert top[0] > top[2] and bottom[2] > bottom[0]  # jet: hot is red, cold is blue


def test_resolve_target_by_name_or_id_and_refusal() -> None:
    assert resolve_target(None, META) is None and resolve_target("", META) is None
    assert resolve_target("two", META) == 2 and resolve_target("1", META) == 1
    assert resolve_target(0, META) == 0
    for bad in ("seven", "3", "-1"):
        with pytest.raises(DataError, match=f"target '{bad}'") as info:
            resolve_target(bad, META)
        assert param_of(info.value) == "target"  # the CLI shows it as --target


def test_ink_polarity_inverts_dark_on_light_digits_only() -> None:
    paper = np.full((16, 16), 240, np.uint8)
    paper[4:12, 7:9] = 10  # a dark "1" on light paper
    drawn = Image.fromarray(paper, "L")
    fixed = np.asarray(match_ink_polarity(drawn, META))
    assert fixed[0, 0] == 15 and fixed[6, 7] == 245  # 255 - v: dark paper, light ink
    already = Image.fromarray(255 - paper, "L")  # light ink on dark: as the dataset
    assert match_ink_polarity(already, META) is already
    cifar = DataMeta(name="cifar10", classes=tuple("abcdefghij"), in_chans=3, input_size=(32, 32),
                     mean=(0.5,) * 3, std=(0.25,) * 3)
    assert match_ink_polarity(drawn, cifar) is drawn
    # prepare_pixels applies it before the run's own preprocessing (grey, 16x16, uint8).
    x = prepare_pixels([drawn.convert("RGB").resize((64, 64))], META)
    assert x.shape == (1, 1, 16, 16) and x.dtype == torch.uint8 and int(x[0, 0, 0, 0]) < 30
