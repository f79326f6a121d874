"""Prompt adherence for the shapes dataset (bench/shapes.py): reads an image's attributes back from its pixels.

Deterministic, numpy only. For one 32x32 RGB image (larger images are box-filtered down to 32x32 first):

- background: the median of the 1-pixel border ring, named by the nearest palette colour;
- foreground: pixels far (> 60 in RGB) from that background colour; the largest 4-connected blob is
  the shape. Its colour is the median of its core pixels (those farthest from the background), named
  by the nearest palette colour other than the background;
- shape: from a soft coverage map (each pixel's position between background and shape colour):
  a triangle (pointing up) has ~1/4 of its area in the top half of its bounding box (< 0.39, or a
  fill ratio of the box < 0.6); otherwise the fill ratio tells a square (> 0.845) from a circle (~pi/4);
- position: the centre of the bounding box (of coverage > 1/2): "centre" when within 3 px of the image
  centre on both axes, otherwise the quadrant it lies in;
- size (reported, not part of "all"): "large" when the bounding box is at least 13 px on its longer side.

    check(image_uint8_hwc, "a red circle in the top left on a blue background")
    -> {"colour": True, "background": True, "shape": True, "position": True, "size": None, "all": True,
        "objects": True}

Attributes the prompt does not name come back as None and don't count towards "all"; "objects" is
colour and background and shape all right (position left out).

Validation on the dataset's own images (sample(seed=1234, n=1000), the captions' attributes as truth):
colour 1.000, background 1.000, shape 1.000, position 1.000, size 1.000 agreement
(tests/test_shapes_checker.py asserts >= 0.95 on 300 images).
"""

from __future__ import annotations

from collections import deque

import numpy as np

try:
    from bench.shapes import BACKGROUNDS, COLOURS, PALETTE, SIZE, parse_prompt, sample
except ImportError:  # run as a script from bench/
    from shapes import BACKGROUNDS, COLOURS, PALETTE, SIZE, parse_prompt, sample  # type: ignore

_FG_DIST = 60.0
_CENTRE_PX = 3.0
_LARGE_PX = 13


def _nearest(rgb: np.ndarray, names: list[str]) -> str:
    d = [np.sum((rgb - np.asarray(PALETTE[n], dtype=np.float64)) ** 2) for n in names]
    return names[int(np.argmin(d))]


def _to32(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected an HWC RGB image, got shape {img.shape}")
    img = img[..., :3].astype(np.float64)
    h, w = img.shape[:2]
    if (h, w) != (SIZE, SIZE):
        if h % SIZE or w % SIZE:
            raise ValueError(f"image size {h}x{w} is not a multiple of {SIZE}")
        img = img.reshape(SIZE, h // SIZE, SIZE, w // SIZE, 3).mean(axis=(1, 3))
    return img


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = []
        q = deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def read(image: np.ndarray) -> dict:
    """The attributes read from an image's pixels: background, colour, shape, position, size (None if no shape)."""
    img = _to32(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    out = {"background": background, "colour": None, "shape": None, "position": None, "size": None,
           "fill": None, "top": None}
    dist = np.linalg.norm(img - bg_rgb, axis=2)
    blob = _largest_component(dist > _FG_DIST)
    if blob.sum() < 4:
        return out
    # Dilate the blob by one pixel so its anti-aliased rim counts towards the coverage.
    region = blob.copy()
    region[1:] |= blob[:-1]
    region[:-1] |= blob[1:]
    region[:, 1:] |= blob[:, :-1]
    region[:, :-1] |= blob[:, 1:]
    core = blob & (dist >= 0.75 * dist[blob].max())
    fg_rgb = np.median(img[core], axis=0)
    out["colour"] = _nearest(fg_rgb, [c for c in COLOURS if c != background])
    axis = fg_rgb - bg_rgb
    alpha = np.clip(((img - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0) * region
    ys, xs = np.nonzero(alpha > 0.5)
    if len(ys) == 0:
        return out
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(alpha.sum())
    fill = area / float((y1 - y0) * (x1 - x0))
    mid = (y0 + y1) / 2.0
    yy = np.arange(SIZE, dtype=np.float64)[:, None] + 0.5
    top = float((alpha * np.clip(mid - (yy - 0.5), 0.0, 1.0)).sum()) / area  # share of area above the box's middle
    if top < 0.39 or fill < 0.6:
        shape = "triangle"
    elif fill > 0.845:
        shape = "square"
    else:
        shape = "circle"
    dx, dy = (x0 + x1) / 2 - SIZE / 2, (y0 + y1) / 2 - SIZE / 2
    if abs(dx) < _CENTRE_PX and abs(dy) < _CENTRE_PX:
        position = "centre"
    else:
        position = ("top" if dy < 0 else "bottom") + " " + ("left" if dx < 0 else "right")
    out.update(shape=shape, position=position, size="large" if max(y1 - y0, x1 - x0) >= _LARGE_PX else "small",
               fill=round(fill, 3), top=round(top, 3))
    return out


def check(image: np.ndarray, prompt: str) -> dict:
    """Whether an image shows what the prompt asks: per attribute True/False (None: prompt doesn't name it)."""
    want = parse_prompt(prompt)
    got = read(image)
    res = {}
    for key in ("colour", "background", "shape", "position", "size"):
        res[key] = None if want[key] is None else bool(got[key] == want[key])
    res["all"] = all(res[k] for k in ("colour", "background", "shape", "position") if res[k] is not None)
    res["objects"] = bool(res["colour"] and res["background"] and res["shape"])  # "all" leaving position out
    return res


def score(images, prompts: list[str]) -> dict:
    """Rates over a batch: for each attribute the share of images (that name it) showing it; "all"; "n"."""
    results = [check(img, p) for img, p in zip(images, prompts)]
    out: dict = {"n": len(results)}
    for key in ("colour", "background", "shape", "position", "size", "all", "objects"):
        vals = [r[key] for r in results if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def validate(seed: int = 1234, n: int = 1000) -> dict:
    """The checker's agreement with the dataset's own attributes (all of them, named in the caption or not)."""
    images, _, attrs = sample(seed, n)
    hits = {k: 0 for k in ("colour", "background", "shape", "position", "size")}
    for img, a in zip(images, attrs):
        got = read(img)
        for k in hits:
            hits[k] += got[k] == a[k]
    return {k: v / n for k, v in hits.items()}


if __name__ == "__main__":
    print(validate())
