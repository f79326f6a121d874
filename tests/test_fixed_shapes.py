"""Fixed-shapes engines make their session at the first feed, with its sizes as free-dimension overrides:
onnxruntime folds the exported graph's Shape arithmetic away (what CUDA graph capture needs: no node left for
the CPU provider), and the results stay those of the dynamic session."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest

from sdrt.engines.onnxruntime import OrtEngine, SessionOptions
from sdrt.engines.spec import NetworkSpec
from sdrt.runtime.config import ModelFolder


def unet_spec(folder) -> NetworkSpec:
    return ModelFolder.open(folder).spec("unet")


def unet_feed(spec: NetworkSpec, batch=2, size=8, seed=0) -> dict:
    """Random inputs for the tiny UNet, its ControlNet residuals included (random too: they must flow through)."""
    rng = np.random.default_rng(seed)
    dims = spec.dims(batch, size * spec.vae_scale_factor, size * spec.vae_scale_factor)
    feed = {t.name: rng.standard_normal(t.resolve(dims), dtype=np.float32) for t in spec.inputs}
    feed["timestep"] = np.full((batch,), 500.0, np.float32)
    return feed


def op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_fixed_session_folds_the_shape_arithmetic_and_matches(exported, tmp_path):
    path = exported["sd1"] / "unet" / "model.onnx"
    spec = unet_spec(exported["sd1"])
    assert op_counts(path)["Shape"] > 0  # the export computes its reshapes from Shape nodes
    dynamic = OrtEngine(path, spec, options=SessionOptions(optimized_model_path=str(tmp_path / "dynamic.onnx")))
    fixed = OrtEngine(path, spec, fixed_shapes=True,
                      options=SessionOptions(optimized_model_path=str(tmp_path / "fixed.onnx")))
    assert fixed.input_dtypes == dynamic.input_dtypes  # from the spec, before any session exists
    assert not fixed.loaded
    feed = unet_feed(spec)
    np.testing.assert_array_equal(fixed.run(feed)["out_sample"], dynamic.run(feed)["out_sample"])
    assert [i.shape for i in fixed._session.get_inputs()] == [list(v.shape) for v in feed.values()]
    assert op_counts(tmp_path / "dynamic.onnx")["Shape"] > 0
    assert op_counts(tmp_path / "fixed.onnx")["Shape"] == 0


def test_fixed_session_made_once_even_when_metadata_was_read_first(exported):
    path = exported["sd1"] / "unet" / "model.onnx"
    spec = unet_spec(exported["sd1"])
    fixed = OrtEngine(path, spec, fixed_shapes=True)
    assert fixed.output_names == ["out_sample"]  # loads a session without overrides
    fixed.run(unet_feed(spec))
    assert [i.shape for i in fixed._session.get_inputs()][0] == [2, 4, 8, 8]  # made again, with the sizes
    session = fixed._session
    fixed.run(unet_feed(spec, seed=1))
    assert fixed._session is session


def test_other_shapes_run_dynamic_and_release_unfixes(exported):
    path = exported["sd1"] / "unet" / "model.onnx"
    spec = unet_spec(exported["sd1"])
    fixed, dynamic = OrtEngine(path, spec, fixed_shapes=True), OrtEngine(path, spec)
    fixed.run(unet_feed(spec, batch=2, size=8))
    other = unet_feed(spec, batch=1, size=16)
    with pytest.warns(RuntimeWarning, match="differ from the fixed ones"):
        got = fixed.run(other)["out_sample"]
    np.testing.assert_array_equal(got, dynamic.run(other)["out_sample"])
    fixed.release()  # e.g. low-memory mode between generations: the next feed fixes new sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fixed.run(other)["out_sample"]
    assert [i.shape for i in fixed._session.get_inputs()][0] == [1, 4, 16, 16]
    np.testing.assert_array_equal(got, dynamic.run(other)["out_sample"])
