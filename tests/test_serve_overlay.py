"""Digit framing and the Grad-CAM overlay drawn back over the image as given, aligned with it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from resnetlab.data import DataMeta
from resnetlab.predict import Geometry, centre_ink, prepare_image_mapped, resize_geometry
from resnetlab.serve.overlay import overlay_on_image

DIGITS = DataMeta(name="digits", classes=tuple("0123456789"), in_chans=1, input_size=(8, 8), mean=(0.3,),
                  std=(0.4,))
FOLDER = DataMeta(name="folder", classes=("a", "b"), in_chans=3, input_size=(224, 224), mean=(0.5,) * 3,
                  std=(0.25,) * 3, resize=256)


def _page(box: tuple[int, int, int, int], size: tuple[int, int] = (200, 120)) -> Image.Image:
    """White paper with a black rectangle of ink at ``box`` (x0, y0, x1, y1)."""
    a = np.full((size[1], size[0]), 255, np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 0
    return Image.fromarray(a, "L")


def test_framing_maps_the_ink_box_onto_the_frame_and_says_so() -> None:
    img = _page((130, 20, 145, 50))  # 15 x 30 ink, far right of a 200 x 120 page
    _, inverted, how, g = prepare_image_mapped(img, DIGITS)
    assert inverted is True and "ink box 15x30 at (130,20)" in how
    # The box's height fills the 8-pixel frame (digits: every character spans all 8 rows) and
    # its centre lands on the frame's centre.
    assert abs((g.sy * 20 + g.ty) - 0) < 0.2 and abs((g.sy * 50 + g.ty) - 8) < 0.2
    assert abs(g.sx * 137.5 + g.tx - 4) < 0.2
    framed, note = centre_ink(Image.new("L", (30, 30), 0), DIGITS)  # nothing to frame
    assert note.startswith("no ink") and framed.size == (30, 30)


def test_resize_geometry_follows_resize_and_centre_crop() -> None:
    g = resize_geometry((512, 256), FOLDER)  # shorter side 256 -> 256: 512 wide, crop 224 from x=144
    assert (g.sx, g.sy, g.tx, g.ty) == (1.0, 1.0, -144.0, -16.0)
    assert resize_geometry((8, 8), DIGITS) == Geometry(1.0, 1.0, 0.0, 0.0)


def test_overlay_is_aligned_with_the_image_as_given() -> None:
    img = _page((80, 60, 140, 180), size=(400, 240))  # a 60 x 120 stroke
    _, _, _, g = prepare_image_mapped(img, DIGITS)
    cam = torch.zeros(8, 8)
    cam[:, :4] = 1.0  # the network looked at the left half of its input only
    out = np.asarray(overlay_on_image(img, cam, g), dtype=np.int32)  # within 224..448 px: drawn 1:1
    assert out.shape == (240, 400, 3)
    left, right = out[120, 95], out[120, 125]  # inside the stroke's left and right quarters
    assert left[0] > left[2] + 60 and right[2] > right[0] + 60  # jet: red where 1, blue where 0
    assert (out[5, 395] == 255).all() and (out[235, 5] == 255).all()  # unseen margins stay as given
