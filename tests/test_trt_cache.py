"""TensorRT build cache without a GPU: profiles, cache keys, the plan store, compatibility refusal, and
the native builder's and engine's error paths (TensorRT driven through a stand-in module that follows its
documented Python API; the real thing runs only in tests/test_engines_gpu.py)."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sdrt.engines import cache as trt_cache
from sdrt.engines import tensorrt as native
from sdrt.engines.cache import BuildKey, GpuInfo, PlanCache, PlanMismatchError, check_compatible, onnx_sha256
from sdrt.engines.errors import BackendNotInstalledError, EngineError
from sdrt.engines.files import sha256_file
from sdrt.engines.profiles import ProfileError, ProfileRange, canonical_profile, dims_from_shapes, profile_fits
from sdrt.engines.spec import unet_spec, vae_decoder_spec
from sdrt.engines.trt_ep import tensorrt_ep_options

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
UNET = unet_spec(4, 4, 768)


@pytest.fixture
def onnx_file(tmp_path):
    """A one-node network (Identity) with the vae decoder's input name, enough to hash and to run."""
    graph = helper.make_graph([helper.make_node("Identity", ["latent_sample"], ["sample"])], "g",
                              [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", "w"])],
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 4, "h", "w"])])
    path = tmp_path / "net" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def key(**changes) -> BuildKey:
    fields = dict(network="unet", onnx_sha256="ab" * 32, gpu_name=H100.name, compute_capability="9.0",
                  tensorrt_version="10.9.0", profile=canonical_profile(ProfileRange((2, 2, 4)).profile(UNET)),
                  precision="fp16")
    return BuildKey(**{**fields, **changes})


# -- profiles ------------------------------------------------------------------------------------

def test_profile_from_spec_matches_spec_shapes():
    r = ProfileRange(batch=(1, 2, 4), height=(256, 512, 768), width=(512, 512, 1024))
    profile = r.profile(UNET)
    for k, (b, h, w) in enumerate([(1, 256, 512), (2, 512, 512), (4, 768, 1024)]):
        expected = UNET.input_shapes(UNET.dims(b, h, w))
        assert {name: shapes[k] for name, shapes in profile.items()} == expected
    assert r.covers(3, 600, 600) and not r.covers(5, 512, 512) and not r.covers(2, 512, 2048)


@pytest.mark.parametrize("bad", [dict(batch=(2, 1, 4)), dict(height=(0, 512, 512)), dict(width=(512, 1024, 768))])
def test_profile_range_rejects_bad_ranges(bad):
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        ProfileRange(**bad)


def test_canonical_profile_checks_and_sorts():
    assert canonical_profile({"b": ((1,), (1,), (2,)), "a": ((1, 2), (1, 2), (1, 2))})[0][0] == "a"
    with pytest.raises(ProfileError, match="ranks"):
        canonical_profile({"x": ((1, 2), (1,), (1, 2))})
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        canonical_profile({"x": ((4,), (2,), (8,))})


def test_dims_from_shapes_derives_pixel_and_latent_sizes():
    shapes = UNET.input_shapes(UNET.dims(2, 512, 768))
    dims = dims_from_shapes(UNET, shapes)
    assert dims == UNET.dims(2, 512, 768)
    vae = vae_decoder_spec(4, 3)
    assert dims_from_shapes(vae, {"latent_sample": (1, 4, 64, 96)})["height"] == 512
    shapes["timestep"] = (3,)
    with pytest.raises(ProfileError, match="batch"):
        dims_from_shapes(UNET, shapes)
    with pytest.raises(ProfileError, match="expected shape"):
        dims_from_shapes(vae, {"latent_sample": (1, 8, 64, 96)})


def test_profile_fits():
    profile = ProfileRange((1, 1, 2), (512, 512, 768), (512, 512, 768)).profile(UNET)
    assert profile_fits(profile, UNET.input_shapes(UNET.dims(2, 768, 512)))
    assert not profile_fits(profile, UNET.input_shapes(UNET.dims(3, 512, 512)))
    assert not profile_fits(profile, UNET.input_shapes(UNET.dims(1, 1024, 512)))


# -- keys ------------------------------------------------------------------------------------------

def test_key_digest_is_stable_and_changes_with_every_field():
    base = key()
    assert key().digest == base.digest
    assert BuildKey.from_json(json.loads(json.dumps(base.to_json()))) == base
    changed = dict(network="vae", onnx_sha256="cd" * 32, gpu_name="NVIDIA A100", compute_capability="8.0",
                   tensorrt_version="10.10.0", precision="fp32", backend="tensorrt-ep",
                   profile=canonical_profile(ProfileRange((2, 2, 2)).profile(UNET)))
    digests = {base.digest} | {key(**{f: v}).digest for f, v in changed.items()}
    assert len(digests) == len(changed) + 1


def test_check_compatible_names_each_difference():
    check_compatible(key(), key())
    with pytest.raises(PlanMismatchError) as e:
        check_compatible(key(gpu_name="NVIDIA A100", compute_capability="8.0"), key())
    assert "gpu_name" in str(e.value) and "compute_capability" in str(e.value) and "NVIDIA A100" in str(e.value)
    with pytest.raises(PlanMismatchError, match="tensorrt_version: built for 8.6.1"):
        check_compatible(key(tensorrt_version="8.6.1"), key())
    check_compatible(key(precision="fp32"), key(), only=("gpu_name",))  # not among the fields checked


def test_from_json_refuses_foreign_records():
    with pytest.raises(PlanMismatchError, match="unknown fields"):
        BuildKey.from_json({**key().to_json(), "surprise": 1})


# -- the plan store ---------------------------------------------------------------------------------

def test_store_then_load_round_trip(tmp_path):
    cache = PlanCache(tmp_path)
    assert cache.load(key()) is None
    path = cache.store(key(), b"plan bytes")
    assert path.parent.name.startswith("unet-") and (path.parent / "key.json").is_file()
    assert cache.load(key()) == b"plan bytes"
    assert cache.load(key(precision="fp32")) is None  # another key, another entry


def test_modified_plan_is_refused(tmp_path):
    cache = PlanCache(tmp_path)
    path = cache.store(key(), b"plan bytes")
    path.write_bytes(b"other bytes")
    with pytest.raises(PlanMismatchError, match="modified"):
        cache.load(key())


def test_plan_recorded_for_another_gpu_is_refused(tmp_path):
    cache = PlanCache(tmp_path)
    path = cache.store(key(), b"plan")
    # the entry's record says another GPU built it (copied caches, or a hand-edited folder)
    trt_cache.write_key(path, key(gpu_name="NVIDIA A100", compute_capability="8.0"))
    with pytest.raises(PlanMismatchError, match="gpu_name.*NVIDIA A100"):
        cache.load(key())


def test_plan_without_record_is_refused(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(PlanMismatchError, match="no key.json"):
        trt_cache.read_key(plan)


def test_get_plan_builds_once_per_key(tmp_path):
    cache, built = PlanCache(tmp_path), []

    def build():
        built.append(1)
        return f"plan {len(built)}".encode()

    assert native.get_plan(key(), cache, build) == b"plan 1"
    assert native.get_plan(key(), cache, build) == b"plan 1"
    other = key(profile=canonical_profile(ProfileRange((1, 1, 1)).profile(UNET)))
    assert native.get_plan(other, cache, build) == b"plan 2"
    assert len(built) == 2
    with pytest.raises(EngineError, match="building is disabled"):
        native.get_plan(key(precision="fp32"), cache, None)


def test_user_plan_file_must_match_gpu_version_and_onnx(tmp_path):
    cache = PlanCache(tmp_path)
    path = cache.store(key(), b"plan")
    here = key(profile=())  # the profile of a given plan file is whatever it was built for
    assert native.check_plan_file(path, here) == key()
    for field, value in (("tensorrt_version", "10.10.0"), ("compute_capability", "8.9"),
                         ("onnx_sha256", "ef" * 32), ("precision", "fp32")):
        with pytest.raises(PlanMismatchError, match=field):
            native.check_plan_file(path, key(profile=(), **{field: value}))


def test_onnx_hash_is_memoized_and_invalidated(onnx_file, tmp_path):
    first = onnx_sha256(onnx_file, tmp_path)
    assert first == sha256_file(onnx_file)
    assert json.loads((tmp_path / "hashes.json").read_text())[str(onnx_file.resolve())]["sha256"] == first
    model = onnx.load(onnx_file)
    model.doc_string = "changed"
    onnx.save(model, onnx_file)
    assert onnx_sha256(onnx_file, tmp_path) == sha256_file(onnx_file) != first


# -- the native builder, driven through a stand-in of tensorrt's documented API -------------------------

class FakeTrt(types.SimpleNamespace):
    """Records what build_plan asks of TensorRT (tensorrt 10 names); `parse_ok`/`build_ok` force failures."""

    def __init__(self, inputs=("latent_sample",), parse_ok=True, build_ok=True):
        calls = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Network:
            num_inputs = len(inputs)

            def get_input(self, i):
                return types.SimpleNamespace(name=inputs[i])

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse", path))
                return parse_ok

            def get_error(self, i):
                return "In node 3 (Resize): unsupported mode"

        class TimingCache:
            def __init__(self, seed):
                self.seed = seed

            def serialize(self):
                return b"timing:" + self.seed

        class Config:
            builder_optimization_level = None

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def set_memory_pool_limit(self, pool, size):
                calls.append(("workspace", size))

            def add_optimization_profile(self, profile):
                calls.append(("profile", profile.shapes))

            def create_timing_cache(self, seed):
                return TimingCache(bytes(seed))

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("timing_seed", cache.seed))
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized plan" if build_ok else None

        super().__init__(__version__="10.9.0.34", Logger=Logger, Builder=Builder, OnnxParser=Parser,
                         BuilderFlag=types.SimpleNamespace(FP16="FP16"),
                         MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
                         NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0))
        fake.calls = calls


VAE = vae_decoder_spec(4, 3)


def test_build_plan_sets_profile_fp16_and_timing_cache(onnx_file, tmp_path):
    trt = FakeTrt()
    profile = ProfileRange((1, 1, 2), (256, 512, 512), (256, 512, 512)).profile(VAE)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    plan = native.build_plan(trt, onnx_file, profile, "fp16", timing, workspace_mib=64)
    assert plan == b"serialized plan"
    calls = dict((c[0], c[1:]) for c in trt.calls)
    assert calls["flag"] == ("FP16",) and calls["network_flags"] == (0,) and calls["workspace"] == (64 << 20,)
    assert calls["profile"][0]["latent_sample"] == ((1, 4, 32, 32), (1, 4, 64, 64), (2, 4, 64, 64))
    assert calls["timing_seed"] == (b"old",)  # the existing timing cache seeded the build
    assert timing.read_bytes() == b"timing:old"  # and was written back
    trt32 = FakeTrt()
    native.build_plan(trt32, onnx_file, profile, "fp32")
    assert not [c for c in trt32.calls if c[0] == "flag"]


def test_build_plan_errors(onnx_file):
    profile = ProfileRange().profile(VAE)
    with pytest.raises(EngineError, match="could not parse.*Resize"):
        native.build_plan(FakeTrt(parse_ok=False), onnx_file, profile, "fp16")
    with pytest.raises(ProfileError, match="no shapes for \\['timestep'\\]"):
        native.build_plan(FakeTrt(inputs=("latent_sample", "timestep")), onnx_file, profile, "fp16")
    with pytest.raises(EngineError, match="failed to build"):
        native.build_plan(FakeTrt(build_ok=False), onnx_file, profile, "fp16")


def test_profile_for_prefers_the_configured_range():
    options = native.TrtOptions(profile=ProfileRange((1, 1, 2), (256, 512, 512), (256, 512, 512)))
    inside = VAE.input_shapes(VAE.dims(2, 256, 256))
    assert native.profile_for(VAE, options, inside) == options.profile.profile(VAE)
    outside = VAE.input_shapes(VAE.dims(4, 256, 256))
    assert native.profile_for(VAE, options, outside) == native.static_profile(outside)


def test_trt_options_validate():
    with pytest.raises(EngineError, match="precision"):
        native.TrtOptions(precision="int8")


# -- choosing the native backend without tensorrt installed ---------------------------------------------

def _tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(not _tensorrt_missing(), reason="tensorrt is installed here")
def test_native_backend_missing_names_the_extra(onnx_file):
    from sdrt.engines import create_engine

    with pytest.raises(BackendNotInstalledError, match=r"sdrt\[tensorrt\]"):
        create_engine(onnx_file, VAE, provider="tensorrt")


@pytest.mark.skipif(not _tensorrt_missing(), reason="tensorrt is installed here")
def test_allow_fallback_runs_on_cpu_with_a_warning(onnx_file):
    from sdrt.engines import create_engine
    from sdrt.engines.onnxruntime import OrtEngine

    with pytest.warns(RuntimeWarning, match=r"running on cpu instead.*tensorrt: .*sdrt\[tensorrt\]"):
        engine = create_engine(onnx_file, None, provider="tensorrt", allow_fallback=True, precision="fp16")
    assert isinstance(engine, OrtEngine) and engine.providers == ["CPUExecutionProvider"]
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(engine.run({"latent_sample": x})["sample"], x)


def test_fallback_not_taken_unless_allowed(onnx_file):
    from sdrt.engines import create_engine

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BackendNotInstalledError, match=r"sdrt\[gpu\]"):
            create_engine(onnx_file, None, provider="cuda")  # no CUDA provider in this onnxruntime


# -- onnxruntime's TensorRT provider: options and cache folder keyed like the native plans ----------------

def test_tensorrt_ep_options(onnx_file, tmp_path):
    r = ProfileRange((1, 1, 2), (256, 512, 512), (256, 512, 768))
    options = tensorrt_ep_options(onnx_file, VAE, profile=r, cache_dir=tmp_path, gpu=H100)
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert options["trt_profile_min_shapes"] == "latent_sample:1x4x32x32"
    assert options["trt_profile_max_shapes"] == "latent_sample:2x4x64x96"
    folder = tmp_path / "tensorrt-ep"
    record = json.loads((folder / options["trt_engine_cache_path"].rsplit("/", 1)[1] / "key.json").read_text())
    assert record["build_key"]["gpu_name"] == H100.name and record["build_key"]["backend"] == "tensorrt-ep"
    fp32 = tensorrt_ep_options(onnx_file, VAE, profile=r, cache_dir=tmp_path, gpu=H100, precision="fp32")
    other_gpu = tensorrt_ep_options(onnx_file, VAE, profile=r, cache_dir=tmp_path, gpu=GpuInfo("NVIDIA L4", "8.9"))
    paths = {o["trt_engine_cache_path"] for o in (options, fp32, other_gpu)}
    assert len(paths) == 3 and fp32["trt_fp16_enable"] is False


def test_cuda_results_are_checked():
    import enum

    from sdrt.engines.cudart import call

    class Err(enum.Enum):  # older cuda-python: plain Enum; newer: IntEnum
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    assert call((Err.cudaSuccess, 1234), "cudaMalloc") == 1234
    assert call((0,), "cudaFree") is None
    with pytest.raises(EngineError, match="cudaMalloc failed: Err.cudaErrorMemoryAllocation"):
        call((Err.cudaErrorMemoryAllocation, 0), "cudaMalloc")


@pytest.mark.skipif(not _tensorrt_missing(), reason="tensorrt is installed here")
def test_missing_cuda_python_names_the_extra():
    from sdrt.engines.cudart import import_cudart

    try:
        import_cudart()
    except BackendNotInstalledError as e:
        assert "sdrt[tensorrt]" in str(e)


def test_tensorrt_ep_options_with_an_unwritable_cache_fall_back_to_a_temporary_one(onnx_file, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # a cache root that cannot be created (read-only for root too)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        options = tensorrt_ep_options(onnx_file, VAE, cache_dir=blocked / "cache", gpu=H100)
    assert Path(options["trt_engine_cache_path"]).is_dir()
    assert str(tmp_path / "tmp") in options["trt_engine_cache_path"]
