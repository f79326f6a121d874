"""Whole-pipeline parity: sdrt on the exported folder vs diffusers' StableDiffusionPipeline on the
same checkpoint, from the same seed (torch-compatible stream, no injected latents)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference import DIFFUSERS_SCHEDULERS, load_pipes, reference
from sdrt.runtime.errors import CancelledError, GenerationError, InvalidInputError
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
STEPS = 5


@pytest.fixture(scope="module")
def reference_pipes(checkpoints):
    return load_pipes(diffusers.StableDiffusionPipeline, checkpoints)


@pytest.fixture(scope="module")
def sdrt_pipes(exported):
    return {name: StableDiffusionPipeline.from_pretrained(path) for name, path in exported.items()}


def ours(exported, scheduler: str | None, seed: int, **kwargs) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(exported, scheduler=scheduler)
    return pipe(seed=seed, output_type="np", **kwargs).images


CASES = [
    # (flavour, scheduler, kwargs)
    ("sd1", None, dict(prompt=PROMPTS[0], guidance_scale=7.5)),
    ("sd2", None, dict(prompt=PROMPTS[0], guidance_scale=7.5)),
    *[(f, s, dict(prompt=PROMPTS[0], guidance_scale=6.0)) for f in ("sd1", "sd2") for s in DIFFUSERS_SCHEDULERS],
    ("sd1", "ddim", dict(prompt=PROMPTS[0], guidance_scale=1.0)),
    ("sd2", "euler-a", dict(prompt=PROMPTS[1], guidance_scale=0.0)),
    ("sd1", "euler-a", dict(prompt=PROMPTS, negative_prompt=["blurry", "ugly, low quality"], guidance_scale=5.0)),
    ("sd2", "ddim", dict(prompt=PROMPTS[1], negative_prompt="blurry", guidance_scale=7.0, guidance_rescale=0.7)),
    ("sd1", "pndm", dict(prompt=PROMPTS[0], num_images_per_prompt=2, guidance_scale=7.5)),
    ("sd2", "dpm++2m-karras", dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=4.0)),
    ("sd1", "ddim", dict(prompt=PROMPTS[1], eta=1.0, guidance_scale=3.0)),
    ("sd1", "unipc", dict(prompt=PROMPTS[0], height=64, width=96, guidance_scale=7.5)),
]


@pytest.mark.parametrize("flavour,scheduler,kwargs", CASES,
                         ids=[f"{f}-{s or 'default'}-{i}" for i, (f, s, _) in enumerate(CASES)])
def test_images_match_diffusers(reference_pipes, exported, flavour, scheduler, kwargs):
    seed = 1234
    expected = reference(reference_pipes[flavour], scheduler, seed, num_inference_steps=STEPS, **kwargs)
    got = ours(exported[flavour], scheduler, seed, num_inference_steps=STEPS, **kwargs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


def test_uint8_and_pil_outputs(sdrt_pipes):
    pipe = sdrt_pipes["sd1"]
    arr = pipe(PROMPTS[0], num_inference_steps=2, seed=3, output_type="uint8").images
    pil = pipe(PROMPTS[0], num_inference_steps=2, seed=3, output_type="pil").images
    assert arr.dtype == np.uint8 and arr.shape == (1, 64, 64, 3)
    assert np.array_equal(np.asarray(pil[0]), arr[0])


def test_same_seed_same_image_and_numpy_stream(sdrt_pipes):
    pipe = sdrt_pipes["sd1"]
    a = pipe(PROMPTS[0], num_inference_steps=2, seed=7, output_type="np").images
    b = pipe(PROMPTS[0], num_inference_steps=2, seed=7, output_type="np").images
    c = pipe(PROMPTS[0], num_inference_steps=2, seed=7, rng="numpy", output_type="np").images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_callback_sees_every_step_and_can_cancel(exported):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="ddim")
    seen = []
    pipe(PROMPTS[0], num_inference_steps=3, seed=1, callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 8, 8)
    with pytest.raises(CancelledError, match="after step 2"):
        pipe(PROMPTS[0], num_inference_steps=3, seed=1, callback=lambda i, t, x: i < 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=72), "height=72 is not a multiple of 16 px.*nearest valid sizes: 64 or 80"),
    (dict(width=8), "width=8 is not a multiple of 16"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
    (dict(rng="cuda"), "torch"),
    (dict(output_type="jpeg"), "output_type must be one of"),
])
def test_bad_arguments(sdrt_pipes, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        sdrt_pipes["sd1"](PROMPTS[0], **{"num_inference_steps": 2, **kwargs})


def test_unknown_scheduler_lists_known_ones(exported):
    with pytest.raises(InvalidInputError, match="known names: .*ddim"):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="warp-drive")


def test_nan_in_unet_output_names_the_step(exported, monkeypatch):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="ddim")
    real_run = pipe.unet.run
    calls = []

    def poisoned(feed):
        calls.append(1)
        out = real_run(feed)
        if len(calls) == 2:
            out["out_sample"][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(pipe.unet, "run", poisoned)
    with pytest.raises(GenerationError, match="NaN/Inf at step 2/3"):
        pipe(PROMPTS[0], num_inference_steps=3, seed=0)
