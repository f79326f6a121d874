"""Every engine against the references: the whole pipeline vs diffusers, each network vs onnxruntime, on the tiny
exported folders; then what the OpenVINO backend adds (its parity verdict and cache, bf16, the NaN-safe fp32
re-run, `sdrt optimize` and `sdrt quantize` folders, the missing extra). OpenVINO cases skip when it is not
installed (`pip install "sdrt[openvino]"`; the test extra has it)."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest

from conftest import run_without_torch
from sdrt.engines import create_engine
from sdrt.engines.errors import BackendNotInstalledError
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.pipeline import StableDiffusionPipeline

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason='OpenVINO is not installed (pip install "sdrt[openvino]")')
ENGINES = [pytest.param("cpu", id="onnxruntime"), pytest.param("openvino", id="openvino", marks=needs_openvino)]
STEPS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


def options(provider: str, cache, **extra) -> dict:
    """Pipeline options: OpenVINO's model cache and parity verdicts in this module's folder."""
    return {"provider": provider, **({"cache_dir": str(cache), **extra} if provider == "openvino" else extra)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# -- every engine vs the references --------------------------------------------------------------------

CASES = [
    ("sd1", None, dict(prompt="a red circle on a blue background", guidance_scale=7.5)),
    ("sd2", "euler-a", dict(prompt="an astronaut riding a horse", negative_prompt="blurry", guidance_scale=5.0,
                            height=64, width=96)),
]


@pytest.fixture(scope="module")
def diffusers_pipes(checkpoints):
    diffusers = pytest.importorskip("diffusers")
    from reference import load_pipes

    return load_pipes(diffusers.StableDiffusionPipeline, checkpoints)


@pytest.mark.parametrize("provider", ENGINES)
@pytest.mark.parametrize("flavour,scheduler,kwargs", CASES, ids=[f"{f}-{s or 'default'}" for f, s, _ in CASES])
def test_txt2img_matches_diffusers(diffusers_pipes, exported, cache, provider, flavour, scheduler, kwargs):
    from reference import reference

    expected = reference(diffusers_pipes[flavour], scheduler, 1234, num_inference_steps=STEPS, **kwargs)
    pipe = StableDiffusionPipeline.from_pretrained(exported[flavour], scheduler=scheduler, **options(provider, cache))
    got = pipe(seed=1234, output_type="np", num_inference_steps=STEPS, **kwargs).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3
    assert pipe.unet.provider_name == ("cpu" if provider == "cpu" else "openvino")


@pytest.mark.parametrize("provider", ENGINES)
def test_img2img_matches_diffusers(checkpoints, exported, cache, provider):
    diffusers = pytest.importorskip("diffusers")
    import torch
    from PIL import Image

    from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = dict(prompt="a red circle", strength=0.6, guidance_scale=7.5, num_inference_steps=STEPS)
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(checkpoints["sd1"], safety_checker=None)
    ref_pipe.set_progress_bar_config(disable=True)
    expected = ref_pipe(image=picture, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                        **kwargs).images
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(exported["sd1"], **options(provider, cache))
    got = pipe(image=picture, seed=7, output_type="np", **kwargs).images
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("provider", ENGINES)
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_each_network_matches_onnxruntime_on_the_validation_shapes(exported, cache, provider, component):
    from sdrt.engines.parity import sample_feed, validation_dims

    folder = ModelFolder.open(exported["sd2"])
    path, spec = folder.onnx_path(component), folder.spec(component)
    reference = create_engine(path, spec, provider="cpu")
    engine = create_engine(path, spec, **options(provider, cache))
    shapes = validation_dims(path, spec)
    assert len(shapes) == 2  # sdrt.json's: the export shape and one it never saw
    for seed, dims in enumerate(shapes):
        feed = sample_feed(spec, reference.input_dtypes, dims, seed, 1000)
        want, got = reference.run(feed), engine.run(feed)
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert np.abs(got[name] - want[name]).max() <= 1e-4 * max(1.0, np.abs(want[name]).max()), name


# -- the OpenVINO backend -------------------------------------------------------------------------------

@needs_openvino
def test_parity_verdict_is_cached_per_file_device_and_precision(exported, tmp_path, monkeypatch):
    from sdrt.engines import parity

    folder = ModelFolder.open(exported["sd1"])
    path, spec = folder.onnx_path("vae_decoder"), folder.spec("vae_decoder")
    engine = create_engine(path, spec, provider="openvino", precision="fp32", cache_dir=str(tmp_path))
    engine.load()
    verdict = engine.parity
    assert verdict["passed"] and verdict["precision"] == "fp32" and len(verdict["checks"]) == 2
    assert max(c["max_abs"] for c in verdict["checks"]) < 1e-4
    assert len(list((tmp_path / "openvino" / "parity").glob("vae_decoder-*.json"))) == 1
    assert list((tmp_path / "openvino").glob("vae_decoder-*/key.json"))  # the model cache's entry, keyed

    def measure_again(engine):
        raise AssertionError("the cached verdict was not used")

    monkeypatch.setattr(parity, "_measure", measure_again)
    again = create_engine(path, spec, provider="openvino", precision="fp32", cache_dir=str(tmp_path))
    again.load()
    assert again.parity == verdict
    other = create_engine(path, spec, provider="openvino", precision="bf16", cache_dir=str(tmp_path))
    with pytest.raises(AssertionError, match="cached verdict"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other.load()  # another precision: another verdict


@needs_openvino
def test_a_failed_verdict_is_refused_until_deleted(exported, tmp_path, monkeypatch):
    from sdrt.engines import parity

    folder = ModelFolder.open(exported["sd1"])
    path, spec = folder.onnx_path("unet"), folder.spec("unet")
    monkeypatch.setattr(parity, "FP32_ATOL", 0.0)  # nothing passes: as if OpenVINO computed something else
    engine = create_engine(path, spec, provider="openvino", precision="fp32", cache_dir=str(tmp_path))
    with pytest.raises(parity.ParityError, match="differs from onnxruntime's.*--provider cpu.*delete it"):
        engine.load()
    assert not engine.loaded
    monkeypatch.setattr(parity, "FP32_ATOL", 1e-3)
    with pytest.raises(parity.ParityError):  # the cached verdict, not a new check
        create_engine(path, spec, provider="openvino", precision="fp32", cache_dir=str(tmp_path)).load()
    for record in (tmp_path / "openvino" / "parity").glob("unet-*.json"):
        record.unlink()
    create_engine(path, spec, provider="openvino", precision="fp32", cache_dir=str(tmp_path)).load()


@needs_openvino
def test_bf16_image_psnr_against_fp32(exported, cache):
    kwargs = dict(prompt="a red circle on a blue background", num_inference_steps=STEPS, seed=3, output_type="np")
    fp32 = StableDiffusionPipeline.from_pretrained(exported["sd1"], **options("openvino", cache, precision="fp32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on CPUs without AMX / AVX-512-BF16
        bf16 = StableDiffusionPipeline.from_pretrained(exported["sd1"], **options("openvino", cache, precision="bf16"))
        got = bf16(**kwargs).images
    assert bf16.unet.precision == "bf16" and fp32.unet.precision == "fp32"
    assert psnr(got, fp32(**kwargs).images) >= 35


@needs_openvino
def test_auto_precision_follows_the_cpu(monkeypatch):
    from sdrt.engines import openvino

    assert openvino.resolve_precision("auto", "CPU", {"FP32", "BF16"}) == ("bf16", None)
    assert openvino.resolve_precision("auto", "CPU", {"FP32", "INT8"}) == ("fp32", None)
    assert openvino.resolve_precision("auto", "GPU.1", {"FP16"}) == ("device", None)
    precision, note = openvino.resolve_precision("bf16", "CPU", {"FP32"})
    assert precision == "bf16" and "emulates" in note
    assert openvino.resolve_precision("f16", "CPU", {"FP32"})[0] == "fp32"
    monkeypatch.setattr(openvino, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert "BF16" in openvino.capabilities("CPU")  # a hypervisor may hide AMX from OpenVINO's probe and not cpuinfo


@needs_openvino
def test_bf16_decoder_reruns_at_fp32_on_nan(exported, cache):
    from sdrt.engines.fallback import FiniteOrFallback, NonFiniteOutputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], **options("openvino", cache, precision="bf16"))
    decoder = pipe.vae_decoder
    assert isinstance(decoder, FiniteOrFallback)
    primary_run = decoder.primary.run
    decoder.primary.run = lambda feed: {k: np.full_like(v, np.nan) for k, v in primary_run(feed).items()}
    with pytest.warns(NonFiniteOutputWarning, match="bf16 overflow"):
        out = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np")
    assert np.isfinite(out.images).all() and decoder.fallback_runs == 1
    assert decoder.fallback.precision == "fp32"


@needs_openvino
def test_static_shapes_and_other_shapes(exported, cache):
    folder = ModelFolder.open(exported["sd1"])
    path, spec = folder.onnx_path("vae_decoder"), folder.spec("vae_decoder")
    engine = create_engine(path, spec, provider="openvino", fixed_shapes=True, cache_dir=str(cache))
    reference = create_engine(path, spec, provider="cpu")
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(engine.run({"latent_sample": z})["sample"],
                               reference.run({"latent_sample": z})["sample"], atol=1e-4)
    assert engine._static_shapes == {"latent_sample": (1, 4, 8, 8)}
    wide = np.concatenate([z, z], axis=3)
    with pytest.warns(RuntimeWarning, match="second, dynamic compilation"):
        got = engine.run({"latent_sample": wide})["sample"]
    np.testing.assert_allclose(got, reference.run({"latent_sample": wide})["sample"], atol=1e-4)


@pytest.fixture(scope="module")
def processed(exported, tmp_path_factory):
    """The sd1 export after `sdrt optimize --optimize cpu` (com.microsoft ops) and `sdrt quantize` (int8 QDQ)."""
    pytest.importorskip("onnx")
    from sdrt.export.optimize import optimize_folder
    from sdrt.export.quantize import quantize_folder

    root = tmp_path_factory.mktemp("processed")
    return {"optimize-cpu": optimize_folder(exported["sd1"], root / "opt", profile="cpu", log=lambda m: None),
            "int8-qdq": quantize_folder(exported["sd1"], root / "int8", mode="qdq", log=lambda m: None)}


@needs_openvino
@pytest.mark.parametrize("kind,max_error", [("optimize-cpu", 1e-3), ("int8-qdq", 0.15)])
def test_optimized_and_int8_folders_run(processed, cache, kind, max_error):
    kwargs = dict(prompt="a red circle", num_inference_steps=STEPS, seed=5, output_type="np")
    expected = StableDiffusionPipeline.from_pretrained(processed[kind])(**kwargs).images
    pipe = StableDiffusionPipeline.from_pretrained(processed[kind], **options("openvino", cache, precision="fp32"))
    got = pipe(**kwargs).images
    assert np.abs(got - expected).max() < max_error
    if kind == "optimize-cpu":
        assert "com.microsoft" in pipe.unet.path.read_bytes()[:200000].decode("latin-1")  # the fused attention ran
    else:
        assert pipe.unet.parity["file_precision"] == "int8"
        assert psnr(got, expected) > 30


def test_missing_openvino_names_the_extra(exported, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    folder = ModelFolder.open(exported["sd1"])
    with pytest.raises(BackendNotInstalledError, match=r'pip install "sdrt\[openvino\]"'):
        create_engine(folder.onnx_path("unet"), folder.spec("unet"), provider="openvino")


def test_openvino_flags_need_the_openvino_provider():
    from sdrt.runtime import cli
    from sdrt.runtime.errors import InvalidInputError

    args = cli.build_parser().parse_args(["bench", "F", "--provider", "openvino:GPU", "--precision", "bf16",
                                          "--threads", "2", "--performance-hint", "throughput"])
    assert cli._openvino_flags(args) == {"precision": "bf16", "performance_hint": "throughput", "num_threads": 2}
    args = cli.build_parser().parse_args(["bench", "F", "--precision", "bf16"])
    with pytest.raises(InvalidInputError, match="--precision applies only to --provider openvino"):
        cli._openvino_flags(args)


@needs_openvino
def test_openvino_generates_without_torch(exported, cache):
    result = run_without_torch("""
import sys
from sdrt.runtime.pipeline import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], provider="openvino", cache_dir=sys.argv[2])
out = pipe("a red circle", num_inference_steps=2, seed=0, output_type="uint8")
assert out.images.shape == (1, 64, 64, 3)
assert "torch" not in sys.modules and "diffusers" not in sys.modules
print("ok", pipe.unet.provider_name)
""", str(exported["sd1"]), str(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok openvino")
