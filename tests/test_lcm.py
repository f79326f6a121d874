"""Latent Consistency Models: a tiny LCM checkpoint (UNet with time_cond_proj_dim, LCMScheduler) exported by
sdrt and run by sdrt.runtime.lcm, against diffusers' LatentConsistencyModelPipeline on the same weights and
seed; the guidance embedding against diffusers'; the folder picks the pipeline; bad inputs; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.runtime.cli import main
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.families import text_to_image_class
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.lcm import LatentConsistencyPipeline, guidance_scale_embedding
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]


@pytest.fixture(scope="module")
def lcm_checkpoint(tiny):
    return tiny.checkpoint("lcm")


@pytest.fixture(scope="module")
def lcm_folder(tiny):
    return tiny["lcm"]


@pytest.fixture(scope="module")
def reference_pipe(lcm_checkpoint):
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(lcm_folder):
    return LatentConsistencyPipeline.from_pretrained(lcm_folder)


CASES = [
    (1, dict(prompt=PROMPTS[0], guidance_scale=8.5)),
    (2, dict(prompt=PROMPTS[1], guidance_scale=1.0, num_images_per_prompt=2)),
    (4, dict(prompt=PROMPTS, guidance_scale=3.0)),
    (4, dict(prompt=PROMPTS[0], guidance_scale=8.5, height=64, width=96)),
]


@pytest.mark.parametrize("steps,kwargs", CASES, ids=[f"{s}-steps-{i}" for i, (s, _) in enumerate(CASES)])
def test_images_match_diffusers(reference_pipe, ours, steps, kwargs):
    seed = 1234
    expected = reference_pipe(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                              output_type="np", **kwargs).images
    got = ours(num_inference_steps=steps, seed=seed, output_type="np", **kwargs).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


def test_guidance_reaches_the_unet(ours):
    """guidance_scale is an input of the UNet (its embedding), so it changes the picture at no extra cost."""
    a = ours(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, seed=3, output_type="np")
    b = ours(PROMPTS[0], num_inference_steps=2, guidance_scale=8.5, seed=3, output_type="np")
    assert np.abs(a.images - b.images).max() > 1e-3
    assert a.timings["steps"] == b.timings["steps"] == 2


@pytest.mark.parametrize("dim", [32, 256, 33])
def test_guidance_embedding_matches_diffusers(reference_pipe, dim):
    """Equal up to float32 rounding of the angles 1000 w f_k: a few ulps of an angle of 1000 w radians."""
    w = torch.tensor([0.0, 0.5, 1.0, 7.5, 14.0])
    expected = reference_pipe.get_guidance_scale_embedding(w, embedding_dim=dim).numpy()
    got = guidance_scale_embedding(w.numpy(), dim)
    assert got.shape == expected.shape == (5, dim) and got.dtype == np.float32
    ulps = 4 * np.finfo(np.float32).eps * 1000 * w.numpy()[:, None]
    assert (np.abs(got - expected) <= ulps + 1e-6).all()


def test_export_records_the_family_and_the_timestep_cond_input(lcm_folder):
    manifest = json.loads((lcm_folder / "sdrt.json").read_text())
    assert manifest["family"] == "latent-consistency"
    inputs = [t["name"] for t in manifest["components"]["unet"]["spec"]["inputs"]]
    assert [n for n in inputs if "residual" not in n] == ["sample", "timestep", "encoder_hidden_states",
                                                          "timestep_cond"]
    assert inputs[-1] == "mid_block_additional_residual"  # and a ControlNet's residuals, zeros without one
    assert manifest["validation"]["unet"]["passed"]
    folder = ModelFolder.open(lcm_folder)
    assert folder.family == "latent-consistency" and folder.scheduler_config["_class_name"] == "LCMScheduler"


def test_the_folder_picks_its_pipeline(lcm_folder, exported):
    assert text_to_image_class(ModelFolder.open(lcm_folder)) is LatentConsistencyPipeline
    assert text_to_image_class(ModelFolder.open(exported["sd1"])) is StableDiffusionPipeline


def test_lcm_pipeline_refuses_a_folder_without_the_guidance_embedding(exported):
    with pytest.raises(ModelFolderError, match="no time_cond_proj_dim .* not a Latent Consistency Model"):
        LatentConsistencyPipeline.from_pretrained(exported["sd1"])


@pytest.mark.parametrize("cls", [StableDiffusionPipeline, StableDiffusionImg2ImgPipeline])
def test_other_pipelines_refuse_an_lcm_folder(lcm_folder, cls):
    with pytest.raises(UnsupportedConfigError, match="Latent Consistency Model .*LatentConsistencyPipeline"):
        cls.from_pretrained(lcm_folder)


def test_bad_inputs_are_explained(ours):
    with pytest.raises(InvalidInputError, match="no negative_prompt: its guidance is distilled"):
        ours(PROMPTS[0], negative_prompt="blurry", num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="exceeds the LCM's original_inference_steps=50"):
        ours(PROMPTS[0], num_inference_steps=51)
    with pytest.raises(InvalidInputError, match="guidance_scale must be >= 0"):
        ours(PROMPTS[0], guidance_scale=-1.0, num_inference_steps=1)


def test_cli_generates_with_the_lcm_pipeline(lcm_folder, ours, tmp_path, capsys):
    out = tmp_path / "lcm.png"
    rc = main(["generate", str(lcm_folder), PROMPTS[0], "-o", str(out), "--steps", "2", "--guidance", "6",
               "--seed", "7", "-q"])
    assert rc == 0
    expected = ours(PROMPTS[0], num_inference_steps=2, guidance_scale=6.0, seed=7, output_type="uint8").images[0]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), expected)
        assert "Steps: 2" in im.text["parameters"]


def test_cli_explains_lcm_bad_options(lcm_folder, tmp_path, capsys):
    rc = main(["generate", str(lcm_folder), "x", "-o", str(tmp_path / "a.png"), "--negative", "blurry", "-q"])
    assert rc == 2
    assert "no negative_prompt" in capsys.readouterr().err
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 40)).save(picture)
    for options, message in [(["--negative", "blurry"], "no negative_prompt"),
                             (["--steps", "41"], "exceeds the 40 distillation timesteps that strength=0.8 keeps")]:
        rc = main(["generate", str(lcm_folder), "x", "-o", str(tmp_path / "a.png"), "--image", str(picture), "-q",
                   *options])
        assert rc == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("a*.png"))


def test_info_shows_the_family(lcm_folder, capsys):
    assert main(["info", str(lcm_folder)]) == 0
    assert "latent-consistency (LatentConsistencyModelPipeline)" in capsys.readouterr().out


# --- img2img: LatentConsistencyImg2ImgPipeline vs diffusers' LatentConsistencyModelImg2ImgPipeline ----------------

from sdrt.runtime.families import image_to_image_class  # noqa: E402
from sdrt.runtime.lcm import LatentConsistencyImg2ImgPipeline  # noqa: E402
from sdrt.runtime.schedulers import load_scheduler  # noqa: E402


def lcm_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic RGB picture: a colour gradient with a dark square."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 90.0)], axis=-1)
    pixels[height // 4:height // 2, width // 4:width // 2] = (20, 40, 200)
    return Image.fromarray(pixels.round().astype(np.uint8))


@pytest.fixture(scope="module")
def reference_img2img(reference_pipe):
    pipe = diffusers.LatentConsistencyModelImg2ImgPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours_img2img(lcm_folder):
    return LatentConsistencyImg2ImgPipeline.from_pretrained(lcm_folder)


STRENGTH_PLANS = [(1, 0.5), (2, 0.5), (4, 0.5), (2, 0.8), (4, 0.8), (8, 0.3), (3, 0.77), (6, 0.12), (15, 0.3),
                  (4, 1.0), (50, 1.0)]


@pytest.mark.parametrize("original", [50, 20])
@pytest.mark.parametrize("steps,strength", STRENGTH_PLANS)
def test_strength_plan_matches_diffusers(reference_pipe, steps, strength, original):
    """Scheduler.plan(strength_in_schedule=True) is LCMScheduler.set_timesteps(n, strength=): same timesteps and
    add_noise at the first of them (the point img2img noises the picture to)."""
    config = {**reference_pipe.scheduler.config, "original_inference_steps": original}
    reference = diffusers.LCMScheduler.from_config(config)
    if steps > int(original * strength):
        with pytest.raises(ValueError):
            reference.set_timesteps(steps, strength=strength)
        with pytest.raises(InvalidInputError, match=f"num_inference_steps={steps} exceeds the "):
            load_scheduler(config, "lcm").plan(steps, strength=strength, strength_in_schedule=True)
        return
    reference.set_timesteps(steps, strength=strength)
    sched = load_scheduler(config, "lcm")
    plan = sched.plan(steps, strength=strength, strength_in_schedule=True)
    np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy())
    assert plan.num_inference_steps == steps
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(steps))
    expected = reference.add_noise(x0, noise, reference.timesteps[:1]).numpy()
    np.testing.assert_allclose(sched.add_noise(plan, x0.numpy(), noise.numpy(), 0), expected, rtol=0, atol=1e-6)


def test_strength_plan_is_lcm_only_and_leaves_the_cut_plan_alone(reference_pipe):
    """Without strength_in_schedule lcm still cuts its full schedule (diffusers' StableDiffusionImg2ImgPipeline
    with an LCMScheduler, e.g. LCM-LoRA); other solvers refuse a schedule built for strength."""
    sched = load_scheduler(reference_pipe.scheduler.config, "lcm")
    np.testing.assert_array_equal(sched.plan(4, strength=0.5).timesteps, sched.plan(4).timesteps[2:])
    with pytest.raises(InvalidInputError, match="euler scheduler has no schedule built for an img2img strength"):
        load_scheduler(reference_pipe.scheduler.config, "euler").plan(4, strength=0.5, strength_in_schedule=True)


IMG2IMG_CASES = [
    (2, 0.5, dict(prompt=PROMPTS[0], guidance_scale=8.5)),
    (4, 0.5, dict(prompt=PROMPTS[1], guidance_scale=1.0)),
    (2, 0.8, dict(prompt=PROMPTS[1], guidance_scale=3.0, num_images_per_prompt=2)),
    (4, 0.8, dict(prompt=PROMPTS[0], guidance_scale=8.5)),
    (4, 0.8, dict(prompt=PROMPTS, guidance_scale=1.0)),
    (1, 0.3, dict(prompt=PROMPTS[0], guidance_scale=6.0, size=(96, 64))),
    (4, 1.0, dict(prompt=PROMPTS[1], guidance_scale=3.0)),
]


@pytest.mark.parametrize("steps,strength,kwargs", IMG2IMG_CASES,
                         ids=[f"{s}-steps-{st}-{i}" for i, (s, st, _) in enumerate(IMG2IMG_CASES)])
def test_img2img_images_match_diffusers(reference_img2img, ours_img2img, steps, strength, kwargs):
    seed = 4321
    kwargs = dict(kwargs)
    image = lcm_picture(*kwargs.pop("size", (64, 64)))
    expected = reference_img2img(image=image, strength=strength, num_inference_steps=steps, output_type="np",
                                 generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    got = ours_img2img(image=image, strength=strength, num_inference_steps=steps, seed=seed, output_type="np",
                       **kwargs)
    assert got.images.shape == expected.shape
    assert np.abs(got.images - expected).max() < 1e-3
    assert got.timings["steps"] == steps  # all the steps run: the schedule is built for strength, not cut


def test_img2img_strength_and_guidance_change_the_picture(ours_img2img):
    image = lcm_picture()
    run = lambda **kw: ours_img2img(PROMPTS[0], image, num_inference_steps=2, seed=5, output_type="np", **kw).images
    base = run(strength=0.5, guidance_scale=8.5)
    assert np.abs(base - run(strength=0.8, guidance_scale=8.5)).max() > 1e-3
    assert np.abs(base - run(strength=0.5, guidance_scale=1.0)).max() > 1e-3


def test_the_folder_picks_its_img2img_pipeline(lcm_folder, exported):
    assert image_to_image_class(ModelFolder.open(lcm_folder)) is LatentConsistencyImg2ImgPipeline
    assert image_to_image_class(ModelFolder.open(exported["sd1"])) is StableDiffusionImg2ImgPipeline
    with pytest.raises(ModelFolderError, match="not a Latent Consistency Model"):
        LatentConsistencyImg2ImgPipeline.from_pretrained(exported["sd1"])


def test_img2img_bad_inputs_are_explained(ours_img2img, lcm_folder):
    image = lcm_picture()
    with pytest.raises(InvalidInputError, match="no negative_prompt: its guidance is distilled"):
        ours_img2img(PROMPTS[0], image, negative_prompt="blurry")
    with pytest.raises(InvalidInputError, match="num_inference_steps=6 exceeds the 5 distillation timesteps that "
                                                "strength=0.1 keeps.* raise strength to at least 0.12"):
        ours_img2img(PROMPTS[0], image, strength=0.1, num_inference_steps=6)
    with pytest.raises(InvalidInputError, match=r"strength must be a number in \(0, 1\]"):
        ours_img2img(PROMPTS[0], image, strength=0.0)
    with pytest.raises(InvalidInputError, match="LCM img2img samples with lcm"):
        LatentConsistencyImg2ImgPipeline.from_pretrained(lcm_folder, scheduler="euler")(PROMPTS[0], image)


def test_cli_img2img_runs_the_lcm_pipeline(lcm_folder, ours_img2img, tmp_path):
    picture = tmp_path / "in.png"
    lcm_picture().save(picture)
    out = tmp_path / "lcm-img2img.png"
    rc = main(["generate", str(lcm_folder), PROMPTS[0], "-o", str(out), "--image", str(picture), "--strength", "0.5",
               "--steps", "2", "--guidance", "6", "--seed", "7", "-q"])
    assert rc == 0
    expected = ours_img2img(PROMPTS[0], lcm_picture(), strength=0.5, num_inference_steps=2, guidance_scale=6.0,
                            seed=7, output_type="uint8").images[0]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), expected)
        assert "Steps: 2" in im.text["parameters"]
