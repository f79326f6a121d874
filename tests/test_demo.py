"""The bundled trained demo model: it draws what it is asked, and `sdrt export` reproduces its ONNX folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.adherence import check
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.demo import default_model, run_demo
from sdrt.runtime.pipeline import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "models" / "shapes-demo"
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a blue circle on a yellow background",
    "a white square on a red background",
    "a black triangle on a green background",
]


def test_demo_model_draws_the_requested_colours():
    pipe = StableDiffusionPipeline.from_pretrained(default_model())
    images = pipe(PROMPTS, num_inference_steps=20, guidance_scale=3.0, seed=0, output_type="uint8").images
    verdicts = [check(img, p) for img, p in zip(images, PROMPTS)]
    assert sum(v["colour"] for v in verdicts) >= 5, verdicts
    assert sum(v["background"] for v in verdicts) >= 5, verdicts


def test_sdrt_demo_writes_a_grid(tmp_path):
    out = tmp_path / "demo.png"
    timings = run_demo(out, steps=2, log=lambda m: None)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (4 * 128, 2 * 128)
    assert timings["images"] == 8 and timings["unet"] > 0


def test_export_of_the_bundled_weights_reproduces_the_shipped_folder(tmp_path):
    pytest.importorskip("diffusers")
    from sdrt.engines.spec import spec_for  # noqa: F401  (spec comes from the folder)
    from sdrt.export.api import export_pipeline

    fresh = ModelFolder.open(export_pipeline(WEIGHTS, tmp_path / "fresh", log=lambda m: None))
    shipped = ModelFolder.open(default_model(), verify="sha256")
    assert fresh.components == shipped.components
    assert fresh.configs == shipped.configs
    rng = np.random.default_rng(0)
    for component in shipped.components:
        spec = shipped.spec(component)
        dims = spec.dims(2, 32, 32)
        feed = {}
        for t in spec.inputs:
            shape = t.resolve(dims)
            feed[t.name] = (rng.integers(0, 49408, shape) if t.dtype == "int64"
                            else rng.standard_normal(shape).astype(np.float32) * (100 if t.name == "timestep" else 1))
        a = OrtEngine(fresh.onnx_path(component), spec).run(feed)
        b = OrtEngine(shipped.onnx_path(component), spec).run(feed)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0, err_msg=f"{component}/{name}")
    shipped_manifest = json.loads((default_model() / "sdrt.json").read_text())
    assert shipped_manifest["pipeline"] == "StableDiffusionPipeline"
