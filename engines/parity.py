"""A second backend checked against onnxruntime before it is trusted: the same inputs, both outputs compared.

The inputs are seeded random tensors at the folder's own validation shapes (the `dims` of the checks that
sdrt.json's "validation" records for the component; a folder without them, such as optimum's, is checked
at batch 1, 8x8 latents). onnxruntime on the CPU is the reference: it is the backend the export was
validated with against torch. The verdict is cached per (ONNX file, device, precision, backend version)
under `<cache>/openvino/parity/`, so the check costs once; a failed verdict is refused again at once,
with the figures, until the file or the setup changes (or the verdict file is deleted).

Rules: fp32 must match as the export's gate does (max |a - b| <= 1e-3 * max(1, max |reference|), looser than
the export's 1e-4 only for another kernel library's summation order); bf16/f16 engines, and int8/fp16 files
(`sdrt quantize`, `sdrt optimize --precision fp16`: each library rounds and requantizes its own way), must stay
within a relative RMS error of 10% (garbage is near 100%; a bf16 UNet call of a trained model is within 0.5%, of
the tiny random test networks within 4%; int8 files differ by 2-3%, plus bf16 up to 5%).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdrt.engines.cache import BuildKey, PlanCache, onnx_sha256
from sdrt.engines.errors import EngineError
from sdrt.engines.files import MANIFEST, atomic_write_json

FP32_ATOL = 1e-3  # max_abs <= FP32_ATOL * max(1, max|reference|)
REDUCED_REL_RMS = 0.1  # ||a - b|| / ||b|| for bf16 / f16 engines and int8 / fp16 files
DEFAULT_LATENT = 8  # latent side of the check when the folder records no validation shapes


class ParityError(EngineError):
    """A backend's output differs from onnxruntime's on the same inputs beyond the precision's tolerance."""


def build_key(engine, profile: tuple = ()) -> BuildKey:
    """What an OpenVINO compilation (and its parity verdict) depends on, as a BuildKey: the ONNX file's sha256, the
    device's name and native capabilities, OpenVINO's version, the precision and the static shapes (profile)."""
    from sdrt.engines.openvino import capabilities, import_openvino, ov_core

    device = engine.options.device
    try:
        name = str(ov_core().get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        name = device
    return BuildKey(network=engine.spec.name if engine.spec is not None else engine.path.parent.name,
                    onnx_sha256=weights_sha256(engine.path, engine.options.cache_dir or None),
                    gpu_name=f"{device}: {name}", compute_capability=",".join(sorted(capabilities(device))),
                    tensorrt_version=f"openvino {import_openvino().__version__}", profile=profile,
                    precision=engine.precision, backend="openvino")


def weights_sha256(path: Path, cache_dir=None) -> str:
    """onnx_sha256 of the file (with its own model.onnx_data), and of any other external data file it reads: the
    step-caching graphs (sdrt.export.deepcache) read the UNet's model.onnx_data, whose weights must key them too."""
    import hashlib

    from sdrt.engines.files import external_data_locations, memo_sha256

    path = Path(path)
    own = {path.name + "_data", path.with_suffix(".onnx_data").name}
    others = sorted(loc for loc in external_data_locations(path) if loc not in own)
    digest = onnx_sha256(path, cache_dir)
    if not others:
        return digest
    shas = [memo_sha256(path.parent / loc, cache_dir=cache_dir) for loc in others]
    return hashlib.sha256((digest + "".join(shas)).encode()).hexdigest()


def validation_dims(path: Path, spec) -> list[dict]:
    """The distinct shapes the folder's sdrt.json validated this component at, in order."""
    path = Path(path)
    dims_list: list[dict] = []
    try:
        manifest = json.loads((path.parent.parent / MANIFEST).read_text())
        checks = manifest["validation"][path.parent.name]["checks"]
        for check in checks:
            if isinstance(check.get("dims"), dict) and check["dims"] not in dims_list:
                dims_list.append(check["dims"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not dims_list and spec is not None:
        side = DEFAULT_LATENT * spec.vae_scale_factor
        dims_list = [spec.dims(1, side, side)]
    return dims_list


def file_precision(path: Path) -> str:
    """The precision the file itself computes in, by its folder's sdrt.json: int8 for a component `sdrt quantize`
    changed, else the folder's precision (fp32 where the record is missing)."""
    path = Path(path)
    try:
        manifest = json.loads((path.parent.parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return "fp32"
    quantized = ((manifest.get("quantization") or {}).get("components") or {}) if isinstance(manifest, dict) else {}
    if path.parent.name in quantized:
        return "int8"
    precision = manifest.get("precision") if isinstance(manifest, dict) else None
    return precision if precision in ("fp32", "fp16") else "fp32"


def sample_feed(spec, dtypes: dict, dims: dict, seed: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Seeded random inputs (as export/trace.sample_inputs makes them): token ids for integer inputs, timesteps in
    [0, 1000), normals otherwise."""
    rng = np.random.default_rng(seed)
    feed = {}
    for t in spec.inputs:
        shape, dtype = t.resolve(dims), dtypes.get(t.name, np.dtype(t.dtype))
        if np.issubdtype(dtype, np.integer):
            feed[t.name] = rng.integers(0, vocab_size, shape).astype(dtype)
        elif t.name == "timestep":
            feed[t.name] = rng.integers(0, 1000, shape).astype(dtype)
        else:
            feed[t.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def compare(got: np.ndarray, ref: np.ndarray, precision: str) -> dict:
    """Error figures of one output and whether they pass for `precision`."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    finite = bool(np.isfinite(got).all())
    max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    max_ref = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel_rms = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)) if ref.size else 0.0
    if precision == "fp32":  # both sides fp32 (an int8 or fp16 file, or a bf16 engine, takes the other rule)
        passed, rule = max_abs <= FP32_ATOL * max(1.0, max_ref), f"max_abs <= {FP32_ATOL} * max(1, max|ref|)"
    else:
        passed, rule = rel_rms <= REDUCED_REL_RMS, f"relative RMS <= {REDUCED_REL_RMS}"
    return {"max_abs": max_abs, "max_ref": max_ref, "rel_rms": rel_rms, "passed": finite and passed, "rule": rule}


def verdict_path(key: BuildKey, cache_dir=None) -> Path:
    return PlanCache(cache_dir or None, kind="openvino").folder / "parity" / f"{key.entry_name}.json"


def check_against_onnxruntime(engine) -> dict:
    """The engine's outputs vs onnxruntime's (CPU) on the validation shapes: the cached verdict, or a new one.
    Raises ParityError when they differ beyond the tolerance (see the module docstring)."""
    key = build_key(engine)
    path = verdict_path(key, engine.options.cache_dir)
    try:
        record = json.loads(path.read_text())
        if record.get("build_key") != key.to_json():
            record = None
    except (OSError, ValueError):
        record = None
    if record is None:
        record = {"build_key": key.to_json(), **_measure(engine)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, record)
        except OSError:  # an unwritable cache only costs the check again next time
            pass
    if not record["passed"]:
        worst = max(record["checks"], key=lambda c: (not c["passed"], c["rel_rms"]))
        shape = {k: v for k, v in worst["dims"].items() if k in ("batch", "sequence", "height", "width")}
        raise ParityError(
            f"OpenVINO ({engine.options.device}, {engine.precision}) gives {engine.path} output {worst['output']!r} "
            f"that differs from onnxruntime's: max error {worst['max_abs']:.3g} (reference max {worst['max_ref']:.3g}), "
            f"relative RMS {worst['rel_rms']:.3g}; rule {worst['rule']}, at {shape}. Run it with "
            f"{'--precision fp32 or ' if engine.precision != 'fp32' else ''}--provider cpu (verdict cached in {path}; "
            "delete it to check again)")
    return record


def _measure(engine) -> dict:
    from dataclasses import replace

    from sdrt.engines.onnxruntime import OrtEngine
    from sdrt.engines.openvino import OvEngine

    spec = engine.spec
    if spec is None:
        raise EngineError(f"{engine.path}: checking OpenVINO against onnxruntime needs the network's spec "
                          "(or validate=False)")
    runner = engine
    if engine.options.static_shapes:  # the check's shapes are not the static ones: a dynamic twin runs them
        runner = OvEngine(engine.path, spec, replace(engine.options, static_shapes=False, validate=False))
    reference = OrtEngine(engine.path, spec)
    try:
        config = json.loads((engine.path.parent / "config.json").read_text())
        vocab_size = int(config.get("vocab_size", 49408))
    except (OSError, ValueError, TypeError):
        vocab_size = 49408
    precision = engine.precision if file_precision(engine.path) == "fp32" else file_precision(engine.path)
    checks = []
    try:
        for seed, dims in enumerate(validation_dims(engine.path, spec)):
            feed = sample_feed(spec, reference.input_dtypes, dims, seed + 1, vocab_size)
            want = reference.run(feed)
            got = runner.run(feed)
            for name in spec.output_names:
                if name in want and name in got:
                    checks.append({"dims": dims, "output": name, **compare(got[name], want[name], precision)})
    finally:
        reference.release()
        if runner is not engine:
            runner.release()
    return {"precision": engine.precision, "file_precision": file_precision(engine.path), "checks": checks,
            "passed": all(c["passed"] for c in checks)}
