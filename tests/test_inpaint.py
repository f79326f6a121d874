"""Inpainting parity: sdrt's StableDiffusionInpaintPipeline on exported folders vs diffusers'
StableDiffusionInpaintPipeline on the same checkpoints, pictures, masks and seeds, for a dedicated
inpainting UNet (9 input channels) and ordinary UNets (4, blending); its bad inputs; `sdrt generate --mask`."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference import load_pipes, reference
from test_img2img import picture

from sdrt.runtime.cli import main
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.inpaint import StableDiffusionInpaintPipeline
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
STEPS = 6  # strength 0.6 runs 3 steps


def mask(width: int = 64, height: int = 64, soft: bool = False, shift: int = 0) -> Image.Image:
    """White (repaint) over a box and a disc on black (keep); `soft` adds grey levels either side of 0.5."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((16 + shift, 8, 44 + shift, 36), fill=255)
    if soft:
        draw.ellipse((30, 30, min(width, 70), 60), fill=150)  # >= 128: repainted
        draw.rectangle((0, height - 14, 12, height - 1), fill=100)  # < 128: kept
    return image


@pytest.fixture(scope="module")
def inpaint_checkpoint(tiny):
    return tiny.checkpoint("sd1-inpaint")


@pytest.fixture(scope="module")
def models(exported, tiny):
    """name -> exported folder: "inpaint" (9-channel UNet), "sd1" and "sd2" (ordinary 4-channel UNets)."""
    return {"inpaint": tiny["sd1-inpaint"], "sd1": exported["sd1"], "sd2": exported["sd2"]}


@pytest.fixture(scope="module")
def reference_pipes(checkpoints, inpaint_checkpoint):
    return load_pipes(diffusers.StableDiffusionInpaintPipeline, {"inpaint": inpaint_checkpoint, **checkpoints})


def ours(folder, scheduler: str | None, seed: int, **kwargs):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, scheduler=scheduler)
    return pipe(seed=seed, output_type="np", **kwargs).images


def test_the_inpainting_export_has_a_9_channel_unet(models):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(models["inpaint"])
    assert pipe.folder.pipeline == "StableDiffusionInpaintPipeline"
    assert pipe.folder.spec("unet").inputs[0].shape[1] == 9
    assert pipe.is_inpainting_unet
    assert not StableDiffusionInpaintPipeline.from_pretrained(models["sd1"]).is_inpainting_unet


# (model, scheduler, strength, arguments); guidance, soft masks, sizes and batches vary along the list.
CASES = [
    (model, scheduler, strength, dict(prompt=PROMPTS[k % 2], guidance_scale=(7.5, 1.0)[k % 2],
                                      num_images_per_prompt=1 + (k // 2) % 2, mask_image=mask(soft=k % 3 == 0)))
    for k, (model, scheduler, strength) in enumerate(
        (m, s, st) for m in ("inpaint", "sd1", "sd2") for s in (None, "euler-a", "dpm++2m-karras")
        for st in (1.0, 0.6)
    )
]
CASES += [
    ("inpaint", "ddim", 0.6, dict(prompt=PROMPTS[0], negative_prompt="blurry", guidance_scale=7.0, eta=1.0,
                                  mask_image=mask(soft=True))),
    ("sd1", "ddim", 1.0, dict(prompt=PROMPTS, negative_prompt=["blurry", "ugly"], guidance_scale=6.0,
                              num_images_per_prompt=2, mask_image=mask())),
]


@pytest.mark.parametrize("model,scheduler,strength,kwargs", CASES,
                         ids=[f"{m}-{s or 'default'}-{st}-{i}" for i, (m, s, st, _) in enumerate(CASES)])
def test_images_match_diffusers(reference_pipes, models, model, scheduler, strength, kwargs):
    seed = 1234
    arguments = dict(image=picture(), strength=strength, num_inference_steps=STEPS, height=64, width=64, **kwargs)
    expected = reference(reference_pipes[model], scheduler, seed, **arguments)
    got = ours(models[model], scheduler, seed, **arguments)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("model", ["inpaint", "sd1"])
def test_non_square_image_matches_diffusers(reference_pipes, models, model):
    """diffusers sizes the output from height/width (default: the model's size); sdrt from the picture."""
    arguments = dict(prompt=PROMPTS[1], image=picture(96, 64), mask_image=mask(96, 64, soft=True, shift=30),
                     strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5)
    expected = reference(reference_pipes[model], "euler-a", 7, height=64, width=96, **arguments)
    got = ours(models[model], "euler-a", 7, **arguments)
    assert got.shape == expected.shape == (1, 64, 96, 3)
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("model", ["inpaint", "sd1"])
def test_one_image_and_mask_per_prompt_match_diffusers(reference_pipes, models, model):
    arguments = dict(prompt=PROMPTS, image=[picture(seed=0), picture(seed=1)], mask_image=[mask(), mask(shift=12)],
                     strength=1.0, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64)
    expected = reference(reference_pipes[model], "dpm++2m-karras", 99, **arguments)
    got = ours(models[model], "dpm++2m-karras", 99, **arguments)
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("model", ["inpaint", "sd1"])
def test_padding_mask_crop_matches_diffusers(reference_pipes, models, model):
    """Repaint a box around the mask at full resolution, paste it back: only PIL output in diffusers."""
    image = picture(128, 96)
    crop_mask = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(crop_mask).ellipse((80, 50, 110, 76), fill=255)
    arguments = dict(prompt=PROMPTS[0], image=image, mask_image=crop_mask, padding_mask_crop=6, strength=1.0,
                     num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64)
    pipe, original = reference_pipes[model]
    pipe.scheduler = original
    expected = pipe(generator=torch.Generator("cpu").manual_seed(3), **arguments).images[0]
    got = StableDiffusionInpaintPipeline.from_pretrained(models[model])(seed=3, **arguments).images[0]
    assert got.size == expected.size == (128, 96)
    difference = np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1  # uint8 rounding of values within 1e-3
    outside = np.asarray(crop_mask) == 0  # the original picture, untouched, wherever the mask is black
    assert np.array_equal(np.asarray(got)[outside], np.asarray(image)[outside])


def test_kept_latents_are_the_pictures_whatever_the_prompt(models):
    """With a 4-channel UNet the final latents outside the mask are the picture's latents, exactly."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(models["sd1"], scheduler="ddim")
    a = pipe(PROMPTS[0], picture(), mask(), num_inference_steps=4, seed=1, output_type="latent")
    b = pipe(PROMPTS[1], picture(), mask(), num_inference_steps=4, seed=1, output_type="latent")
    repainted = np.zeros((8, 8), bool)
    repainted[1:5, 2:6] = True  # the box (16..44, 8..36) px, at 8 px per latent cell (nearest)
    assert np.array_equal(a.images[..., ~repainted], b.images[..., ~repainted])
    assert not np.allclose(a.images[..., repainted], b.images[..., repainted])
    assert "Denoising strength: 1" in a.parameters[0] and a.timings["steps"] == 4 and "vae_encoder" in a.timings


def test_array_inputs_are_read_as_their_pil_images(models):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(models["inpaint"], scheduler="ddim")
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=3, seed=4, output_type="np")
    from_pil = pipe(image=picture(), mask_image=mask(soft=True), **kwargs).images
    from_arrays = pipe(image=np.asarray(picture()), mask_image=np.asarray(mask(soft=True)), **kwargs).images
    assert np.array_equal(from_pil, from_arrays)


@pytest.fixture(scope="module")
def inpaint_sd1(models):
    return StableDiffusionInpaintPipeline.from_pretrained(models["inpaint"], scheduler="ddim")


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_image=mask(64, 48)), "mask is 64x48 but image 0 is 64x64; a mask must have its image's size"),
    (dict(strength=0.0), r"strength must be a number in \(0, 1\], got 0.0"),
    (dict(strength=1.5), r"strength must be a number in \(0, 1\]"),
    (dict(strength="0.5"), r"strength must be a number in \(0, 1\]"),
    (dict(strength=0.1), "leaves no step to run"),
    (dict(image=picture().convert("RGBA")), "image 0 has transparency"),
    (dict(image=picture().convert("L")), "mode L, not RGB"),
    (dict(image=picture().convert("CMYK")), "mode CMYK, not RGB"),
    (dict(mask_image=mask().convert("RGBA")), "mask 0 has transparency"),
    (dict(mask_image=mask().convert("I")), "mask 0 has mode I"),
    (dict(mask_image=np.zeros((64, 64), np.float32)), "arrays must be HW or HWC"),
    (dict(mask_image=None), "mask_image is missing"),
    (dict(image=[]), "image is an empty list"),
    (dict(image=[picture()] * 2, mask_image=[mask()] * 3), "got 3 masks for 2 images"),
    (dict(image=picture(64, 72), mask_image=mask(64, 72)), "height=72 is not a multiple of 16"),
    (dict(height=64, width=40), "width=40 is not a multiple of 16"),
    (dict(prompt=PROMPTS, image=[picture()] * 3, mask_image=mask()), "got 3 images for 2 prompts"),
    (dict(padding_mask_crop=4, output_type="np"), "output_type must be 'pil' or 'uint8'"),
    (dict(padding_mask_crop=-1), "padding_mask_crop must be an integer >= 0"),
    (dict(padding_mask_crop=4, mask_image=Image.new("L", (64, 64))), "this mask is all black"),
    (dict(padding_mask_crop=4, image=[picture()] * 2), "padding_mask_crop takes one image and one mask"),
])
def test_bad_inputs(inpaint_sd1, kwargs, message):
    arguments = {"prompt": PROMPTS[0], "image": picture(), "mask_image": mask(), "num_inference_steps": 5,
                 "output_type": "uint8", **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        inpaint_sd1(**arguments)


def test_txt2img_only_export_is_refused(models, tmp_path):
    """A folder exported without the VAE encoder cannot read the picture; say so before any work."""
    folder = tmp_path / "no-encoder"
    shutil.copytree(models["sd1"], folder)
    shutil.rmtree(folder / "vae_encoder")
    (folder / "sdrt.json").unlink()  # its file list names the encoder; an optimum-like folder has none
    with pytest.raises(ModelFolderError, match="lacks vae_encoder/model.onnx, which inpainting needs"):
        StableDiffusionInpaintPipeline.from_pretrained(folder)


def test_other_families_are_refused(models, tmp_path):
    folder = tmp_path / "lcm"
    shutil.copytree(models["sd1"], folder)
    (folder / "sdrt.json").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "LatentConsistencyModelPipeline"}))
    with pytest.raises(UnsupportedConfigError, match="is a latent-consistency model.*inpainting runs Stable Diff"):
        StableDiffusionInpaintPipeline.from_pretrained(folder)


@pytest.mark.parametrize("cls", [StableDiffusionPipeline, StableDiffusionImg2ImgPipeline])
def test_inpainting_model_is_refused_by_the_other_pipelines(models, cls):
    with pytest.raises(UnsupportedConfigError, match="takes 9 input channels.*an inpainting model"):
        cls.from_pretrained(models["inpaint"])


def test_generate_with_mask(models, tmp_path, capsys):
    source, mask_path, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    picture(64, 80).save(source)
    mask(64, 80).save(mask_path)
    rc = main(["generate", str(models["inpaint"]), "a red circle", "--image", str(source), "--mask", str(mask_path),
               "--strength", "0.8", "-o", str(out), "--steps", "5", "--seed", "3", "--scheduler", "euler-a", "-q"])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (64, 80)
        text = im.text["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert "Denoising strength: 0.8" in text and "Seed: 3" in text and "Size: 64x80" in text
    pipe = StableDiffusionInpaintPipeline.from_pretrained(models["inpaint"], scheduler="euler-a")
    expected = pipe("a red circle", picture(64, 80), mask(64, 80), strength=0.8, num_inference_steps=5,
                    guidance_scale=7.5, seed=3, output_type="uint8").images[0]
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("extra,message", [
    (["--mask", "{mask}"], "--mask applies only with --image"),
    (["--image", "{src}", "--mask", "{missing}"], "cannot read --mask"),
    (["--image", "{src}", "--mask", "{small}"], "mask is 32x32 but image 0 is 64x64"),
    (["--image", "{src}", "--mask", "{mask}", "--strength", "0"], r"strength must be a number in \(0, 1\]"),
    (["--image", "{src}"], "takes 9 input channels.*an inpainting model"),
])
def test_generate_mask_options_errors(models, tmp_path, capsys, extra, message):
    source, mask_path, small = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "small.png"
    picture().save(source)
    mask().save(mask_path)
    mask(32, 32).save(small)
    extra = [a.format(src=source, mask=mask_path, small=small, missing=tmp_path / "nope.png") for a in extra]
    rc = main(["generate", str(models["inpaint"]), "x", "-o", str(tmp_path / "o.png"), "--steps", "2", "-q", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "o.png").exists()
