"""SD3 and Flux inpainting (sdrt.runtime.dit_inpaint) against diffusers' StableDiffusion3InpaintPipeline and
FluxInpaintPipeline on the same tiny random-weight checkpoints (export/fixtures_dit.py) from the same seed.

diffusers' SD3 inpainting decodes without the VAE's shift_factor (diffusers issue #13611); sdrt decodes as every
other SD3 pipeline, so its latents are compared with diffusers' (output_type="latent") and its pixels with those
latents decoded as StableDiffusion3Pipeline decodes them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.dit_inpaint import FluxInpaintPipeline, StableDiffusion3InpaintPipeline
from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError

pytest.importorskip("diffusers")

TOLERANCE = 2 / 255  # per pixel
PROMPT = "a photo of an astronaut riding a horse on mars"


@pytest.fixture(scope="module")
def folders(tiny) -> dict:
    """{"sd3" | "flux": (diffusers checkpoint, exported folder)}: the session's tiny folders (tests/conftest.py)."""
    return {"sd3": (tiny.checkpoint("sd3"), tiny["sd3"]), "flux": (tiny.checkpoint("flux-dev"), tiny["flux-dev"])}


@pytest.fixture(scope="module")
def sd3(folders):
    return StableDiffusion3InpaintPipeline.from_pretrained(folders["sd3"][1])


@pytest.fixture(scope="module")
def sd3_reference(folders):
    import diffusers

    return diffusers.StableDiffusion3InpaintPipeline.from_pretrained(folders["sd3"][0])


@pytest.fixture(scope="module")
def flux(folders):
    return FluxInpaintPipeline.from_pretrained(folders["flux"][1])


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    noise = rng.integers(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(base * [1.0, 0.6, 0.3] + noise, 0, 255).astype(np.uint8))


def mask(height: int, width: int, box: tuple[int, int, int, int]) -> Image.Image:
    """White (repaint) inside box (x1, y1, x2, y2), black elsewhere."""
    plane = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    plane[y1:y2, x1:x2] = 255
    return Image.fromarray(plane)


def run_reference(pipe, **kwargs):
    seed = kwargs.pop("seed")
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def decoded_as_sd3(pipe, latents: torch.Tensor) -> np.ndarray:
    """diffusers' latents decoded as StableDiffusion3Pipeline decodes (with the shift_factor), as float NHWC."""
    config = pipe.vae.config
    with torch.no_grad():
        image = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


def max_difference(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd3_matches_diffusers(sd3, sd3_reference, strength):
    height, width = 80, 64  # not square; the picture and its mask (96 x 72) are resized to it
    kwargs = dict(prompt=PROMPT, image=picture(96, 72), mask_image=mask(96, 72, (10, 20, 50, 70)), strength=strength,
                  height=height, width=width, num_inference_steps=5, guidance_scale=4.0, seed=3)
    want_latents = run_reference(sd3_reference, output_type="latent", **kwargs)
    got_latents = sd3(output_type="latent", **kwargs).images
    assert max_difference(got_latents, want_latents.numpy()) < 1e-3
    got = sd3(output_type="np", **kwargs).images
    worst = max_difference(got, decoded_as_sd3(sd3_reference, want_latents))
    assert worst <= TOLERANCE, f"max |sdrt - diffusers| = {worst * 255:.3f}/255"


def test_sd3_default_size_and_padding_mask_crop(sd3, sd3_reference):
    """The model's size by default (the tiny transformer's 32 x 8 = 256 px); padding_mask_crop pastes the repainted
    box back into the original picture, as diffusers' apply_overlay."""
    image, repaint = picture(120, 96, 1), mask(120, 96, (30, 40, 60, 90))
    kwargs = dict(prompt=PROMPT, image=image, mask_image=repaint, num_inference_steps=3, seed=5)
    result = sd3(output_type="latent", **kwargs).images
    assert result.shape[2:] == (32, 32)
    want = run_reference(sd3_reference, output_type="latent", **kwargs).numpy()
    assert max_difference(result, want) < 1e-3

    # padding_mask_crop: diffusers' output pasted from its (unshifted) decode; compare the kept pixels exactly and
    # the box's size and place: the repainted pixels differ by the decode's shift only.
    kwargs.update(height=64, width=64, padding_mask_crop=8)
    got = np.asarray(sd3(output_type="pil", **kwargs).images[0])
    want = np.asarray(run_reference(sd3_reference, output_type="pil", **kwargs)[0])
    assert got.shape == want.shape == (120, 96, 3)
    kept = np.asarray(repaint) == 0
    np.testing.assert_array_equal(got[kept], np.asarray(image)[kept])
    np.testing.assert_array_equal(want[kept], np.asarray(image)[kept])


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_flux_matches_diffusers(folders, flux, strength):
    import diffusers

    reference = diffusers.FluxInpaintPipeline.from_pretrained(folders["flux"][0])
    kwargs = dict(prompt=PROMPT, image=picture(96, 64, 2), mask_image=mask(96, 64, (8, 16, 48, 80)),
                  strength=strength, height=96, width=64, num_inference_steps=4, guidance_scale=3.0, seed=7)
    want = run_reference(reference, output_type="np", **kwargs)
    got = flux(output_type="np", **kwargs).images
    worst = max_difference(got, want)
    assert worst <= TOLERANCE, f"max |sdrt - diffusers| = {worst * 255:.3f}/255"



def test_flux_padding_mask_crop_matches_diffusers(folders, flux):
    """The box around the mask repainted at 64 x 64 and pasted back into the 96 x 120 original, as diffusers."""
    import diffusers

    reference = diffusers.FluxInpaintPipeline.from_pretrained(folders["flux"][0])
    kwargs = dict(prompt=PROMPT, image=picture(120, 96, 1), mask_image=mask(120, 96, (30, 40, 60, 90)), height=64,
                  width=64, padding_mask_crop=8, num_inference_steps=3, seed=5)
    got = np.asarray(flux(output_type="pil", **kwargs).images[0])
    want = np.asarray(run_reference(reference, output_type="pil", **kwargs)[0])
    assert got.shape == want.shape == (120, 96, 3)
    assert max_difference(got, want) <= 2  # uint8 levels

def test_generate_picks_the_inpainting_pipelines(folders):
    from sdrt.runtime.families import inpaint_pipeline

    assert type(inpaint_pipeline(folders["sd3"][1])) is StableDiffusion3InpaintPipeline
    assert type(inpaint_pipeline(folders["flux"][1])) is FluxInpaintPipeline
    with pytest.raises(UnsupportedConfigError, match="flux model"):
        StableDiffusion3InpaintPipeline.from_pretrained(folders["flux"][1])


def test_bad_inputs_are_refused(sd3, flux):
    image = picture(64, 64)
    cases = [
        (sd3, dict(mask_image=mask(32, 64, (0, 0, 8, 8))), "mask is 64x32"),
        (sd3, dict(mask_image="mask.png"), "expected a PIL image"),
        (sd3, dict(mask_image=np.zeros((64, 64), np.float32)), "uint8"),
        (sd3, dict(mask_image=None), "mask_image is missing"),
        (sd3, dict(mask_image=mask(64, 64, (0, 0, 8, 8)), strength=0.0), "strength"),
        (sd3, dict(mask_image=mask(64, 64, (0, 0, 8, 8)), height=72), "multiple of 16"),
        (flux, dict(mask_image=mask(64, 64, (0, 0, 8, 8)), negative_prompt="x"), "true_cfg_scale"),
        (flux, dict(mask_image=Image.new("RGBA", (64, 64))), "transparency"),
        (flux, dict(mask_image=mask(64, 64, (0, 0, 8, 8)), height=72), "multiple of 16"),
    ]
    for pipe, arguments, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            pipe(PROMPT, image, **{"height": 64, "width": 64, "num_inference_steps": 1, **arguments})


def test_cli_inpaints_sd3(folders, tmp_path):
    from sdrt.runtime.cli import main

    picture(96, 80).save(tmp_path / "picture.png")
    mask(96, 80, (10, 10, 40, 60)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(folders["sd3"][1]), "a cat", "--image", str(tmp_path / "picture.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "3", "--seed", "1", "-o", str(out)]) == 0
    assert Image.open(out).mode == "RGB" and Image.open(out).size == (80, 96)  # the picture's size
