"""Bad input to `sdrt export` / `sdrt info`: a typed error, a clear message, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("diffusers")

from sdrt.export import validate
from sdrt.export.api import export_pipeline
from sdrt.export.errors import CheckpointError, OutputExistsError, UnsupportedModelError, ValidationError
from sdrt.runtime.cli import main
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import ModelFolderError


def quiet(msg):
    pass


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture()
def ckpt_copy(checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["sd1"], dst)
    return dst


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_pipeline(tmp_path / "nope", tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_source_not_diffusers(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        export_pipeline(tmp_path / "src", tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_unsupported_family_is_named(ckpt_copy, tmp_path):
    index = json.loads((ckpt_copy / "model_index.json").read_text())
    index["_class_name"] = "FluxControlNetPipeline"
    (ckpt_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="Flux ControlNets are not supported yet"):
        export_pipeline(ckpt_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")
    index["_class_name"] = "StableDiffusion3Pipeline"  # an SD3 index over a UNet folder: its transformer is missing
    (ckpt_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no transformer/ folder"):
        export_pipeline(ckpt_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_output_exists_needs_force(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export_pipeline(checkpoints["sd1"], out, log=quiet)
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupted_weights_file(ckpt_copy, tmp_path):
    weights = ckpt_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unet: the weights .* could not be loaded"):
        export_pipeline(ckpt_copy, tmp_path / "out", components=["unet"], log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_weights_that_do_not_all_load_are_refused(ckpt_copy, tmp_path):
    """A text encoder whose weights silently re-initialize must stop the export, naming the weights."""
    from safetensors.torch import load_file, save_file

    path = ckpt_copy / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    dropped = next(k for k in tensors if k.endswith("encoder.layers.1.mlp.fc2.weight"))
    del tensors[dropped]
    tensors["extra.weight"] = tensors[next(k for k in tensors if k.endswith("final_layer_norm.weight"))].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        export_pipeline(ckpt_copy, tmp_path / "out", components=["text_encoder"], log=quiet)
    assert "encoder.layers.1.mlp.fc2.weight" in str(info.value) and "extra.weight" in str(info.value)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("opset", [11, 17, 99])
def test_opset_we_cannot_produce(checkpoints, tmp_path, opset):
    with pytest.raises(UnsupportedModelError, match=f"opset {opset} cannot be produced"):
        export_pipeline(checkpoints["sd1"], tmp_path / "out", opset=opset, log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_validation_miss_fails_the_export(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(validate.TOLERANCE, "fp32", -1.0)
    with pytest.raises(ValidationError, match="differs from torch"):
        export_pipeline(checkpoints["sd1"], tmp_path / "out", components=["vae_decoder"], log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_failed_force_export_keeps_the_old_folder(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setitem(validate.TOLERANCE, "fp32", -1.0)
    with pytest.raises(ValidationError):
        export_pipeline(checkpoints["sd1"], out, components=["vae_decoder"], force=True, log=quiet)
    assert (out / "keep.txt").read_text() == "old"


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err


# -- sdrt info on damaged folders -------------------------------------------------------------

@pytest.fixture()
def folder_copy(exported, tmp_path):
    dst = tmp_path / "folder"
    shutil.copytree(exported["sd1"], dst)
    return dst


def test_info_describes_a_good_folder(folder_copy, capsys):
    assert main(["info", str(folder_copy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "stable-diffusion" and info["verified"] == "sha256"
    assert set(info["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert info["components"]["unet"]["max_abs_error"] < 1e-4


def test_info_missing_model(folder_copy, capsys):
    (folder_copy / "unet" / "model.onnx").unlink()
    assert main(["info", str(folder_copy)]) == 2
    assert "unet/model.onnx" in capsys.readouterr().err


def test_info_truncated_model(folder_copy):
    f = folder_copy / "vae_decoder" / "model.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match="truncated"):
        ModelFolder.open(folder_copy, verify="size")


def test_info_hash_mismatch(folder_copy, capsys):
    f = folder_copy / "unet" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["info", str(folder_copy)]) == 2
    assert "sha256" in capsys.readouterr().err


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="could not be downloaded from the Hugging Face hub"):
        export_pipeline("sdrt-test/no-such-model", tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")
