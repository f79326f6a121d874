"""Refitting native TensorRT plans (LoRA) without a GPU: the REFIT build flag and its cache key, and
TrtEngine.set_initializers driven through a stand-in of TensorRT 10's documented Refitter API (the builder's
stand-in is test_trt_cache's FakeTrt; the runtime, engine and refitter are small fakes here)."""

from __future__ import annotations

import types
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_trt_cache import H100, FakeTrt

from sdrt.engines import tensorrt as native
from sdrt.engines.errors import EngineError
from sdrt.engines.profiles import ProfileRange
from sdrt.engines.spec import vae_decoder_spec

VAE = vae_decoder_spec(4, 3)
W = np.arange(16, dtype=np.float32).reshape(4, 4)  # the file's initializer values
B = np.full((4,), 0.5, dtype=np.float32)


@pytest.fixture
def onnx_file(tmp_path):
    """latent_sample @ w + b, with the initializers `w` and `b` stored in the file."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["latent_sample", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["sample"])],
        "g", [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", 4])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 4, "h", 4])],
        initializer=[numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")])
    path = tmp_path / "vae_decoder" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


class RefitTrt(FakeTrt):
    """FakeTrt plus TensorRT 10's runtime and refitter: `refits` records (engine number, {name: values}) per
    successful refit_cuda_engine; `missing` makes refits fail with those names; `prototypes` are the
    refittable weights (name -> (size, DataType))."""

    def __init__(self, prototypes=None, missing=()):
        super().__init__(inputs=("latent_sample",))
        self.BuilderFlag.REFIT = "REFIT"
        self.refits, self.engines, self.missing = [], [], list(missing)
        self.prototypes = prototypes if prototypes is not None else {"w": (16, "FLOAT"), "b": (4, "FLOAT")}
        fake = self

        class Weights:  # points at the array's memory, as TensorRT's does: a weak reference stands for that
            def __init__(self, array):
                self.ref, self.size, self.dtype = weakref.ref(array), array.size, array.dtype

        class Engine:
            num_io_tensors = 0

            def __init__(self, plan):
                self.number, self.plan = len(fake.engines), plan
                fake.engines.append(self)

            def create_execution_context(self):
                return object()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return Engine(plan)

        class Refitter:
            def __init__(self, engine, logger):
                self.engine, self.named = engine, {}

            def get_weights_prototype(self, name):
                size, dtype = fake.prototypes.get(name, (-1, "FLOAT"))
                return types.SimpleNamespace(size=size, dtype=dtype)

            def set_named_weights(self, name, weights):
                if name not in fake.prototypes:
                    return False
                self.named[name] = weights
                return True

            def get_missing_weights(self):
                return list(fake.missing)

            def refit_cuda_engine(self):
                if fake.missing:
                    return False
                arrays = {n: w.ref() for n, w in self.named.items()}
                assert all(a is not None for a in arrays.values()), "an array was freed before the refit"
                fake.refits.append((self.engine.number, {n: a.copy() for n, a in arrays.items()}))
                return True

        self.Runtime, self.Refitter, self.Weights = Runtime, Refitter, Weights
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.nptype = lambda dtype: {"FLOAT": np.float32, "HALF": np.float16}[dtype]


def fake_cudart():
    ok = lambda *args: (0,)  # noqa: E731
    return types.SimpleNamespace(cudaSetDevice=ok, cudaStreamCreate=lambda: (0, 7), cudaStreamDestroy=ok,
                                 cudaGraphExecDestroy=ok, cudaGraphDestroy=ok, cudaFree=ok)


@pytest.fixture
def fake_gpu(monkeypatch):
    """TensorRT and cuda-python replaced by fakes; returns the fake tensorrt module."""
    trt = RefitTrt()
    monkeypatch.setattr(native, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(native, "import_cudart", fake_cudart)
    monkeypatch.setattr(native, "gpu_from_cudart", lambda device: H100)
    return trt


PROFILE = ProfileRange((1, 1, 1), (32, 32, 32), (32, 32, 32))


def engine_for(onnx_file, tmp_path, **options) -> native.TrtEngine:
    return native.TrtEngine(onnx_file, VAE, native.TrtOptions(profile=PROFILE, cache_dir=tmp_path / "cache", **options))


# -- building refittable plans ---------------------------------------------------------------------------

def test_build_plan_sets_refit_only_when_asked(onnx_file):
    profile = PROFILE.profile(VAE)
    trt = RefitTrt()
    native.build_plan(trt, onnx_file, profile, "fp16", refit=True)
    assert ("flag", "REFIT") in trt.calls and ("flag", "FP16") in trt.calls
    plain = RefitTrt()
    native.build_plan(plain, onnx_file, profile, "fp16")
    assert ("flag", "REFIT") not in plain.calls


def test_refittable_plans_have_their_own_key():
    args = ("unet", "ab" * 32, H100, "10.9.0", PROFILE.profile(VAE), "fp16")
    plain, refit = native.make_key(*args), native.make_key(*args, refit=True)
    assert plain.precision == "fp16" and refit.precision == "fp16+refit"
    assert plain.digest != refit.digest
    assert native.make_key(*args, refit=False) == plain  # keys of existing plans do not change


def test_engine_builds_and_caches_refittable_plans_apart(onnx_file, tmp_path, fake_gpu):
    with engine_for(onnx_file, tmp_path, refit=True) as engine:
        key = engine._plans[0].key
    assert key.precision == "fp16+refit" and ("flag", "REFIT") in fake_gpu.calls
    with engine_for(onnx_file, tmp_path) as plain:
        assert plain._plans[0].key.precision == "fp16"
        assert plain.cache.entry(plain._plans[0].key) != plain.cache.entry(key)


# -- set_initializers ----------------------------------------------------------------------------------------

def test_replacing_weights_needs_a_refittable_plan(onnx_file, tmp_path, fake_gpu):
    engine = engine_for(onnx_file, tmp_path)
    with pytest.raises(EngineError, match=r"without refit.*TrtOptions\(refit=True\)"):
        engine.set_initializers({"w": W + 1})
    engine.set_initializers({})  # restoring the file's weights needs nothing
    assert engine.initializers == {}


def test_loaded_plans_are_refit_with_the_arrays(onnx_file, tmp_path, fake_gpu):
    with engine_for(onnx_file, tmp_path, refit=True) as engine:
        assert fake_gpu.refits == []  # a plan holds the file's weights: nothing to refit yet
        engine.set_initializers({"w": W * 2})
        (number, refit), = fake_gpu.refits
        assert number == 0 and refit.keys() == {"w"}
        np.testing.assert_array_equal(refit["w"], W * 2)
        np.testing.assert_array_equal(engine.initializers["w"], W * 2)
        engine.set_initializers({"w": W * 2})  # the same set again: no refit
        assert len(fake_gpu.refits) == 1


def test_arrays_take_the_plans_dtype_and_stay_alive_until_the_refit(onnx_file, tmp_path, fake_gpu):
    fake_gpu.prototypes.update(w=(16, "HALF"), b=(4, "HALF"))  # e.g. an fp16 ONNX file's weights
    with engine_for(onnx_file, tmp_path, refit=True) as engine:
        engine.set_initializers({"w": W + 1, "b": B})  # the fake refitter asserts that the cast copies are alive
    refit = fake_gpu.refits[0][1]
    assert refit["w"].dtype == refit["b"].dtype == np.float16
    np.testing.assert_array_equal(refit["w"], (W + 1).astype(np.float16))


def test_names_no_longer_set_get_the_files_values_back(onnx_file, tmp_path, fake_gpu):
    with engine_for(onnx_file, tmp_path, refit=True) as engine:
        engine.set_initializers({"w": W * 2, "b": B * 3})
        engine.set_initializers({"w": W * 2})  # b no longer replaced: read back from the ONNX file
        refit = fake_gpu.refits[-1][1]
        assert refit.keys() == {"b"}
        np.testing.assert_array_equal(refit["b"], B)
        engine.set_initializers({})
        refit = fake_gpu.refits[-1][1]
        assert refit.keys() == {"w"}
        np.testing.assert_array_equal(refit["w"], W)
        assert engine.initializers == {}


def test_refit_drops_the_captured_cuda_graph(onnx_file, tmp_path, fake_gpu):
    with engine_for(onnx_file, tmp_path, refit=True, cuda_graph=True) as engine:
        dropped = []
        engine._plans[0].stream.drop_graph = lambda: dropped.append(1)
        engine.set_initializers({"b": B + 1})
        assert dropped == [1]
        engine.set_initializers({"b": B + 1})  # nothing changed: the graph stays
        assert dropped == [1]


def test_plans_loaded_later_are_refit_with_the_current_set(onnx_file, tmp_path, fake_gpu):
    engine = engine_for(onnx_file, tmp_path, refit=True)
    engine.set_initializers({"w": W - 1})  # before load: kept until a plan exists
    assert fake_gpu.refits == []
    with engine:
        assert [n for n, _ in fake_gpu.refits] == [0]
        shapes = VAE.input_shapes(VAE.dims(2, 64, 64))  # outside the profile: another plan is built
        plan = engine._plan_for(shapes)
        assert len(engine._plans) == 2 and plan.key.precision == "fp16+refit"
        number, refit = fake_gpu.refits[-1]
        assert number == 1 and refit.keys() == {"w"}
        np.testing.assert_array_equal(refit["w"], W - 1)
        engine.set_initializers({"w": W - 2})  # both plans are refit
        assert [n for n, _ in fake_gpu.refits[-2:]] == [0, 1]


def test_failed_refit_names_the_missing_weights(onnx_file, tmp_path, fake_gpu):
    with engine_for(onnx_file, tmp_path, refit=True) as engine:
        engine.set_initializers({"w": W * 2})
        fake_gpu.missing = ["b"]
        with pytest.raises(EngineError, match=r"needs weights \['b'\].*released"):
            engine.set_initializers({"w": W * 3})
        assert not engine.loaded and engine._plans == []  # a half-refit plan is not run
        np.testing.assert_array_equal(engine.initializers["w"], W * 2)  # the set before stays
        fake_gpu.missing = []
        engine.load()  # loads again, refit with the set before
        np.testing.assert_array_equal(fake_gpu.refits[-1][1]["w"], W * 2)


def test_unknown_weights_are_refused_by_name(onnx_file, tmp_path, fake_gpu):
    with engine_for(onnx_file, tmp_path, refit=True) as engine:
        with pytest.raises(EngineError, match="no refittable weights named 'bias'"):
            engine.set_initializers({"bias": B})
        with pytest.raises(EngineError, match="hold 16 values"):
            engine.load()
            engine.set_initializers({"w": W[:2]})
