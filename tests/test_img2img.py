"""Image-to-image parity: sdrt's StableDiffusionImg2ImgPipeline on the exported folder vs diffusers'
StableDiffusionImg2ImgPipeline on the same checkpoint, image and seed; its bad inputs; `sdrt generate --image`."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.runtime.cli import main
from reference import load_pipes, reference

IMG2IMG_SCHEDULERS = ("ddim", "euler-a", "dpm++2m-karras")
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
STEPS = 8  # strength 0.3 runs 2 steps, 0.75 runs 6, 1.0 all 8


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: a colour gradient with a disc and a bar on it."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                       np.full_like(x, 40 + 60 * seed, dtype=float)], axis=-1)
    image = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8 + 4 * seed, 10, 36 + 4 * seed, 38), fill=(230, 30, 40))
    draw.rectangle((30, 44 - 6 * seed, 58, 54), fill=(20, 200, 90))
    return image


@pytest.fixture(scope="module")
def reference_pipes(checkpoints):
    return load_pipes(diffusers.StableDiffusionImg2ImgPipeline, checkpoints)


def ours(exported, scheduler: str | None, seed: int, **kwargs) -> np.ndarray:
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported, scheduler=scheduler)
    return pipe(seed=seed, output_type="np", **kwargs).images


# Every flavour x scheduler x strength; guidance and images per prompt vary along the grid.
GRID = [
    (flavour, scheduler, strength, dict(prompt=PROMPTS[k % 2], guidance_scale=(7.5, 1.0, 0.0)[k % 3],
                                        num_images_per_prompt=1 + k % 2))
    for k, (flavour, scheduler, strength) in enumerate(
        (f, s, st) for f in ("sd1", "sd2") for s in IMG2IMG_SCHEDULERS for st in (0.3, 0.75, 1.0)
    )
]
CASES = [
    *GRID,
    ("sd1", None, 0.75, dict(prompt=PROMPTS[0], guidance_scale=7.5)),  # the checkpoint's PNDM
    ("sd2", None, 0.6, dict(prompt=PROMPTS[1], guidance_scale=5.0, num_images_per_prompt=2)),
    ("sd1", "euler-a", 0.75, dict(prompt=PROMPTS, negative_prompt=["blurry", "ugly"], guidance_scale=6.0,
                                  num_images_per_prompt=2)),
    # diffusers' img2img has no guidance_rescale (it swallows the argument), so no case sets it here.
    ("sd2", "ddim", 0.75, dict(prompt=PROMPTS[0], negative_prompt="blurry", guidance_scale=7.0, eta=1.0)),
]


@pytest.mark.parametrize("flavour,scheduler,strength,kwargs", CASES,
                         ids=[f"{f}-{s or 'default'}-{st}-{i}" for i, (f, s, st, _) in enumerate(CASES)])
def test_images_match_diffusers(reference_pipes, exported, flavour, scheduler, strength, kwargs):
    seed = 4321
    image = picture()
    expected = reference(reference_pipes[flavour], scheduler, seed, image=image, strength=strength,
                         num_inference_steps=STEPS, **kwargs)
    got = ours(exported[flavour], scheduler, seed, image=image, strength=strength, num_inference_steps=STEPS,
               **kwargs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


def test_one_image_per_output_matches_diffusers(reference_pipes, exported):
    """Two prompts, two images: image k goes with prompt k, and the latent sample is drawn for both at once."""
    images = [picture(seed=0), picture(seed=1)]
    kwargs = dict(prompt=PROMPTS, image=images, strength=0.75, num_inference_steps=STEPS, guidance_scale=7.5)
    expected = reference(reference_pipes["sd1"], "dpm++2m-karras", 99, **kwargs)
    got = ours(exported["sd1"], "dpm++2m-karras", 99, **kwargs)
    assert np.abs(got - expected).max() < 1e-3


def test_output_has_the_image_size_and_parameters_name_the_strength(exported):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"], scheduler="ddim")
    out = pipe(PROMPTS[0], picture(96, 64), strength=0.5, num_inference_steps=4, seed=2, output_type="uint8")
    assert out.images.shape == (1, 64, 96, 3)
    assert "Denoising strength: 0.5" in out.parameters[0] and "Size: 96x64" in out.parameters[0]
    assert out.timings["steps"] == 2 and "vae_encoder" in out.timings


@pytest.fixture(scope="module")
def img2img_sd1(exported):
    return StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"], scheduler="ddim")


@pytest.mark.parametrize("kwargs,message", [
    (dict(strength=0.0), r"strength must be a number in \(0, 1\], got 0.0"),
    (dict(strength=1.5), r"strength must be a number in \(0, 1\]"),
    (dict(strength=-0.2), r"strength must be a number in \(0, 1\]"),
    (dict(strength="0.5"), r"strength must be a number in \(0, 1\]"),
    (dict(strength=0.1), "leaves no step to run"),
    (dict(image=picture().convert("RGBA")), "transparency"),
    (dict(image=picture().convert("L")), "mode L, not RGB"),
    (dict(image=picture(64, 72)), "image height=72 is not a multiple of 16 px.*nearest valid sizes: 64 or 80"),
    (dict(image=picture(40, 64)), "image width=40 is not a multiple of 16"),
    (dict(image=None), "expected a PIL image"),
    (dict(prompt=PROMPTS, image=[picture()] * 3), "got 3 images for 2 prompts"),
    (dict(prompt=PROMPTS, image=[picture()] * 2, num_images_per_prompt=2), "got 2 images for 2 prompts x 2"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    (dict(output_type="jpeg"), "output_type must be one of"),
])
def test_bad_inputs(img2img_sd1, kwargs, message):
    arguments = {"prompt": PROMPTS[0], "image": picture(), "strength": 0.5, "num_inference_steps": 5, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        img2img_sd1(**arguments)


def test_folder_without_vae_encoder_is_named(exported, tmp_path):
    folder = tmp_path / "no-encoder"
    shutil.copytree(exported["sd1"], folder)
    shutil.rmtree(folder / "vae_encoder")
    (folder / "sdrt.json").unlink()  # its file list names the encoder; an optimum-like folder has none
    with pytest.raises(ModelFolderError, match="lacks vae_encoder/model.onnx, which img2img needs"):
        StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    StableDiffusionPipeline.from_pretrained(folder)  # txt2img does not need it


def test_generate_with_image(exported, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(64, 80).save(source)
    out = tmp_path / "out.png"
    rc = main(["generate", str(exported["sd1"]), "a red circle", "--image", str(source), "--strength", "0.6",
               "-o", str(out), "--steps", "5", "--seed", "3", "--scheduler", "euler-a", "-q"])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (64, 80)
        text = im.text["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert "Denoising strength: 0.6" in text and "Seed: 3" in text and "Size: 64x80" in text
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"], scheduler="euler-a")
    expected = pipe("a red circle", picture(64, 80), strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                    seed=3, output_type="uint8").images[0]
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("extra,message", [
    (["--strength", "0.5"], "--strength applies only with --image"),
    (["--image", "{src}", "--size", "64x64"], "--size does not apply with --image"),
    (["--image", "{missing}"], "cannot read --image"),
    (["--image", "{src}", "--strength", "1.5"], r"strength must be a number in \(0, 1\]"),
])
def test_generate_image_options_errors(exported, tmp_path, capsys, extra, message):
    source = tmp_path / "in.png"
    picture().save(source)
    extra = [a.format(src=source, missing=tmp_path / "nope.png") for a in extra]
    rc = main(["generate", str(exported["sd1"]), "x", "-o", str(tmp_path / "o.png"), "--steps", "2", "-q", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "o.png").exists()
