"""The shapes dataset (bench/shapes.py) and its pixel checker (bench/adherence.py): numpy + Pillow, no torch.

The checker reads colour, background, shape, position and size back from the dataset's own images;
on sample(seed=1234, n=1000) it agrees with the captions' attributes on 1.000 of images for every
attribute (see bench/adherence.py). Here: >= 0.95 per attribute on 300 images.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import adherence, shapes  # noqa: E402


def test_sample_is_deterministic_and_well_formed():
    a_img, a_cap, a_att = shapes.sample(7, 40)
    b_img, b_cap, b_att = shapes.sample(7, 40)
    assert a_img.dtype == np.uint8 and a_img.shape == (40, 32, 32, 3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_att == b_att
    assert not np.array_equal(a_img, shapes.sample(8, 40)[0])
    for cap, att in zip(a_cap, a_att):
        assert att["colour"] != att["background"]
        assert shapes.caption(att) == cap
        assert att["colour"] in shapes.COLOURS and att["background"] in shapes.BACKGROUNDS
        assert att["shape"] in shapes.SHAPES and att["position"] in shapes.POSITIONS


def test_parse_prompt_round_trips_captions():
    _, caps, atts = shapes.sample(3, 200)
    for cap, att in zip(caps, atts):
        p = shapes.parse_prompt(cap)
        assert (p["colour"], p["shape"], p["background"]) == (att["colour"], att["shape"], att["background"])
        assert p["position"] == (att["position"] if att["position_in_caption"] else None)
        assert p["size"] == (att["size"] if att["size_in_caption"] else None)
    assert shapes.parse_prompt("A small green triangle in the top left on a white background.") == {
        "colour": "green", "shape": "triangle", "background": "white", "size": "small", "position": "top left"}
    assert shapes.parse_prompt("a blue square in the center on a red background")["position"] == "centre"


def test_checker_agrees_with_dataset_captions():
    images, caps, atts = shapes.sample(1234, 300)
    hits = {k: 0 for k in ("colour", "background", "shape", "position", "size")}
    for img, att in zip(images, atts):
        got = adherence.read(img)
        for k in hits:
            hits[k] += got[k] == att[k]
    rates = {k: v / len(images) for k, v in hits.items()}
    assert all(r >= 0.95 for r in rates.values()), rates
    s = adherence.score(images, caps)
    assert s["n"] == 300 and s["all"] >= 0.95, s


def test_check_flags_wrong_prompts_and_handles_blank_images():
    img = shapes.render({"colour": "red", "shape": "circle", "background": "blue", "size": "large",
                         "position": "top left"})
    ok = adherence.check(img, "a red circle in the top left on a blue background")
    assert ok == {"colour": True, "background": True, "shape": True, "position": True, "size": None, "all": True,
                  "objects": True}
    bad = adherence.check(img, "a green square in the bottom right on a white background")
    assert not any(bad[k] for k in ("colour", "background", "shape", "position", "all", "objects"))
    assert adherence.check(img, "a red circle on a blue background")["position"] is None
    # 4x upscaled images are box-filtered back to 32x32.
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
    assert adherence.check(big, "a large red circle in the top left on a blue background")["all"]
    blank = np.full((32, 32, 3), 200, np.uint8)
    res = adherence.check(blank, "a red circle on a blue background")
    assert res["all"] is False and res["shape"] is False


def test_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, %r); "
            "import bench.shapes, bench.adherence; print('ok')") % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_shape_is_read_back_at_every_position_and_size(shape):
    for pos in shapes.POSITIONS:
        for size in shapes.SIZES:
            att = {"colour": "yellow", "shape": shape, "background": "black", "size": size, "position": pos}
            got = adherence.read(shapes.render(att, seed=1))
            assert (got["shape"], got["position"], got["size"]) == (shape, pos, size)
