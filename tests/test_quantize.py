"""sdrt quantize: int8 UNet and text encoder, calibrated on recorded pipeline runs, validated against fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_without_torch
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.export import quantize as q
from sdrt.export.calibration import CalibrationError, FeedReader, RecordingEngine, record_feeds
from sdrt.export.errors import ExportError, ValidationError

DEMO = Path(__file__).resolve().parent.parent / "models" / "shapes-demo-onnx"
# bench/quantize.py demo (bench/results/quantize-*-demo.md), static int8 vs fp32 over the first 16 of these
# prompts, 20 steps, guidance 3: PSNR median 50.6 dB, min 41.9 dB. Floors with margin: a diffusion trajectory
# can flip (another shape) on a small perturbation, hence a median and a looser minimum.
DEMO_MEDIAN_PSNR_FLOOR = 40.0
DEMO_MIN_PSNR_FLOOR = 25.0
QUIET = {"log": lambda m: None}


def op_types(path) -> set[str]:
    return set(q.op_counts(Path(path)))


def rel_rms(got, ref) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {mode: q.quantize_folder(exported["sd1"], root / mode, mode=mode, **QUIET) for mode in ("dynamic", "static")}


@pytest.fixture(scope="module")
def demo_static(tmp_path_factory):
    if not (DEMO / "sdrt.json").is_file():
        pytest.skip("the bundled demo model is not in this checkout")
    return q.quantize_folder(DEMO, tmp_path_factory.mktemp("demo") / "int8", mode="static", guidance_scale=3.0, **QUIET)


def test_manifest_records_quantization_and_validation(quantized):
    from sdrt.runtime.info import describe

    for mode, folder in quantized.items():
        manifest = json.loads((folder / "sdrt.json").read_text())
        assert manifest["precision"] == "int8" and manifest["quantization"]["mode"] == mode
        assert manifest["quantization"]["per_channel"] is True
        assert (manifest["quantization"]["calibration"] is None) == (mode == "dynamic")
        for name in ("unet", "text_encoder"):
            report = manifest["validation_quantize"][name]
            assert report["passed"] and report["checks"][0]["feeds"] >= (2 if name == "unet" else 1)
            assert 0 < report["checks"][0]["max_rel_rms"] <= q.TOLERANCE
        describe(folder, verify="sha256")  # the file table is that of the quantized files


def test_graphs_hold_quantized_ops(quantized, exported):
    for folder in quantized.values():
        for name in ("unet", "text_encoder"):
            ops = op_types(folder / name / "model.onnx")
            assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, name
    static_unet = quantized["static"] / "unet" / "model.onnx"
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(static_unet)
    assert "QuantizeLinear" not in op_types(quantized["dynamic"] / "unet" / "model.onnx")
    # static: int8 Conv weights, except the convolutions kept fp32 (first, last, Concat-fed)
    model = onnx.load(str(static_unet))
    int8_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert len(int8_weights) > 10
    kept = q.fp32_convs(exported["sd1"] / "unet" / "model.onnx")
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    assert kept and all(name in convs for name in kept)
    assert len(convs) > len(kept)


def test_outputs_within_tolerance_on_fresh_inputs(quantized, exported):
    """Independently of the manifest: other prompts and seeds than validation used, fp32 vs int8 per component."""
    feeds = record_feeds(exported["sd1"], ["a blue square at the bottom", "a cat"], steps=3, first_seed=500)
    for mode, folder in quantized.items():
        for name, output in (("unet", "out_sample"), ("text_encoder", "last_hidden_state")):
            ref, got = OrtEngine(exported["sd1"] / name / "model.onnx"), OrtEngine(folder / name / "model.onnx")
            errors = [rel_rms(got.run(f)[output], ref.run(f)[output]) for f in feeds[name]]
            assert 0 < max(errors) <= q.TOLERANCE, (mode, name, errors)


def test_quantized_folder_generates(quantized, exported):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(exported["sd1"])("a red circle", num_inference_steps=3, seed=0,
                                                                       output_type="np").images
    for folder in quantized.values():
        images = StableDiffusionPipeline.from_pretrained(folder)("a red circle", num_inference_steps=3, seed=0,
                                                                 output_type="np").images
        assert images.shape == reference.shape and np.isfinite(images).all()


def test_refuses_quantized_or_converted_folder(quantized, exported, tmp_path):
    with pytest.raises(q.QuantizeError, match="already quantized"):
        q.quantize_folder(quantized["dynamic"], tmp_path / "again", mode="dynamic", **QUIET)
    fp16 = tmp_path / "fp16"
    shutil.copytree(exported["sd1"], fp16)
    manifest = json.loads((fp16 / "sdrt.json").read_text())
    (fp16 / "sdrt.json").write_text(json.dumps(dict(manifest, precision="fp16")))
    with pytest.raises(q.QuantizeError, match="already quantized or converted"):
        q.quantize_folder(fp16, tmp_path / "x", mode="dynamic", **QUIET)
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_zero_calibration_samples_refused(exported, tmp_path):
    for calibration in (0, []):
        with pytest.raises(CalibrationError, match="at least one"):
            q.quantize_folder(exported["sd1"], tmp_path / "z", mode="static", calibration=calibration, **QUIET)
    with pytest.raises(CalibrationError, match="at least one calibration sample"):
        FeedReader([], ["sample"])
    with pytest.raises(CalibrationError, match="at least one prompt"):
        record_feeds(exported["sd1"], [])
    assert not (tmp_path / "z").exists()
    assert issubclass(CalibrationError, ExportError)


def test_bad_mode_and_components(exported, tmp_path):
    with pytest.raises(q.QuantizeError, match="unknown quantization mode"):
        q.quantize_folder(exported["sd1"], tmp_path / "x", mode="int4", **QUIET)
    with pytest.raises(q.QuantizeError, match="the VAE stays fp32"):
        q.quantize_folder(exported["sd1"], tmp_path / "x", components=("vae_decoder",), **QUIET)
    assert not (tmp_path / "x").exists()


def test_validation_failure_writes_nothing(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(q, "TOLERANCE", 1e-6)
    with pytest.raises(ValidationError, match="relative RMS error"):
        q.quantize_folder(exported["sd1"], tmp_path / "bad", mode="dynamic", components=("unet",), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_recording_engine_keeps_copies(exported):
    engine = OrtEngine(exported["sd1"] / "text_encoder" / "model.onnx")
    feeds = []
    recorder = RecordingEngine(engine, feeds)
    ids = np.zeros((1, 77), dtype=np.int64)
    out = recorder.run({"input_ids": ids})
    ids[0, 0] = 7
    assert feeds[0]["input_ids"][0, 0] == 0 and len(feeds) == 1
    np.testing.assert_array_equal(out["last_hidden_state"],
                                  engine.run({"input_ids": np.zeros((1, 77), dtype=np.int64)})["last_hidden_state"])


def test_cli_quantize_without_torch(exported, tmp_path):
    """The whole quantization, calibration included, runs on the base install plus onnx: no torch."""
    out = tmp_path / "cli"
    result = run_without_torch("""
import sys
from sdrt.runtime.cli import main
sys.exit(main(sys.argv[1:]))
""", "quantize", str(exported["sd1"]), str(out), "--mode", "static", "--calibration-prompts", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "sdrt.json").read_text())["quantization"]["calibration"]["samples"]["unet"] >= 2 * 4
    bad = run_without_torch("""
import sys
from sdrt.runtime.cli import main
sys.exit(main(sys.argv[1:]))
""", "quantize", str(exported["sd1"]), str(tmp_path / "zero"), "--calibration-prompts", "0")
    assert bad.returncode == 2 and "calibration" in bad.stderr and not (tmp_path / "zero").exists()


def test_demo_model_quantized_image_close_to_fp32(demo_static):
    """The trained demo model: int8 (static) images against fp32 images, same prompts and seeds."""
    from bench.shapes import prompts
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    manifest = json.loads((demo_static / "sdrt.json").read_text())
    assert manifest["validation_quantize"]["unet"]["checks"][0]["max_rel_rms"] <= q.TOLERANCE / 2  # a trained model
    images = {}
    for key, folder in (("fp32", DEMO), ("int8", demo_static)):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        images[key] = np.concatenate([pipe(p, num_inference_steps=20, guidance_scale=3.0, seed=1000 + k,
                                           output_type="np").images for k, p in enumerate(prompts(seed=2024, n=6))])
    mse = np.mean((images["int8"] - images["fp32"]) ** 2, axis=(1, 2, 3))
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-20))
    print(f"demo int8 vs fp32 PSNR per image: {np.round(psnr, 1)} dB")
    assert np.median(psnr) > DEMO_MEDIAN_PSNR_FLOOR and psnr.min() > DEMO_MIN_PSNR_FLOOR
    assert np.all(psnr < 100)  # really different: the int8 networks ran


def test_quantizes_cpu_optimized_folder_keeps_fusions(exported, tmp_path):
    """int8 + fusions: a folder from `sdrt optimize --optimize cpu` quantizes; the fused ops stay."""
    from sdrt.export.optimize import optimize_folder

    fused = optimize_folder(exported["sd1"], tmp_path / "fused", "cpu", "fp32", log=lambda m: None)
    out = q.quantize_folder(fused, tmp_path / "int8", mode="dynamic", components=("unet",), **QUIET)
    manifest = json.loads((out / "sdrt.json").read_text())
    assert manifest["optimize"]["profile"] == "cpu" and manifest["quantization"]["mode"] == "dynamic"
    assert {"SkipLayerNormalization", "MatMulInteger"} <= op_types(out / "unet" / "model.onnx")
    gpu = tmp_path / "gpu"
    shutil.copytree(exported["sd1"], gpu)
    (gpu / "sdrt.json").write_text(json.dumps(dict(json.loads((gpu / "sdrt.json").read_text()),
                                                   optimize={"profile": "gpu"})))
    with pytest.raises(q.QuantizeError, match="gpu profile"):
        q.quantize_folder(gpu, tmp_path / "y", mode="dynamic", **QUIET)


def test_qdq_mode_keeps_attention_products_fp32(exported, tmp_path):
    """qdq: weight MatMuls and Convs get Q/DQ pairs; MatMuls of two activations (attention) stay fp32."""
    out = q.quantize_folder(exported["sd1"], tmp_path / "qdq", mode="qdq", components=("unet",), calibration=2, **QUIET)
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if producer.get(n.input[1]) == "DequantizeLinear"]
    kept = q.activation_matmuls(exported["sd1"] / "unet" / "model.onnx")
    assert quantized and kept and "MatMulInteger" not in op_types(out / "unet" / "model.onnx")
    assert {n.name for n in matmuls if producer.get(n.input[0]) != "DequantizeLinear"} >= set(kept)


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_static_mode_on_cpu_optimized_folder(exported, tmp_path, monkeypatch, external):
    """Static int8 of a `sdrt optimize --optimize cpu` folder, both default components: the fused text encoder
    (whose com.microsoft domain onnxruntime's optimizer leaves undeclared) quantizes, the UNet keeps its
    MultiHeadAttention nodes, and the folder validates and generates. With external data (what SD-sized
    weights get, see sdrt.export.folder.EXTERNAL_DATA_BYTES; here forced) both in the input and the output."""
    from sdrt.export import folder as folder_module
    from sdrt.export.optimize import optimize_folder
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    if external:
        monkeypatch.setattr(folder_module, "EXTERNAL_DATA_BYTES", 0)
    fused = optimize_folder(exported["sd1"], tmp_path / "fused", "cpu", "fp32", log=lambda m: None)
    out = q.quantize_folder(fused, tmp_path / "int8", mode="static", calibration=1, calibration_steps=2, **QUIET)
    for folder in (fused, out):
        for name in ("unet", "text_encoder"):
            assert (folder / name / "model.onnx_data").is_file() == external, (folder, name)
    manifest = json.loads((out / "sdrt.json").read_text())
    assert all(manifest["validation_quantize"][c]["passed"] for c in ("unet", "text_encoder"))
    unet = q.op_counts(out / "unet" / "model.onnx")
    assert unet["MultiHeadAttention"] == q.op_counts(fused / "unet" / "model.onnx")["MultiHeadAttention"] > 0
    assert {"QuantizeLinear", "MatMulInteger"} <= set(unet) and "Softmax" not in unet
    assert "MatMulInteger" in op_types(out / "text_encoder" / "model.onnx")
    image = StableDiffusionPipeline.from_pretrained(out, low_memory=True)("a cat", num_inference_steps=2, seed=0,
                                                                          output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_declare_domains_adds_missing_opset_imports(tmp_path):
    """A node of an undeclared domain gets its opset import in a copy; a complete model is returned as is."""
    from onnx import TensorProto, helper

    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    src = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    fixed = q.declare_domains(src, tmp_path)
    assert fixed != src
    assert {o.domain for o in onnx.load(str(fixed)).opset_import} == {"", "com.microsoft"}
    onnx.shape_inference.infer_shapes(onnx.load(str(fixed)), strict_mode=True)
    assert q.declare_domains(fixed, tmp_path / "unused") == fixed
