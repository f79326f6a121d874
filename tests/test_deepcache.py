"""Step caching (DeepCache): the split graphs against a torch reference of the same split, on the bundled demo
model (its last up block has cross-attention, as SD1.5's) and the tiny sd1 export (without); the shallow branch
equals the whole UNet when the cached feature is fresh; `cache_interval` in the pipeline, with each engine."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.engines import create_engine
from sdrt.engines.spec import zero_residuals
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.deepcache import FEATURE, specs
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.pipeline import StableDiffusionPipeline

pytest.importorskip("onnx")
REPO = Path(__file__).resolve().parent.parent
ENGINES = [pytest.param("cpu", id="onnxruntime"),
           pytest.param("openvino", id="openvino", marks=pytest.mark.skipif(
               importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed"))]


@pytest.fixture(scope="module")
def split(exported, tmp_path_factory):
    """Copies of the demo folder and the tiny sd1 export with the step-caching graphs written by `sdrt deepcache`."""
    from sdrt.runtime.cli import main

    root = tmp_path_factory.mktemp("deepcache")
    folders = {"demo": root / "demo", "sd1": root / "sd1"}
    shutil.copytree(REPO / "models" / "shapes-demo-onnx", folders["demo"])
    shutil.copytree(exported["sd1"], folders["sd1"])
    for folder in folders.values():
        assert main(["deepcache", str(folder)]) == 0
    return folders


def _torch_unet(name, checkpoints):
    diffusers = pytest.importorskip("diffusers")
    path = REPO / "models" / "shapes-demo" / "unet" if name == "demo" else checkpoints["sd1"] / "unet"
    return diffusers.UNet2DConditionModel.from_pretrained(path).eval()


def _feed(folder: ModelFolder, batch: int = 2, side: int | None = None) -> dict:
    spec = folder.spec("unet")
    side = side or 8 * spec.vae_scale_factor
    dims = spec.dims(batch, side, side)
    rng = np.random.default_rng(0)
    cross = spec.input("encoder_hidden_states").shape[-1]
    return {"sample": rng.standard_normal(spec.input("sample").resolve(dims)).astype(np.float32),
            "timestep": np.array([700.0, 300.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, cross)).astype(np.float32),
            **zero_residuals(spec, batch, side, side)}


def _torch_split(unet, feed, feature=None):
    """The torch UNet on `feed`: (out_sample, the hidden state entering the last up block); with `feature`, that
    hidden state is replaced by it (the shallow branch's math, in the reference implementation)."""
    import torch

    seen = {}

    def hook(module, args, kwargs):
        seen["feature"] = kwargs["hidden_states"].detach().clone()
        if feature is not None:
            kwargs = {**kwargs, "hidden_states": torch.from_numpy(feature)}
        return args, kwargs

    handle = unet.up_blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = unet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                       torch.from_numpy(feed["encoder_hidden_states"])).sample
    finally:
        handle.remove()
    return out.numpy(), seen["feature"].numpy()


@pytest.mark.parametrize("name", ["demo", "sd1"])
def test_split_matches_a_torch_reference_of_the_same_split(split, checkpoints, name):
    folder = ModelFolder.open(split[name])
    record = folder.manifest["deepcache"]
    full_spec, shallow_spec = specs(folder.spec("unet"), record["feature_channels"])
    full = create_engine(folder.path / record["full"], full_spec)
    shallow = create_engine(folder.path / record["shallow"], shallow_spec)
    unet = _torch_unet(name, checkpoints)
    feed = _feed(folder)
    want_out, want_feature = _torch_split(unet, feed)
    got = full.run(feed)
    assert got[FEATURE].shape == want_feature.shape and want_feature.shape[1] == record["feature_channels"]
    np.testing.assert_allclose(got[FEATURE], want_feature, atol=1e-4 * max(1, np.abs(want_feature).max()))
    np.testing.assert_allclose(got["out_sample"], want_out, atol=1e-4 * max(1, np.abs(want_out).max()))
    # A fresh feature: the shallow branch is the whole UNet.
    fresh = shallow.run({**feed, FEATURE: got[FEATURE]})["out_sample"]
    np.testing.assert_allclose(fresh, got["out_sample"], atol=1e-5)
    # Any feature (a stale one, as at a cached step): the same as torch's UNet with that feature injected.
    stale = np.random.default_rng(1).standard_normal(want_feature.shape).astype(np.float32)
    np.testing.assert_allclose(shallow.run({**feed, FEATURE: stale})["out_sample"],
                               _torch_split(unet, feed, stale)[0], atol=1e-4 * max(1, np.abs(want_out).max()))
    assert record["nodes"]["shallow"] < record["nodes"]["unet"] / 2  # the shallow branch is the small part


@pytest.mark.parametrize("provider", ENGINES)
def test_cache_interval_in_the_pipeline(split, tmp_path, provider):
    options = {"provider": provider, **({"cache_dir": str(tmp_path)} if provider == "openvino" else {})}
    kwargs = dict(prompt="a red circle on a blue background", num_inference_steps=6, guidance_scale=3.0, seed=2,
                  output_type="np")
    plain = StableDiffusionPipeline.from_pretrained(split["demo"], **options)(**kwargs)
    same = StableDiffusionPipeline.from_pretrained(split["demo"], cache_interval=1, **options)(**kwargs)
    np.testing.assert_array_equal(same.images, plain.images)
    cached = StableDiffusionPipeline.from_pretrained(split["demo"], cache_interval=3, **options)(**kwargs)
    assert cached.timings["unet_shallow_calls"] == 4  # full at steps 0 and 3, shallow at 1, 2, 4, 5
    error = np.abs(cached.images - plain.images)
    assert np.isfinite(cached.images).all() and 0 < error.mean() < 0.1


def test_cache_interval_errors(exported, split):
    with pytest.raises(ModelFolderError, match="sdrt deepcache"):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], cache_interval=2)
    for bad in (0, 1.5, True):
        with pytest.raises(InvalidInputError, match="cache_interval"):
            StableDiffusionPipeline.from_pretrained(split["sd1"], cache_interval=bad)
