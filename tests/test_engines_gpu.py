"""GPU engines: onnxruntime CUDA (IO binding, device-resident tensors, CUDA graphs), onnxruntime's TensorRT
provider, and the native TensorRT backend (build, plan cache, refusal, CUDA graphs). Every test is marked
`gpu` and skips without what it needs (onnxruntime-gpu, tensorrt + cuda-python, a CUDA device).

The network is built here with onnx.helper (no torch or diffusers needed on the GPU machine): a small
decoder-shaped net with the VAE decoder's input/output names, checked against onnxruntime on the CPU.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.engines import create_engine
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.engines.profiles import ProfileRange
from sdrt.engines.spec import vae_decoder_spec

SPEC = vae_decoder_spec(4, 3)
PROVIDERS = ort.get_available_providers()


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


needs_cuda = pytest.mark.skipif("CUDAExecutionProvider" not in PROVIDERS, reason="onnxruntime-gpu with CUDA needed")
def _tensorrt_libraries() -> bool:
    """onnxruntime-gpu lists its TensorRT provider whether or not TensorRT's libraries are there."""
    import ctypes

    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return False
    return True


needs_trt_ep = pytest.mark.skipif("TensorrtExecutionProvider" not in PROVIDERS or not _tensorrt_libraries(),
                                  reason="onnxruntime's TensorRT provider and TensorRT 10 (libnvinfer.so.10) needed")
needs_tensorrt = pytest.mark.skipif(not (_importable("tensorrt") and (_importable("cuda.bindings") or
                                                                      _importable("cuda.cudart"))),
                                    reason="tensorrt and cuda-python needed (sdrt[tensorrt])")
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """latent_sample (B,4,h,w) -> Conv 3x3 -> Relu -> Resize x8 -> Conv 3x3 -> sample (B,3,8h,8w)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 16, 3, 3)).astype(np.float32) * 0.3, "w2")
    scales = numpy_helper.from_array(np.array([1, 1, 8, 8], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["latent_sample", "w1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Resize", ["h2", "", "scales"], ["h3"], mode="nearest"),
        helper.make_node("Conv", ["h3", "w2"], ["sample"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", "w"])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "H", "W"])], [w1, w2, scales])
    path = tmp_path_factory.mktemp("gpu") / "vae_decoder" / "model.onnx"
    path.parent.mkdir()
    # IR 10: onnx 1.23 writes IR 14 by default, which onnxruntime < 1.32 (the GPU machine's 1.31) refuses.
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def latents(batch=1, size=16, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, size, size)).astype(np.float32)


def reference(path, x):
    return OrtEngine(path, SPEC).run({"latent_sample": x})["sample"]


def close(got, expected, rtol):
    np.testing.assert_allclose(got, expected, atol=rtol * max(1.0, float(np.abs(expected).max())))


# -- onnxruntime CUDA ------------------------------------------------------------------------------

@needs_cuda
def test_cuda_io_binding_matches_cpu(decoder):
    engine = OrtEngine(decoder, SPEC, provider="cuda", io_binding=True)
    for seed in range(3):
        x = latents(seed=seed)
        close(engine.run({"latent_sample": x})["sample"], reference(decoder, x), 1e-3)


@needs_cuda
def test_cuda_run_ortvalues_stays_on_device(decoder):
    engine = OrtEngine(decoder, SPEC, provider="cuda", io_binding=True)
    x = engine.to_device(latents())
    out = engine.run_ortvalues({"latent_sample": x})["sample"]
    assert x.device_name().lower() == "cuda" and out.device_name().lower() == "cuda"
    close(out.numpy(), reference(decoder, latents()), 1e-3)


@needs_cuda
def test_cuda_graph_replays_and_falls_back_on_new_shapes(decoder):
    engine = OrtEngine(decoder, SPEC, provider="cuda", cuda_graph=True)
    for seed in range(4):  # onnxruntime captures after its warm-up runs, then replays
        x = latents(seed=seed)
        close(engine.run({"latent_sample": x})["sample"], reference(decoder, x), 1e-3)
    x = latents(batch=2, size=8)
    with pytest.warns(RuntimeWarning, match="differ from the fixed ones"):
        close(engine.run({"latent_sample": x})["sample"], reference(decoder, x), 1e-3)


# -- onnxruntime's TensorRT provider ------------------------------------------------------------------

@needs_trt_ep
def test_tensorrt_ep_fp16_with_caches(decoder, tmp_path):
    engine = create_engine(decoder, SPEC, provider="tensorrt-ep", cache_dir=tmp_path,
                           profile=ProfileRange((1, 1, 2), (64, 128, 128), (64, 128, 128)))
    x = latents()
    close(engine.run({"latent_sample": x})["sample"], reference(decoder, x), 2e-2)
    entries = [p for p in (tmp_path / "tensorrt-ep").iterdir() if p.is_dir()]
    assert len(entries) == 1 and any(f.suffix == ".engine" for f in entries[0].iterdir())


# -- native TensorRT ------------------------------------------------------------------------------

@needs_tensorrt
def test_native_build_run_and_cache(decoder, tmp_path, monkeypatch):
    from sdrt.engines import tensorrt as native

    options = native.TrtOptions(cache_dir=tmp_path, profile=ProfileRange((1, 1, 2), (64, 128, 128), (64, 128, 128)))
    engine = native.TrtEngine(decoder, SPEC, options)
    for batch in (1, 2):
        x = latents(batch=batch)
        close(engine.run({"latent_sample": x})["sample"], reference(decoder, x), 2e-2)
    engine.release()
    plans = list((tmp_path / "tensorrt").glob("*/model.plan"))
    assert len(plans) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the cached plan should have been used")

    monkeypatch.setattr(native, "build_plan", no_build)
    again = native.TrtEngine(decoder, SPEC, options)
    close(again.run({"latent_sample": latents()})["sample"], reference(decoder, latents()), 2e-2)
    monkeypatch.undo()
    x = latents(batch=4, size=8)  # outside the profile: a second plan, for exactly these shapes
    close(again.run({"latent_sample": x})["sample"], reference(decoder, x), 2e-2)
    assert len(list((tmp_path / "tensorrt").glob("*/model.plan"))) == 2


@needs_tensorrt
def test_native_cuda_graph(decoder, tmp_path):
    from sdrt.engines import tensorrt as native

    engine = native.TrtEngine(decoder, SPEC, native.TrtOptions(cache_dir=tmp_path, cuda_graph=True))
    for seed in range(3):
        x = latents(seed=seed)
        close(engine.run({"latent_sample": x})["sample"], reference(decoder, x), 2e-2)


@needs_tensorrt
def test_native_refuses_a_plan_from_another_gpu(decoder, tmp_path):
    from sdrt.engines import tensorrt as native
    from sdrt.engines.cache import PlanMismatchError, key_path

    engine = native.TrtEngine(decoder, SPEC, native.TrtOptions(cache_dir=tmp_path))
    engine.run({"latent_sample": latents()})
    plan = next((tmp_path / "tensorrt").glob("*/model.plan"))
    record = json.loads(key_path(plan).read_text())
    record["build_key"]["gpu_name"] = "NVIDIA A100-SXM4-80GB"
    key_path(plan).write_text(json.dumps(record))
    with pytest.raises(PlanMismatchError, match="gpu_name"):
        native.TrtEngine(decoder, SPEC, native.TrtOptions(cache_dir=tmp_path), plan=plan).load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PlanMismatchError, match="gpu_name"):  # nor reused from the cache
            native.TrtEngine(decoder, SPEC, native.TrtOptions(cache_dir=tmp_path)).run({"latent_sample": latents()})
