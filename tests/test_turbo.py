"""SD-Turbo-style sampling needs nothing new in sdrt: a folder whose scheduler config has "trailing"
timestep spacing, run at guidance_scale 0 for 1-4 steps, matches diffusers' StableDiffusionPipeline on
the same checkpoint and seed (Euler as in SD-Turbo's config, and Euler ancestral from the same config)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference import load_pipes, reference
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def turbo_checkpoint(tmp_path_factory):
    from sdrt.export.fixtures_family import save_tiny_turbo_pipeline

    return save_tiny_turbo_pipeline(tmp_path_factory.mktemp("turbo-checkpoint") / "turbo")


@pytest.fixture(scope="module")
def turbo_folder(turbo_checkpoint, tmp_path_factory):
    from sdrt.export.api import export_pipeline

    return export_pipeline(turbo_checkpoint, tmp_path_factory.mktemp("turbo-exported") / "turbo",
                           components=("text_encoder", "unet", "vae_decoder"), log=lambda m: None)


@pytest.fixture(scope="module")
def reference_pipe(turbo_checkpoint):
    return load_pipes(diffusers.StableDiffusionPipeline, {"turbo": turbo_checkpoint})["turbo"]


def test_the_folder_keeps_the_trailing_spacing(turbo_folder):
    config = json.loads((turbo_folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler" and config["timestep_spacing"] == "trailing"


@pytest.mark.parametrize("scheduler", [None, "euler-a"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_images_match_diffusers(reference_pipe, turbo_folder, scheduler, steps):
    seed = 99
    expected = reference(reference_pipe, scheduler, seed, prompt=PROMPT, num_inference_steps=steps,
                         guidance_scale=0.0)
    pipe = StableDiffusionPipeline.from_pretrained(turbo_folder, scheduler=scheduler)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, seed=seed, output_type="np")
    assert out.images.shape == expected.shape
    assert np.abs(out.images - expected).max() < 1e-3


def test_one_step_starts_from_the_last_training_timestep(turbo_folder):
    """Trailing spacing: the single step is taken at t = 999, where "leading" would give t = 1."""
    pipe = StableDiffusionPipeline.from_pretrained(turbo_folder)
    assert pipe.scheduler.plan(1).timesteps.tolist() == [999]
