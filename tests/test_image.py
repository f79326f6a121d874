"""Image helpers against diffusers' VaeImageProcessor, and the PNG writer."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.image import format_parameters, from_pil, image_grid, save_png, to_pil, to_uint8, to_unit

torch = pytest.importorskip("torch")
image_processor = pytest.importorskip("diffusers.image_processor")


@pytest.fixture(scope="module")
def processor():
    return image_processor.VaeImageProcessor(vae_scale_factor=8)


def vae_output(seed: int, dtype=np.float32, shape=(2, 3, 24, 40)) -> np.ndarray:
    """Like a VAE decoder's output: mostly in [-1, 1], some values past both ends, and exact .5 steps."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.6, size=shape)
    # Values whose unit*255 lands on a half, where the rounding rule shows.
    images.flat[:64] = (np.arange(64) + 0.5) / 255 * 2 - 1
    return images.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_to_uint8_and_to_unit_match_postprocess(processor, dtype):
    images = vae_output(0, dtype)
    expected_pil = processor.postprocess(torch.from_numpy(images), output_type="pil")
    expected_np = processor.postprocess(torch.from_numpy(images), output_type="np")

    pixels = to_uint8(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 24, 40, 3)
    np.testing.assert_array_equal(pixels, np.stack([np.asarray(p) for p in expected_pil]))

    unit = to_unit(images)
    assert unit.dtype == np.float32 and unit.flags.c_contiguous
    np.testing.assert_array_equal(unit, expected_np)
    assert unit.min() >= 0 and unit.max() <= 1


def test_to_uint8_refuses_nan():
    images = vae_output(1)
    images[0, 1, 2, 3] = np.nan
    with pytest.raises(InvalidInputError, match="1 NaN"):
        to_uint8(images)
    assert np.isnan(to_unit(images)).sum() == 1


@pytest.mark.parametrize("bad", [np.zeros((3, 8, 8), np.float32), np.zeros((1, 3, 8, 8), np.uint8)])
def test_to_uint8_refuses_non_nchw_float(bad):
    with pytest.raises(InvalidInputError, match="NCHW"):
        to_uint8(bad)


def test_to_pil_modes_and_ownership():
    pixels = to_uint8(vae_output(2))
    pictures = to_pil(pixels)
    assert [p.mode for p in pictures] == ["RGB", "RGB"] and pictures[0].size == (40, 24)
    np.testing.assert_array_equal(np.asarray(pictures[1]), pixels[1])
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert to_pil(gray)[0].mode == "L" and to_pil(rgba)[0].mode == "RGBA"
    before = np.asarray(to_pil(gray)[0]).copy()
    picture = to_pil(gray)[0]
    gray[:] = 255
    np.testing.assert_array_equal(np.asarray(picture), before)
    with pytest.raises(InvalidInputError, match="uint8"):
        to_pil(np.zeros((8, 8, 3), np.float32))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size, target",
    [((64, 48), (None, None)), ((67, 53), (None, None)), ((100, 70), (32, 48)), ((30, 20), (64, 40))],
    ids=["same", "floor-to-8", "downscale", "upscale"],
)
def test_from_pil_matches_preprocess(processor, size, target):
    height, width = target
    images = [photo(*size, seed=0), photo(*size, seed=1)]
    expected = processor.preprocess(images, height=height, width=width).numpy()
    got = from_pil(images, height=height, width=width)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(from_pil(images[1], height=height, width=width), expected[1:])
    np.testing.assert_array_equal(from_pil(np.asarray(images[0]), height=height, width=width), expected[:1])


def test_from_pil_converts_palette_and_refuses_other_modes():
    rgb = photo(16, 16)
    palette = rgb.convert("P")
    np.testing.assert_array_equal(from_pil(palette), from_pil(palette.convert("RGB")))
    with pytest.raises(InvalidInputError, match="transparency.*RGBA"):
        from_pil(rgb.convert("RGBA"))
    with pytest.raises(InvalidInputError, match="mode L"):
        from_pil(rgb.convert("L"))
    transparent = rgb.convert("P")
    transparent.info["transparency"] = 0
    with pytest.raises(InvalidInputError, match="transparency"):
        from_pil(transparent)
    with pytest.raises(InvalidInputError, match="HWC uint8 RGB"):
        from_pil(np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        from_pil(rgb, height=20)
    with pytest.raises(InvalidInputError, match="smaller"):
        from_pil(photo(7, 16))


def test_png_round_trip_keeps_parameters(tmp_path):
    pixels = to_uint8(vae_output(3))
    text = format_parameters("a cat, photo", "blurry", 20, "ddim", 7.5, 42, 40, 24, model="sd15")
    path = tmp_path / "cat.png"
    save_png(to_pil(pixels)[0], path, text)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.text["parameters"] == text
        np.testing.assert_array_equal(np.asarray(saved), pixels[0])

    unicode_text = "東京の夜景 🌃 — crème\nSteps: 1"
    save_png(pixels[1], path, unicode_text)  # an array, overwriting; non-Latin-1 goes in iTXt
    with Image.open(path) as saved:
        assert saved.text["parameters"] == unicode_text
        np.testing.assert_array_equal(np.asarray(saved), pixels[1])

    save_png(pixels[0], tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as saved:
        assert "parameters" not in saved.text


def test_png_write_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    save_png(photo(8, 8), path, "first")
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_png(photo(8, 8, seed=1), path, "second")
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    monkeypatch.undo()
    with Image.open(path) as kept:
        assert kept.text["parameters"] == "first"


def test_format_parameters_a1111_style():
    text = format_parameters("a cat", "blurry, ugly", 20, "ddim", 7.5, 42, 512, 768, model="sd-v1-5")
    assert text == (
        "a cat\nNegative prompt: blurry, ugly\n"
        "Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: sd-v1-5"
    )
    text = format_parameters(
        "a dog", "", 30, "euler_a", 7.0, 1, 1024, 1024, denoising_strength=0.75, clip_skip=None, Model_hash="ab12"
    )
    assert text == (
        "a dog\nSteps: 30, Sampler: euler_a, CFG scale: 7, Seed: 1, Size: 1024x1024, Model hash: ab12, "
        "Denoising strength: 0.75"  # A1111's order: the model hash after the size
    )
    model = "C:\\models\\a,b"
    quoted = format_parameters("p", None, 1, "ddim", 1.5, None, 8, 8, model=model)
    assert quoted == "p\nSteps: 1, Sampler: ddim, CFG scale: 1.5, Size: 8x8, Model: " + json.dumps(model)


def test_image_grid_size_and_placement():
    pictures = [Image.new("RGB", (10, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(pictures, cols=2)
    assert grid.size == (20, 18) and grid.mode == "RGB"
    assert grid.getpixel((15, 8)) == (120, 0, 0)  # row 1, col 1: image 3
    assert grid.getpixel((5, 14)) == (160, 0, 0)  # row 2, col 0: image 4
    assert grid.getpixel((15, 14)) == (0, 0, 0)  # empty cell
    assert image_grid(pictures[:2], cols=4).size == (20, 6)
    assert image_grid(list(to_uint8(vae_output(4))), cols=1).size == (40, 48)
    with pytest.raises(InvalidInputError, match="one size"):
        image_grid([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))], cols=2)
    with pytest.raises(InvalidInputError, match="no images"):
        image_grid([], cols=2)
