"""NaN-safe VAE decode: a decoder output with NaN/Inf is re-run with the fp32 decoder (with a warning), and
without one the error names the fix. NaN is forced by editing the decoder's ONNX graph to add NaN to its
output; the reference is the same pipeline on the untouched fp32 folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sdrt.engines.base import Engine
from sdrt.engines.fallback import FALLBACKS_KEY, FiniteOrFallback, NonFiniteOutputWarning
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.export import optimize as opt
from sdrt.export.folder import write_manifest
from sdrt.runtime import image as imageio
from sdrt.runtime.errors import GenerationError
from sdrt.runtime.pipeline import StableDiffusionPipeline

ARGS = dict(num_inference_steps=2, guidance_scale=7.5, seed=0, output_type="np", num_images_per_prompt=2)


def poison(path) -> None:
    """Make the network at `path` add NaN to its output (as an overflowing fp16 decoder would give)."""
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_finite" if o == out else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "forced_nan"))
    model.graph.node.append(helper.make_node("Add", [f"{out}_finite", "forced_nan"], [out]))
    onnx.save(model, str(path))


def nan_folder(src, dst, with_fp32: bool):
    """A copy of `src` whose decoder gives NaN; with_fp32: plus the untouched decoder as its fp32 fallback."""
    shutil.copytree(src, dst)
    if with_fp32:
        shutil.copytree(dst / "vae_decoder", dst / "vae_decoder_fp32")
    poison(dst / "vae_decoder" / "model.onnx")
    manifest = json.loads((dst / "sdrt.json").read_text())
    if with_fp32:
        manifest[FALLBACKS_KEY] = {"vae_decoder": {"path": "vae_decoder_fp32/model.onnx", "precision": "fp32"}}
    write_manifest(dst, manifest)
    return dst


@pytest.fixture(scope="module")
def reference(exported):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    return pipe("a red circle", **ARGS).images


def test_nan_decode_is_rerun_in_fp32(exported, reference, tmp_path):
    folder = nan_folder(exported["sd1"], tmp_path / "nan", with_fp32=True)
    pipe = StableDiffusionPipeline.from_pretrained(folder, verify="sha256")
    with pytest.warns(NonFiniteOutputWarning, match="vae_decoder returned NaN/Inf"):
        images = pipe("a red circle", **ARGS).images
    assert pipe.vae_decoder.fallback_runs == 2  # one decode per image, each re-run
    np.testing.assert_array_equal(images, reference)


def test_without_fp32_decoder_the_error_names_the_fix(exported, tmp_path):
    folder = nan_folder(exported["sd1"], tmp_path / "nan", with_fp32=False)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert not isinstance(pipe.vae_decoder, FiniteOrFallback)
    with pytest.raises(GenerationError, match=r"NaN/Inf.*black.*vae_decoder_fp32.*sdrt optimize --precision fp16"):
        pipe("a red circle", **ARGS)


@pytest.fixture(scope="module")
def fp16_folder(exported, tmp_path_factory):
    return opt.optimize_folder(exported["sd1"], tmp_path_factory.mktemp("fp16") / "cpu-fp16", "cpu", "fp16",
                               log=lambda m: None)


def test_fp16_optimize_keeps_a_validated_fp32_decoder(fp16_folder, exported):
    from sdrt.runtime.config import ModelFolder

    manifest = json.loads((fp16_folder / "sdrt.json").read_text())
    assert manifest[FALLBACKS_KEY]["vae_decoder"]["path"] == "vae_decoder_fp32/model.onnx"
    report = manifest["validation_optimize"]["vae_decoder_fp32"]
    assert report["passed"] and report["tolerance"]["atol"] == opt.TOLERANCE["fp32"]
    ModelFolder.open(fp16_folder, verify="sha256")  # the extra files are in sdrt.json's table
    fp32 = onnx.load(str(fp16_folder / "vae_decoder_fp32" / "model.onnx"))
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp32.graph.initializer)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    expected = OrtEngine(exported["sd1"] / "vae_decoder" / "model.onnx").run({"latent_sample": latents})["sample"]
    got = OrtEngine(fp16_folder / "vae_decoder_fp32" / "model.onnx").run({"latent_sample": latents})["sample"]
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_fp16_folder_uses_fp16_decoder_and_creates_no_fp32_engine(fp16_folder):
    pipe = StableDiffusionPipeline.from_pretrained(fp16_folder)
    assert isinstance(pipe.vae_decoder, FiniteOrFallback)
    images = pipe("a red circle", **ARGS).images
    assert np.isfinite(images).all() and pipe.vae_decoder.fallback is None


def test_fp16_folder_with_overflowing_decoder_decodes_in_fp32(fp16_folder, tmp_path):
    folder = tmp_path / "fp16-nan"
    shutil.copytree(fp16_folder, folder)
    poison(folder / "vae_decoder" / "model.onnx")
    pipe = StableDiffusionPipeline.from_pretrained(folder, verify="none")
    latents = pipe("a red circle", **{**ARGS, "output_type": "latent"}).images
    with pytest.warns(NonFiniteOutputWarning):
        images = pipe("a red circle", **ARGS).images
    vae = pipe.folder.vae
    fp32 = OrtEngine(folder / "vae_decoder_fp32" / "model.onnx")
    scaled = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor)
    decoded = np.concatenate([fp32.run({"latent_sample": scaled[k:k + 1]})["sample"]
                              for k in range(len(latents))])
    np.testing.assert_array_equal(images, imageio.to_unit(decoded))


class Stub(Engine):
    def __init__(self, value):
        self.value, self.released, self.calls = value, False, 0

    loaded = True
    input_dtypes = {"x": np.dtype(np.float32)}
    output_names = ["y"]

    def load(self):
        pass

    def run(self, feed):
        self.calls += 1
        return {"y": np.full(2, self.value, np.float32)}

    def release(self):
        self.released = True


def test_fallback_engine_is_made_lazily_and_released():
    made = []
    finite = FiniteOrFallback(Stub(1.0), lambda: made.append(Stub(2.0)) or made[-1])
    np.testing.assert_array_equal(finite.run({})["y"], [1, 1])
    assert made == []
    broken = FiniteOrFallback(Stub(np.inf), lambda: made.append(Stub(2.0)) or made[-1], name="decoder")
    with pytest.warns(NonFiniteOutputWarning, match="decoder returned NaN/Inf"):
        np.testing.assert_array_equal(broken.run({})["y"], [2, 2])
    with pytest.warns(NonFiniteOutputWarning):
        broken.run({})
    assert len(made) == 1 and made[0].calls == 2 and broken.fallback_runs == 2
    broken.release()
    assert broken.primary.released and made[0].released
