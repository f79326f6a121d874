"""sdrt optimize: cpu/gpu fusion profiles and fp16, validated against the plain fp32 export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sdrt.engines.onnxruntime import OrtEngine
from sdrt.export import optimize as opt
from sdrt.export.errors import ExportError, OutputExistsError, ValidationError

GPU_ONLY_OPS = {"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def optimized(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimized")
    src = exported["sd1"]
    return {key: opt.optimize_folder(src, root / f"{key[0]}-{key[1]}", key[0], key[1], log=lambda m: None)
            for key in (("cpu", "fp32"), ("cpu", "fp16"), ("gpu", "fp16"))}


def test_cpu_fp32_runs_on_cpu_provider_and_matches(optimized, exported):
    from sdrt.runtime.info import describe

    out = optimized["cpu", "fp32"]
    manifest = json.loads((out / "sdrt.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["optimize"]["profile"] == "cpu"
    assert manifest["optimize"]["onnxruntime"]
    for name, report in manifest["validation_optimize"].items():
        assert report["passed"] and len({json.dumps(c["dims"]) for c in report["checks"]}) == 2, name
        assert max(c["max_abs"] for c in report["checks"]) <= 1e-4
        assert not op_types(out / name / "model.onnx") & GPU_ONLY_OPS, name
    assert "SkipLayerNormalization" in op_types(out / "unet" / "model.onnx")
    describe(out, verify="sha256")  # file hashes in sdrt.json are those of the optimized files


def test_cpu_fp16_within_tolerance_and_decoded_psnr(optimized, exported):
    out = optimized["cpu", "fp16"]
    manifest = json.loads((out / "sdrt.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["optimize"]["keep_io_types"] is True
    assert all(r["passed"] for r in manifest["validation_optimize"].values())
    # fp16 weights really are fp16
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(out / "unet" / "model.onnx")).graph.initializer)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    images = []
    for folder in (exported["sd1"], out):
        engine = OrtEngine(folder / "vae_decoder" / "model.onnx")
        images.append(np.clip(engine.run({"latent_sample": latents})["sample"] / 2 + 0.5, 0, 1))
    mse = float(np.mean((images[0] - images[1]) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-20))
    print(f"vae_decoder fp16 vs fp32 PSNR: {psnr:.1f} dB")
    assert psnr > 40


def test_fp16_folder_generates(optimized):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(optimized["cpu", "fp16"], provider="cpu")
    out = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np")
    assert np.isfinite(out.images).all()


def test_gpu_profile_has_fused_ops(optimized):
    out = optimized["gpu", "fp16"]
    manifest = json.loads((out / "sdrt.json").read_text())
    for name, report in manifest["validation_optimize"].items():
        assert report["run"] == "not run: no GPU"
    unet_ops = op_types(out / "unet" / "model.onnx")
    assert {"GroupNorm", "SkipGroupNorm", "NhwcConv"} <= unet_ops
    assert {"GroupNorm", "NhwcConv"} <= op_types(out / "vae_decoder" / "model.onnx")


def test_numpy_patch_still_needed():
    """Canary: upstream FusionAttentionUnet.get_num_heads still calls int() on a shape-[1] array,
    which numpy >= 2.4 refuses. When this test fails, upstream is fixed: delete
    sdrt.export.optimize._patch_unet_num_heads and this test."""
    from onnx import helper
    from onnxruntime.transformers.fusion_attention_unet import FusionAttentionUnet
    from onnxruntime.transformers.onnx_model import OnnxModel

    shape_parts = [helper.make_tensor(f"d{i}", onnx.TensorProto.INT64, [1], [v]) for i, v in enumerate((0, 0, 2, 4))]
    nodes = [helper.make_node("Concat", [f"d{i}" for i in range(4)], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], shape_parts)
    model = OnnxModel(helper.make_model(graph))
    fusion = FusionAttentionUnet(model, 0, 0, False, False, False)
    upstream = getattr(FusionAttentionUnet.get_num_heads, "_sdrt_original", FusionAttentionUnet.get_num_heads)
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        with pytest.raises(TypeError):
            upstream(fusion, nodes[1], is_torch2=True)
    opt._patch_unet_num_heads()
    assert FusionAttentionUnet.get_num_heads(fusion, nodes[1], is_torch2=True) == 2


def test_refuses_optimized_folder(optimized, tmp_path):
    with pytest.raises(opt.OptimizeError, match="already optimized"):
        opt.optimize_folder(optimized["cpu", "fp32"], tmp_path / "again", log=lambda m: None)


def test_unknown_profile_and_precision(exported, tmp_path):
    with pytest.raises(opt.OptimizeError, match="unknown optimize profile"):
        opt.optimize_folder(exported["sd1"], tmp_path / "x", profile="tpu")
    with pytest.raises(opt.OptimizeError, match="unknown precision"):
        opt.optimize_folder(exported["sd1"], tmp_path / "x", precision="int8")
    assert not (tmp_path / "x").exists()
    assert issubclass(opt.OptimizeError, ExportError)


def test_output_exists_without_force(exported, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        opt.optimize_folder(exported["sd1"], tmp_path / "out", log=lambda m: None)


def test_validation_failure_writes_nothing(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(opt.TOLERANCE, "fp16", 0.0)
    with pytest.raises(ValidationError, match="differs from the fp32 export"):
        opt.optimize_folder(exported["sd1"], tmp_path / "bad", precision="fp16", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_optimize(exported, tmp_path):
    from sdrt.runtime.cli import main

    assert main(["optimize", str(exported["sd1"]), str(tmp_path / "o"), "--optimize", "cpu", "--precision", "fp32"]) == 0
    assert json.loads((tmp_path / "o" / "sdrt.json").read_text())["optimize"]["profile"] == "cpu"
