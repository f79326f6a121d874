"""SDXL: export of a tiny random-weight SDXL checkpoint (two text encoders, added UNet conditions), and
sdrt's StableDiffusionXL(Img2Img)Pipeline on it vs diffusers' on the same checkpoint and seed; bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import run_without_torch
from reference import load_pipes, reference
from test_img2img import picture

from sdrt.export.api import export_pipeline
from sdrt.export.fixtures_xl import save_tiny_xl_pipeline
from sdrt.runtime.cli import main
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.families import image_to_image_pipeline, text_to_image_pipeline
from sdrt.runtime.pipeline import StableDiffusionPipeline
from sdrt.runtime.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from sdrt.runtime.tokenizer import ClipTokenizer

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
STEPS = 4
quiet = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def xl_checkpoints(tiny, tmp_path_factory) -> dict:
    """"base": an SDXL base checkpoint (the session's); "aesthetic": an img2img one whose UNet takes an aesthetic
    score."""
    root = tmp_path_factory.mktemp("sdxl-checkpoints")
    return {
        "base": tiny.checkpoint("xl-base"),
        "aesthetic": save_tiny_xl_pipeline(root / "aesthetic", seed=1, img2img=True, requires_aesthetics_score=True),
    }


@pytest.fixture(scope="module")
def xl_exported(xl_checkpoints, tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sdxl-exported")
    return {"base": tiny["xl-base"], "aesthetic": export_pipeline(xl_checkpoints["aesthetic"], root / "aesthetic",
                                                                  log=quiet)}


@pytest.fixture(scope="module")
def no_force_zeros(xl_exported, tmp_path_factory):
    """The exported base model with force_zeros_for_empty_prompt false in its model_index.json."""
    folder = shutil.copytree(xl_exported["base"], tmp_path_factory.mktemp("sdxl-variants") / "no-force-zeros")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    return folder


@pytest.fixture(scope="module")
def reference_txt2img(xl_checkpoints):
    return load_pipes(diffusers.StableDiffusionXLPipeline, {"base": xl_checkpoints["base"]})["base"]


@pytest.fixture(scope="module")
def reference_img2img(xl_checkpoints):
    return load_pipes(diffusers.StableDiffusionXLImg2ImgPipeline, xl_checkpoints)


@pytest.fixture(scope="module")
def txt2img(xl_exported):
    return StableDiffusionXLPipeline.from_pretrained(xl_exported["base"])


# -- export --------------------------------------------------------------------------------------


def test_export_writes_both_encoders_with_optimum_names(xl_exported):
    import onnx

    folder = xl_exported["base"]
    manifest = json.loads((folder / "sdrt.json").read_text())
    assert manifest["family"] == "stable-diffusion-xl" and manifest["validation"]["text_encoder_2"]["passed"]
    for sub in ("tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "text_encoder_2/model.onnx"):
        assert (folder / sub).is_file()
    for component, pooled, layers in (("text_encoder", "pooler_output", 3), ("text_encoder_2", "text_embeds", 2)):
        config = json.loads((folder / component / "config.json").read_text())
        assert config["output_hidden_states"] is True
        outputs = [o.name for o in onnx.load(str(folder / component / "model.onnx")).graph.output]
        assert outputs == ["last_hidden_state", pooled] + [f"hidden_states.{i}" for i in range(layers + 1)]
    unet = onnx.load(str(folder / "unet" / "model.onnx"))
    names = [i.name for i in unet.graph.input]
    assert names[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert names[5:] == [t.name for t in ModelFolder.open(folder).spec("unet").inputs[5:]]  # ControlNet residuals
    assert names[-1] == "mid_block_additional_residual"
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["text_encoder_projection_dim"] == 24 and config["requires_aesthetics_score"] is False
    assert ModelFolder.open(xl_exported["aesthetic"]).spec("unet").input("time_ids").shape == ("batch", 5)


def test_second_tokenizer_matches_transformers(xl_exported, xl_checkpoints):
    from transformers import CLIPTokenizer

    ours = ClipTokenizer.from_folder(xl_exported["base"] / "tokenizer_2")
    theirs = CLIPTokenizer.from_pretrained(xl_checkpoints["base"] / "tokenizer_2")
    assert theirs.pad_token == "!"
    prompts = PROMPTS + ["", "wow!! ! a cat"]
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours(prompts), np.array(expected))


# -- text-to-image parity --------------------------------------------------------------------------

MICRO = dict(original_size=(128, 256), crops_coords_top_left=(16, 8), target_size=(64, 80))
NEGATIVE_MICRO = dict(negative_original_size=(32, 48), negative_crops_coords_top_left=(4, 0),
                      negative_target_size=(48, 48))
CASES = [
    # (scheduler, kwargs); force_zeros_for_empty_prompt is true unless a case says otherwise
    (None, dict(prompt=PROMPTS[0])),
    (None, dict(prompt=PROMPTS[0], guidance_scale=1.0)),
    (None, dict(prompt=PROMPTS[1], negative_prompt="blurry", guidance_scale=6.0)),
    (None, dict(prompt=PROMPTS[0], negative_prompt_2="blurry")),  # zeros all the same: negative_prompt is None
    (None, dict(prompt=PROMPTS[0], prompt_2="")),  # an empty prompt_2 repeats prompt
    (None, dict(prompt=PROMPTS, prompt_2=["oil painting", "photo"], negative_prompt=["blurry", "ugly"],
                negative_prompt_2=["dark", ""], num_images_per_prompt=2)),
    (None, dict(prompt=PROMPTS[1], height=64, width=96, **MICRO)),
    (None, dict(prompt=PROMPTS[1], negative_prompt="", height=96, width=64, **MICRO, **NEGATIVE_MICRO)),
    ("euler-a", dict(prompt=PROMPTS[0], negative_prompt="blurry", guidance_rescale=0.7)),
    ("dpm++2m-karras", dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=4.0, **MICRO)),
]


@pytest.mark.parametrize("scheduler,kwargs", CASES, ids=[f"{s or 'default'}-{i}" for i, (s, _) in enumerate(CASES)])
def test_txt2img_matches_diffusers(reference_txt2img, xl_exported, scheduler, kwargs):
    expected = reference(reference_txt2img, scheduler, 1234, num_inference_steps=STEPS, **kwargs)
    got = StableDiffusionXLPipeline.from_pretrained(xl_exported["base"], scheduler=scheduler)(
        seed=1234, num_inference_steps=STEPS, output_type="np", **kwargs).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("kwargs", [dict(), dict(negative_prompt_2="blurry"), dict(negative_prompt="blurry")])
def test_force_zeros_false_encodes_the_empty_negative(reference_txt2img, xl_checkpoints, no_force_zeros, txt2img,
                                                      kwargs):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_checkpoints["base"],
                                                               force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt is False
    expected = reference((pipe, pipe.scheduler), None, 7, prompt=PROMPTS[0], num_inference_steps=STEPS, **kwargs)
    ours = StableDiffusionXLPipeline.from_pretrained(no_force_zeros, verify="none")
    got = ours(PROMPTS[0], seed=7, num_inference_steps=STEPS, output_type="np", **kwargs).images
    assert np.abs(got - expected).max() < 1e-3
    if "negative_prompt" not in kwargs:  # with force_zeros the same call gives another image
        zeros = txt2img(PROMPTS[0], seed=7, num_inference_steps=STEPS, output_type="np", **kwargs).images
        assert np.abs(got - zeros).max() > 1e-2


def test_micro_conditioning_changes_the_image(txt2img):
    """A guard on the parity cases above: the conditioning reaches the UNet."""
    plain = txt2img(PROMPTS[0], seed=3, num_inference_steps=2, output_type="np").images
    sized = txt2img(PROMPTS[0], seed=3, num_inference_steps=2, output_type="np", **MICRO).images
    assert np.abs(plain - sized).max() > 1e-2


# -- image-to-image parity -------------------------------------------------------------------------

IMG2IMG_CASES = [
    ("base", dict(prompt=PROMPTS[0])),  # diffusers' default strength, 0.3
    ("base", dict(prompt=PROMPTS[1], strength=0.75, guidance_scale=1.0)),
    ("base", dict(prompt=PROMPTS, strength=0.6, prompt_2=["oil painting", "photo"], negative_prompt=["blurry", "ugly"],
                  num_images_per_prompt=2)),
    ("base", dict(prompt=PROMPTS[0], strength=0.8, negative_prompt="blurry", **MICRO,
                  negative_original_size=(32, 48), negative_target_size=(48, 48))),
    ("aesthetic", dict(prompt=PROMPTS[0], strength=0.8)),
    ("aesthetic", dict(prompt=PROMPTS[1], strength=0.9, aesthetic_score=8.0, negative_aesthetic_score=1.0,
                       original_size=(256, 128), negative_original_size=(32, 32), negative_prompt="blurry")),
]


@pytest.mark.parametrize("model,kwargs", IMG2IMG_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(IMG2IMG_CASES)])
def test_img2img_matches_diffusers(reference_img2img, xl_exported, model, kwargs):
    image = picture(96, 64)
    expected = reference(reference_img2img[model], None, 4321, image=image, num_inference_steps=8, **kwargs)
    got = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl_exported[model])(
        image=image, seed=4321, num_inference_steps=8, output_type="np", **kwargs).images
    assert got.shape == expected.shape == (len(got), 64, 96, 3)
    assert np.abs(got - expected).max() < 1e-3


def test_aesthetic_score_changes_the_image(xl_exported):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl_exported["aesthetic"])
    images = [pipe(PROMPTS[0], picture(), strength=0.9, aesthetic_score=score, seed=1, num_inference_steps=4,
                   output_type="np").images for score in (6.0, 9.0)]
    assert np.abs(images[0] - images[1]).max() > 1e-2


# -- choosing the pipeline, bad inputs -------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_like_folder(xl_exported, tmp_path_factory):
    """An SD-style folder (one text encoder): the SDXL export without text_encoder_2, indexed as SD, and
    without sdrt.json (as optimum writes folders)."""
    folder = shutil.copytree(xl_exported["base"], tmp_path_factory.mktemp("sdxl-variants") / "one-encoder")
    shutil.rmtree(folder / "text_encoder_2")
    (folder / "sdrt.json").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    return folder


def test_families_pick_the_sdxl_classes(xl_exported, sd_like_folder):
    assert type(text_to_image_pipeline(xl_exported["base"])) is StableDiffusionXLPipeline
    assert type(image_to_image_pipeline(xl_exported["base"])) is StableDiffusionXLImg2ImgPipeline
    assert type(text_to_image_pipeline(sd_like_folder)) is StableDiffusionPipeline


def test_sdxl_pipeline_on_a_one_encoder_model_is_refused(sd_like_folder):
    with pytest.raises(UnsupportedConfigError, match="no second text encoder.*takes no prompt_2"):
        StableDiffusionXLPipeline.from_pretrained(sd_like_folder)


def test_sd_pipeline_on_an_sdxl_model_is_refused(xl_exported):
    with pytest.raises(UnsupportedConfigError, match="SDXL model.*StableDiffusionXLPipeline"):
        StableDiffusionPipeline.from_pretrained(xl_exported["base"])


def test_sdxl_folder_without_second_encoder_is_refused(xl_exported, tmp_path):
    folder = shutil.copytree(xl_exported["base"], tmp_path / "broken")
    (folder / "text_encoder_2" / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="lacks text_encoder_2/model.onnx"):
        ModelFolder.open(folder, verify="none")


def test_time_ids_the_unet_does_not_take_are_refused(xl_exported, tmp_path):
    folder = shutil.copytree(xl_exported["base"], tmp_path / "aesthetic-index")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, requires_aesthetics_score=True)))
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, verify="none")
    with pytest.raises(UnsupportedConfigError, match="UNet takes 6 time ids but this pipeline makes 5"):
        pipe(PROMPTS[0], picture(), num_inference_steps=4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_2=["a", "b"]), "prompt_2 has 2 entries but prompt has 1"),
    (dict(prompt_2=3), "prompt_2 must be a string or a list of strings"),
    (dict(negative_prompt_2=[1]), "negative_prompt_2 must be a string or a list of strings"),
    (dict(original_size=(64,)), r"original_size must be a pair of numbers"),
    (dict(crops_coords_top_left=(-1, 0)), r"crops_coords_top_left must be a pair of numbers >= 0"),
    (dict(negative_target_size="64x64"), "negative_target_size must be a pair"),
    (dict(height=72), "height=72 is not a multiple of 16"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
])
def test_bad_inputs(txt2img, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        txt2img(**{"prompt": PROMPTS[0], "num_inference_steps": 2, **kwargs})


def test_bad_aesthetic_score(xl_exported):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl_exported["aesthetic"])
    with pytest.raises(InvalidInputError, match="aesthetic_score must be a number"):
        pipe(PROMPTS[0], picture(), aesthetic_score="high", num_inference_steps=4)


# -- CLI, no torch -------------------------------------------------------------------------------------


def test_cli_generates_with_prompt_2(xl_exported, tmp_path, capsys):
    out = tmp_path / "xl.png"
    code = main(["generate", str(xl_exported["base"]), PROMPTS[0], "--prompt-2", "oil painting", "--steps", "2",
                 "--size", "96x64", "--seed", "5", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (96, 64)
        params = image.text["parameters"]
        assert "CFG scale: 5" in params and "CFG scale: 7.5" not in params, params  # SDXL default, as diffusers
    code = main(["generate", str(xl_exported["base"]), PROMPTS[0], "--image", str(out), "--strength", "0.5",
                 "--steps", "4", "-o", str(tmp_path / "i2i.png"), "-q"])
    assert code == 0, capsys.readouterr().err


def test_cli_refuses_prompt_2_without_a_second_encoder(sd_like_folder, tmp_path, capsys):
    code = main(["generate", str(sd_like_folder), PROMPTS[0], "--prompt-2", "x", "--steps", "1",
                 "-o", str(tmp_path / "x.png"), "-q"])
    assert code == 2
    assert "--prompt-2 needs a model with a second text encoder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sdxl_generates_without_torch(xl_exported):
    result = run_without_torch("""
import sys
from sdrt.runtime.sdxl import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
out = pipe("a red circle", prompt_2="a photo", num_inference_steps=2, seed=0, output_type="uint8")
assert out.images.shape == (1, 64, 64, 3)
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("ok")
""", str(xl_exported["base"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
