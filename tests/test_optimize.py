"""sdrt optimize: cpu/gpu fusion profiles and fp16, validated against the plain fp32 export; the attention
fusion in both profiles; SDXL folders; the tiny VAE carried through; quantized folders refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sdrt.engines.onnxruntime import OrtEngine
from sdrt.export import folder as folder_module
from sdrt.export import optimize as opt
from sdrt.export.errors import ExportError, OutputExistsError, ValidationError

GPU_ONLY_OPS = {"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}


ATTENTION = {"unet": 8, "vae_decoder": 1, "vae_encoder": 1}  # fused per component in the tiny sd1 folder


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def assert_attention_fused(out, expected: dict):
    """Every attention of `expected` components fused (report and graph), none in the others."""
    manifest = json.loads((out / "sdrt.json").read_text())
    for name, report in manifest["validation_optimize"].items():
        component = name.removesuffix("_fp32")
        if component in expected:
            attention = report["attention"]
            assert (attention["fused"], attention["softmax_left"]) == (expected[component], 0), name
            if manifest["optimize"]["profile"] == "gpu":  # every one packed: QKV (self) or KV (cross)
                assert attention["packed_qkv"] + attention["packed_kv"] == expected[component], name
            ops = op_types(out / name / "model.onnx")
            assert "MultiHeadAttention" in ops and "Softmax" not in ops, name
        else:
            assert "attention" not in report and "MultiHeadAttention" not in op_types(out / name / "model.onnx")


class Optimized(dict):
    """(profile, precision) -> the sd1 export optimized so, made on first use (the GPU machine needs one only)."""

    def __init__(self, src, root):
        super().__init__()
        self.src, self.root = src, root

    def __missing__(self, key):
        self[key] = opt.optimize_folder(self.src, self.root / f"{key[0]}-{key[1]}", *key, log=lambda m: None)
        return self[key]


@pytest.fixture(scope="module")
def optimized(exported, tmp_path_factory):
    return Optimized(exported["sd1"], tmp_path_factory.mktemp("optimized"))


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
    assert_attention_fused(out, ATTENTION)
    describe(out, verify="sha256")  # file hashes in sdrt.json are those of the optimized files


def test_cpu_fp16_within_tolerance_and_decoded_psnr(optimized, exported):
    out = optimized["cpu", "fp16"]
    manifest = json.loads((out / "sdrt.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["optimize"]["keep_io_types"] is True
    assert all(r["passed"] for r in manifest["validation_optimize"].values())
    assert_attention_fused(out, ATTENTION)  # the CPU provider has fp16 MultiHeadAttention kernels
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
    reported = [c["psnr_db"] for c in manifest["validation_optimize"]["vae_decoder"]["checks"]]
    assert len(reported) == 2 and min(reported) > 40  # sdrt.json gives it too, per validation shape
    assert opt.decoded_psnr(images[0] * 2 - 1, images[0] * 2 - 1) == 200.0
    assert opt.decoded_psnr(np.zeros((1, 3, 4, 4)), np.full((1, 3, 4, 4), 0.2)) == pytest.approx(20 * np.log10(10))


def test_fp16_folder_generates(optimized):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(optimized["cpu", "fp16"], provider="cpu")
    out = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np")
    assert np.isfinite(out.images).all()


def test_gpu_profile_has_fused_ops(optimized):
    out = optimized["gpu", "fp16"]
    manifest = json.loads((out / "sdrt.json").read_text())
    for name, report in manifest["validation_optimize"].items():  # run on the CPU, CUDA-only ops lowered
        assert report["passed"] and report["run"].startswith("CPU provider, the CUDA-only ops lowered")
        assert len({json.dumps(c["dims"]) for c in report["checks"]}) == 2
        assert all(c["max_abs"] <= opt.TOLERANCE["fp16"] * max(1, c["max_ref"]) for c in report["checks"])
    assert min(c["psnr_db"] for c in manifest["validation_optimize"]["vae_decoder"]["checks"]) > 40
    lowered = manifest["validation_optimize"]["unet"]["lowered"]
    assert lowered["MultiHeadAttention"] == 8 and {"GroupNorm", "SkipGroupNorm", "NhwcConv"} <= set(lowered)
    assert manifest["validation_optimize"]["unet"]["attention"] == {"fused": 8, "softmax_left": 0, "packed_qkv": 4,
                                                                    "packed_kv": 4}
    assert manifest["validation_optimize"]["unet"]["bias_split_gelu"] == 0  # the tiny UNet's width has no kernel
    # fp16 norms on the GPU: no Cast pair around GroupNorm / SkipGroupNorm / SkipLayerNormalization
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    producer = {o: n.op_type for n in unet.graph.node for o in n.output}
    norms = [n for n in unet.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm", "SkipLayerNormalization")]
    assert len(norms) == 29 and all(producer.get(n.input[0]) != "Cast" for n in norms)
    assert manifest["optimize"]["fp16_op_block_list"] == opt.FP16_OP_BLOCK_LISTS["gpu"]
    unet_ops = op_types(out / "unet" / "model.onnx")
    assert {"GroupNorm", "SkipGroupNorm", "NhwcConv", "MultiHeadAttention"} <= unet_ops
    for vae in ("vae_decoder", "vae_encoder", "vae_decoder_fp32"):
        assert {"GroupNorm", "NhwcConv", "MultiHeadAttention"} <= op_types(out / vae / "model.onnx")
    assert_attention_fused(out, ATTENTION)


def test_gpu_check_requires_the_attention_fusion(exported, tmp_path, monkeypatch):
    """check_gpu_graph fails a gpu-profile unet without MultiHeadAttention (here: attention fusion off)."""
    unfused = opt.optimize_file
    monkeypatch.setattr(opt, "optimize_file", lambda *a, **k: unfused(*a, **k, attention=False))
    missing = r"unet: the gpu profile did not produce the fused ops \['MultiHeadAttention'\]"
    with pytest.raises(ValidationError, match=missing):
        opt.optimize_folder(exported["sd1"], tmp_path / "gpu", "gpu", "fp16", log=lambda m: None)


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


def test_refuses_quantized_folder_saying_so(exported, tmp_path):
    """A folder written by `sdrt quantize` (precision int8, a quantization record) is not "already
    optimized": the message says it is quantized and to optimize before quantizing."""
    folder = tmp_path / "int8"
    folder.mkdir()
    manifest = json.loads((exported["sd1"] / "sdrt.json").read_text())
    manifest.update(precision="int8", quantization={"mode": "dynamic"})
    (folder / "sdrt.json").write_text(json.dumps(manifest))
    with pytest.raises(opt.OptimizeError, match=r"is quantized \(precision int8, dynamic mode.*optimize the fp32 "
                                                r"export before quantizing") as info:
        opt.optimize_folder(folder, tmp_path / "out", log=lambda m: None)
    assert "already optimized" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_weights_past_the_threshold_go_to_model_onnx_data(tmp_path, monkeypatch):
    """save_model: small weights stay in model.onnx; past EXTERNAL_DATA_BYTES they go to model.onnx_data (and
    onnxruntime runs either the same)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")  # 16 KiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = np.ones((2, 64), np.float32)
    outputs = []
    for threshold, name in ((1 << 20, "small"), (8 << 10, "large")):
        monkeypatch.setattr(folder_module, "EXTERNAL_DATA_BYTES", threshold)
        (tmp_path / name).mkdir()
        folder_module.save_model(model, tmp_path / name / "model.onnx")
        assert (tmp_path / name / "model.onnx_data").is_file() == (name == "large")
        outputs.append(OrtEngine(tmp_path / name / "model.onnx").run({"x": x})["y"])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], x @ numpy_helper.to_array(weight))


def test_large_networks_keep_their_weights_in_model_onnx_data(exported, tmp_path, monkeypatch):
    """Past protobuf's 2 GB (SD 1.5's fp32 UNet) the optimized weights go to model.onnx_data, as the export
    writes them; here every network pretends to be that large."""
    monkeypatch.setattr(folder_module, "PROTOBUF_LIMIT", 0)
    from sdrt.runtime.info import describe

    out = opt.optimize_folder(exported["sd1"], tmp_path / "o", "cpu", "fp32", log=lambda m: None)
    assert (out / "unet" / "model.onnx_data").is_file()
    graph = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    describe(out, verify="sha256")


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


# -- SDXL and the tiny VAE ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_exported(tiny):
    pytest.importorskip("diffusers")
    return tiny["xl-base"]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_sdxl_fp16(xl_exported, tmp_path, profile):
    """Both text encoders, the added-cond UNet (text_embeds, time_ids; 16 attentions in its 2-layer
    transformer blocks) and the VAE, with the fp32 decoder fallback; cpu-profile outputs within tolerance."""
    from sdrt.runtime.sdxl import StableDiffusionXLPipeline

    out = opt.optimize_folder(xl_exported, tmp_path / profile, profile, "fp16", log=lambda m: None)
    manifest = json.loads((out / "sdrt.json").read_text())
    assert set(manifest["validation_optimize"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                   "vae_encoder", "vae_decoder_fp32"}
    assert all(r["passed"] for r in manifest["validation_optimize"].values())
    assert_attention_fused(out, {"unet": 16, "vae_decoder": 1, "vae_encoder": 1})
    if profile == "gpu":
        assert "SkipLayerNormalization" in op_types(out / "text_encoder_2" / "model.onnx")
        return
    unet_inputs = {t["name"] for t in manifest["components"]["unet"]["spec"]["inputs"]}
    assert {"text_embeds", "time_ids"} <= unet_inputs
    pipe = StableDiffusionXLPipeline.from_pretrained(out, provider="cpu")
    image = pipe("a red circle", num_inference_steps=2, seed=0, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.fixture(scope="module")
def with_taesd(exported, tmp_path_factory):
    """A copy of the exported sd1 folder with the tiny VAE (vae_tiny_decoder/, vae_tiny_encoder/) added."""
    import shutil

    from sdrt.export.fixtures_family import save_tiny_taesd
    from sdrt.export.taesd import export_taesd

    root = tmp_path_factory.mktemp("taesd")
    folder = root / "sd1"
    shutil.copytree(exported["sd1"], folder)
    return export_taesd(save_tiny_taesd(root / "taesd"), folder, log=lambda m: None)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_tiny_vae_is_optimized_like_the_vae(with_taesd, tmp_path, profile):
    """The tiny VAE goes through the same profile and precision as the VAE, validated (cpu) or checked
    for its fused convolutions (gpu), and the file table covers it."""
    from sdrt.runtime.info import describe
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    out = opt.optimize_folder(with_taesd, tmp_path / profile, profile, "fp16", log=lambda m: None)
    manifest = json.loads((out / "sdrt.json").read_text())
    for name in ("vae_tiny_decoder", "vae_tiny_encoder"):
        report = manifest["validation_optimize"][name]
        assert report["passed"] and report["attention"] == {"fused": 0, "softmax_left": 0}  # none to fuse
        if profile == "cpu":
            assert len({json.dumps(c["dims"]) for c in report["checks"]}) == 2
        else:
            assert "NhwcConv" in op_types(out / name / "model.onnx")
        weights = onnx.load(str(out / name / "model.onnx")).graph.initializer
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), name
    describe(out, verify="sha256")
    if profile == "cpu":
        pipe = StableDiffusionPipeline.from_pretrained(out, provider="cpu", vae="taesd")
        image = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np").images
        assert np.isfinite(image).all()


def test_optimized_folders_refuse_providers_that_cannot_run_them(optimized):
    """A gpu-profile folder needs a GPU provider; no optimized folder goes to native TensorRT (its parser does not
    know com.microsoft ops): both refused before any engine is made, with what to run instead."""
    from sdrt.runtime.config import ModelFolder
    from sdrt.runtime.errors import UnsupportedConfigError
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    gpu, cpu = optimized["gpu", "fp16"], optimized["cpu", "fp32"]
    with pytest.raises(UnsupportedConfigError, match=r"optimized for the CUDA provider .*--optimize cpu"):
        StableDiffusionPipeline.from_pretrained(gpu, provider="cpu")
    for folder in (gpu, cpu):
        with pytest.raises(UnsupportedConfigError, match=r"TensorRT's ONNX parser does not know.*plain `sdrt export`"):
            StableDiffusionPipeline.from_pretrained(folder, provider="tensorrt")
    for provider in ("cuda", "cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        ModelFolder.open(gpu).check_provider(provider)  # accepted (engines are made later, on use)
    with pytest.warns(UserWarning, match="splits each network between TensorRT and CUDA"):
        ModelFolder.open(gpu).check_provider("tensorrt-ep")  # runs, but TensorRT gets only pieces
    ModelFolder.open(cpu).check_provider("cpu")


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="onnxruntime-gpu with CUDA needed")
def test_gpu_profile_on_the_cuda_provider(optimized, exported):
    """The real CUDA kernels (not the CPU lowering): every network of the gpu fp16 folder, run by the CUDA
    provider, within the fp16 tolerance of the fp32 export at its validation shapes."""
    out = optimized["gpu", "fp16"]
    manifest = json.loads((exported["sd1"] / "sdrt.json").read_text())
    for name, spec in opt.networks(manifest).items():
        report = opt.compare_files(exported["sd1"] / name / "model.onnx", out / name / "model.onnx", spec,
                                   opt.validation_shapes(manifest, name), "fp16", provider="cuda",
                                   decoder=name in opt.DECODERS)
        assert report["passed"], name
        print(name, max(c["max_abs"] / max(1, c["max_ref"]) for c in report["checks"]))


def test_gpu_profile_with_an_op_the_lowering_does_not_know(exported, tmp_path, monkeypatch):
    """A CUDA-only op that sdrt.export.lowering cannot rewrite stops optimize with a typed error, nothing written."""
    from sdrt.export import lowering

    monkeypatch.setattr(lowering, "LOWERINGS", {k: v for k, v in lowering.LOWERINGS.items() if k != "NhwcConv"})
    with pytest.raises(opt.OptimizeError, match=r"cannot be validated on the CPU: no CPU lowering .*NhwcConv"):
        opt.optimize_folder(exported["sd1"], tmp_path / "gpu", "gpu", "fp16", log=lambda m: None)
    assert not (tmp_path / "gpu").exists()
