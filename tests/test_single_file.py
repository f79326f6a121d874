"""Single-file checkpoints (`sdrt export model.safetensors OUT`): tiny diffusers pipelines written in the original
Stable Diffusion layout by sdrt.export.fixtures_single_file, read back with diffusers' single-file loader, exported,
and compared with the export of the diffusers folder they came from."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402

from sdrt.export import single_file  # noqa: E402
from sdrt.export.errors import CheckpointError, ExportError, UnsupportedModelError  # noqa: E402
from sdrt.runtime import cli  # noqa: E402


@pytest.fixture(scope="module")
def sd1_file(checkpoints, tmp_path_factory):
    """The tiny SD1 checkpoint of the session fixtures as one original-layout .safetensors."""
    from diffusers import StableDiffusionPipeline

    from sdrt.export.fixtures_single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(checkpoints["sd1"])
    return save_single_file(pipe, tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def sd1_file_export(sd1_file, checkpoints, tmp_path_factory):
    from sdrt.export.api import export_pipeline

    out = tmp_path_factory.mktemp("single-export") / "sd1"
    return export_pipeline(sd1_file, out, config=checkpoints["sd1"], log=lambda m: None,
                           components=["text_encoder", "unet", "vae_decoder"])


def _image(folder, **kw):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    return pipe("a red circle", num_inference_steps=3, guidance_scale=7.5, seed=7, height=64, width=64,
                output_type="np", **kw).images


def test_single_file_export_gives_the_folder_export_image(sd1_file, sd1_file_export, exported):
    """The single file and its diffusers folder give the same image, bit for bit (the same weights, exported alike)."""
    import hashlib

    a, b = _image(sd1_file_export), _image(exported["sd1"])
    assert a.shape == b.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    manifest = json.loads((sd1_file_export / "sdrt.json").read_text())
    assert manifest["single_file"] == {"architecture": "sd1", "file": "tiny-sd1.safetensors",
                                       "sha256": hashlib.sha256(sd1_file.read_bytes()).hexdigest()}
    assert manifest["source"] == str(sd1_file.resolve())
    assert [p.name for p in sd1_file_export.parent.iterdir()] == ["sd1"]  # no work folders left


@pytest.mark.parametrize("flavour", ["sd2", "sdxl", "sdxl-refiner", "sd1-inpaint", "sdxl-inpaint"])
def test_every_architecture_reads_back_to_the_same_weights(flavour, tmp_path):
    """Each layout is recognized and diffusers' loader, given the folder's configs, restores every weight exactly."""
    from sdrt.export.fixtures import tiny_pipeline
    from sdrt.export.fixtures_inpaint import tiny_inpaint_pipeline, tiny_xl_inpaint_pipeline
    from sdrt.export.fixtures_single_file import save_single_file
    from sdrt.export.fixtures_xl import tiny_xl_pipeline, tiny_xl_refiner

    make, layout = {
        "sd2": (lambda: tiny_pipeline("sd2"), "sd2"),
        "sdxl": (tiny_xl_pipeline, "sdxl"),
        "sdxl-refiner": (tiny_xl_refiner, "sdxl-refiner"),
        "sd1-inpaint": (lambda: tiny_inpaint_pipeline("sd1"), "sd1"),
        "sdxl-inpaint": (tiny_xl_inpaint_pipeline, "sdxl"),
    }[flavour]
    pipe = make()
    pipe.save_pretrained(tmp_path / "folder")
    source = single_file.inspect(save_single_file(pipe, tmp_path / "model.safetensors", layout))
    assert source.architecture == flavour
    folder = single_file.convert(source, tmp_path / "converted", config=tmp_path / "folder", log=lambda m: None)
    back = type(pipe).from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            continue
        want, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert not (tmp_path / "converted.configs").exists()


def test_shipped_configs_have_the_published_sizes():
    """The configs sdrt ships for full-size single files build networks of the published parameter counts."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    published = {  # UNet, text encoders (diffusers' / transformers' reference checkpoints)
        "sd1": (859_520_964, [123_060_480]), "sd2": (865_910_724, [340_387_840]),
        "sdxl": (2_567_463_684, [123_060_480, 694_659_840]), "sd1-inpaint": (859_535_364, [123_060_480]),
    }
    for name, (unet_size, encoder_sizes) in published.items():
        arch = single_file.ARCHITECTURES[name]
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(arch.unet)
            vae = AutoencoderKL.from_config(arch.vae)
            sizes = []
            for _, cls, config, _ in arch.text_encoders:
                model = (CLIPTextModel if cls == "CLIPTextModel" else CLIPTextModelWithProjection)(
                    CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"}))
                sizes.append(sum(p.numel() for p in model.parameters()))
        assert sum(p.numel() for p in unet.parameters()) == unet_size, name
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863, name
        assert sizes == encoder_sizes, name


def _fake(path, tensors: dict):
    """A valid .safetensors file with these (name -> shape) tensors, zeros (the header is what is read)."""
    from safetensors.numpy import save_file

    save_file({k: np.zeros(s, np.float16) for k, s in tensors.items()}, str(path))
    return path


UNET4 = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "first_stage_model.decoder.conv_in.weight": (2,)}


@pytest.mark.parametrize("extra, expected", [
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}, "sd1"),
    ({"cond_stage_model.model.ln_final.weight": (4,)}, "sd2"),
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,),
      "conditioner.embedders.1.model.ln_final.weight": (4,)}, "sdxl"),
    ({"conditioner.embedders.0.model.ln_final.weight": (4,)}, "sdxl-refiner"),
])
def test_detects_the_architecture_from_the_keys(tmp_path, extra, expected):
    assert single_file.inspect(_fake(tmp_path / "m.safetensors", {**UNET4, **extra})).architecture == expected
    nine = {**UNET4, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3), **extra}
    if expected != "sdxl-refiner":
        assert single_file.inspect(_fake(tmp_path / "i.safetensors", nine)).architecture == expected + "-inpaint"


@pytest.mark.parametrize("tensors, error, words", [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, UnsupportedModelError, "SD3"),
    ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, UnsupportedModelError, "Flux"),
    ({"control_model.time_embed.0.weight": (4, 4)}, UnsupportedModelError, "ControlNet"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, CheckpointError, "lora_unet_down"),
    ({**UNET4, "model.diffusion_model.input_blocks.0.0.weight": (8, 8, 3, 3),
      "cond_stage_model.transformer.text_model.x": (2,)}, UnsupportedModelError, "pix2pix"),
    (UNET4, CheckpointError, "no text encoder"),
])
def test_unrecognized_files_say_what_was_found(tmp_path, tensors, error, words):
    with pytest.raises(error, match=words):
        single_file.inspect(_fake(tmp_path / "m.safetensors", tensors))


def test_pickles_and_broken_files_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 not read")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    good = _fake(tmp_path / "t.safetensors", {**UNET4, "cond_stage_model.model.ln_final.weight": (4,)})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    header = json.dumps({"a": {"dtype": "F32", "shape": [2]}}).encode()  # no data_offsets
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    cases = {"model.ckpt": "pickle", "model.pt": "pickle", "junk.safetensors": "not a safetensors file",
             "cut.safetensors": "truncated", "bad.safetensors": "malformed", "missing.safetensors": "does not exist"}
    for name, words in cases.items():
        out = tmp_path / ("out-" + name)
        assert cli.main(["export", str(tmp_path / name), str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() and not list(tmp_path.glob(".out-*")), name


def test_tiny_file_without_its_config_says_to_pass_one(sd1_file, tmp_path):
    """The shipped configs are SD 1.x's full size: a smaller model is refused with the way out, nothing written."""
    from sdrt.export.api import export_pipeline

    with pytest.raises(CheckpointError, match="--config") as e:
        export_pipeline(sd1_file, tmp_path / "out", log=lambda m: None)
    assert "cond_stage_model.transformer" in str(e.value)  # what was found
    assert list(tmp_path.iterdir()) == []


def test_config_and_prediction_type_checks(sd1_file, checkpoints, tmp_path):
    from sdrt.export.api import export_pipeline

    with pytest.raises(ExportError, match="single-file"):
        export_pipeline(checkpoints["sd1"], tmp_path / "o", config=checkpoints["sd2"], log=lambda m: None)
    with pytest.raises(ExportError, match="prediction_type"):
        export_pipeline(sd1_file, tmp_path / "o", prediction_type="sample", log=lambda m: None)
    with pytest.raises(CheckpointError, match="model_index.json"):
        export_pipeline(sd1_file, tmp_path / "o", config=tmp_path, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_prediction_type_override_reaches_the_folder(sd1_file, checkpoints, tmp_path):
    folder = single_file.convert(single_file.inspect(sd1_file), tmp_path / "c", config=checkpoints["sd1"],
                                 prediction_type="v_prediction", log=lambda m: None)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_v_pred_and_ztsnr_markers_set_the_scheduler(sd1_file, checkpoints, tmp_path):
    """The empty marker tensors A1111/ComfyUI read in v-prediction / zero-terminal-SNR checkpoints (SDXL v-pred)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(sd1_file))
    save_file({**tensors, "v_pred": np.zeros(0, np.float32), "ztsnr": np.zeros(0, np.float32)},
              str(tmp_path / "vpred.safetensors"))
    folder = single_file.convert(single_file.inspect(tmp_path / "vpred.safetensors"), tmp_path / "c",
                                 config=checkpoints["sd1"], log=lambda m: None)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
