"""A synthetic captioned image dataset of simple coloured shapes: numpy + Pillow only (no torch).

Every image is 32x32 RGB: one shape (circle, square or triangle) of one colour, small or large, at one
of five positions, on a plain background of a different colour. Captions name what is drawn, e.g.

    "a red circle on a blue background"
    "a small green triangle in the top left on a white background"

Colour, shape and background are always named; size and position each appear in about half the
captions, so the model learns prompts with and without them. Everything is deterministic from a seed.

    images, captions, attrs = sample(seed=0, n=1000)   # uint8 (n, 32, 32, 3), list[str], list[dict]
    caption(attrs[0]) == captions[0]
    parse_prompt(captions[0])                          # the attributes a prompt asks for

bench/adherence.py reads the attributes back from pixels (the checker for generated images).
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4  # drawn at 128x128 and box-filtered down: anti-aliased edges

# Well separated in RGB (every pair at least ~150 apart), so the checker can read them back.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: list[str] = list(PALETTE)
BACKGROUNDS: list[str] = list(PALETTE)
SHAPES: list[str] = ["circle", "square", "triangle"]
POSITIONS: list[str] = ["centre", "top left", "top right", "bottom left", "bottom right"]
SIZES: list[str] = ["small", "large"]

# Side of the shape's bounding box (px at 32x32) and how far a corner position's centre sits from the
# image centre, per size: shapes keep a margin of >= 2 px from the border, so the border is background.
_SIDE = {"small": 10.0, "large": 16.0}
_OFFSET = {"small": 8.0, "large": 6.0}
_JITTER = 1.0  # uniform +-1 px on the centre
_P_SIZE_IN_CAPTION = 0.5
_P_POSITION_IN_CAPTION = 0.5


def position_centre(position: str, size: str) -> tuple[float, float]:
    """Nominal (x, y) centre, in pixels of the 32x32 image, of a shape at `position`."""
    c = SIZE / 2
    if position == "centre":
        return c, c
    d = _OFFSET[size]
    vert, horiz = position.split()
    return c + (d if horiz == "right" else -d), c + (d if vert == "bottom" else -d)


def caption(attrs: dict) -> str:
    """The caption for a set of attributes (size/position only when `attrs` says to name them)."""
    words = ["a"]
    if attrs.get("size_in_caption", False):
        words.append(attrs["size"])
    words += [attrs["colour"], attrs["shape"]]
    if attrs.get("position_in_caption", False):
        words.append("in the centre" if attrs["position"] == "centre" else f"in the {attrs['position']}")
    words.append(f"on a {attrs['background']} background")
    return " ".join(words)


_WORD = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}


def parse_prompt(prompt: str) -> dict:
    """The attributes a prompt asks for: colour, shape, background, size, position (None when not named).

    Accepts the dataset's captions and light variations ("centre"/"center", "square"/"squares").
    """
    p = " " + re.sub(r"[^a-z ]", " ", prompt.lower()).replace("center", "centre") + " "
    p = re.sub(r"\s+", " ", p)
    out: dict = {"colour": None, "shape": None, "background": None, "size": None, "position": None}
    m = re.search(r" on an? (\w+) background ", p)
    if m and m.group(1) in BACKGROUNDS:
        out["background"] = m.group(1)
        p = p[: m.start()] + " " + p[m.end():]
    for pos in POSITIONS:
        if f" {pos} " in p:
            out["position"] = pos
            p = p.replace(f" {pos} ", " ")
            break
    for key, vocab in _WORD.items():
        for w in vocab:
            if re.search(rf" {w}s? ", p):
                out[key] = w
                break
    return out


def _draw(attrs: dict, rng: np.random.Generator) -> np.ndarray:
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), PALETTE[attrs["background"]])
    d = ImageDraw.Draw(img)
    cx, cy = position_centre(attrs["position"], attrs["size"])
    cx += rng.uniform(-_JITTER, _JITTER)
    cy += rng.uniform(-_JITTER, _JITTER)
    h = _SIDE[attrs["size"]] / 2
    x0, y0, x1, y1 = (cx - h) * s, (cy - h) * s, (cx + h) * s, (cy + h) * s
    fill = PALETTE[attrs["colour"]]
    if attrs["shape"] == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif attrs["shape"] == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif attrs["shape"] == "triangle":  # pointing up, base at the bottom of the box
        d.polygon([(cx * s, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {attrs['shape']!r}")
    img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def random_attrs(rng: np.random.Generator) -> dict:
    """One random attribute set (shape colour always differs from the background)."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    background = colour
    while background == colour:
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return {
        "colour": colour,
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "background": background,
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "size_in_caption": bool(rng.random() < _P_SIZE_IN_CAPTION),
        "position_in_caption": bool(rng.random() < _P_POSITION_IN_CAPTION),
    }


def render(attrs: dict, seed: int = 0) -> np.ndarray:
    """Draw one image (uint8 HWC) for an attribute set; `seed` only moves the +-1 px jitter."""
    return _draw(attrs, np.random.default_rng(seed))


def sample(seed: int, n: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """n random images (uint8, (n, 32, 32, 3)), their captions and attribute dicts, from `seed`."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    attrs: list[dict] = []
    for i in range(n):
        a = random_attrs(rng)
        images[i] = _draw(a, rng)
        attrs.append(a)
        captions.append(caption(a))
    return images, captions, attrs


def prompts(seed: int, n: int, position: bool | None = None) -> list[str]:
    """n random prompts in the dataset's caption style (for evaluation); `position` forces it named or not."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = random_attrs(rng)
        if position is not None:
            a["position_in_caption"] = position
        out.append(caption(a))
    return out


if __name__ == "__main__":  # write a preview sheet: python bench/shapes.py out.png
    import sys

    imgs, caps, _ = sample(0, 64)
    sheet = imgs.reshape(8, 8, SIZE, SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(8 * SIZE, 8 * SIZE, 3)
    Image.fromarray(sheet).resize((8 * SIZE * 4,) * 2, Image.Resampling.NEAREST).save(
        sys.argv[1] if len(sys.argv) > 1 else "shapes-preview.png")
    print("\n".join(caps[:8]))
