"""Optimize an exported folder: onnxruntime's transformer fusions (a cpu or gpu profile) and fp16.

The optimized folder is a copy of the input folder whose model.onnx files went through our attention
fusion (sdrt.export.attention: the exported scaled-dot-product attention -> MultiHeadAttention, which
onnxruntime's own FusionAttentionUnet does not match) and then
`onnxruntime.transformers.optimizer.optimize_model`. The tiny VAE (TAESD, `sdrt export-taesd`) is
optimized like the VAE when the folder has one. Each optimized network is validated against
the fp32 file of the input folder (itself validated against torch at export), run by onnxruntime
on seeded random inputs at the two shapes recorded in the input's validation report; torch is
not needed. Rule: max |optimized - input| <= atol * max(1, max |input|), atol = 1e-4 for fp32 and
2e-2 for fp16 (fp16 keeps ~3 decimal digits, and errors add up over the UNet's layers).
The VAE decoders' reports also give the decoded image's PSNR against the input's (`psnr_db` per check),
which `sdrt optimize` prints: the figure that says whether fp16 changed the picture.
The gpu profile's graphs hold ops only the CUDA provider runs: they are validated the same way on the
CPU after sdrt.export.lowering rewrote those ops into standard ONNX with their documented semantics
(which checks the fusions' wiring and the fp16 conversion, not the CUDA kernels), and structurally
(the expected fused ops are present).

Profiles:
- gpu: every fusion the CUDA provider has kernels for (MultiHeadAttention, GroupNorm/SkipGroupNorm,
  BiasSplitGelu, BiasAdd, NhwcConv; BiasSplitGelu through sdrt.export.split_gelu, for the widths the
  CUDA kernel has), and the attentions' Q, K, V projections packed into one GEMM
  (self-attention QKV, cross-attention KV: sdrt.export.packing). It cannot run on the CPU provider.
- cpu: only fusions with CPU kernels (checked by loading and running with CPUExecutionProvider):
  MultiHeadAttention with separate Q, K, V, LayerNormalization/SkipLayerNormalization, Gelu/BiasGelu.
  GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd and packed QKV/KV are CUDA-only.
  MultiHeadAttention has CPU kernels for fp32 and fp16 (onnxruntime 1.32), both with a flash-attention
  path that never holds the full score matrix, so it stays fused (and fp16) in the fp16 folders too.

Components with attention (unet, vae) record in their report how many were fused and how many Softmax
nodes are left; the text encoders' causal attention is not fused (77 tokens: little to gain).

fp16 keeps the inputs and outputs fp32 (keep_io_types=True), so that the runtime feeds and reads
the same arrays as for an fp32 folder; the casts cost little next to the networks.

fp16 also writes `vae_decoder_fp32/`: the decoder optimized with the same profile but kept in fp32,
validated the same way and recorded in sdrt.json under "fallbacks". fp16 VAE decoders overflow on
some models (NaN/Inf, a black image); the runtime then re-runs that decode with the fp32 one
(sdrt.engines.fallback). It costs the decoder's size again on disk (~200 MB for SD 1.5), nothing
in memory until needed.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np

from sdrt.engines.fallback import FALLBACKS_KEY
from sdrt.engines.files import MANIFEST
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.export.attention import fuse_attention
from sdrt.export.errors import ExportError, ValidationError
from sdrt.export.folder import save_model, staging, write_manifest
from sdrt.export.packing import pack_attention
from sdrt.export.split_gelu import fuse_bias_split_gelu

PROFILES = ("cpu", "gpu")
PRECISIONS = ("fp32", "fp16")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
MODEL_TYPE = {"text_encoder": "clip", "text_encoder_2": "clip", "text_encoder_3": "t5", "unet": "unet",
              "transformer": "mmdit", "vae_decoder": "vae", "vae_encoder": "vae", "vae_tiny_decoder": "vae",
              "vae_tiny_encoder": "vae"}
# T5 (SD3's text_encoder_3, Flux's text_encoder_2) overflows in fp16 (its feed-forward activations pass 65504, as
# diffusers and optimum note): an fp16 folder keeps it fp32.
FP32_ALWAYS = ("t5",)


def network_type(name: str, spec: dict) -> str:
    """onnxruntime's optimizer model type of a network: by name, except that a text encoder giving only
    last_hidden_state is a T5 (Flux's text_encoder_2)."""
    if name.startswith("text_encoder") and [t["name"] for t in spec.get("outputs", [])] == ["last_hidden_state"]:
        return "t5"
    return MODEL_TYPE[name]
ATTENTION_MODEL_TYPES = ("unet", "vae")  # where sdrt.export.attention fuses the attention
# Ops left in fp32 by the fp16 conversion, per profile. cpu: normalizations and reductions whose fp16 kernels
# lose too much or do not exist on the CPU provider, and the timestep embedding's trigonometry. gpu: the
# CUDA GroupNorm, SkipGroupNorm, (Skip)LayerNormalization and Resize kernels take fp16 and accumulate in fp32,
# so they stay fp16 (no Cast pair around each of the UNet's ~60 norms); only the trigonometry, reductions
# and random ops stay fp32.
FP16_OP_BLOCK_LIST = ["Resize", "Upsample", "GroupNorm", "SkipGroupNorm", "InstanceNormalization",
                      "LayerNormalization", "SkipLayerNormalization", "RandomNormalLike", "Range",
                      "Sin", "Cos", "Exp", "Pow", "ReduceMean", "Softmax"]
FP16_OP_BLOCK_LISTS = {"cpu": FP16_OP_BLOCK_LIST,
                       "gpu": ["InstanceNormalization", "RandomNormalLike", "Range", "Sin", "Cos", "Exp", "Pow",
                               "ReduceMean", "Softmax"]}
DECODERS = ("vae_decoder", "vae_tiny_decoder")  # their reports also give the decoded image's PSNR
# Components an fp16 folder also keeps in fp32, for the runtime's NaN fallback.
FP32_FALLBACKS = ("vae_decoder",)
# Fused op types a gpu-profile graph is expected to hold, per model type, when the network has the op they
# replace (FUSED_FROM: the exported op type each fused op stands for; the tiny VAE has no norm or attention).
GPU_FUSED_OPS = {"unet": {"GroupNorm", "SkipGroupNorm", "NhwcConv", "MultiHeadAttention"},
                 "vae": {"GroupNorm", "NhwcConv", "MultiHeadAttention"}, "clip": {"SkipLayerNormalization"}}
FUSED_FROM = {"GroupNorm": "InstanceNormalization", "SkipGroupNorm": "InstanceNormalization", "NhwcConv": "Conv",
              "MultiHeadAttention": "Softmax", "SkipLayerNormalization": "LayerNormalization"}


class OptimizeError(ExportError):
    """The folder cannot be optimized (wrong input, unknown profile, or a fused graph that fails)."""


def _patch_unet_num_heads() -> None:
    """Work around onnxruntime 1.32 + numpy >= 2.4: FusionAttentionUnet.get_num_heads calls
    int() on a shape-[1] array (`int(num_heads)`), which numpy 2.4 turned from a deprecation
    warning into a TypeError. We read element 0 instead. tests/test_optimize.py has a canary that
    fails once upstream no longer crashes: then delete this patch."""
    from onnxruntime.transformers import fusion_attention_unet as fau

    original = fau.FusionAttentionUnet.get_num_heads
    if getattr(original, "_sdrt_patched", False):
        return

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if not is_torch2:
            return original(self, reshape_q, is_torch2)
        parent = self.model.get_parent(reshape_q, 1)
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and list(value.shape) == [1] and int(value[0]) > 0:
                return int(value[0])
        return 0

    get_num_heads._sdrt_patched = True
    get_num_heads._sdrt_original = original
    fau.FusionAttentionUnet.get_num_heads = get_num_heads


def fusion_options(model_type: str, profile: str):
    """FusionOptions for a model type and profile (see the module docstring)."""
    from onnxruntime.transformers.fusion_options import AttentionOpType, FusionOptions

    options = FusionOptions(model_type)
    gpu = profile == "gpu"
    options.enable_attention = True
    options.use_multi_head_attention = True
    options.attention_op_type = AttentionOpType.MultiHeadAttention
    options.enable_skip_layer_norm = True
    options.enable_bias_skip_layer_norm = True
    options.enable_gelu = True
    options.enable_bias_gelu = True
    for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                 "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
        setattr(options, flag, gpu)
    return options


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise OptimizeError(f"{folder} has no {MANIFEST}: optimize works on folders written by `sdrt export`")
    manifest = json.loads(path.read_text())
    if manifest.get("quantization") or manifest.get("precision") == "int8":
        raise OptimizeError(
            f"{folder} is quantized (precision {manifest.get('precision')}, "
            f"{(manifest.get('quantization') or {}).get('mode')} mode by `sdrt quantize`): optimize the fp32 "
            "export before quantizing, i.e. `sdrt optimize` the fp32 folder (--optimize cpu), then "
            "`sdrt quantize` the optimized folder")
    if manifest.get("precision", "fp32") != "fp32" or manifest.get("optimize"):
        raise OptimizeError(
            f"{folder} is already optimized (precision {manifest.get('precision')}, profile "
            f"{(manifest.get('optimize') or {}).get('profile')}); optimize the plain fp32 export instead")
    return manifest


def _random_feed(spec_json: dict, dims: dict, seed: int, vocab_size: int = 49408) -> dict:
    """Seeded inputs of the spec's shapes; Flux's transformer gets positions, t / 1000 and guidance as its
    pipeline makes them (sdrt.export.trace.sample_inputs does the same for export)."""
    rng = np.random.default_rng(seed)
    feed = {}
    names = [t["name"] for t in spec_json["inputs"]]
    for t in spec_json["inputs"]:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in t["shape"])
        if t["dtype"] == "int64":
            feed[t["name"]] = rng.integers(0, vocab_size, shape, dtype=np.int64)
        elif t["name"] == "img_ids":
            from sdrt.runtime.core.transformer import image_ids

            feed[t["name"]] = image_ids(dims["latent_height"], dims["latent_width"])
        elif t["name"] == "txt_ids":
            feed[t["name"]] = np.zeros(shape, dtype=np.float32)
        elif "img_ids" in names and t["name"] in ("timestep", "guidance"):
            low, high = (0.0, 1.0) if t["name"] == "timestep" else (1.0, 10.0)
            feed[t["name"]] = rng.uniform(low, high, shape).astype(np.float32)
        elif t["name"] == "timestep":
            feed[t["name"]] = rng.integers(0, 1000, shape).astype(np.float32)
        else:
            feed[t["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def validation_shapes(manifest: dict, name: str) -> list[dict]:
    """The distinct shapes at which export validated this component."""
    shapes = []
    for check in manifest["validation"][name]["checks"]:
        if check["dims"] not in shapes:
            shapes.append(check["dims"])
    return shapes


def decoded_psnr(reference: np.ndarray, got: np.ndarray) -> float:
    """PSNR (dB) between two VAE decoder outputs as images: [-1, 1] mapped to [0, 1] and clipped, as the
    runtime does before writing pixels; 200 dB for identical images (JSON has no inf)."""
    mse = float(np.mean((np.clip(got / 2 + 0.5, 0, 1) - np.clip(reference / 2 + 0.5, 0, 1)) ** 2))
    return 10 * float(np.log10(1.0 / max(mse, 1e-20)))


def _run_each(path: Path, provider: str, feeds: list[dict]) -> list[dict]:
    """The outputs of one file for each feed, its session released afterwards."""
    engine = OrtEngine(path, provider=provider)
    try:
        return [engine.run(feed) for feed in feeds]
    finally:
        engine.release()


def compare_files(reference: Path, optimized: Path, spec_json: dict, shapes: list[dict], precision: str,
                  provider: str = "cpu", decoder: bool = False) -> dict:
    """Run both files at each shape; return a JSON-able report, raising ValidationError on a miss. For a VAE
    decoder (`decoder`) each check also reports the decoded image's PSNR against the reference's."""
    atol = TOLERANCE[precision]
    config = reference.parent / "config.json"  # token ids within the encoder's vocabulary (T5's is small)
    vocab = json.loads(config.read_text()).get("vocab_size", 49408) if config.is_file() else 49408
    feeds = [_random_feed(spec_json, dims, seed, vocab) for seed, dims in enumerate(shapes, 1)]
    references = _run_each(reference, "cpu", feeds)  # one session at a time: the peak is the larger one, not both
    try:
        results = _run_each(optimized, provider, feeds)
    except ExportError:
        raise
    except Exception as e:  # EngineError: the optimized graph does not load or run
        raise OptimizeError(f"{optimized}: the optimized network does not run on the {provider} provider: {e}") from e
    checks = []
    for dims, ref, got in zip(shapes, references, results):
        for out in ref:
            r, g = ref[out].astype(np.float32), got[out].astype(np.float32)
            max_abs = float(np.max(np.abs(g - r)))
            max_ref = float(np.max(np.abs(r)))
            passed = bool(np.isfinite(g).all()) and max_abs <= atol * max(1.0, max_ref)
            checks.append({"dims": dims, "output": out, "max_abs": max_abs, "max_ref": max_ref, "passed": passed})
            if decoder:
                checks[-1]["psnr_db"] = decoded_psnr(r, g)
    report = {"reference": "the unoptimized fp32 ONNX file (onnxruntime, CPU)",
              "tolerance": {"atol": atol, "rule": "max_abs <= atol * max(1, max|reference|)"},
              "checks": checks, "passed": all(c["passed"] for c in checks)}
    if not report["passed"]:
        worst = max(checks, key=lambda c: c["max_abs"] / max(1.0, c["max_ref"]))
        raise ValidationError(
            f"{optimized.parent.name}: optimized output {worst['output']!r} differs from the fp32 export by "
            f"{worst['max_abs']:.3g} (allowed {atol * max(1.0, worst['max_ref']):.3g}) at {worst['dims']}; "
            "nothing was written. Try --precision fp32, or the other --optimize profile.")
    return report


def op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def check_gpu_graph(src: Path, dst: Path, model_type: str) -> dict:
    """Structural check of a gpu-profile graph: it holds every fused op of GPU_FUSED_OPS whose source op the
    exported network `src` has."""
    source, present = op_types(src), op_types(dst)
    expected = {op for op in GPU_FUSED_OPS.get(model_type, set()) if FUSED_FROM[op] in source}
    missing = sorted(expected - present)
    if missing:
        raise ValidationError(f"{dst.parent.name}: the gpu profile did not produce the fused ops {missing}")
    return {"fused_ops": sorted(present & (expected | {"MultiHeadAttention", "Attention",
            "BiasSplitGelu", "BiasAdd", "BiasGelu", "Gelu", "SkipLayerNormalization", "LayerNormalization"})),
            "passed": True}


def compare_lowered(src: Path, dst: Path, spec: dict, shapes: list[dict], precision: str,
                    decoder: bool = False) -> dict:
    """compare_files for a gpu-profile graph, run on the CPU provider after sdrt.export.lowering rewrote its
    CUDA-only ops into standard ONNX with their documented semantics (the kernels themselves are not run)."""
    import tempfile

    import onnx

    from sdrt.export.lowering import lower_for_cpu

    model = onnx.load(str(dst))
    try:
        lowered = lower_for_cpu(model)
    except ValueError as e:  # a CUDA-only op this sdrt cannot lower (a newer onnxruntime's fusion)
        raise OptimizeError(f"{dst.parent.name}: the gpu-profile graph cannot be validated on the CPU: {e}. Nothing "
                            "was written; report it, or use the onnxruntime version sdrt was tested with.") from e
    with tempfile.TemporaryDirectory(prefix="sdrt-lowered-", dir=dst.parent) as work:
        path = Path(work) / "model.onnx"
        save_model(model, path)
        del model
        report = compare_files(src, path, spec, shapes, precision, decoder=decoder)
    report["run"] = ("CPU provider, the CUDA-only ops lowered to standard ONNX (sdrt.export.lowering): checks the "
                     "fused graph under each op's documented semantics, not the CUDA kernels")
    report["lowered"] = lowered
    return report


def optimize_file(src: Path, dst: Path, model_type: str, profile: str, precision: str, attention: bool = True) -> dict:
    """Write dst: src with our attention fusion (attention=False skips it), onnxruntime's fusions for
    `profile`, and fp16 if asked. Returns what sdrt's own fusions did, for the report: "attention" (unet and
    vae: {"fused": n, "softmax_left": m}, and for gpu how many had their projections packed, "packed_qkv"
    for self-attention and "packed_kv" for cross-attention) and, for a gpu UNet, "bias_split_gelu"."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_unet_num_heads()
    model = onnx.load(str(src))
    gpu, attention_model = profile == "gpu", model_type in ATTENTION_MODEL_TYPES
    fused = fuse_attention(model) if attention and attention_model else 0
    packed = pack_attention(model) if fused and gpu else None
    split_gelu = fuse_bias_split_gelu(model) if gpu and model_type == "unet" else None
    optimized = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=fusion_options(model_type, profile), use_gpu=gpu)
    if precision == "fp16":
        optimized.convert_float_to_float16(keep_io_types=True, op_block_list=FP16_OP_BLOCK_LISTS[profile])
    optimized.topological_sort()
    softmax_left = sum(n.op_type == "Softmax" for n in optimized.model.graph.node)
    save_model(optimized.model, dst)
    fusions = {}
    if attention_model:
        fusions["attention"] = {"fused": fused, "softmax_left": softmax_left}
        if packed is not None:
            fusions["attention"].update(packed_qkv=packed["qkv"], packed_kv=packed["kv"])
    if split_gelu is not None:
        fusions["bias_split_gelu"] = split_gelu
    return fusions


def optimize_component(src: Path, dst: Path, name: str, spec: dict, shapes: list[dict], profile: str,
                       precision: str, log=lambda message: None) -> dict:
    """Optimize one network file and validate it on the CPU (gpu: lowered, and structurally checked); the report."""
    model_type = network_type(name, spec)
    kept = precision == "fp16" and model_type in FP32_ALWAYS
    if kept:
        log(f"{dst.parent.name}: kept fp32 (T5 overflows in fp16)")
        precision = "fp32"
    fusions = optimize_file(src, dst, model_type, profile, precision)
    decoder = name in DECODERS
    how = "on the CPU" if profile == "cpu" else "on the CPU (CUDA-only ops lowered to standard ONNX)"
    log(f"{dst.parent.name}: validating against the fp32 export at {len(shapes)} shape(s), {how}")
    if profile == "cpu":
        report = compare_files(src, dst, spec, shapes, precision, decoder=decoder)
    else:
        structure = check_gpu_graph(src, dst, model_type)
        report = {**compare_lowered(src, dst, spec, shapes, precision, decoder=decoder), **structure}
    if kept:
        report["precision"] = "fp32 (T5 overflows in fp16)"
    return {**report, **fusions}


def networks(manifest: dict) -> dict[str, dict]:
    """Every network of an exported folder, name -> spec: the main components, then the tiny VAE's."""
    tiny = (manifest.get("tiny_vae") or {}).get("components", {})
    specs = {name: record["spec"] for name, record in manifest["components"].items()}
    specs.update({name: record["spec"] for name, record in tiny.items()})
    return specs


def optimize_folder(folder, out, profile: str = "cpu", precision: str = "fp32", force: bool = False,
                    log=print) -> Path:
    """Write `out`: `folder` with every network optimized for `profile` at `precision`, validated."""
    import onnxruntime

    folder, out = Path(folder), Path(out)
    if profile not in PROFILES:
        raise OptimizeError(f"unknown optimize profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if precision not in PRECISIONS:
        raise OptimizeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    manifest = _read_manifest(folder)
    manifest.update(precision=precision, validation_optimize={},
                    optimize={"profile": profile, "tool": "onnxruntime.transformers.optimizer",
                              "attention_fusion": "sdrt.export.attention (MultiHeadAttention) for unet and vae",
                              "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                              "keep_io_types": precision == "fp16",
                              "fp16_op_block_list": FP16_OP_BLOCK_LISTS[profile] if precision == "fp16" else None,
                              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    specs = networks(manifest)
    with staging(out, force) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.onnx", "model.onnx_data", MANIFEST))
        for name, spec in specs.items():
            log(f"{name}: optimizing ({network_type(name, spec)}, {profile} profile, {precision})")
            report = optimize_component(folder / name / "model.onnx", tmp / name / "model.onnx", name, spec,
                                        validation_shapes(manifest, name), profile, precision, log)
            manifest["validation_optimize"][name] = report
            if "attention" in report:
                log(f"{name}: fused {report['attention']['fused']} attention(s), "
                    f"{report['attention']['softmax_left']} Softmax left")
            if name in DECODERS:
                log(f"{name}: decoded image PSNR vs the fp32 export "
                    f"{min(c['psnr_db'] for c in report['checks']):.1f} dB (worst shape)")
        fallbacks = [n for n in FP32_FALLBACKS if n in manifest["components"]] if precision == "fp16" else []
        for name in fallbacks:
            target = f"{name}_fp32"
            log(f"{target}: keeping an fp32 {name} for the runtime's NaN fallback")
            (tmp / target).mkdir()
            shutil.copy2(folder / name / "config.json", tmp / target / "config.json")
            manifest["validation_optimize"][target] = optimize_component(
                folder / name / "model.onnx", tmp / target / "model.onnx", name, specs[name],
                validation_shapes(manifest, name), profile, "fp32", log)
            manifest.setdefault(FALLBACKS_KEY, {})[name] = {
                "path": f"{target}/model.onnx", "precision": "fp32",
                "use": "re-run a decode whose fp16 output has NaN/Inf (fp16 overflow)"}
        write_manifest(tmp, manifest)
    log(f"optimized {len(specs)} networks to {out}")
    return out
