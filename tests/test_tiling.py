"""Tiled VAE (sdrt.runtime.tiling): the tile grid, exact blending of a local operation, the tiled decode's
difference from a whole decode on the tiny fixture (bounded, reported as PSNR), tiled img2img encode, bad tile sizes."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.core import codec
from sdrt.runtime.pipeline import StableDiffusionPipeline
from sdrt.runtime.tiling import Tiling, decode, encode, tile_starts

FACTOR = 8  # the tiny fixture's VAE factor, as SD's


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """dB on images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("length,tile,overlap", [(16, 8, 2), (17, 8, 3), (8, 8, 2), (5, 8, 2), (64, 32, 8), (9, 4, 0)])
def test_tiles_cover_the_length_and_overlap_at_least_as_asked(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + tile - b >= overlap  # neighbours share at least `overlap` cells, no gap


def upsample(z: np.ndarray) -> np.ndarray:
    """A local 'decoder': nearest upsampling by the VAE factor, plus the channel mean (a per-pixel operation)."""
    up = np.repeat(np.repeat(z, FACTOR, axis=2), FACTOR, axis=3)
    return up[:, :3] + up.mean(axis=1, keepdims=True)


def downsample(x: np.ndarray) -> np.ndarray:
    """A local 'encoder': mean over each factor x factor block."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // FACTOR, FACTOR, w // FACTOR, FACTOR).mean(axis=(3, 5))


@pytest.mark.parametrize("tiling", [Tiling(64, 16), Tiling(48, 8), Tiling(32, 0), Tiling(512, 64)])
def test_blending_reproduces_a_local_operation_exactly(tiling):
    """Weights are normalised per pixel, so an operation without context gives the whole result."""
    z = np.random.default_rng(0).standard_normal((1, 4, 17, 23)).astype(np.float32)
    np.testing.assert_allclose(decode(upsample, z, tiling, FACTOR), upsample(z), rtol=0, atol=1e-6)
    x = np.random.default_rng(1).standard_normal((1, 3, 17 * FACTOR, 23 * FACTOR)).astype(np.float32)
    np.testing.assert_allclose(encode(downsample, x, tiling, FACTOR), downsample(x), rtol=0, atol=1e-6)


class Counting:
    """Wraps an engine's run: counts its calls and the spatial shapes of the (one) input it was fed."""

    def __init__(self, run):
        self.run, self.shapes = run, []

    def __call__(self, feed):
        (x,) = feed.values()
        self.shapes.append(x.shape[2:])
        return self.run(feed)


@pytest.fixture(scope="module")
def sd1_latents(exported):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="ddim")
    latents = pipe("a red circle on a blue background", num_inference_steps=3, height=192, width=192, seed=3,
                   output_type="latent").images
    return pipe, latents


def decode_with(pipe, latents, tiling):
    pipe.vae_tiling = tiling
    engine = pipe.vae_decoder
    counting = Counting(engine.run)
    engine.run = counting  # instance attribute: the pipeline's own calls go through it
    try:
        return codec.decode(pipe.models, latents, "np", pipe.vae_tiling, {}), counting.shapes
    finally:
        del engine.run


def test_tiled_decode_is_close_to_the_whole_decode_and_blending_beats_hard_seams(sd1_latents):
    pipe, latents = sd1_latents
    whole, shapes = decode_with(pipe, latents, None)
    assert shapes == [(24, 24)]
    blended, shapes = decode_with(pipe, latents, Tiling(96, 32))  # 12-cell tiles, 4 shared: starts 0, 8, 12
    assert len(shapes) == 9 and set(shapes) == {(12, 12)}
    seams, shapes = decode_with(pipe, latents, Tiling(96, 0))  # tiles side by side, nothing to blend
    assert len(shapes) == 4
    psnr_blended, psnr_seams = psnr(blended, whole), psnr(seams, whole)
    report = f"tiled vs whole decode, 192 px, 96 px tiles: PSNR {psnr_blended:.1f} dB blended (32 px overlap), " \
             f"{psnr_seams:.1f} dB with hard seams"
    assert blended.shape == whole.shape
    assert psnr_blended > psnr_seams + 3, report
    assert psnr_blended > 24, report  # random-weight tiny VAE: GroupNorm over 4 groups sees each tile alone


def test_a_tile_as_large_as_the_image_is_the_whole_decode(sd1_latents):
    pipe, latents = sd1_latents
    whole, _ = decode_with(pipe, latents, None)
    tiled, shapes = decode_with(pipe, latents, Tiling(192, 64))
    assert len(shapes) == 1 and np.abs(tiled - whole).max() == 0.0


def test_tiled_img2img_encode_uses_tiles_and_stays_close(exported):
    from test_low_memory import picture

    image = picture(128)
    kwargs = dict(prompt="a red circle", image=image, strength=0.5, num_inference_steps=4, seed=2, output_type="np")
    results = {}
    for name, tiling in (("whole", None), ("tiled", Tiling(64, 16))):
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"], scheduler="ddim", vae_tiling=tiling)
        counting = Counting(pipe.vae_encoder.run)
        pipe.vae_encoder.run = counting
        results[name] = pipe(**kwargs).images
        assert len(counting.shapes) == (1 if tiling is None else 9), counting.shapes  # 16 cells: starts 0, 6, 8
    value = psnr(results["tiled"], results["whole"])
    assert value > 20, f"tiled encode + decode vs whole, 128 px, 64 px tiles: PSNR {value:.1f} dB"


@pytest.mark.parametrize("tiling,message", [
    (Tiling(64, 64), "must be larger than the tile overlap"),
    (Tiling(32, 48), "must be larger than the tile overlap"),
    (Tiling(60, 16), "multiple of the VAE's factor 8"),
    (Tiling(64, 12), "multiple of the VAE's factor 8"),
    (Tiling(64, -8), "non-negative"),
    (Tiling(0, 0), "must be larger"),
])
def test_bad_tile_sizes_are_refused(exported, tiling, message):
    with pytest.raises(InvalidInputError, match=message):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], vae_tiling=tiling)
    with pytest.raises(InvalidInputError, match=message):
        decode(upsample, np.zeros((1, 4, 8, 8), np.float32), tiling, FACTOR)
