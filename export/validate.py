"""The validation gate: every exported network, run by onnxruntime, must match its torch module.

Inputs are seeded random tensors at two shapes: the export shape and one the export never saw
(another batch size, a non-square image, a shorter token sequence). The check passes when
max |onnxruntime - torch| <= atol * max(1, max |torch|), with atol = 1e-4 for fp32 files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sdrt.engines.onnxruntime import OrtEngine
from sdrt.engines.spec import NetworkSpec
from sdrt.export.errors import ValidationError
from sdrt.export.trace import sample_inputs

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class Check:
    dims: dict
    output: str
    max_abs: float
    max_ref: float
    max_rel: float
    passed: bool


def compare(module: torch.nn.Module, onnx_path: Path, spec: NetworkSpec, dims_list: list[dict],
            precision: str = "fp32", vocab_size: int = 49408) -> dict:
    """Run both sides at each shape; return a JSON-able report, raising ValidationError on a miss."""
    atol = TOLERANCE[precision]
    engine = OrtEngine(onnx_path, spec)
    checks = []
    try:
        for seed, dims in enumerate(dims_list):
            example = sample_inputs(spec, dims, seed=seed + 1, vocab_size=vocab_size)
            with torch.no_grad():
                ref = module(*example)
            ref = ref if isinstance(ref, (tuple, list)) else (ref,)
            got = engine.run({name: t.numpy() for name, t in zip(spec.input_names, example)})
            for name, r in zip(spec.output_names, ref):
                r = r.float().numpy()
                g = got[name].astype(np.float32)
                max_abs = float(np.max(np.abs(g - r))) if r.size else 0.0
                max_ref = float(np.max(np.abs(r))) if r.size else 0.0
                finite = bool(np.isfinite(g).all())
                passed = finite and max_abs <= atol * max(1.0, max_ref)
                checks.append(Check(dict(dims), name, max_abs, max_ref, max_abs / max(max_ref, 1e-12), passed))
    finally:
        engine.release()
    report = {"tolerance": {"atol": atol, "rule": "max_abs <= atol * max(1, max|torch|)"},
              "checks": [asdict(c) for c in checks], "passed": all(c.passed for c in checks)}
    if not report["passed"]:
        worst = max(checks, key=lambda c: c.max_abs / (atol * max(1.0, c.max_ref)))
        raise ValidationError(
            f"{spec.name}: onnxruntime output {worst.output!r} differs from torch by {worst.max_abs:.3g} "
            f"(allowed {atol * max(1.0, worst.max_ref):.3g}) at {worst.dims}; the export was not written. "
            "Try another --opset, or report the model."
        )
    return report
