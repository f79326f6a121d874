"""SD3 and Flux (diffusion transformers, flow matching): export, and the runtime against diffusers' pipelines on the
same tiny random-weight checkpoints (export/fixtures_dit.py) from the same seed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdrt.runtime.core.transformer import image_ids, pack, unpack
from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.flux import FluxImg2ImgPipeline, FluxPipeline
from sdrt.runtime.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

TOLERANCE = 2 / 255  # the bar, per pixel
PROMPT = "a photo of an astronaut riding a horse on mars"


def diffusers_pipeline(cls_name: str, checkpoint, **components):
    import diffusers

    return getattr(diffusers, cls_name).from_pretrained(checkpoint, **components)


def reference(pipe, **kwargs) -> np.ndarray:
    seed = kwargs.pop("seed")
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def assert_close(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    worst = float(np.abs(got - want).max())
    assert worst <= TOLERANCE, f"max |sdrt - diffusers| = {worst * 255:.3f}/255"
    return worst


def picture(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    noise = rng.integers(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(base * [1.0, 0.6, 0.3] + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def sd3(tiny):
    return StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])


@pytest.fixture(scope="module")
def flux_dev(tiny):
    return FluxPipeline.from_pretrained(tiny["flux-dev"])


# -- the transformer's feed ---------------------------------------------------------------------------------------


def test_packing_is_diffusers():
    from diffusers import FluxPipeline as Reference

    latents = np.random.default_rng(0).standard_normal((2, 4, 6, 10)).astype(np.float32)
    packed = Reference._pack_latents(torch.from_numpy(latents), 2, 4, 6, 10).numpy()
    np.testing.assert_array_equal(pack(latents), packed)
    np.testing.assert_array_equal(unpack(packed, 6, 10), latents)
    ids = Reference._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(6, 10), ids)


def test_flux_step_draws_are_packed():
    """An SDE step's noise on Flux is drawn in the packed layout FluxPipeline's loop holds (diffusers' SD3 and Flux
    pipelines pass no generator to scheduler.step, so there it comes from torch's global stream: no seed reproduces
    it; sdrt draws from the run's generator, packed as diffusers would)."""
    from sdrt.runtime.families.flux import PackedDraws
    from sdrt.runtime.rng import make_generator

    got = PackedDraws(make_generator(5, "torch")).randn((2, 4, 6, 10))
    want = torch.randn((2, 15, 16), generator=torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_array_equal(pack(got), want)
    assert PackedDraws(make_generator(5, "torch")).randn((3, 7)).shape == (3, 7)


def test_export_records_the_folder(tiny):
    folder = tiny["sd3"]
    manifest = json.loads((folder / "sdrt.json").read_text())
    assert manifest["family"] == "stable-diffusion-3"
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                                           "vae_decoder", "vae_encoder"}
    assert all(report["passed"] for report in manifest["validation"].values())
    inputs = [t["name"] for t in manifest["components"]["transformer"]["spec"]["inputs"]]
    assert inputs == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert (folder / "tokenizer_3" / "tokenizer.json").is_file()
    flux = json.loads((tiny["flux-dev"] / "sdrt.json").read_text())
    inputs = [t["name"] for t in flux["components"]["transformer"]["spec"]["inputs"]]
    assert inputs[-3:] == ["img_ids", "txt_ids", "guidance"]
    schnell = json.loads((tiny["flux-schnell"] / "sdrt.json").read_text())
    assert "guidance" not in [t["name"] for t in schnell["components"]["transformer"]["spec"]["inputs"]]


def test_transformer_runs_at_odd_patch_counts(tiny):
    """The SD3 pos-embed crop at a latent side of 2 mod 4 (the exporter's slice bug, sdrt.export.trace)."""
    from diffusers import SD3Transformer2DModel

    from sdrt.engines.onnxruntime import OrtEngine
    from sdrt.runtime.config import ModelFolder

    folder = ModelFolder.open(tiny["sd3"])
    engine = OrtEngine(folder.onnx_path("transformer"), folder.spec("transformer"))
    model = SD3Transformer2DModel.from_pretrained(tiny.checkpoint("sd3") / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    feed = {"hidden_states": torch.randn(1, 16, 10, 6, generator=g), "encoder_hidden_states": torch.randn(1, 9, 96, generator=g),
            "pooled_projections": torch.randn(1, 72, generator=g), "timestep": torch.tensor([700.0])}
    with torch.no_grad():
        want = model(**feed, return_dict=False)[0].numpy()
    got = engine.run({k: v.numpy() for k, v in feed.items()})["out_hidden_states"]
    assert np.abs(got - want).max() < 1e-4


# -- SD3 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, guidance", [((64, 96), 5.0), ((80, 48), 1.0)])
def test_sd3_txt2img(tiny, sd3, size, guidance):
    height, width = size
    ref = diffusers_pipeline("StableDiffusion3Pipeline", tiny.checkpoint("sd3"))
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry, low quality", num_inference_steps=4, height=height,
                  width=width, guidance_scale=guidance, seed=7)
    assert_close(sd3(**kwargs, output_type="np").images, reference(ref, **kwargs))


def test_sd3_three_prompts_batch_and_clip_skip(tiny, sd3):
    ref = diffusers_pipeline("StableDiffusion3Pipeline", tiny.checkpoint("sd3"))
    kwargs = dict(prompt=["a red cube", "a blue sphere on a table"], prompt_2=["a cube", "a ball"], prompt_3=["t5 one", "t5 two"],
                  negative_prompt=["ugly", "dark"], negative_prompt_3=["noisy", "grainy"], num_inference_steps=3, height=64,
                  width=64, num_images_per_prompt=2, clip_skip=1, max_sequence_length=32, seed=3)
    assert_close(sd3(**kwargs, output_type="np").images, reference(ref, **kwargs))


def test_sd3_without_t5(tiny, tmp_path):
    """A folder whose T5 was left out (as diffusers allows text_encoder_3=None): zeros for its states."""
    folder = tmp_path / "sd3-no-t5"
    shutil.copytree(tiny["sd3"], folder)
    shutil.rmtree(folder / "text_encoder_3")
    manifest = json.loads((folder / "sdrt.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("text_encoder_3/")}
    (folder / "sdrt.json").write_text(json.dumps(manifest))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    ref = diffusers_pipeline("StableDiffusion3Pipeline", tiny.checkpoint("sd3"), text_encoder_3=None, tokenizer_3=None)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64, seed=11)
    assert_close(pipe(**kwargs, output_type="np").images, reference(ref, **kwargs))
    with pytest.raises(InvalidInputError, match="no T5 encoder"):
        pipe(PROMPT, prompt_3="x", num_inference_steps=1, height=64, width=64)


def test_sd3_img2img(tiny):
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny["sd3"])
    ref = diffusers_pipeline("StableDiffusion3Img2ImgPipeline", tiny.checkpoint("sd3"))
    image = picture(80, 64)
    for strength in (0.55, 1.0):
        kwargs = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=5, seed=2,
                      guidance_scale=4.0)
        assert_close(pipe(**kwargs, output_type="np").images, reference(ref, **kwargs))  # resized to 256 px
        kwargs.update(height=80, width=64)
        assert_close(pipe(**kwargs, output_type="np").images, reference(ref, **kwargs))


@pytest.mark.parametrize("name, diffusers_class", [("flow-heun", "FlowMatchHeunDiscreteScheduler"),
                                                    ("flow-dpm++2m", "DPMSolverMultistepScheduler"),
                                                    ("flow-unipc", "UniPCMultistepScheduler")])
def test_sd3_other_flow_schedulers(tiny, sd3, name, diffusers_class):
    import diffusers

    ref = diffusers_pipeline("StableDiffusion3Pipeline", tiny.checkpoint("sd3"))
    config = dict(ref.scheduler.config)
    if diffusers_class != "FlowMatchHeunDiscreteScheduler":
        config.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config["shift"])
    ref.scheduler = getattr(diffusers, diffusers_class).from_config(config)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=64, width=64, seed=5, guidance_scale=3.0)
    assert_close(sd3(**kwargs, scheduler=name, output_type="np").images, reference(ref, **kwargs))


# -- Flux -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 96), (128, 128)])  # two image token counts: two mu (dynamic shifting)
def test_flux_dev_txt2img(tiny, flux_dev, size):
    height, width = size
    ref = diffusers_pipeline("FluxPipeline", tiny.checkpoint("flux-dev"))
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=height, width=width, guidance_scale=4.5, seed=1)
    assert_close(flux_dev(**kwargs, output_type="np").images, reference(ref, **kwargs))


def test_flux_dev_true_cfg_and_prompt_2(tiny, flux_dev):
    ref = diffusers_pipeline("FluxPipeline", tiny.checkpoint("flux-dev"))
    kwargs = dict(prompt=["a cat", "a dog"], prompt_2=["a pet, photographed", "another pet"], negative_prompt=["blurry", "dark"],
                  true_cfg_scale=3.0, num_inference_steps=3, height=64, width=64, num_images_per_prompt=2,
                  max_sequence_length=64, seed=4)
    assert_close(flux_dev(**kwargs, output_type="np").images, reference(ref, **kwargs))


def test_flux_schnell_txt2img(tiny):
    pipe = FluxPipeline.from_pretrained(tiny["flux-schnell"])
    ref = diffusers_pipeline("FluxPipeline", tiny.checkpoint("flux-schnell"))
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=80, width=112, seed=9)
    assert_close(pipe(**kwargs, output_type="np").images, reference(ref, **kwargs))
    with pytest.raises(InvalidInputError, match="takes no guidance"):
        pipe(PROMPT, guidance_scale=3.5, num_inference_steps=1, height=64, width=64)


def test_flux_img2img(tiny):
    pipe = FluxImg2ImgPipeline.from_pretrained(tiny["flux-dev"])
    ref = diffusers_pipeline("FluxImg2ImgPipeline", tiny.checkpoint("flux-dev"))
    kwargs = dict(prompt=PROMPT, image=picture(96, 64, 1), strength=0.7, num_inference_steps=4, height=96,
                  width=64, guidance_scale=3.0, seed=6)
    assert_close(pipe(**kwargs, output_type="np").images, reference(ref, **kwargs))


def test_flux_dpm_scheduler_with_dynamic_shifting(tiny, flux_dev):
    import diffusers

    ref = diffusers_pipeline("FluxPipeline", tiny.checkpoint("flux-dev"))
    config = dict(ref.scheduler.config, use_flow_sigmas=True, prediction_type="flow_prediction",
                  flow_shift=ref.scheduler.config["shift"])
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=64, width=80, seed=8)
    assert_close(flux_dev(**kwargs, scheduler="dpm++2m", output_type="np").images, reference(ref, **kwargs))


# -- bad input, before any engine runs -------------------------------------------------------------------------


def test_bad_inputs_are_refused(tiny, sd3, flux_dev):
    cases = [
        (flux_dev, dict(prompt_3="x"), "prompt_3"),
        (flux_dev, dict(height=72, width=64), "multiple of 16"),
        (flux_dev, dict(negative_prompt="x"), "true_cfg_scale"),
        (flux_dev, dict(max_sequence_length=600), "max_sequence_length"),
        (flux_dev, dict(scheduler="euler-a"), "flow"),
        (sd3, dict(skip_guidance_layers=[7, 8, 9]), "skip_guidance_layers"),
        (sd3, dict(height=64, width=40), "multiple of 16"),
        (sd3, dict(max_sequence_length=0), "max_sequence_length"),
        (sd3, dict(scheduler="ddim"), "flow"),
    ]
    for pipe, kwargs, message in cases:
        arguments = {"height": 64, "width": 64, "num_inference_steps": 1, **kwargs}
        with pytest.raises((InvalidInputError, UnsupportedConfigError), match=message):
            pipe(PROMPT, **arguments)


def test_wrong_facade_names_the_right_one(tiny):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    with pytest.raises(UnsupportedConfigError, match="FluxPipeline"):
        StableDiffusionPipeline.from_pretrained(tiny["flux-dev"])
    with pytest.raises(UnsupportedConfigError, match="StableDiffusion3Pipeline"):
        FluxPipeline.from_pretrained(tiny["sd3"])


# -- the CLI -------------------------------------------------------------------------------------------------------


def test_cli_generate_picks_the_family(tiny, flux_dev, tmp_path):
    """`sdrt generate FOLDER PROMPT --steps N --seed S --size WxH --guidance G` gives diffusers' image."""
    from PIL import Image

    out = tmp_path / "flux.png"
    subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", "generate", str(tiny["flux-dev"]), PROMPT, "--steps", "3",
                    "--seed", "12", "--size", "96x64", "--guidance", "5", "-o", str(out), "-q"], check=True)
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    ref = diffusers_pipeline("FluxPipeline", tiny.checkpoint("flux-dev"))
    want = reference(ref, prompt=PROMPT, num_inference_steps=3, height=64, width=96, guidance_scale=5.0, seed=12)[0]
    assert np.abs(got - want).max() <= TOLERANCE + 1 / 255  # the PNG rounds to 8 bits
    params = Image.open(out).info["parameters"]
    assert "Sampler: flow-euler" in params and "CFG scale: 5" in params
    bad = subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", "generate", str(tiny["flux-schnell"]), PROMPT,
                          "--guidance", "3", "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and "takes no guidance" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_optimize_fp16_keeps_t5_fp32(tiny, sd3, tmp_path):
    """`sdrt optimize --precision fp16` on an SD3 folder: T5 stays fp32 (it overflows in fp16), the rest is fp16,
    and the image stays close to the fp32 folder's."""
    from sdrt.export.optimize import optimize_folder

    out = optimize_folder(tiny["sd3"], tmp_path / "sd3-fp16", precision="fp16", log=lambda m: None)
    report = json.loads((out / "sdrt.json").read_text())["validation_optimize"]
    assert report["text_encoder_3"]["precision"] == "fp32 (T5 overflows in fp16)"
    assert "precision" not in report["transformer"]
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64, seed=1, output_type="np")
    fp16 = StableDiffusion3Pipeline.from_pretrained(out)(**kwargs).images
    assert np.abs(fp16 - sd3(**kwargs).images).max() <= 4 / 255


def test_sd3_in_diffusers_test_layout(tmp_path):
    """diffusers' own SD3 test layout: patch 1, a 1x VAE, both CLIPs together wider than T5 (their states are then
    cut to its width, as diffusers' negative pad does)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline as Reference
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdrt.export.api import export_pipeline
    from sdrt.export.fixtures import clip_tokenizer
    from sdrt.export.fixtures_dit import _t5_tokenizer

    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=5, pad_token_id=1, vocab_size=49408, hidden_act="gelu", projection_dim=32)
    tokenizer_3 = _t5_tokenizer()
    torch.manual_seed(0)
    components = dict(
        transformer=SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                          num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                          pooled_projection_dim=64, out_channels=4),
        text_encoder=CLIPTextModelWithProjection(clip), text_encoder_2=CLIPTextModelWithProjection(clip),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, is_encoder_decoder=False)),
        vae=AutoencoderKL(sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                          norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                          scaling_factor=1.5035),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler())
    Reference(**components).save_pretrained(tmp_path / "ckpt")
    folder = export_pipeline(tmp_path / "ckpt", tmp_path / "onnx", log=lambda m: None)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=24, width=32, guidance_scale=5.0, seed=4)
    got = StableDiffusion3Pipeline.from_pretrained(folder)(**kwargs, output_type="np").images
    assert_close(got, reference(Reference.from_pretrained(tmp_path / "ckpt"), **kwargs))


# -- the server ----------------------------------------------------------------------------------------------------


def test_serve_flux_dev_and_schnell(tiny, flux_dev):
    """A1111's API on Flux folders: cfg_scale is dev's distilled guidance (the image equals FluxPipeline's), and a
    schnell-type model ignores the cfg_scale A1111 clients always send; img2img keeps the picture's size."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdrt.serve.app import create_app
    from sdrt.serve.cli import build_server

    server = build_server([str(tiny["flux-dev"]), str(tiny["flux-schnell"])])
    try:
        with TestClient(create_app(server)) as client:
            body = dict(prompt=PROMPT, steps=3, cfg_scale=4.0, seed=21, width=96, height=64)
            dev = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
                "sd_model_checkpoint": tiny["flux-dev"].name}})
            assert dev.status_code == 200, dev.text
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(dev.json()["images"][0]))))
            want = flux_dev(PROMPT, num_inference_steps=3, guidance_scale=4.0, seed=21, height=64, width=96,
                            output_type="uint8").images[0]
            np.testing.assert_array_equal(got, want)
            schnell = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
                "sd_model_checkpoint": tiny["flux-schnell"].name}})
            assert schnell.status_code == 200, schnell.text
            buffer = io.BytesIO()
            picture(80, 48).save(buffer, format="PNG")
            edit = client.post("/sdapi/v1/img2img", json=dict(
                prompt=PROMPT, steps=3, seed=2, denoising_strength=0.6,
                init_images=[base64.b64encode(buffer.getvalue()).decode()],
                override_settings={"sd_model_checkpoint": tiny["flux-dev"].name}))
            assert edit.status_code == 200, edit.text
            assert Image.open(io.BytesIO(base64.b64decode(edit.json()["images"][0]))).size == (48, 80)
    finally:
        server.close()


@pytest.mark.parametrize("name, kwargs", [("sd3", dict(guidance_scale=5.0, negative_prompt="dark")),
                                          ("flux-dev", dict(true_cfg_scale=2.0, negative_prompt="dark"))])
def test_low_memory_gives_the_same_image(tiny, name, kwargs):
    """--low-memory: one network at a time (T5 released before the transformer loads), CFG halves in turn."""
    cls = StableDiffusion3Pipeline if name == "sd3" else FluxPipeline
    call = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64, seed=3, output_type="np", **kwargs)
    low = cls.from_pretrained(tiny[name], low_memory=True)
    np.testing.assert_allclose(low(**call).images, cls.from_pretrained(tiny[name])(**call).images, atol=1e-5)
    assert not any(engine.loaded for engine in low.core.models.engines())  # every network released after its stage


def test_bench_runs_the_folders_family(tiny):
    """`sdrt bench` opens the folder's own pipeline: Flux schnell (no guidance input, no CFG) and SD3 (CFG)."""
    from sdrt.runtime.bench import BenchSettings, run_bench

    for name, cfg in (("flux-schnell", False), ("sd3", True)):
        result = run_bench(tiny[name], BenchSettings(steps=2, width=64, height=64, runs=1, warmup=0, cold_start=False),
                           progress=False)
        assert result["settings"]["cfg"] is cfg and result["settings"]["scheduler"] == "flow-euler"
        assert result["settings"]["unet_evaluations"] == 2
