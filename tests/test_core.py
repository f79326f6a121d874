"""The generation core: tasks combined through the one loop, the guidance interval, and argument checking
(every bad argument is an InvalidInputError from the API, before any engine runs, and exit 2 with one line
from the CLI)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from golden_cases import mask, picture  # noqa: E402
from reference import load_pipes, reference  # noqa: E402

from sdrt.engines.spec import zero_residuals  # noqa: E402
from sdrt.runtime.cli import main  # noqa: E402
from sdrt.runtime.config import ModelFolder  # noqa: E402
from sdrt.runtime.core.generate import Generator  # noqa: E402
from sdrt.runtime.core.request import Request  # noqa: E402
from sdrt.runtime.errors import InvalidInputError  # noqa: E402
from sdrt.runtime.families.sd import StableDiffusion  # noqa: E402
from sdrt.runtime.families.sdxl import StableDiffusionXL  # noqa: E402
from sdrt.runtime.guidance import Guidance, sigma  # noqa: E402
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline  # noqa: E402
from sdrt.runtime.pipeline import StableDiffusionPipeline  # noqa: E402
from sdrt.runtime.schedulers import load_scheduler  # noqa: E402
from sdrt.runtime.tasks.handoff import HandOff  # noqa: E402
from sdrt.runtime.tasks.inpaint import Inpaint  # noqa: E402

PROMPT = "a red circle on a blue background"
STEPS = 6


class RecordingUNet:
    """Wraps an engine; records the batch of every UNet call."""

    def __init__(self, engine):
        self._engine, self.batches = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, feed):
        self.batches.append(len(feed["sample"]))
        return self._engine.run(feed)


# -- tasks combined ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["euler-a", "heun"])
def test_inpaint_with_the_refiner_hand_off_through_the_core(tiny, scheduler):
    """The core's own API, tasks listed by hand: SDXL inpainting (4-channel blend) handed from the base
    (Inpaint + HandOff to denoising_end) to the refiner (Inpaint + HandOff from denoising_start), against
    diffusers' StableDiffusionXLInpaintPipeline ensemble on the same checkpoints and seeds."""
    references = {name: load_pipes(diffusers.StableDiffusionXLInpaintPipeline, {name: tiny.checkpoint(name)})[name]
                  for name in ("xl-base", "xl-refiner")}
    common = dict(prompt=PROMPT, image=picture(1), mask_image=mask(), num_inference_steps=STEPS)
    cls_name = {"euler-a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler"}[scheduler]
    base_pipe, original = references["xl-base"]
    base_pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config)
    expected_latents = base_pipe(generator=torch.Generator("cpu").manual_seed(3), denoising_end=0.7,
                                 output_type="latent", height=64, width=64, **common).images
    refiner_pipe, original = references["xl-refiner"]
    refiner_pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config)
    expected = refiner_pipe(generator=torch.Generator("cpu").manual_seed(4), image=expected_latents,
                            denoising_start=0.7, output_type="np", height=64, width=64,
                            **{k: v for k, v in common.items() if k != "image"}).images

    def core(name: str) -> Generator:
        folder = ModelFolder.open(tiny[name])
        return Generator(folder, StableDiffusionXL(folder), scheduler=scheduler, encoder=True)

    latents = core("xl-base").generate(Request(**common, guidance_scale=7.5, seed=3, denoising_end=0.7,
                                               output_type="latent", strength=0.9999), [Inpaint(), HandOff()])
    np.testing.assert_allclose(latents.images, expected_latents.numpy(), atol=1e-4)
    out = core("xl-refiner").generate(
        Request(**{**common, "image": latents.images}, guidance_scale=7.5, seed=4, denoising_start=0.7,
                output_type="np", strength=0.9999), [Inpaint(), HandOff()])
    assert out.images.shape == expected.shape and np.abs(out.images - expected).max() < 1e-4
    assert out.timings["steps"] < STEPS and "Denoising start: 0.7" in out.parameters[0]


def test_sd_inpainting_hands_off_too(tiny):
    """The hand-off is a task of its own: it combines with SD 1.x inpainting, which diffusers' SD inpainting
    pipeline cannot cut. The two halves run exactly the full schedule's timesteps, split at the cutoff."""
    folder = ModelFolder.open(tiny["sd1"])
    core = Generator(folder, StableDiffusion(folder), scheduler="euler", encoder=True)
    seen = {"base": [], "rest": []}
    common = dict(prompt=PROMPT, image=picture(2), mask_image=mask(), num_inference_steps=STEPS, strength=1.0)
    base = core.generate(Request(**common, seed=1, denoising_end=0.5, output_type="latent",
                                 callback=lambda i, t, x: seen["base"].append(t)), [Inpaint(), HandOff()])
    rest = core.generate(Request(**{**common, "image": base.images}, seed=1, denoising_start=0.5, output_type="np",
                                 callback=lambda i, t, x: seen["rest"].append(t)), [Inpaint(), HandOff()])
    full = core.scheduler.plan(STEPS).timesteps
    np.testing.assert_array_equal(np.array(seen["base"] + seen["rest"]), full)
    assert min(seen["base"]) >= 500 > max(seen["rest"])
    assert rest.images.shape == (1, 64, 64, 3) and np.isfinite(rest.images).all()


def test_a_request_may_name_its_own_scheduler(exported):
    """Request.scheduler runs one generation with another solver than the Generator's, as a pipeline opened with it."""
    folder = ModelFolder.open(exported["sd1"])
    from sdrt.runtime.tasks.txt2img import TextToImage

    core = Generator(folder, StableDiffusion(folder))
    got = core.generate(Request(PROMPT, num_inference_steps=3, seed=2, output_type="np", scheduler="euler-a"),
                        [TextToImage()])
    expected = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="euler-a")(
        PROMPT, num_inference_steps=3, seed=2, output_type="np")
    np.testing.assert_array_equal(got.images, expected.images)
    assert "Sampler: euler-a" in got.parameters[0]
    with pytest.raises(InvalidInputError):
        Request(PROMPT, scheduler=3)


# -- guidance interval ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,diffusers_class", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                                  ("dpm++2m-karras", "DPMSolverMultistepScheduler")])
def test_sigma_of_each_step_is_the_schedules(exported, name, diffusers_class):
    """sigma(plan, i) against sqrt((1 - alpha_bar_t) / alpha_bar_t) from diffusers' own tables (VP solvers) or
    its sigmas (sigma-view solvers), at every evaluation."""
    config = ModelFolder.open(exported["sd1"]).scheduler_config
    plan = load_scheduler(config, name).plan(10)
    ours = np.array([sigma(plan, i) for i in range(plan.num_evaluations)])
    overrides = {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"} if "karras" in name else {}
    sched = getattr(diffusers, diffusers_class).from_config(config, **overrides)
    sched.set_timesteps(10)
    if hasattr(sched, "sigmas") and name != "ddim":
        expected = sched.sigmas.numpy()[:plan.num_evaluations].astype(np.float64)
    else:
        abar = sched.alphas_cumprod.numpy().astype(np.float64)[sched.timesteps.numpy()]
        expected = np.sqrt((1 - abar) / abar)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_guidance_interval_formula():
    """active(i) is lo <= sigma_i <= hi; combine is uncond + s (cond - uncond), rescaled as Lin et al."""
    plan = load_scheduler({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000}, "euler").plan(8)
    sigmas = [sigma(plan, i) for i in range(plan.num_evaluations)]
    lo, hi = sigmas[5], sigmas[2]
    guidance = Guidance(True, 5.0, 0.0, (lo, hi))
    assert [guidance.active(plan, i) for i in range(8)] == [lo <= s <= hi for s in sigmas] == [False, False] + \
        [True] * 4 + [False, False]
    assert not Guidance(False, 5.0, 0.0, None).active(plan, 0) and Guidance(True, 5.0).active(plan, 7)
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    uncond, cond = pred[:2], pred[2:]
    np.testing.assert_allclose(Guidance(True, 5.0).combine(pred), uncond + 5.0 * (cond - uncond), rtol=1e-6)


@pytest.fixture(scope="module")
def reference_sd1(checkpoints):
    return load_pipes(diffusers.StableDiffusionPipeline, {"sd1": checkpoints["sd1"]})["sd1"]


def test_an_interval_covering_every_step_is_plain_guidance(exported, reference_sd1):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="euler-a")
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5)
    plain = pipe(seed=5, output_type="np", **kwargs).images
    covered = pipe(seed=5, output_type="np", guidance_interval=(0.0, 1e6), **kwargs).images
    np.testing.assert_array_equal(covered, plain)
    expected = reference(reference_sd1, "euler-a", 5, **kwargs)
    assert np.abs(covered - expected).max() < 1e-3


def test_an_interval_ending_early_matches_diffusers_turning_guidance_off(exported, reference_sd1):
    """Guidance at the high noise levels only: diffusers' documented dynamic-CFG callback (drop the negative
    embeddings and set the scale to 0 after step k) gives the same image."""
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="dpm++2m-karras")
    plan = pipe.scheduler.plan(STEPS)
    k = 3  # steps 0..2 guided
    lo = (sigma(plan, k - 1) + sigma(plan, k)) / 2
    unet = pipe.unet = RecordingUNet(pipe.unet)
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5)
    got = pipe(seed=9, output_type="np", guidance_interval=(lo, 1e6), **kwargs)
    assert unet.batches == [2] * k + [1] * (STEPS - k)
    assert "Guidance interval" in got.parameters[0]

    def stop_guidance(diffusers_pipe, i, t, tensors):
        if i == k - 1:
            diffusers_pipe._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    expected = reference(reference_sd1, "dpm++2m-karras", 9, callback_on_step_end=stop_guidance,
                         callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)
    assert np.abs(got.images - expected).max() < 1e-3


def test_an_interval_starting_late_matches_a_hand_built_loop(exported):
    """Guidance off at the highest noise levels (the paper's main setting): each step outside the interval is the
    conditional prediction alone, inside it the guided one; built here from the scheduler and the engines."""
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="euler", cfg_mode="sequential")
    plan = pipe.scheduler.plan(STEPS)
    hi = (sigma(plan, 1) + sigma(plan, 2)) / 2  # steps 0 and 1 unguided
    got = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=6.0, seed=2,
               output_type="latent", guidance_interval=(0.0, hi)).images

    ids = pipe.tokenizer(["blurry", PROMPT])
    embeds = pipe.text_encoder.run({"input_ids": ids})["last_hidden_state"]
    from sdrt.runtime.rng import make_generator

    latents = make_generator(2, "torch").randn((1, 4, 8, 8)).astype(np.float32) * np.float32(plan.init_noise_sigma)
    state = pipe.scheduler.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        x = pipe.scheduler.scale_model_input(plan, i, latents)

        def predict(half):
            return pipe.unet.run({"sample": x, "timestep": np.full((1,), t, np.float32),
                                  "encoder_hidden_states": embeds[half:half + 1],
                                  **zero_residuals(pipe.unet.spec, 1, 64, 64)})["out_sample"]
        cond = predict(1)
        pred = cond if i < 2 else (lambda u: u + np.float32(6.0) * (cond - u))(predict(0))
        latents, state = pipe.scheduler.step(plan, i, pred, latents, state, None)
    np.testing.assert_allclose(got, latents, atol=1e-5)


# -- bad arguments -------------------------------------------------------------------------------------------

BAD_CALLS = [
    dict(guidance_scale="7.5"), dict(guidance_scale=None), dict(guidance_scale=math.nan),
    dict(guidance_scale=math.inf), dict(guidance_rescale=math.nan), dict(eta=math.inf), dict(eta="0"),
    dict(generator=np.random.default_rng(0)), dict(generator=torch.Generator().manual_seed(0)),
    dict(negative_prompt=5), dict(negative_prompt=["a", 3]), dict(prompt=None), dict(prompt=5), dict(prompt=[]),
    dict(num_inference_steps=2.5), dict(num_inference_steps="4"), dict(num_inference_steps=None),
    dict(num_images_per_prompt="2"), dict(height="64"), dict(width=64.0), dict(seed="1"), dict(seed=1.5),
    dict(output_type=5), dict(callback=5), dict(progress="yes"), dict(rng=None),
    dict(guidance_interval=(1.0,)), dict(guidance_interval=(math.nan, 1.0)), dict(guidance_interval=(2.0, 1.0)),
    dict(guidance_interval="0.3,5"), dict(guidance_interval=(0.0, math.inf)),
]


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"an engine was used ({name}) before the arguments were checked")


@pytest.mark.parametrize("kwargs", BAD_CALLS, ids=[repr(k)[:50] for k in BAD_CALLS])
def test_bad_arguments_are_invalid_input_before_any_engine_runs(exported, kwargs):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    for name in ("text_encoder", "unet", "vae_decoder"):
        setattr(pipe, name, Untouchable())
    with pytest.raises(InvalidInputError):
        pipe(**{"prompt": PROMPT, "num_inference_steps": 2, **kwargs})


@pytest.mark.parametrize("kwargs", [dict(strength=math.nan), dict(strength="0.5"), dict(strength=None),
                                    dict(image=None), dict(image="picture.png")])
def test_bad_img2img_arguments_are_invalid_input(exported, kwargs):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"])
    with pytest.raises(InvalidInputError):
        pipe(**{"prompt": PROMPT, "image": picture(0), "num_inference_steps": 2, **kwargs})


@pytest.mark.parametrize("call", [
    lambda folder: StableDiffusionPipeline.from_pretrained(None),
    lambda folder: StableDiffusionPipeline.from_pretrained(42),
    lambda folder: StableDiffusionPipeline.from_pretrained(folder, provider=5),
    lambda folder: StableDiffusionPipeline.from_pretrained(folder, provider=None),
    lambda folder: StableDiffusionPipeline.from_pretrained(folder, scheduler=3),
    lambda folder: StableDiffusionPipeline.from_pretrained(folder, verify="maybe"),
    lambda folder: StableDiffusionPipeline.from_pretrained(folder, low_memory="yes"),
    lambda folder: StableDiffusionPipeline(str(folder)),
], ids=["path-None", "path-int", "provider-int", "provider-None", "scheduler-int", "verify", "low_memory", "str"])
def test_bad_constructor_arguments_are_invalid_input(exported, call):
    with pytest.raises(InvalidInputError):
        call(exported["sd1"])


@pytest.mark.parametrize("options", [
    ["--guidance", "nan"], ["--guidance", "inf"], ["--guidance", "abc"], ["--steps", "0"], ["--steps", "x"],
    ["--guidance-interval", "2,1"], ["--guidance-interval", "a,b"], ["--guidance-interval", "nan,1"],
    ["--num-images", "0"], ["--seed", "abc"], ["--size", "0x0"], ["--image", "missing.png", "--strength", "nan"],
])
def test_cli_bad_arguments_exit_2_with_one_line(exported, tmp_path, capsys, options):
    try:
        code = main(["generate", str(exported["sd1"]), PROMPT, "-o", str(tmp_path / "out.png"), "-q", *options])
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.png").exists()
