"""int8 quantization of an exported folder for the CPU, with onnxruntime.quantization.

Modes (what each listed component gets):
- dynamic: MatMul/Gemm weights int8 (per output channel), activations quantized at run time
  (DynamicQuantizeLinear -> MatMulInteger; onnxruntime fuses them to DynamicQuantizeMatMul /
  MatMulIntegerToFloat). No calibration. Convolutions stay fp32.
- static: as dynamic, and every Conv quantized statically in QDQ form (uint8 activations with
  ranges calibrated on real pipeline runs, int8 per-channel weights); onnxruntime turns each
  DQ -> Conv -> Q into a QLinearConv. Networks without Conv (the text encoder) get dynamic only.
- qdq: Conv, MatMul and Gemm all static QDQ (calibrated); no run-time range computation.

MatMuls of two activations (attention scores) stay fp32 in every mode: their ranges move with the
prompt, and they are a small share of the UNet's work. So do the network's first and last Conv
(the UNet's conv_in and conv_out, 4 latent channels, well under 1% of its work): the latent's range
moves with the timestep and the guidance scale, and quantizing them statically gave the largest
error (demo model, guidance 7.5: relative RMS error 0.10 with them, 0.023 without). Weights are int8 with the signed x unsigned
(u8s8) kernels that use VNNI (vpdpbusd) where the CPU has it; `reduce_range` (7-bit weights) is for
CPUs without VNNI, where u8s8 products can saturate int16 intermediates. By default it is on only when
the machine doing the quantization lacks VNNI: pass it explicitly when quantizing for another CPU.

Calibration and validation inputs are recorded from real runs of the runtime pipeline on the
input folder (sdrt.export.calibration): calibration prompts with seeds 0.., validation with a
prompt and seed the calibration did not see. Validation rule, per component and output, over every
validation feed: relative RMS error  ||int8 - fp32||_2 / ||fp32||_2 <= TOLERANCE = 0.1, for the UNet's
noise prediction and the text encoder's hidden states. Measured (static mode): 0.01-0.02 on the
trained demo model (images 45-50 dB PSNR from fp32), 0.04 on the SD1.5 architecture with random
weights, up to 0.065 on the tiny random test UNet (8-16 channels: one activation scale per tensor
fits few random channels badly); a broken quantization (wrong scales, saturation) is of order 1.
int8 keeps ~2 significant digits per layer and errors add up over the layers, so this is looser
than fp16's max-abs rule (sdrt.export.optimize); relative RMS, not max-abs, because a rare outlier
element says little about the image. The image-level check is bench/quantize.py (PSNR, adherence).
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from sdrt.engines.files import MANIFEST
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.export.calibration import DEFAULT_PROMPTS, CalibrationError, FeedReader, record_feeds
from sdrt.export.errors import ExportError, ValidationError
from sdrt.export.folder import save_model, staging, write_manifest

MODES = {  # mode -> (op types quantized statically (QDQ), op types quantized dynamically)
    "dynamic": ((), ("MatMul", "Gemm")),
    "static": (("Conv",), ("MatMul", "Gemm")),
    "qdq": (("Conv", "MatMul", "Gemm"), ()),
}
QUANTIZABLE = ("text_encoder", "text_encoder_2", "unet")
TOLERANCE = 0.1  # relative RMS error of each output vs the fp32 network (see the module docstring)
VALIDATION_PROMPT = "a small wooden boat on a calm lake at dawn"
VALIDATION_SEED = 10_000
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "QuantizeLinear", "DequantizeLinear"}


class QuantizeError(ExportError):
    """The folder cannot be quantized as asked (already quantized, unknown mode, bad options)."""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this CPU has an int8 dot-product instruction onnxruntime's MLAS kernels use."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8", "asimddp"})


def _read_fp32_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise QuantizeError(f"{folder} has no {MANIFEST}: quantize works on folders written by `sdrt export`")
    manifest = json.loads(path.read_text())
    if manifest.get("quantization") or manifest.get("precision", "fp32") != "fp32":
        raise QuantizeError(
            f"{folder} is already quantized or converted (precision {manifest.get('precision')}); "
            "quantize the fp32 export instead")
    if (manifest.get("optimize") or {}).get("profile") not in (None, "cpu"):
        raise QuantizeError(f"{folder} is optimized for the {manifest['optimize']['profile']} profile, whose fused "
                            "ops have no CPU kernels; quantize the fp32 export or its cpu-profile optimization")
    return manifest


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _save(src: Path, dst: Path) -> None:
    """Save `src` as dst (+ dst_data for large weights, see save_model), whatever the quantizer wrote."""
    import onnx

    save_model(onnx.load(str(src)), dst)


def fp32_convs(path: Path) -> list[str]:
    """The Conv nodes kept fp32 in static modes: the network's first and last (the UNet's conv_in and
    conv_out), and those fed straight by a Concat (the up blocks' 1x1 skip-connection shortcuts,
    whose input joins two tensors of different ranges that one activation scale serves badly)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    producer = {out: n.op_type for n in nodes for out in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    keep = convs[:1] + [n for n in convs if producer.get(n.input[0]) == "Concat"] + convs[-1:]
    return list(dict.fromkeys(n.name for n in keep))


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes without a weight (attention scores and their product with V), kept fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights & set(n.input)]


def declare_domains(src: Path, work: Path) -> Path:
    """`src`, or a copy in `work` that declares every operator domain its nodes use.

    onnxruntime's transformers optimizer leaves com.microsoft undeclared in the CLIP graph it fuses
    (`sdrt optimize --optimize cpu`'s text encoder): onnxruntime runs it anyway, but ONNX shape
    inference, which both quantizers run first, refuses a node whose domain has no opset import."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    declared = {o.domain or "ai.onnx" for o in model.opset_import}
    missing = sorted({n.domain for n in model.graph.node if n.domain} - declared)
    if not missing:
        return src
    model = onnx.load(str(src))
    model.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in missing)
    out = work / "declared.onnx"
    save_model(model, out)
    return out


def quantize_file(src: Path, dst: Path, static_ops: Sequence[str], dynamic_ops: Sequence[str],
                  feeds: Sequence[dict] | None, input_names: Sequence[str], per_channel: bool,
                  reduce_range: bool) -> None:
    """Quantize one ONNX file: static QDQ for `static_ops` (calibrated on `feeds`), then dynamic for the rest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory(prefix="sdrt-quantize-", dir=dst.parent) as work:
        current = declare_domains(src, Path(work))
        large = (current.parent / (current.name + "_data")).is_file()  # weights in model.onnx_data
        if static_ops:
            reader = FeedReader(feeds or [], input_names)  # refuses zero samples before any work
            from onnxruntime.quantization.shape_inference import quant_pre_process

            # onnxruntime's basic graph optimizations and ONNX shape inference first (the quantizer needs
            # the shapes); symbolic shape inference gives up on the dynamo export's graphs, so it is skipped.
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(current), str(pre), skip_symbolic_shape=True, save_as_external_data=large)
            current = pre
            exclude = fp32_convs(current) + activation_matmuls(current)
            out = Path(work) / "static.onnx"
            quantize_static(str(current), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(static_ops), per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude, use_external_data_format=large,
                            extra_options={"MatMulConstBOnly": True})
            current = out
        if dynamic_ops:
            out = Path(work) / "dynamic.onnx"
            quantize_dynamic(str(current), str(out), op_types_to_quantize=list(dynamic_ops), per_channel=per_channel,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8,
                             use_external_data_format=large, extra_options={"MatMulConstBOnly": True})
            current = out
        _save(current, dst)


def compare_on_feeds(reference: Path, quantized: Path, feeds: Sequence[dict], tolerance: float | None = None) -> dict:
    """Relative RMS error of each output over `feeds`; a JSON-able report, ValidationError on a miss."""
    tolerance = TOLERANCE if tolerance is None else tolerance
    ref_engine, q_engine = OrtEngine(reference), OrtEngine(quantized)
    errors: dict[str, list[float]] = {}
    try:
        for feed in feeds:
            ref, got = ref_engine.run(feed), q_engine.run(feed)
            for out in ref:
                r, g = ref[out].astype(np.float64), got[out].astype(np.float64)
                rel = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)) if np.isfinite(g).all() else np.inf
                errors.setdefault(out, []).append(rel)
    finally:
        ref_engine.release()
        q_engine.release()
    checks = [{"output": out, "feeds": len(v), "max_rel_rms": max(v), "mean_rel_rms": float(np.mean(v)),
               "passed": max(v) <= tolerance} for out, v in errors.items()]
    report = {"reference": "the fp32 ONNX file of the input folder (onnxruntime, CPU)",
              "inputs": "feeds recorded from a pipeline run on a held-out prompt and seed",
              "tolerance": {"rel_rms": tolerance, "rule": "||int8 - fp32|| / ||fp32|| <= rel_rms, per feed"},
              "checks": checks, "passed": all(c["passed"] for c in checks)}
    if not report["passed"]:
        worst = max(checks, key=lambda c: c["max_rel_rms"])
        raise ValidationError(
            f"{quantized.parent.name}: int8 output {worst['output']!r} differs from fp32 by a relative RMS error "
            f"of {worst['max_rel_rms']:.3g} (allowed {tolerance}); nothing was written. Try mode='dynamic', "
            "more calibration prompts, or leave this component in fp32 (components=...).")
    return report


def _calibration_prompts(calibration: int | Sequence[str]) -> list[str]:
    if isinstance(calibration, (int, np.integer)):
        if not 1 <= calibration <= len(DEFAULT_PROMPTS):
            raise CalibrationError(f"calibration needs at least one prompt and at most {len(DEFAULT_PROMPTS)} "
                                   f"(the built-in list), got {calibration}; or pass your own prompts")
        return list(DEFAULT_PROMPTS[:calibration])
    prompts = list(calibration)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise CalibrationError("calibration needs at least one prompt (got zero or non-strings)")
    return prompts


def quantize_folder(folder, out, mode: str = "static", components: Sequence[str] = ("unet", "text_encoder"),
                    calibration: int | Sequence[str] = 4, calibration_steps: int = 4, guidance_scale: float = 7.5,
                    per_channel: bool = True, reduce_range: bool | None = None, force: bool = False,
                    log=print) -> Path:
    """Write `out`: `folder` with `components` quantized to int8 in `mode`, each validated against fp32."""
    import onnxruntime

    folder, out = Path(folder), Path(out)
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    manifest = _read_fp32_manifest(folder)
    components = list(dict.fromkeys(components))
    bad = [c for c in components if c not in QUANTIZABLE or c not in manifest["components"]]
    if not components or bad:
        raise QuantizeError(f"cannot quantize {bad or 'no components'}: choose among "
                            f"{[c for c in QUANTIZABLE if c in manifest['components']]} (the VAE stays fp32)")
    static_ops, dynamic_ops = MODES[mode]
    plans = {}
    for name in components:
        present = op_counts(folder / name / "model.onnx")
        plans[name] = {"static_ops": [op for op in static_ops if op in present],
                       "dynamic_ops": [op for op in dynamic_ops if op in present]}
    needs_calibration = any(p["static_ops"] for p in plans.values())
    prompts = _calibration_prompts(calibration) if needs_calibration else []
    flags = cpu_flags()
    if reduce_range is None:
        reduce_range = not has_vnni(flags)

    log(f"recording validation inputs ({'and calibration inputs, ' if prompts else ''}"
        f"{calibration_steps} steps per prompt) from pipeline runs of {folder}")
    calib = record_feeds(folder, prompts, components, calibration_steps, guidance_scale) if prompts else {}
    valid = record_feeds(folder, [VALIDATION_PROMPT], components, calibration_steps, guidance_scale,
                         first_seed=VALIDATION_SEED)
    manifest.update(precision="int8", validation_quantize={}, quantization={
        "mode": mode, "components": plans, "format": "QDQ (static) + DynamicQuantizeLinear (dynamic)",
        "activation_type": "uint8", "weight_type": "int8", "per_channel": per_channel,
        "reduce_range": reduce_range, "matmul_const_b_only": True,
        "calibration": {"prompts": prompts, "steps": calibration_steps, "guidance_scale": guidance_scale,
                        "method": "MinMax", "samples": {k: len(v) for k, v in calib.items()}} if prompts else None,
        "validation": {"prompt": VALIDATION_PROMPT, "seed": VALIDATION_SEED, "steps": calibration_steps},
        "cpu": {"vnni": has_vnni(flags)}, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    with staging(out, force) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        for name in components:
            src, dst = folder / name / "model.onnx", tmp / name / "model.onnx"
            for f in (dst, dst.with_name("model.onnx_data")):
                f.unlink(missing_ok=True)
            plan = plans[name]
            log(f"{name}: quantizing (static {plan['static_ops'] or '-'}, dynamic {plan['dynamic_ops'] or '-'})")
            input_names = [t["name"] for t in manifest["components"][name]["spec"]["inputs"]]
            quantize_file(src, dst, plan["static_ops"], plan["dynamic_ops"], calib.get(name), input_names,
                          per_channel, reduce_range)
            manifest["validation_quantize"][name] = compare_on_feeds(src, dst, valid[name])
            log(f"{name}: relative RMS error vs fp32 "
                f"{max(c['max_rel_rms'] for c in manifest['validation_quantize'][name]['checks']):.4f}")
        write_manifest(tmp, manifest)
    log(f"quantized {', '.join(components)} to int8 ({mode}) in {out}")
    return out
