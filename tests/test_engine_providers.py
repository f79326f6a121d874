"""Provider parsing and onnxruntime IO binding (run on the CPU provider, compared with plain session.run)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.engines import create_engine
from sdrt.engines.errors import EngineError
from sdrt.engines.onnxruntime import OrtEngine, binding_device, with_cuda_graph
from sdrt.engines.providers import ProviderError, engine_options_for, parse_provider
from sdrt.runtime.config import ModelFolder


@pytest.mark.parametrize("text,kind,backend,providers", [
    ("cpu", "cpu", "onnxruntime", ("CPUExecutionProvider",)),
    ("CUDA", "cuda", "onnxruntime", ("CUDAExecutionProvider",)),
    ("cuda:1", "cuda", "onnxruntime", (("CUDAExecutionProvider", {"device_id": 1}),)),
    ("tensorrt-ep", "tensorrt-ep", "onnxruntime", ("TensorrtExecutionProvider",)),
    ("trt-ep", "tensorrt-ep", "onnxruntime", ("TensorrtExecutionProvider",)),
    ("tensorrt", "tensorrt", "tensorrt", ()),
    ("trt", "tensorrt", "tensorrt", ()),
    ("cuda,cpu", "cuda", "onnxruntime", ("CUDAExecutionProvider", "CPUExecutionProvider")),
    ("OpenVINOExecutionProvider", "openvino-ep", "onnxruntime", ("OpenVINOExecutionProvider",)),
    ("openvino-ep", "openvino-ep", "onnxruntime", ("OpenVINOExecutionProvider",)),
    ("openvino", "openvino", "openvino", ()),
    ("openvino:GPU.1", "openvino", "openvino", ()),
    ("MyVendorExecutionProvider", "MyVendorExecutionProvider", "onnxruntime", ("MyVendorExecutionProvider",)),
])
def test_parse_provider(text, kind, backend, providers):
    choice = parse_provider(text)
    assert (choice.kind, choice.backend, choice.providers) == (kind, backend, providers)


def test_parse_provider_list_with_options():
    choice = parse_provider([("cuda", {"device_id": 2}), "cpu"])
    assert choice.providers == (("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider")


@pytest.mark.parametrize("text,message", [
    ("gpu", "unknown provider 'gpu'"),
    ("cuda:first", "must be a number"),
    ("tensorrt,cuda", "cannot be combined"),
])
def test_parse_provider_errors(text, message):
    with pytest.raises(ProviderError, match=message):
        parse_provider(text)


def test_cuda_graph_options():
    assert with_cuda_graph(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert with_cuda_graph([("TensorrtExecutionProvider", {"trt_fp16_enable": True})])[0][1] == {
        "trt_fp16_enable": True, "trt_cuda_graph_enable": "1"}
    with pytest.raises(EngineError, match="CUDA or TensorRT"):
        with_cuda_graph(["CPUExecutionProvider"])
    assert binding_device([("CUDAExecutionProvider", {"device_id": 1})]) == ("cuda", 1)
    assert binding_device(["CPUExecutionProvider"]) == ("cpu", 0)


@pytest.fixture(scope="module")
def folder(exported):
    return ModelFolder.open(exported["sd1"])


@pytest.mark.parametrize("provider,given,expected", [
    ("cuda", None, True), ("cuda:1", None, True), ("tensorrt-ep", None, True), ("cuda", False, False),
    ("cpu", None, False), ("cpu", True, True), ("tensorrt", None, False), ("OpenVINOExecutionProvider", None, False),
])
def test_io_binding_is_on_by_default_for_onnxruntime_on_a_gpu(provider, given, expected):
    options = {} if given is None else {"io_binding": given}
    assert engine_options_for(parse_provider(provider), options)["io_binding"] is expected
    assert "io_binding" not in options  # popped: the rest are session options


def test_created_engine_takes_the_default(folder):
    path, spec = folder.onnx_path("unet"), folder.spec("unet")
    assert create_engine(path, spec, provider="cpu").io_binding is False
    assert create_engine(path, spec, provider="cpu", io_binding=None).io_binding is False
    assert create_engine(path, spec, provider="cpu", io_binding=True).io_binding is True
    assert create_engine(path, spec, provider="cpu").provider_name == "cpu"


def test_options_for_the_wrong_backend_are_refused(folder):
    with pytest.raises(ProviderError, match="do not apply to provider cpu"):
        create_engine(folder.onnx_path("unet"), folder.spec("unet"), provider="cpu", precision="fp16")
    with pytest.raises(ProviderError, match="unknown engine option"):
        create_engine(folder.onnx_path("unet"), folder.spec("unet"), provider="cpu", threads=2)
    with pytest.raises(EngineError, match="CUDA or TensorRT"):
        create_engine(folder.onnx_path("unet"), folder.spec("unet"), provider="cpu", cuda_graph=True)


def _feed(engine, spec, dims, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 1000, shape) if engine.input_dtypes[name] == np.int64
            else rng.standard_normal(shape).astype(np.float32) for name, shape in spec.input_shapes(dims).items()}


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_io_binding_matches_plain_run(folder, component):
    spec = folder.spec(component)
    plain = OrtEngine(folder.onnx_path(component), spec)
    bound = OrtEngine(folder.onnx_path(component), spec, io_binding=True)
    kept, first = None, None
    for seed, dims in enumerate([spec.dims(2, 64, 64), spec.dims(2, 64, 64), spec.dims(1, 32, 64)]):
        feed = _feed(plain, spec, dims, seed)
        expected, got = plain.run(feed), bound.run(feed)
        assert list(got) == list(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
        if seed == 0:
            kept = {n: a.copy() for n, a in got.items()}
            first = got
            buffers = {n: v.data_ptr() for n, v in bound._runner.outputs.items()}
        if seed == 1:  # same shapes: the output buffers were reused, and the first result was not overwritten
            assert {n: v.data_ptr() for n, v in bound._runner.outputs.items()} == buffers
            for name in kept:
                np.testing.assert_array_equal(first[name], kept[name])
                assert not np.shares_memory(first[name], got[name])


def test_run_ortvalues_keeps_tensors_on_the_device(folder):
    spec = folder.spec("unet")
    plain = OrtEngine(folder.onnx_path("unet"), spec)
    bound = OrtEngine(folder.onnx_path("unet"), spec, io_binding=True)
    feed = _feed(plain, spec, spec.dims(2, 64, 64), 0)
    embeds = bound.to_device(feed["encoder_hidden_states"])  # uploaded once, reused by every step
    latents = feed["sample"]
    for step in range(3):  # feed each output back as the next sample, as a denoise loop does
        out = bound.run_ortvalues({**feed, "sample": latents, "encoder_hidden_states": embeds})["out_sample"]
        expected = plain.run({**feed, "sample": latents})["out_sample"]
        latents = out.numpy().copy()
        np.testing.assert_array_equal(latents, expected)
    with pytest.raises(EngineError, match="io_binding=True"):
        plain.run_ortvalues(feed)


def test_fixed_shapes_runs_other_shapes_in_a_second_session(folder):
    spec = folder.spec("vae_decoder")
    plain = OrtEngine(folder.onnx_path("vae_decoder"), spec)
    fixed = OrtEngine(folder.onnx_path("vae_decoder"), spec, fixed_shapes=True)
    a, b = _feed(plain, spec, spec.dims(1, 64, 64), 0), _feed(plain, spec, spec.dims(1, 64, 64), 1)
    np.testing.assert_array_equal(fixed.run(a)["sample"], plain.run(a)["sample"])
    address = fixed._runner.inputs["latent_sample"].data_ptr()
    np.testing.assert_array_equal(fixed.run(b)["sample"], plain.run(b)["sample"])
    assert fixed._runner.inputs["latent_sample"].data_ptr() == address  # same input buffer, new data
    other = _feed(plain, spec, spec.dims(2, 32, 64), 2)
    with pytest.warns(RuntimeWarning, match="differ from the fixed ones"):
        got = fixed.run(other)["sample"]
    np.testing.assert_array_equal(got, plain.run(other)["sample"])
    np.testing.assert_array_equal(fixed.run(a)["sample"], plain.run(a)["sample"])  # back on the fixed path
    fixed.release()
    assert not fixed.loaded


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed here")
def test_cli_native_tensorrt_names_the_extra_and_falls_back_only_when_allowed(exported, tmp_path, capsys):
    from sdrt.runtime.cli import main

    args = ["generate", str(exported["sd1"]), "a red circle", "--provider", "tensorrt", "--steps", "1", "-q"]
    assert main(args + ["-o", str(tmp_path / "a.png")]) == 2
    assert "sdrt[tensorrt]" in capsys.readouterr().err and not (tmp_path / "a.png").exists()
    with pytest.warns(RuntimeWarning, match="running on cpu instead"):
        assert main(args + ["-o", str(tmp_path / "b.png"), "--allow-fallback"]) == 0
    assert (tmp_path / "b.png").is_file()
