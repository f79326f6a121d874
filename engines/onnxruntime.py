"""onnxruntime backend: CPU, CUDA and TensorRT execution providers, or any other provider by name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdrt.engines.base import Engine
from sdrt.engines.errors import BackendNotInstalledError, EngineError
from sdrt.engines.spec import NetworkSpec

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}

# Short provider names users type, and the onnxruntime provider each means.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt-ep": "TensorrtExecutionProvider",
    "trt-ep": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a base dependency
        raise BackendNotInstalledError(
            "onnxruntime is not installed: pip install onnxruntime (or 'sdrt[gpu]' for CUDA)"
        ) from e
    return onnxruntime


@dataclass(frozen=True)
class SessionOptions:
    """The onnxruntime session settings sdrt exposes."""

    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"  # disable | basic | extended | all
    enable_mem_arena: bool = True
    enable_mem_pattern: bool = True
    deterministic: bool = False
    log_severity: int = 3


def resolve_providers(provider: str | Sequence[Any]) -> list[Any]:
    """Turn 'cpu' / 'cuda' / 'tensorrt-ep' / a provider name / a list with options into ORT's form."""
    ort = _import_onnxruntime()
    entries = [provider] if isinstance(provider, str) else list(provider)
    resolved = []
    for entry in entries:
        name, options = (entry, None) if isinstance(entry, str) else entry
        name = PROVIDER_ALIASES.get(name.lower(), name) if isinstance(name, str) else name
        if name not in ort.get_available_providers():
            extra = "sdrt[gpu] (onnxruntime-gpu)" if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") \
                else "an onnxruntime build that has it"
            raise BackendNotInstalledError(
                f"onnxruntime provider {name} is not available here (available: "
                f"{', '.join(ort.get_available_providers())}); install {extra}"
            )
        resolved.append(name if options is None else (name, options))
    if all((p if isinstance(p, str) else p[0]) != "CPUExecutionProvider" for p in resolved):
        resolved.append("CPUExecutionProvider")  # the fallback for ops a GPU provider lacks
    return resolved


class OrtEngine(Engine):
    """A network in an ONNX file, run by onnxruntime."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec | None = None,
                 provider: str | Sequence[Any] = "cpu", options: SessionOptions | None = None):
        self.path = Path(path)
        self.spec = spec
        self.providers = resolve_providers(provider)
        self.options = options or SessionOptions()
        self._session = None
        if not self.path.is_file():
            raise EngineError(f"no ONNX file at {self.path}")

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        if self._session is not None:
            return
        ort = _import_onnxruntime()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.graph_optimization]
        so.enable_cpu_mem_arena = self.options.enable_mem_arena
        so.enable_mem_pattern = self.options.enable_mem_pattern
        so.log_severity_level = self.options.log_severity
        if self.options.deterministic:
            so.use_deterministic_compute = True
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise EngineError(f"onnxruntime could not load {self.path}: {e}") from e

    @property
    def _loaded_session(self):
        self.load()
        return self._session

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return {i.name: np.dtype(_ONNX_DTYPES.get(i.type, np.float32)) for i in self._loaded_session.get_inputs()}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._loaded_session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._loaded_session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._loaded_session
        dtypes = self.input_dtypes
        missing = [n for n in dtypes if n not in feed]
        if missing:
            raise EngineError(f"{self.path}: feed lacks inputs {missing}")
        inputs = {n: np.ascontiguousarray(feed[n], dtype=dtypes[n]) for n in dtypes}
        try:
            outputs = session.run(None, inputs)
        except Exception as e:
            shapes = {n: a.shape for n, a in inputs.items()}
            raise EngineError(f"onnxruntime failed to run {self.path} on shapes {shapes}: {e}") from e
        return dict(zip(self.output_names, outputs))

    def release(self) -> None:
        self._session = None
