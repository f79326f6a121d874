"""SDXL inpainting parity: sdrt's StableDiffusionXLInpaintPipeline on exported tiny SDXL folders vs diffusers'
StableDiffusionXLInpaintPipeline on the same checkpoints, pictures, masks and seeds, for the base model's
ordinary UNet (4 channels, blending) and a dedicated inpainting UNet (9 channels); the base + refiner ensemble
(denoising_end / denoising_start, latents as image); bad inputs; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference import reference
from test_img2img import picture
from test_inpaint import mask
from test_sdxl_refiner import evaluations, run_reference

from sdrt.runtime.cli import main
from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.families import inpaint_pipeline
from sdrt.runtime.inpaint import StableDiffusionInpaintPipeline
from sdrt.runtime.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from sdrt.runtime.sdxl_inpaint import StableDiffusionXLInpaintPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
STEPS = 5  # strength 0.9999 runs 4 steps, 0.6 runs 3


NAMES = {"base": "xl-base", "inpaint": "xl-inpaint", "refiner": "xl-refiner"}  # conftest.TinyFolders' names


@pytest.fixture(scope="module")
def xl_checkpoints(tiny) -> dict:
    """"base": the SDXL base checkpoint (4-channel UNet); "inpaint": a dedicated SDXL inpainting one (9 channels);
    "refiner": the SDXL refiner (4 channels, second text encoder only), which diffusers' inpainting pipeline loads."""
    return {name: tiny.checkpoint(folder) for name, folder in NAMES.items()}


@pytest.fixture(scope="module")
def models(tiny) -> dict:
    return {name: tiny[folder] for name, folder in NAMES.items()}


@pytest.fixture(scope="module")
def reference_pipes(xl_checkpoints) -> dict:
    pipes = {}
    for name, path in xl_checkpoints.items():
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(path, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = (pipe, pipe.scheduler)
    return pipes


def test_the_family_picks_the_sdxl_inpainting_class(models):
    for name, nine_channels in (("base", False), ("inpaint", True)):
        pipe = inpaint_pipeline(models[name])
        assert type(pipe) is StableDiffusionXLInpaintPipeline and pipe.is_inpainting_unet is nine_channels
    folder = json.loads((models["inpaint"] / "model_index.json").read_text())
    assert folder["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert inpaint_pipeline(models["inpaint"]).folder.spec("unet").inputs[0].shape[1] == 9


# (model, scheduler, arguments); no strength means diffusers' default, 0.9999 (not pure noise).
CASES = [
    ("base", None, dict(prompt=PROMPTS[0], mask_image=mask(soft=True))),
    ("base", None, dict(prompt=PROMPTS[1], guidance_scale=1.0, strength=0.6, mask_image=mask())),
    ("base", "euler-a", dict(prompt=PROMPTS[0], strength=1.0, negative_prompt="blurry", mask_image=mask())),
    ("base", "dpm++2m-karras", dict(prompt=PROMPTS, prompt_2=["oil painting", "photo"], strength=0.6,
                                    num_images_per_prompt=2, guidance_rescale=0.5, mask_image=mask(soft=True))),
    ("inpaint", None, dict(prompt=PROMPTS[0], mask_image=mask())),
    ("inpaint", None, dict(prompt=PROMPTS[1], guidance_scale=1.0, strength=1.0, mask_image=mask(soft=True))),
    ("inpaint", "euler-a", dict(prompt=PROMPTS[0], strength=0.6, negative_prompt="blurry", guidance_scale=6.0,
                                original_size=(128, 96), crops_coords_top_left=(8, 4), mask_image=mask())),
]


@pytest.mark.parametrize("model,scheduler,kwargs", CASES,
                         ids=[f"{m}-{s or 'default'}-{k.get('strength', 'default')}-{i}"
                              for i, (m, s, k) in enumerate(CASES)])
def test_images_match_diffusers(reference_pipes, models, model, scheduler, kwargs):
    arguments = dict(image=picture(), num_inference_steps=STEPS, height=64, width=64, **kwargs)
    expected = reference(reference_pipes[model], scheduler, 1234, **arguments)
    got = StableDiffusionXLInpaintPipeline.from_pretrained(models[model], scheduler=scheduler)(
        seed=1234, output_type="np", **arguments).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


def test_non_square_picture_and_kept_region(reference_pipes, models):
    """sdrt sizes the output from the picture (diffusers from height/width); the blend keeps the black part."""
    image, area = picture(96, 64), mask(96, 64, shift=30)
    arguments = dict(prompt=PROMPTS[1], image=image, mask_image=area, strength=0.6, num_inference_steps=STEPS)
    expected = reference(reference_pipes["base"], None, 7, height=64, width=96, **arguments)
    got = StableDiffusionXLInpaintPipeline.from_pretrained(models["base"])(seed=7, output_type="np",
                                                                           **arguments).images
    assert got.shape == expected.shape == (1, 64, 96, 3)
    assert np.abs(got - expected).max() < 1e-3


def test_padding_mask_crop_matches_diffusers(reference_pipes, models):
    """Repaint a box around the mask at full resolution, paste it back: only PIL output in diffusers."""
    image = picture(128, 96)
    crop_mask = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(crop_mask).ellipse((80, 50, 110, 76), fill=255)
    arguments = dict(prompt=PROMPTS[0], image=image, mask_image=crop_mask, padding_mask_crop=6,
                     num_inference_steps=STEPS, height=64, width=64)
    pipe, original = reference_pipes["inpaint"]
    pipe.scheduler = original
    expected = pipe(generator=torch.Generator("cpu").manual_seed(3), **arguments).images[0]
    got = StableDiffusionXLInpaintPipeline.from_pretrained(models["inpaint"])(seed=3, **arguments).images[0]
    assert got.size == expected.size == (128, 96)
    difference = np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1  # uint8 rounding of values within 1e-3
    outside = np.asarray(crop_mask) == 0  # the original picture, untouched, wherever the mask is black
    assert np.array_equal(np.asarray(got)[outside], np.asarray(image)[outside])


def test_bad_inputs_are_refused(models):
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(models["base"])
    with pytest.raises(InvalidInputError, match="mask is 32x32 but image 0 is 64x64"):
        pipe(PROMPTS[0], picture(), mask(32, 32), num_inference_steps=2)
    with pytest.raises(InvalidInputError, match=r"strength must be a number in \(0, 1\]"):
        pipe(PROMPTS[0], picture(), mask(), strength=1.5, num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="prompt_2 has 2 entries but prompt has 1"):
        pipe(PROMPTS[0], picture(), mask(), prompt_2=["a", "b"], num_inference_steps=2)
    with pytest.raises(UnsupportedConfigError, match="is a stable-diffusion-xl model.*families.inpaint_pipeline"):
        StableDiffusionInpaintPipeline.from_pretrained(models["base"])


# -- the ensemble of expert denoisers: base to denoising_end, refiner from denoising_start on its latents ----------

ENSEMBLE_STEPS = 10
# (scheduler, the base's extra arguments, the refiner's); the hand-over is at 0.8 (diffusers' cutoff 200).
ENSEMBLE_CASES = [
    (None, dict(), dict()),  # Euler; the base at diffusers' default strength 0.9999 (9 of 10 steps)
    ("dpm++2m-karras", dict(strength=1.0), dict()),  # multistep: the refiner starts with no history
    ("euler-a", dict(negative_prompt="blurry"), dict(negative_prompt="blurry", aesthetic_score=7.0)),  # noise per step
    ("heun", dict(strength=0.6), dict()),  # 2nd order: the refiner re-runs the step the base ends inside
]


@pytest.mark.parametrize("scheduler,base_kwargs,refiner_kwargs", ENSEMBLE_CASES,
                         ids=[s or "euler" for s, _, _ in ENSEMBLE_CASES])
def test_inpainting_ensemble_matches_diffusers(reference_pipes, models, scheduler, base_kwargs, refiner_kwargs):
    """Both halves of diffusers' base + refiner inpainting, each from its own seed; the refiner takes the base's
    latents (its own side's) and the same mask, and sizes its output from them."""
    common = dict(prompt=PROMPTS[0], mask_image=mask(soft=True), num_inference_steps=ENSEMBLE_STEPS)
    expected_latents = run_reference(reference_pipes["base"], scheduler, 5, image=picture(), denoising_end=0.8,
                                     output_type="latent", height=64, width=64, **common, **base_kwargs)
    base = StableDiffusionXLInpaintPipeline.from_pretrained(models["base"], scheduler=scheduler)
    latents, base_steps = evaluations(base, image=picture(), seed=5, denoising_end=0.8, output_type="latent",
                                      **common, **base_kwargs)
    assert latents.images.shape == tuple(expected_latents.shape) == (1, 4, 8, 8)
    np.testing.assert_allclose(latents.images, expected_latents.numpy(), atol=1e-4)  # float32 rounding: up to 3e-5

    expected = run_reference(reference_pipes["refiner"], scheduler, 6, image=expected_latents, denoising_start=0.8,
                             output_type="np", height=64, width=64, **common, **refiner_kwargs)
    refiner = StableDiffusionXLInpaintPipeline.from_pretrained(models["refiner"], scheduler=scheduler)
    got, refiner_steps = evaluations(refiner, image=latents.images, seed=6, denoising_start=0.8, output_type="np",
                                     **common, **refiner_kwargs)
    assert got.images.shape == expected.shape == (1, 64, 64, 3)
    # 2e-6 here; 1e-5 fails when the refiner's blend leaves out the noise (it is drawn, not added, from the start).
    assert np.abs(got.images - expected).max() < 1e-5
    assert "Denoising start: 0.8" in got.parameters[0] and "Denoising strength" not in got.parameters[0]

    assert min(base_steps) >= 200  # diffusers' cutoff for 0.8 of 1000 training timesteps
    if refiner.scheduler.evaluations_per_step == 1:  # one schedule, split once (the base's cut short by strength)
        assert max(refiner_steps) < 200
        full = refiner.scheduler.plan(ENSEMBLE_STEPS).timesteps
        np.testing.assert_array_equal(np.concatenate([base_steps, refiner_steps]), full[len(full) - len(base_steps)
                                                                                         - len(refiner_steps):])


# (model, scheduler, arguments): one cut on a picture, as diffusers allows (denoising_start: encoded, not noised).
CUT_CASES = [
    ("base", None, dict(denoising_start=0.6)),
    ("base", "euler-a", dict(denoising_start=0.5, strength=0.3, negative_prompt="blurry")),  # strength ignored
    ("base", "dpm++2m-karras", dict(denoising_end=0.5, strength=0.6)),
    ("base", "euler-a", dict(denoising_end=0.7, strength=1.0, num_images_per_prompt=2)),
    ("base", "ddim", dict(denoising_start=0.3, denoising_end=0.7, guidance_scale=1.0)),  # a middle expert
    ("inpaint", None, dict(denoising_start=0.5)),
    ("inpaint", "euler-a", dict(denoising_end=0.7, strength=1.0)),
    ("refiner", "dpm++2m-karras", dict(denoising_start=0.7, aesthetic_score=7.0)),
]


@pytest.mark.parametrize("model,scheduler,kwargs", CUT_CASES,
                         ids=[f"{m}-{s or 'default'}-{'-'.join(k for k in a if k.startswith('denoising'))}"
                              for m, s, a in CUT_CASES])
def test_denoising_start_or_end_on_a_picture_matches_diffusers(reference_pipes, models, model, scheduler, kwargs):
    arguments = dict(prompt=PROMPTS[1], image=picture(), mask_image=mask(), num_inference_steps=ENSEMBLE_STEPS,
                     height=64, width=64, **kwargs)
    expected = reference(reference_pipes[model], scheduler, 11, **arguments)
    got = StableDiffusionXLInpaintPipeline.from_pretrained(models[model], scheduler=scheduler)(
        seed=11, output_type="np", **arguments).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4  # float32 rounding: up to 1.4e-5


@pytest.mark.parametrize("scheduler,kwargs", [
    ("euler-a", dict(strength=0.6)),  # noised latents: the noise draw, no encode nor masked-picture draws
    (None, dict(strength=1.0, num_images_per_prompt=2)),  # pure noise; the latents still blend the kept region
])
def test_latents_as_image_without_denoising_start_match_diffusers(reference_pipes, models, scheduler, kwargs):
    """Latents given as image, noised as a picture's latents would be; a mask of 68x68 rounds down to the latents'
    64x64 and is resized to it (diffusers resizes it to height x width)."""
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    area = mask(68, 68, soft=True)
    arguments = dict(prompt=PROMPTS[0], mask_image=area, num_inference_steps=ENSEMBLE_STEPS, **kwargs)
    expected = reference(reference_pipes["refiner"], scheduler, 2, image=torch.from_numpy(latents), height=64,
                         width=64, **arguments)
    got = StableDiffusionXLInpaintPipeline.from_pretrained(models["refiner"], scheduler=scheduler)(
        image=latents, seed=2, output_type="np", **arguments).images
    assert got.shape == expected.shape == (kwargs.get("num_images_per_prompt", 1), 64, 64, 3)
    assert np.abs(got - expected).max() < 1e-4  # float32 rounding: 2e-6


@pytest.mark.parametrize("model,kwargs,message", [
    ("base", dict(denoising_start=1.0), r"denoising_start must be a number in \(0, 1\)"),
    ("base", dict(denoising_start=0), r"denoising_start must be a number in \(0, 1\)"),
    ("base", dict(denoising_end=1.5), r"denoising_end must be a number in \(0, 1\)"),
    ("base", dict(denoising_end=True), r"denoising_end must be a number in \(0, 1\)"),
    ("base", dict(denoising_start=0.8, denoising_end=0.8), "denoising_start=0.8 must be below denoising_end=0.8"),
    ("base", dict(denoising_start=0.7, denoising_end=0.3), "denoising_start=0.7 must be below denoising_end=0.3"),
    ("base", dict(image=np.zeros((1, 3, 8, 8), np.float32)), "latents must be NCHW with the VAE's 4 channels"),
    ("base", dict(image=np.zeros((1, 8, 8, 8), np.float32)), "latents must be NCHW with the VAE's 4 channels"),
    ("base", dict(image=np.zeros((1, 4, 8, 8), np.float32), height=128),
     "height=128, but the latents given as image make 64x64 pictures.*leave height and width out"),
    ("base", dict(image=np.zeros((1, 4, 8, 8), np.float32), mask_image=mask(72, 64)),
     "mask 0 is 72x64 but the latents given as image make 64x64 pictures"),
    ("base", dict(image=np.zeros((1, 4, 8, 8), np.float32), padding_mask_crop=4),
     "latents given as image cannot be cropped"),
    ("base", dict(image=np.zeros((2, 4, 8, 8), np.float32), mask_image=[mask()] * 3), "got 3 masks for 2 images"),
    ("inpaint", dict(image=np.zeros((1, 4, 8, 8), np.float32), denoising_start=0.8),
     "UNet is an inpainting one.*pass the picture"),
])
def test_bad_denoising_cuts_and_latents_are_refused(models, model, kwargs, message):
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(models[model])
    with pytest.raises(InvalidInputError, match=message):
        pipe(**{"prompt": PROMPTS[0], "image": picture(), "mask_image": mask(), "num_inference_steps": 4, **kwargs})


@pytest.mark.parametrize("cls", [StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline])
def test_the_inpainting_unet_is_refused_by_the_other_sdxl_pipelines(models, cls):
    with pytest.raises(UnsupportedConfigError, match="takes 9 input channels.*families.inpaint_pipeline"):
        cls.from_pretrained(models["inpaint"])


def test_generate_with_mask_on_an_sdxl_folder(models, tmp_path, capsys):
    """`sdrt generate --image --mask` picks the SDXL class and its default strength (0.9999)."""
    source, mask_path, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    picture(64, 80).save(source)
    mask(64, 80).save(mask_path)
    rc = main(["generate", str(models["base"]), PROMPTS[0], "--image", str(source), "--mask", str(mask_path),
               "--prompt-2", "oil painting", "-o", str(out), "--steps", "4", "--seed", "3", "-q"])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (64, 80)
        text = im.text["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert "Denoising strength: 0.9999" in text and "Seed: 3" in text
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(models["base"])
    expected = pipe(PROMPTS[0], picture(64, 80), mask(64, 80), prompt_2="oil painting", num_inference_steps=4,
                    guidance_scale=7.5, seed=3, output_type="uint8").images[0]
    assert np.array_equal(pixels, expected)
