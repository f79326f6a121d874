"""The tiny VAE (TAESD): `export_taesd` adds diffusers' AutoencoderTiny to an exported folder (validated,
sdrt.json updated); txt2img and img2img with vae="taesd" match diffusers with `pipe.vae = AutoencoderTiny`
on the same checkpoint and seed; the per-step preview; bad inputs; the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference import load_pipes, reference
from sdrt.export.errors import CheckpointError, OutputExistsError, UnsupportedModelError, ValidationError
from sdrt.runtime.cli import main
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.info import describe
from sdrt.runtime.pipeline import StableDiffusionPipeline
from sdrt.runtime.preview import TaesdPreview
from test_img2img import picture

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def taesd_checkpoint(tmp_path_factory):
    from sdrt.export.fixtures_family import save_tiny_taesd

    return save_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.fixture(scope="module")
def folder(exported, taesd_checkpoint, tmp_path_factory):
    """A copy of the exported sd1 folder with the tiny VAE added."""
    from sdrt.export.taesd import export_taesd

    target = tmp_path_factory.mktemp("with-taesd") / "sd1"
    shutil.copytree(exported["sd1"], target)
    return export_taesd(taesd_checkpoint, target, **QUIET)


@pytest.fixture
def plain_copy(exported, tmp_path):
    target = tmp_path / "sd1"
    shutil.copytree(exported["sd1"], target)
    return target


def with_taesd(pipeline_cls, checkpoints, taesd_checkpoint):
    pipe, scheduler = load_pipes(pipeline_cls, {"sd1": checkpoints["sd1"]})["sd1"]
    pipe.vae = diffusers.AutoencoderTiny.from_pretrained(taesd_checkpoint)
    return pipe, scheduler


# -- export -------------------------------------------------------------------------------------------


def test_export_adds_validated_components_and_updates_the_manifest(folder):
    opened = ModelFolder.open(folder, verify="sha256")  # the file table covers the new files
    assert {"vae_tiny_decoder", "vae_tiny_encoder"} <= set(opened.components)
    manifest = json.loads((folder / "sdrt.json").read_text())
    for name in ("vae_tiny_decoder", "vae_tiny_encoder"):
        assert f"{name}/model.onnx" in manifest["files"]
        assert manifest["validation"][name]["passed"]
        assert name in manifest["tiny_vae"]["components"]
    assert "vae_tiny_decoder" not in manifest["components"]  # kept apart: `sdrt optimize` reads them from "tiny_vae"
    assert opened.spec("vae_tiny_encoder").output_names == ["latents"]
    info = describe(folder)
    assert info["tiny_vae"] == ["vae_tiny_decoder", "vae_tiny_encoder"]
    assert info["components"]["vae_tiny_decoder"]["max_abs_error"] is not None
    assert not list(folder.glob(".*"))  # no staging leftovers


def test_export_refuses_to_overwrite_without_force(folder, taesd_checkpoint):
    from sdrt.export.taesd import export_taesd

    with pytest.raises(OutputExistsError, match="already has vae_tiny_decoder, vae_tiny_encoder; pass --force"):
        export_taesd(taesd_checkpoint, folder, **QUIET)


def test_export_decoder_only_replaces_with_force(plain_copy, taesd_checkpoint):
    from sdrt.export.taesd import export_taesd

    export_taesd(taesd_checkpoint, plain_copy, **QUIET)
    export_taesd(taesd_checkpoint, plain_copy, force=True, encoder=False, **QUIET)
    opened = ModelFolder.open(plain_copy, verify="sha256")
    assert "vae_tiny_decoder" in opened.components and "vae_tiny_encoder" not in opened.components
    assert "vae_tiny_encoder" not in json.loads((plain_copy / "sdrt.json").read_text())["validation"]
    with pytest.raises(ModelFolderError, match="lacks vae_tiny_encoder/model.onnx, which img2img needs"):
        StableDiffusionImg2ImgPipeline.from_pretrained(plain_copy, vae="taesd")


def test_export_rejects_bad_sources_and_leaves_the_folder_unchanged(plain_copy, checkpoints, tmp_path,
                                                                    monkeypatch):
    from sdrt.export import taesd
    from sdrt.export.fixtures_family import tiny_taesd

    before = (plain_copy / "sdrt.json").read_bytes()
    with pytest.raises(CheckpointError, match="does not exist"):
        taesd.export_taesd(tmp_path / "nowhere", plain_copy, **QUIET)
    with pytest.raises(UnsupportedModelError, match="holds no AutoencoderTiny"):
        taesd.export_taesd(checkpoints["sd1"], plain_copy, **QUIET)  # a pipeline whose vae/ is an AutoencoderKL
    with pytest.raises(CheckpointError, match="not an exported sdrt/optimum folder"):
        taesd.export_taesd(checkpoints["sd1"], tmp_path, **QUIET)
    wide = tiny_taesd()
    wide = diffusers.AutoencoderTiny.from_config({**wide.config, "latent_channels": 16})
    wide.save_pretrained(tmp_path / "taesd3")
    with pytest.raises(UnsupportedModelError, match="16 latent channels but .* has 4"):
        taesd.export_taesd(tmp_path / "taesd3", plain_copy, **QUIET)

    def failing_compare(*args, **kwargs):
        raise ValidationError("vae_tiny_decoder: onnxruntime output differs from torch")

    monkeypatch.setattr("sdrt.export.validate.compare", failing_compare)
    from sdrt.export.fixtures_family import save_tiny_taesd

    with pytest.raises(ValidationError):
        taesd.export_taesd(save_tiny_taesd(tmp_path / "taesd"), plain_copy, **QUIET)
    assert (plain_copy / "sdrt.json").read_bytes() == before
    assert not (plain_copy / "vae_tiny_decoder").exists() and not list(plain_copy.glob(".*"))


# -- parity with diffusers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def txt2img_reference(checkpoints, taesd_checkpoint):
    return with_taesd(diffusers.StableDiffusionPipeline, checkpoints, taesd_checkpoint)


TXT2IMG = [
    (None, dict(prompt=PROMPTS[0], guidance_scale=7.5)),
    ("euler-a", dict(prompt=PROMPTS, guidance_scale=0.0, num_images_per_prompt=2)),
    ("dpm++2m-karras", dict(prompt=PROMPTS[1], guidance_scale=5.0, height=64, width=96)),
]


@pytest.mark.parametrize("scheduler,kwargs", TXT2IMG, ids=[s or "default" for s, _ in TXT2IMG])
def test_txt2img_matches_diffusers_with_autoencoder_tiny(txt2img_reference, folder, scheduler, kwargs):
    seed = 2024
    expected = reference(txt2img_reference, scheduler, seed, num_inference_steps=4, **kwargs)
    tiny = StableDiffusionPipeline.from_pretrained(folder, scheduler=scheduler, vae="taesd")
    got = tiny(num_inference_steps=4, seed=seed, output_type="np", **kwargs).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3
    full = StableDiffusionPipeline.from_pretrained(folder, scheduler=scheduler)
    assert np.abs(full(num_inference_steps=4, seed=seed, output_type="np", **kwargs).images - got).max() > 1e-2


@pytest.mark.parametrize("scheduler,strength", [("ddim", 0.75), ("euler-a", 0.5)])
def test_img2img_encodes_with_the_tiny_vae_as_diffusers(checkpoints, taesd_checkpoint, folder, scheduler, strength):
    """AutoencoderTiny's encoder gives latents, not a distribution: no random draw before the noise."""
    ref = with_taesd(diffusers.StableDiffusionImg2ImgPipeline, checkpoints, taesd_checkpoint)
    seed, image = 11, picture()
    kwargs = dict(prompt=PROMPTS[0], image=image, strength=strength, num_inference_steps=6, guidance_scale=6.0)
    expected = reference(ref, scheduler, seed, **kwargs)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, scheduler=scheduler, vae="taesd")
    got = pipe(seed=seed, output_type="np", **kwargs).images
    assert np.abs(got - expected).max() < 1e-3


# -- preview -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vae", ["full", "taesd"])
def test_preview_decodes_each_step_with_the_tiny_vae(folder, vae):
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler", vae=vae)
    seen = []
    preview = TaesdPreview(pipe, lambda step, images: seen.append((step, images)), every=2)
    pipe(PROMPTS[0], num_inference_steps=4, seed=5, output_type="uint8", callback=preview)
    assert [step for step, _ in seen] == [1, 3]
    assert all(images.shape == (1, 64, 64, 3) and images.dtype == np.uint8 for _, images in seen)
    # The last preview is the final image as the tiny VAE decodes it.
    final = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler", vae="taesd")(
        PROMPTS[0], num_inference_steps=4, seed=5, output_type="uint8").images
    assert np.array_equal(seen[-1][1], final)
    preview.release()


def test_preview_can_cancel_and_needs_the_tiny_vae(folder, exported):
    from sdrt.runtime.errors import CancelledError

    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")
    with pytest.raises(CancelledError, match="after step 1/3"):
        pipe(PROMPTS[0], num_inference_steps=3, seed=1, callback=TaesdPreview(pipe, lambda step, images: False))
    with pytest.raises(InvalidInputError, match="every must be an integer >= 1"):
        TaesdPreview(pipe, print, every=0)
    with pytest.raises(ModelFolderError, match="sdrt export-taesd"):
        TaesdPreview(StableDiffusionPipeline.from_pretrained(exported["sd1"]), print)


# -- bad input and CLI --------------------------------------------------------------------------------


def test_vae_option_errors(folder, exported):
    with pytest.raises(ModelFolderError, match="has no tiny VAE .*`sdrt export-taesd"):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], vae="taesd")
    with pytest.raises(InvalidInputError, match="vae must be one of"):
        StableDiffusionPipeline.from_pretrained(folder, vae="tiny-ish")


def test_cli_generate_with_taesd(folder, exported, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["generate", str(folder), PROMPTS[0], "-o", str(out), "--steps", "2", "--seed", "3", "--vae",
                 "taesd", "-q"]) == 0
    expected = StableDiffusionPipeline.from_pretrained(folder, vae="taesd")(
        PROMPTS[0], num_inference_steps=2, guidance_scale=7.5, seed=3, output_type="uint8").images[0]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), expected)
    rc = main(["generate", str(exported["sd1"]), "x", "-o", str(tmp_path / "u.png"), "--vae", "taesd", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has no tiny VAE" in err and "export-taesd" in err and "Traceback" not in err


def test_cli_export_taesd_and_info(plain_copy, taesd_checkpoint, capsys):
    assert main(["export-taesd", str(taesd_checkpoint), str(plain_copy), "--decoder-only"]) == 0
    assert main(["info", str(plain_copy)]) == 0
    assert "tiny VAE   vae_tiny_decoder (--vae taesd)" in capsys.readouterr().out
    assert main(["export-taesd", str(taesd_checkpoint), str(plain_copy)]) == 2
    assert "pass --force" in capsys.readouterr().err
