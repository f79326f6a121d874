"""Low-memory mode (one engine at a time, sequential guidance halves, lean sessions): the same images as the
normal mode, engines released between stages, and its options on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdrt.engines.spec import zero_residuals
from sdrt.runtime.cli import main
from sdrt.runtime.core import loop
from sdrt.runtime.core.generate import Run
from sdrt.runtime.core.request import Request
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.guidance import Guidance
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
STEPS = 4

TXT2IMG = [
    ("sd1", None, dict(prompt=PROMPTS[0], guidance_scale=7.5)),
    ("sd1", "euler-a", dict(prompt=PROMPTS[0], guidance_scale=1.0)),  # no CFG: one call per step either way
    ("sd1", "ddim", dict(prompt=PROMPTS, negative_prompt=["blurry", "ugly"], guidance_scale=5.0,
                         num_images_per_prompt=2, guidance_rescale=0.7)),
    ("sd2", "dpm++2m-karras", dict(prompt=PROMPTS[1], guidance_scale=6.0, height=64, width=96)),
]


def picture(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([4 * x, 4 * y, 255 - 2 * (x + y)], axis=-1).astype(np.uint8))


def run(cls, folder, scheduler, **options):
    def generate(**kwargs):
        return cls.from_pretrained(folder, scheduler=scheduler, **options)(seed=7, num_inference_steps=STEPS,
                                                                           output_type="np", **kwargs).images
    return generate


@pytest.mark.parametrize("flavour,scheduler,kwargs", TXT2IMG, ids=[f"{f}-{s or 'default'}-{i}"
                                                                   for i, (f, s, _) in enumerate(TXT2IMG)])
def test_txt2img_low_memory_gives_the_same_image(exported, flavour, scheduler, kwargs):
    normal = run(StableDiffusionPipeline, exported[flavour], scheduler)(**kwargs)
    low = run(StableDiffusionPipeline, exported[flavour], scheduler, low_memory=True)(**kwargs)
    assert low.shape == normal.shape
    assert np.abs(low - normal).max() == 0.0


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_img2img_low_memory_gives_the_same_image(exported, guidance_scale):
    kwargs = dict(prompt=PROMPTS, image=picture(), strength=0.75, guidance_scale=guidance_scale)
    normal = run(StableDiffusionImg2ImgPipeline, exported["sd1"], "ddim")(**kwargs)
    low = run(StableDiffusionImg2ImgPipeline, exported["sd1"], "ddim", low_memory=True)(**kwargs)
    assert np.abs(low - normal).max() == 0.0


def test_sequential_cfg_alone_gives_the_same_image(exported):
    kwargs = dict(prompt=PROMPTS[0], guidance_scale=7.5)
    batched = run(StableDiffusionPipeline, exported["sd1"], "pndm", cfg_mode="batched")(**kwargs)
    sequential = run(StableDiffusionPipeline, exported["sd1"], "pndm", cfg_mode="sequential")(**kwargs)
    assert np.abs(batched - sequential).max() == 0.0


class RecordingEngine:
    """Wraps an engine: records each feed's batch and loaded states of the pipeline's engines at each call."""

    def __init__(self, engine, pipe):
        self.engine, self.pipe, self.calls = engine, pipe, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feed):
        self.calls.append({"feed": dict(feed), "loaded": {n: e.loaded for n, e in engines(self.pipe).items()}})
        return self.engine.run({k: v for k, v in feed.items() if k in self.engine.input_names})


def engines(pipe) -> dict:
    names = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    return {n: getattr(pipe, n) for n in names if hasattr(pipe, n)}


def test_low_memory_holds_one_engine_at_a_time(exported):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"], scheduler="ddim", low_memory=True)
    recorders = {n: RecordingEngine(e, pipe) for n, e in engines(pipe).items()}
    for name, recorder in recorders.items():
        setattr(pipe, name, recorder)
    pipe(PROMPTS[0], picture(), strength=1.0, num_inference_steps=STEPS, seed=0, output_type="np")
    for name, recorder in recorders.items():
        assert recorder.calls, f"{name} never ran"
        for call in recorder.calls:
            others = {n: loaded for n, loaded in call["loaded"].items() if n != name}
            assert not any(others.values()), f"while {name} ran, loaded: {others}"
    assert not any(e.loaded for e in engines(pipe).values()), "an engine stayed loaded after the call"
    # Sequential guidance: two UNet calls of one image per step, the negative half first.
    unet_calls = recorders["unet"].calls
    assert len(unet_calls) == 2 * STEPS
    assert all(len(c["feed"]["sample"]) == 1 for c in unet_calls)
    assert pipe.unet.options.enable_mem_arena is False and pipe.unet.options.enable_mem_pattern is False


def test_low_memory_loads_the_unet_once_per_generation(exported):
    """Sequential guidance halves share one UNet session: loaded at the first call, released after the loop."""
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="euler", low_memory=True)
    loads = []
    load = pipe.unet.load
    pipe.unet.load = lambda: (loads.append(pipe.unet.loaded), load())[1]
    for _ in range(2):
        pipe(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=7.5, seed=0, output_type="latent")
    assert loads.count(False) == 2, f"the UNet session was created {loads.count(False)} times in 2 generations"
    assert not pipe.unet.loaded


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory):
    """The sd1 export with every attention fused into MultiHeadAttention (`sdrt optimize --optimize cpu`)."""
    from sdrt.export.optimize import optimize_folder

    return optimize_folder(exported["sd1"], tmp_path_factory.mktemp("fused") / "cpu", "cpu", "fp32",
                           log=lambda m: None)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_low_memory_on_fused_attention_gives_the_same_image(fused, guidance_scale):
    """The fused folder (the one low-memory mode is measured on) runs the same in both modes."""
    attention = json.loads((fused / "sdrt.json").read_text())["validation_optimize"]["unet"]["attention"]
    assert attention["fused"] > 0 and attention["softmax_left"] == 0
    kwargs = dict(prompt=PROMPTS[0], negative_prompt="blurry", guidance_scale=guidance_scale)
    normal = run(StableDiffusionPipeline, fused, "dpm++2m")(**kwargs)
    low = run(StableDiffusionPipeline, fused, "dpm++2m", low_memory=True)(**kwargs)
    assert np.abs(low - normal).max() == 0.0


def test_normal_mode_keeps_engines_loaded(exported):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    pipe(PROMPTS[0], num_inference_steps=2, seed=0, output_type="np")
    assert all(e.loaded for e in engines(pipe).values())
    assert pipe.cfg_mode == "batched" and pipe.unet.options.enable_mem_arena is True


def test_sequential_cfg_splits_extra_unet_inputs_like_the_embeddings(exported):
    """The conditioning beside the embeddings (SDXL's time_ids, LCM's timestep_cond) is batched like them, negatives first:
    sequential guidance must hand each call its own half."""
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], cfg_mode="sequential")
    recorder = RecordingEngine(pipe.unet, pipe)
    pipe.unet = recorder
    batch = 2
    run = Run(Request(PROMPTS, negative_prompt=["", "blurry"]), pipe.core.family, (), pipe.models,
              pipe.scheduler, Guidance(True, 7.5), "sequential", None)
    embeds = pipe.core.family.conditioning(run)["encoder_hidden_states"]
    time_ids = np.arange(2 * batch * 6, dtype=np.float32).reshape(2 * batch, 6)  # rows 0-1 negative, 2-3 positive
    run.plan = pipe.scheduler.plan(2)
    run.conditioning = {"encoder_hidden_states": embeds, "time_ids": time_ids,
                        **zero_residuals(pipe.folder.spec("unet"), 2 * batch, 64, 64)}
    latents = np.random.default_rng(0).standard_normal((batch, 4, 8, 8)).astype(np.float32)
    out = loop.denoise(run, latents)
    negative, positive = recorder.calls[0]["feed"], recorder.calls[1]["feed"]
    np.testing.assert_array_equal(negative["time_ids"], time_ids[:batch])
    np.testing.assert_array_equal(positive["time_ids"], time_ids[batch:])
    np.testing.assert_array_equal(negative["encoder_hidden_states"], embeds[:batch])
    np.testing.assert_array_equal(positive["encoder_hidden_states"], embeds[batch:])
    run.cfg_mode = "batched"
    batched = loop.denoise(run, latents)
    np.testing.assert_array_equal(recorder.calls[-1]["feed"]["time_ids"], time_ids)
    assert np.abs(out - batched).max() == 0.0


def test_bad_cfg_mode_is_refused(exported):
    with pytest.raises(InvalidInputError, match="cfg_mode must be one of"):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], cfg_mode="parallel")


def test_generate_low_memory_writes_the_same_png(exported, tmp_path, capsys):
    args = [str(exported["sd1"]), "a red circle", "--steps", "3", "--seed", "5", "-q"]
    assert main(["generate", *args, "-o", str(tmp_path / "normal.png")]) == 0
    assert main(["generate", *args, "--low-memory", "-o", str(tmp_path / "low.png")]) == 0
    assert main(["generate", *args, "--low-memory", "--tile-size", "32", "--tile-overlap", "8",
                 "-o", str(tmp_path / "tiled.png")]) == 0
    normal, low, tiled = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("normal", "low", "tiled"))
    assert (normal == low).all()
    assert tiled.shape == normal.shape and (tiled != normal).any()  # tiles of 32 px on a 64 px image


@pytest.mark.parametrize("extra,message", [
    (["--tile-size", "16", "--tile-overlap", "16"], "must be larger than the tile overlap"),
    (["--tile-size", "60"], "multiple of the VAE's factor 8"),
    (["--tile-overlap", "8"], "--tile-overlap needs --tile-size"),
])
def test_generate_bad_tile_options(exported, tmp_path, capsys, extra, message):
    code = main(["generate", str(exported["sd1"]), "a red circle", "--steps", "1", "-q", "-o",
                 str(tmp_path / "x.png"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
