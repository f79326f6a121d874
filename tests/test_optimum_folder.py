"""A folder written by `optimum-cli export onnx` (tests/data/optimum-sd1, made by tools/make_optimum_fixture.py in a
venv of its own: optimum-onnx pins transformers 4) runs in sdrt and gives diffusers' image of the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.core.models import Models
from sdrt.runtime.core.timestep import TimestepForm
from sdrt.runtime.pipeline import StableDiffusionPipeline

DATA = Path(__file__).parent / "data" / "optimum-sd1"
KW = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64)


@pytest.fixture(scope="module")
def diffusers_pipe():
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline as Reference

    from sdrt.export.fixtures import clip_tokenizer

    pipe = Reference.from_pretrained(DATA / "diffusers", tokenizer=clip_tokenizer(), safety_checker=None,
                                     requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_fixture_was_made_by_optimum():
    made = json.loads((DATA / "MADE_BY.json").read_text())
    assert made["versions"]["transformers"].startswith("4.") and "optimum-onnx" in made["versions"]
    folder = ModelFolder.open(DATA / "onnx")
    assert folder.manifest is None  # no sdrt.json: optimum's layout only


@pytest.mark.parametrize("scheduler", [None, "euler-a", "dpm++2m-karras"])
def test_optimum_folder_gives_diffusers_image(diffusers_pipe, scheduler):
    from tests.reference import reference

    want = reference((diffusers_pipe, diffusers_pipe.scheduler), scheduler, 3, prompt="a red circle",
                     negative_prompt="blurry", **KW)
    pipe = StableDiffusionPipeline.from_pretrained(DATA / "onnx", scheduler=scheduler)
    got = pipe("a red circle", negative_prompt="blurry", seed=3, output_type="np", **KW).images
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert np.abs(got - want).max() < 1e-3


def test_optimum_unet_takes_a_scalar_timestep_and_mixed_rows_run_per_timestep():
    """The UNet is asked once (sdrt's per-row form fails in its time projection) and then fed a scalar; rows at
    different timesteps (a server's batch) give what each gives alone."""
    models = Models(ModelFolder.open(DATA / "onnx"))
    unet = models.unet
    assert isinstance(unet, TimestepForm) and unet.form is None
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    text = rng.standard_normal((3, 77, 8), dtype=np.float32)
    same = unet.run({"sample": sample, "timestep": np.full(3, 500, np.float32), "encoder_hidden_states": text})
    assert unet.form == "scalar"
    mixed = unet.run({"sample": sample, "timestep": np.array([900, 10, 900], np.float32), "encoder_hidden_states": text})
    for row, t in enumerate((900, 10, 900)):
        alone = unet.run({"sample": sample[row:row + 1], "timestep": np.array([t], np.float32),
                          "encoder_hidden_states": text[row:row + 1]})
        np.testing.assert_array_equal(mixed["out_sample"][row], alone["out_sample"][0])
    assert not np.allclose(mixed["out_sample"][1], same["out_sample"][1])


def test_sdrt_folders_keep_one_timestep_per_row(exported):
    models = Models(ModelFolder.open(exported["sd1"]))
    assert not isinstance(models.unet, TimestepForm)
