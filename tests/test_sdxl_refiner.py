"""The SDXL refiner (second text encoder only, aesthetic score) and the base + refiner ensemble
(denoising_end / denoising_start): export of a tiny refiner, and sdrt's pipelines vs diffusers' on the same
checkpoints and seeds; the number of steps each half runs; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference import DIFFUSERS_SCHEDULERS, load_pipes, reference
from test_img2img import picture

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.families import image_to_image_pipeline
from sdrt.runtime.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

PROMPT = "an astronaut riding a horse, 4k!"
STEPS = 10
# Heun, a 2nd-order solver: its timesteps repeat, and denoising_start never splits one of its steps.
SCHEDULERS = {**DIFFUSERS_SCHEDULERS, "heun": ("HeunDiscreteScheduler", {})}


@pytest.fixture(scope="module")
def xl_checkpoints(tiny) -> dict:
    return {"base": tiny.checkpoint("xl-base"), "refiner": tiny.checkpoint("xl-refiner")}


@pytest.fixture(scope="module")
def exported(tiny) -> dict:
    return {"base": tiny["xl-base"], "refiner": tiny["xl-refiner"]}


@pytest.fixture(scope="module")
def references(xl_checkpoints) -> dict:
    return {**load_pipes(diffusers.StableDiffusionXLPipeline, {"base": xl_checkpoints["base"]}),
            **load_pipes(diffusers.StableDiffusionXLImg2ImgPipeline, {"refiner": xl_checkpoints["refiner"]})}


def run_reference(pipe_and_scheduler, scheduler: str | None, seed: int, **kwargs):
    """diffusers' pipeline with the scheduler sdrt names (any output_type), from a torch generator of `seed`."""
    pipe, original = pipe_and_scheduler
    pipe.scheduler = original
    if scheduler is not None:
        cls_name, overrides = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def evaluations(pipe, **kwargs) -> tuple[object, list[float]]:
    """The pipeline's output and the timestep of each UNet evaluation it ran."""
    timesteps = []
    out = pipe(callback=lambda i, t, latents: timesteps.append(t), **kwargs)
    return out, timesteps


# -- export --------------------------------------------------------------------------------------


def test_refiner_exports_with_the_second_encoder_only(exported):
    folder = ModelFolder.open(exported["refiner"])
    assert "text_encoder" not in folder.components and "text_encoder_2" in folder.components
    assert not (folder.path / "tokenizer").exists() and (folder.path / "tokenizer_2" / "vocab.json").is_file()
    manifest = json.loads((folder.path / "sdrt.json").read_text())
    assert manifest["family"] == "stable-diffusion-xl"
    assert all(manifest["validation"][c]["passed"] for c in ("text_encoder_2", "unet", "vae_decoder", "vae_encoder"))
    assert folder.spec("unet").input("time_ids").shape == ("batch", 5)
    assert folder.spec("unet").input("encoder_hidden_states").shape[-1] == 48  # the second encoder's width alone
    assert type(image_to_image_pipeline(folder.path)) is StableDiffusionXLImg2ImgPipeline


# -- refiner img2img on a picture ------------------------------------------------------------------

REFINER_CASES = [
    (None, dict()),  # diffusers' default strength, 0.3
    (None, dict(strength=0.6, negative_prompt="blurry", aesthetic_score=7.5, negative_aesthetic_score=1.5)),
    ("dpm++2m-karras", dict(strength=0.8, guidance_scale=1.0, num_images_per_prompt=2)),
    ("ddim", dict(strength=0.5, original_size=(256, 128))),
    (None, dict(denoising_start=0.7)),  # diffusers allows a picture: encoded, and not noised
]


@pytest.mark.parametrize("scheduler,kwargs", REFINER_CASES,
                         ids=[f"{s or 'euler'}-{i}" for i, (s, _) in enumerate(REFINER_CASES)])
def test_refiner_img2img_matches_diffusers(references, exported, scheduler, kwargs):
    image = picture(96, 64)
    expected = reference(references["refiner"], scheduler, 99, prompt=PROMPT, image=image,
                         num_inference_steps=STEPS, **kwargs)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(exported["refiner"], scheduler=scheduler)
    got = pipe(PROMPT, image, seed=99, num_inference_steps=STEPS, output_type="np", **kwargs).images
    assert got.shape == expected.shape == (len(got), 64, 96, 3)
    assert np.abs(got - expected).max() < 1e-4


# -- the ensemble: base to denoising_end, refiner from denoising_start on its latents --------------

# scheduler -> the evaluations the base and the refiner run for 10 steps split at 0.8 (diffusers' cutoff 200)
ENSEMBLE_CASES = [
    (None, 0.8, (8, 2)),  # Euler, "leading" spacing: timesteps 901 .. 1; 201 >= 200 > 101
    ("dpm++2m-karras", 0.8, None),
    ("ddim", 0.8, (8, 2)),
    ("euler-a", 0.65, None),  # noise drawn in both halves
    ("heun", 0.8, (15, 5)),  # the base ends inside step 8 (its Euler half), the refiner re-runs that half
]


@pytest.mark.parametrize("scheduler,fraction,counts", ENSEMBLE_CASES,
                         ids=[f"{s or 'euler'}-{f}" for s, f, _ in ENSEMBLE_CASES])
def test_ensemble_matches_diffusers(references, exported, scheduler, fraction, counts):
    common = dict(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=96)
    expected_latents = run_reference(references["base"], scheduler, 5, denoising_end=fraction, output_type="latent",
                                     **common)
    base = StableDiffusionXLPipeline.from_pretrained(exported["base"], scheduler=scheduler)
    latents, base_steps = evaluations(base, seed=5, denoising_end=fraction, output_type="latent", **common)
    latents = latents.images
    assert latents.shape == tuple(expected_latents.shape) == (1, 4, 8, 12)
    np.testing.assert_allclose(latents, expected_latents.numpy(), atol=5e-4)  # DDIM drifts most: 2e-4 over 8 steps

    del common["height"], common["width"]
    expected = run_reference(references["refiner"], scheduler, 6, image=expected_latents, denoising_start=fraction,
                             output_type="np", **common)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(exported["refiner"], scheduler=scheduler)
    got, refiner_steps = evaluations(refiner, image=latents, seed=6, denoising_start=fraction, output_type="np",
                                     **common)
    assert got.images.shape == expected.shape == (1, 64, 96, 3)
    assert np.abs(got.images - expected).max() < 1e-3

    if base.scheduler.evaluations_per_step == 1:  # one schedule, split once
        np.testing.assert_array_equal(np.concatenate([base_steps, refiner_steps]), base.scheduler.plan(STEPS).timesteps)
    if counts is not None:
        assert (len(base_steps), len(refiner_steps)) == counts


def test_refiner_denoising_end_and_start_match_diffusers(references, exported):
    """Both cuts in one img2img call (a middle expert), on latents."""
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, denoising_start=0.3, denoising_end=0.7)
    expected = run_reference(references["refiner"], None, 8, image=torch.from_numpy(latents), output_type="latent",
                             **kwargs)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(exported["refiner"])
    got, steps = evaluations(pipe, image=latents, seed=8, output_type="latent", **kwargs)
    np.testing.assert_allclose(got.images, expected.numpy(), atol=1e-4)
    assert steps == [601.0, 501.0, 401.0, 301.0]  # cutoffs 700 (start: t < 700) and 300 (end: t >= 300)


# -- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(denoising_start=1.0), r"denoising_start must be a number in \(0, 1\)"),
    (dict(denoising_start=0), r"denoising_start must be a number in \(0, 1\)"),
    (dict(denoising_end="0.8"), r"denoising_end must be a number in \(0, 1\)"),
    (dict(denoising_start=0.8, denoising_end=0.8), "denoising_start=0.8 must be below denoising_end=0.8"),
    (dict(denoising_start=0.9999), "denoising_start=0.9999 starts after the last timestep"),
    (dict(denoising_end=0.01, strength=1.0, num_inference_steps=1), "denoising_end=0.01 ends before the first timestep"),
    (dict(prompt_2="oil painting"), "has one text encoder.*leave prompt_2 and negative_prompt_2 out"),
    (dict(image=np.zeros((1, 3, 8, 8), np.float32)), "latents must be NCHW with the VAE's 4 channels"),
])
def test_refiner_bad_inputs(exported, kwargs, message):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(exported["refiner"])
    with pytest.raises(InvalidInputError, match=message):
        pipe(**{"prompt": PROMPT, "image": picture(), "num_inference_steps": 4, **kwargs})


def test_base_refuses_a_denoising_end_outside_the_unit_interval(exported):
    pipe = StableDiffusionXLPipeline.from_pretrained(exported["base"])
    for value in (1, 1.5, True):
        with pytest.raises(InvalidInputError, match="denoising_end must be a number in"):
            pipe(PROMPT, num_inference_steps=2, denoising_end=value)


# -- the command line: sdrt generate BASE --refiner REFINER ---------------------------------------


def test_cli_base_and_refiner_is_the_api_ensemble(exported, tmp_path):
    """`--refiner` runs the ensemble tested against diffusers above: base to 0.8 (or --high-noise-frac), refiner
    from there on the base's latents, the same seed; the PNG is the API's image."""
    from PIL import Image

    from sdrt.runtime.cli import main

    base = StableDiffusionXLPipeline.from_pretrained(exported["base"])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(exported["refiner"])
    images = {}
    for fraction in (None, 0.5):
        out = tmp_path / f"ensemble-{fraction}.png"
        extra = [] if fraction is None else ["--high-noise-frac", str(fraction)]
        assert main(["generate", str(exported["base"]), PROMPT, "--refiner", str(exported["refiner"]), "--steps",
                     str(STEPS), "--seed", "4", "--negative", "blurry", "-o", str(out), "-q", *extra]) == 0
        images[fraction] = np.asarray(Image.open(out).convert("RGB"))
        cut = 0.8 if fraction is None else fraction
        latents = base(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, seed=4, denoising_end=cut,
                       output_type="latent").images
        expected = refiner(PROMPT, latents, negative_prompt="blurry", num_inference_steps=STEPS, seed=4,
                           denoising_start=cut, output_type="pil").images[0]
        np.testing.assert_array_equal(images[fraction], np.asarray(expected.convert("RGB")))
    assert np.abs(images[None].astype(int) - images[0.5]).max() > 0  # the hand-over point matters


@pytest.mark.parametrize("args,message", [
    (["--high-noise-frac", "0.7"], "--high-noise-frac applies only with --refiner"),
    (["--refiner", "{picture}"], "is not a folder"),
    (["--refiner", "{refiner}", "--high-noise-frac", "1.2"], r"denoising_end must be a number in \(0, 1\)"),
])
def test_cli_refiner_bad_inputs(exported, tmp_path, capsys, args, message):
    import re

    from PIL import Image

    from sdrt.runtime.cli import main

    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    args = [a.format(refiner=exported["refiner"], picture=tmp_path / "in.png") for a in args]
    assert main(["generate", str(exported["base"]), PROMPT, "--steps", "2", "-o", str(tmp_path / "x.png"), "-q",
                 *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_cli_refiner_with_a_picture_is_the_api_ensemble(exported, tmp_path, inpaint):
    """`--image [--mask] --refiner`: the base's img2img or inpainting to 0.8, then the refiner's on its latents
    (with the same mask), the same PNG as through the API (both halves are diffusers-parity tested)."""
    from PIL import Image
    from test_inpaint import mask as make_mask

    from sdrt.runtime.cli import main
    from sdrt.runtime.sdxl_inpaint import StableDiffusionXLInpaintPipeline

    picture().save(tmp_path / "in.png")
    make_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    extra = ["--mask", str(tmp_path / "mask.png")] if inpaint else ["--strength", "0.6"]
    assert main(["generate", str(exported["base"]), PROMPT, "--image", str(tmp_path / "in.png"), *extra,
                 "--refiner", str(exported["refiner"]), "--steps", str(STEPS), "--seed", "4", "-o", str(out),
                 "-q"]) == 0
    cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
    masks = (make_mask(),) if inpaint else ()
    strength = {} if inpaint else {"strength": 0.6}
    latents = cls.from_pretrained(exported["base"])(PROMPT, picture(), *masks, num_inference_steps=STEPS, seed=4,
                                                    denoising_end=0.8, output_type="latent", **strength).images
    expected = cls.from_pretrained(exported["refiner"])(PROMPT, latents, *masks, num_inference_steps=STEPS, seed=4,
                                                        denoising_start=0.8, output_type="pil").images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected.convert("RGB")))
