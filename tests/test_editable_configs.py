"""Scheduler configs edited the way diffusers users edit them (scheduler_config.json, model_index.json), and the
command-line forms (--scheduler-config, --scheduler-option): the folder still loads, runs with the edited options
at diffusers parity, and `sdrt info` says what differs from the export; weights and tokenizer stay checked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import cli
from sdrt.runtime.config import ModelFolder, is_editable
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.info import describe
from sdrt.runtime.pipeline import StableDiffusionPipeline
from sdrt.runtime.schedulers.overrides import merged, parse_option

KW = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64)
EDIT = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "use_karras_sigmas": True}


def _edit(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def edited(exported, checkpoints, tmp_path_factory):
    """The tiny SD1 export and its diffusers checkpoint, both with EDIT in scheduler/scheduler_config.json."""
    root = tmp_path_factory.mktemp("edited")
    folder, checkpoint = root / "export", root / "checkpoint"
    shutil.copytree(exported["sd1"], folder)
    shutil.copytree(checkpoints["sd1"], checkpoint)
    for path in (folder, checkpoint):  # as diffusers users change the scheduler: its class is model_index.json's
        _edit(path / "scheduler" / "scheduler_config.json", **EDIT)
        _edit(path / "model_index.json", scheduler=["diffusers", EDIT["_class_name"]])
    return folder, checkpoint


def _diffusers(checkpoint, seed=5, scheduler_options=None):
    pytest.importorskip("diffusers")
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    if scheduler_options:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler_options)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **KW).images


def test_an_edited_scheduler_config_loads_and_runs_at_diffusers_parity(edited):
    folder, checkpoint = edited
    reference, want = _diffusers(checkpoint)
    assert type(reference.scheduler).__name__ == "EulerDiscreteScheduler" and reference.scheduler.use_karras_sigmas
    pipe = StableDiffusionPipeline.from_pretrained(folder, verify="sha256")
    got = pipe("a red circle", seed=5, output_type="np", **KW).images
    assert np.abs(got - want).max() < 1e-3
    plain = StableDiffusionPipeline.from_pretrained(folder, scheduler="pndm")
    assert np.abs(plain("a red circle", seed=5, output_type="np", **KW).images - want).max() > 1e-2  # it mattered


def test_info_reports_the_edited_configs(edited, capsys):
    folder, _ = edited
    assert describe(folder)["edited_configs"] == ["model_index.json", "scheduler/scheduler_config.json"]
    assert cli.main(["info", str(folder)]) == 0  # sha256 verification of every other file passes
    out = capsys.readouterr().out
    assert "edited" in out and "model_index.json" in out and "scheduler/scheduler_config.json" in out


def test_weights_and_tokenizer_stay_checked(exported, tmp_path):
    for rel, change in (("unet/model.onnx", b"\0"), ("tokenizer/vocab.json", b" ")):
        folder = tmp_path / rel.replace("/", "_")
        shutil.copytree(exported["sd1"], folder)
        with open(folder / rel, "ab") as f:
            f.write(change)
        with pytest.raises(ModelFolderError, match="re-export"):
            ModelFolder.open(folder)
    assert is_editable("scheduler/scheduler_config.json") and is_editable("unet/config.json")
    assert not is_editable("tokenizer/tokenizer_config.json") and not is_editable("unet/model.onnx")


def test_scheduler_options_on_the_command_line_match_diffusers_from_config(exported, checkpoints, tmp_path):
    options = {"timestep_spacing": "trailing", "steps_offset": 0}
    _, want = _diffusers(checkpoints["sd1"], seed=9, scheduler_options=options)
    out = tmp_path / "o.png"
    args = ["generate", str(exported["sd1"]), "a red circle", "-o", str(out), "--steps", "4", "--guidance", "7.5",
            "--size", "64x64", "--seed", "9", "--quiet"]
    assert cli.main(args + [f"--scheduler-option={k}={v}" for k, v in options.items()]) == 0
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert np.abs(got - want[0]).max() <= 1.5 / 255
    config = dict(json.loads((exported["sd1"] / "scheduler" / "scheduler_config.json").read_text()), **options)
    (tmp_path / "s.json").write_text(json.dumps(config))
    assert cli.main(args[:4] + [str(tmp_path / "f.png")] + args[5:] + ["--scheduler-config", str(tmp_path / "s.json")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")), np.asarray(Image.open(out)))


@pytest.mark.parametrize("flags, words", [
    (["--scheduler-option", "timestep_spacing"], "KEY=VALUE"),
    (["--scheduler-option", "timestep_spacin=trailing"], "did you mean timestep_spacing"),
    (["--scheduler-option", "timestep_spacing=sideways"], "sideways"),
    (["--scheduler-option", "beta_start=nan"], "must be a number"),
    (["--scheduler-option", "beta_start=NaN"], "finite"),
    (["--scheduler-config", "/nonexistent.json"], "no such file"),
])
def test_bad_scheduler_options_are_refused_before_any_work(exported, tmp_path, capsys, flags, words):
    out = tmp_path / "x.png"
    assert cli.main(["generate", str(exported["sd1"]), "a cat", "-o", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not out.exists()


def test_option_values_parse_as_diffusers_users_write_them(tmp_path):
    assert parse_option("use_karras_sigmas=true") == ("use_karras_sigmas", True)
    assert parse_option("use_karras_sigmas=True") == ("use_karras_sigmas", True)
    assert parse_option("variance_type=None") == ("variance_type", None)
    assert parse_option("beta_end=0.012") == ("beta_end", 0.012)
    assert parse_option("timestep_spacing=trailing") == ("timestep_spacing", "trailing")
    assert parse_option("steps_offset=1") == ("steps_offset", 1)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="JSON object"):
        merged({}, tmp_path / "bad.json")
    assert merged({"a": 1, "beta_end": 0.02}, None, ["beta_end=0.012"]) == {"a": 1, "beta_end": 0.012}


def test_ddpm_takes_diffusers_variance_type_none(exported, checkpoints, tmp_path):
    """DPM-Solver configs (the demo model's) write variance_type: null; diffusers' DDPM then samples fixed_small."""
    pytest.importorskip("diffusers")
    import diffusers
    import torch

    folder = tmp_path / "f"
    shutil.copytree(exported["sd1"], folder)
    _edit(folder / "scheduler" / "scheduler_config.json", variance_type=None)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoints["sd1"], safety_checker=None)
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config, variance_type=None)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a red circle", generator=torch.Generator().manual_seed(2), output_type="np", **KW).images
    got = StableDiffusionPipeline.from_pretrained(folder, scheduler="ddpm")("a red circle", seed=2, output_type="np",
                                                                            **KW).images
    assert np.abs(got - want).max() < 1e-3


def test_the_demo_folder_has_a_complete_scheduler_config():
    from sdrt.runtime.demo import default_model

    config = ModelFolder.open(default_model()).scheduler_config
    assert config["clip_sample"] is False and config["set_alpha_to_one"] is False
    assert ModelFolder.open(default_model(), verify="sha256").edited_configs() == []
