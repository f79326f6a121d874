"""onnxruntime backend: CPU, CUDA and TensorRT execution providers, or any other provider by name."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdrt.engines.base import Engine
from sdrt.engines.errors import BackendNotInstalledError, EngineError
from sdrt.engines.files import check_external_data
from sdrt.engines.iobinding import BoundRunner
from sdrt.engines.profiles import dims_from_shapes
from sdrt.engines.resident import Resident
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
    "openvino-ep": "OpenVINOExecutionProvider",  # onnxruntime's; "openvino" is sdrt's own backend (engines/openvino.py)
}


def short_name(provider: str) -> str:
    """The name users type for an onnxruntime provider (cpu, cuda, tensorrt-ep, ...), else its full name."""
    return next((short for short, full in PROVIDER_ALIASES.items() if full == provider), provider)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a base dependency
        raise BackendNotInstalledError(
            "onnxruntime is not installed: pip install onnxruntime (or 'sdrt[gpu]' for CUDA)"
        ) from e
    global _logger_quiet
    if not _logger_quiet:  # the process-wide logger too (provider loading, environment): errors are raised
        level = os.environ.get("SDRT_ORT_LOG_SEVERITY", "4")
        onnxruntime.set_default_logger_severity(int(level) if level in ("0", "1", "2", "3", "4") else 4)
        _logger_quiet = True
    return onnxruntime


_logger_quiet = False
_cuda_libraries_loaded = False


def _preload_cuda_libraries(ort) -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA and cuDNN libraries of the nvidia-* pip packages only through
    `preload_dlls()`; without it a CUDA session silently runs on the CPU. Once per process."""
    global _cuda_libraries_loaded
    if _cuda_libraries_loaded or not hasattr(ort, "preload_dlls"):
        return
    _cuda_libraries_loaded = True
    try:
        ort.preload_dlls()
    except Exception as e:  # missing pip packages: the system's libraries (LD_LIBRARY_PATH) may still serve
        warnings.warn(f"onnxruntime.preload_dlls() failed ({e}); relying on the system's CUDA libraries",
                      RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class SessionOptions:
    """The onnxruntime session settings sdrt exposes."""

    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"  # disable | basic | extended | all
    enable_mem_arena: bool = True
    enable_mem_pattern: bool = True
    deterministic: bool = False
    # 4 (fatal only): onnxruntime's own "[E:onnxruntime ...]" lines would repeat on stderr the failures sdrt
    # raises as typed errors (EngineError); 0-3 show its verbose/info/warning/error log for debugging.
    log_severity: int = 4
    optimized_model_path: str | None = None  # where onnxruntime saves the graph it runs (for inspection)


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


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# The provider option that turns on CUDA graph capture, per provider.
CUDA_GRAPH_OPTION = {"CUDAExecutionProvider": "enable_cuda_graph", "TensorrtExecutionProvider": "trt_cuda_graph_enable"}


def _name(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


def with_cuda_graph(providers: list) -> list:
    """`providers` with CUDA graph capture turned on for its CUDA / TensorRT entries."""
    if not any(_name(p) in CUDA_GRAPH_OPTION for p in providers):
        raise EngineError("cuda_graph needs the CUDA or TensorRT execution provider "
                          f"(providers here: {[_name(p) for p in providers]})")
    out = []
    for p in providers:
        if _name(p) in CUDA_GRAPH_OPTION:
            options = {} if isinstance(p, str) else dict(p[1])
            p = (_name(p), {**options, CUDA_GRAPH_OPTION[_name(p)]: "1"})
        out.append(p)
    return out


def binding_device(providers: list) -> tuple[str, int]:
    """Where IO binding puts tensors: the first provider's device ("cuda" for CUDA/TensorRT, else "cpu")."""
    first = providers[0]
    if _name(first) in GPU_PROVIDERS:
        options = {} if isinstance(first, str) else first[1]
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


class OrtEngine(Engine):
    """A network in an ONNX file, run by onnxruntime.

    io_binding: bind inputs and outputs as OrtValues on the provider's device and reuse output
      buffers across calls (`run` still returns arrays the caller owns; `run_ortvalues` keeps
      inputs and outputs on the device between calls; `device_resident` uploads inputs that many
      calls share once, as OrtValues).
    fixed_shapes: also copy inputs into persistent buffers, so every call uses the same addresses;
      the first feed's shapes are the fixed ones, and other shapes run in a second, plain session.
      `device_resident` values are then copied into those buffers, and only when a buffer holds
      another value (sdrt.engines.resident).
    cuda_graph: fixed_shapes plus onnxruntime's CUDA graph capture (CUDA / TensorRT providers only).

    With fixed shapes and a spec, the session is made when the first feed arrives, with that feed's axis
    sizes as free-dimension overrides: onnxruntime then folds the graph's Shape arithmetic into
    constants (32 Shape nodes in an exported UNet), so no node is left for the CPU provider, which
    CUDA graph capture refuses, and the kernels see static shapes.
    """

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec | None = None,
                 provider: str | Sequence[Any] = "cpu", options: SessionOptions | None = None, *,
                 io_binding: bool = False, fixed_shapes: bool = False, cuda_graph: bool = False):
        self.path = Path(path)
        self.spec = spec
        self.providers = resolve_providers(provider)
        self.options = options or SessionOptions()
        self._session = None
        if not self.path.is_file():
            raise EngineError(f"no ONNX file at {self.path}")
        self.cuda_graph = cuda_graph
        self.fixed_shapes = fixed_shapes or cuda_graph
        self.io_binding = io_binding or self.fixed_shapes
        self._plain_providers = self.providers
        if cuda_graph:
            if spec is None:
                raise EngineError(f"{self.path}: cuda_graph needs the network's spec, to bind fixed output buffers")
            self.providers = with_cuda_graph(self.providers)
        self._runner: BoundRunner | None = None
        self._other_shapes: OrtEngine | None = None  # runs shapes other than the fixed ones
        self._fixed_dims: dict[str, int] | None = None  # free-dimension overrides (fixed shapes, see above)
        self._session_dims: dict[str, int] | None = None  # the overrides the loaded session was made with
        self._initializers: dict[str, np.ndarray] = {}  # weights replacing the file's (set_initializers)
        self._initializer_values: list = []  # their OrtValues, alive as long as the session that uses them

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
        if self.options.optimized_model_path:
            so.optimized_model_filepath = str(self.options.optimized_model_path)
        for axis, size in (self._fixed_dims or {}).items():
            so.add_free_dimension_override_by_name(axis, size)
        values = []
        for name, array in self._initializers.items():
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            so.add_initializer(name, values[-1])
        if any(_name(p) in GPU_PROVIDERS for p in self.providers):
            _preload_cuda_libraries(ort)
        # onnxruntime's NCHWc layout pass (CPU, level "all") reorders Conv weights from the file's initializers,
        # not from add_initializer's (onnxruntime 1.32: a replaced Conv weight is silently ignored); it is
        # turned off where a convolution's weight (4-D) is replaced.
        disabled = ["NchwcTransformer"] if any(a.ndim >= 3 for a in self._initializers.values()) else None
        check_external_data(self.path)  # weights outside the folder are refused before onnxruntime opens them
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=self.providers,
                                                 disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise EngineError(f"onnxruntime could not load {self.path}: {e}") from e
        self._session_dims = self._fixed_dims
        self._initializer_values = values

    @property
    def _loaded_session(self):
        self.load()
        return self._session

    @property
    def _waits_for_fixed_dims(self) -> bool:
        """Fixed shapes with a spec: the session is made at the first feed, with its sizes (see the class)."""
        return self.fixed_shapes and self.spec is not None and self._runner is None

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        if self._session is None and self._waits_for_fixed_dims:  # the spec's, not to load the session too early
            return {t.name: np.dtype(t.dtype) for t in self.spec.inputs}
        return {i.name: np.dtype(_ONNX_DTYPES.get(i.type, np.float32)) for i in self._loaded_session.get_inputs()}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._loaded_session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._loaded_session.get_outputs()]

    @property
    def provider_name(self) -> str:
        """The provider the loaded session runs on first (onnxruntime drops one that fails to start)."""
        return short_name(self._loaded_session.get_providers()[0])

    def _inputs(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """The feed checked for completeness, arrays cast to the network's dtypes (device values, with IO binding,
        as given)."""
        dtypes = self.input_dtypes
        missing = [n for n in dtypes if n not in feed]
        if missing:
            raise EngineError(f"{self.path}: feed lacks inputs {missing}")
        kept = (_import_onnxruntime().OrtValue, Resident) if self.io_binding else ()
        return {n: feed[n] if isinstance(feed[n], kept) else np.require(feed[n], dtypes[n], "C")  # keeps 0-d scalars
                for n in dtypes}

    def _bound(self) -> BoundRunner:
        if self._runner is None:
            device, device_id = binding_device(self.providers)
            session = self._loaded_session
            dtypes = {o.name: np.dtype(_ONNX_DTYPES.get(o.type, np.float32)) for o in session.get_outputs()}
            self._runner = BoundRunner(_import_onnxruntime(), session, device, dtypes, self.spec,
                                       fixed=self.fixed_shapes, device_id=device_id)
        return self._runner

    def _for_other_shapes(self, shapes: dict) -> "OrtEngine":
        if self._other_shapes is None:
            warnings.warn(f"{self.path}: shapes {shapes} differ from the fixed ones {self._runner.fixed_shapes}; "
                          "running them in a second session without fixed buffers or CUDA graph",
                          RuntimeWarning, stacklevel=3)
            self._other_shapes = OrtEngine(self.path, self.spec, self._plain_providers, self.options, io_binding=True)
            self._other_shapes.set_initializers(self._initializers)
        return self._other_shapes

    def run_ortvalues(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Run with IO binding; inputs may be OrtValues already on the device (see `to_device`).

        Returns the output OrtValues, left on the device. They belong to the engine: the next call
        reuses them, so copy (or feed them on) before calling again.
        """
        if not self.io_binding:
            raise EngineError("run_ortvalues needs an engine made with io_binding=True")
        inputs = self._inputs(feed)
        shapes = {n: tuple(v.shape()) if callable(v.shape) else v.shape for n, v in inputs.items()}
        if self._waits_for_fixed_dims:
            self._fix_dims(shapes)
        runner = self._bound()
        if not runner.accepts(shapes):
            return self._for_other_shapes(shapes).run_ortvalues(inputs)
        try:
            return runner.run(inputs)
        except Exception as e:
            raise EngineError(f"onnxruntime failed to run {self.path} (IO binding) on shapes {shapes}: {e}") from e

    def _fix_dims(self, shapes: dict) -> None:
        """Make the session for the first fixed feed: its axis sizes as free-dimension overrides."""
        self._fixed_dims = dims_from_shapes(self.spec, shapes)
        if self._session is not None and self._session_dims != self._fixed_dims:
            self._session = None  # loaded early (metadata) or for other sizes: made again with these
        self.load()

    def to_device(self, array: np.ndarray):
        """An OrtValue on this engine's device holding a copy of `array` (e.g. text embeddings kept across steps)."""
        return self._bound().ortvalue(array)

    def device_resident(self, inputs: Mapping[str, np.ndarray]) -> dict:
        """Without IO binding: the arrays, unchanged. With it: OrtValues uploaded now, bound by every later call;
        with fixed shapes: `Resident` values, copied into the fixed input buffers (a captured CUDA graph reads
        those addresses) when a buffer holds another value."""
        if not self.io_binding:
            return dict(inputs)
        dtypes = self.input_dtypes
        unknown = sorted(set(inputs) - set(dtypes))
        if unknown:
            raise EngineError(f"{self.path}: the network has no inputs {unknown} (it takes {sorted(dtypes)})")
        arrays = {n: np.ascontiguousarray(a, dtype=dtypes[n]) for n, a in inputs.items()}
        if self.fixed_shapes:
            return {n: Resident(a) for n, a in arrays.items()}
        return {n: self.to_device(a) for n, a in arrays.items()}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.io_binding:
            return {n: BoundRunner.to_host(v) for n, v in self.run_ortvalues(feed).items()}
        session = self._loaded_session
        inputs = self._inputs(feed)
        try:
            outputs = session.run(None, inputs)
        except Exception as e:
            shapes = {n: a.shape for n, a in inputs.items()}
            raise EngineError(f"onnxruntime failed to run {self.path} on shapes {shapes}: {e}") from e
        return dict(zip(self.output_names, outputs))

    @property
    def initializers(self) -> dict[str, np.ndarray]:
        return dict(self._initializers)

    def set_initializers(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Run with these arrays in place of the file's initializers of the same names (LoRA weights); `{}`
        restores the file's. onnxruntime takes them when a session is made (SessionOptions.add_initializer), so a
        loaded session is dropped and the next run makes one; the file's other weights are read as before."""
        if any(_name(p) == "TensorrtExecutionProvider" for p in self.providers):
            raise EngineError(
                f"{self.path}: onnxruntime's TensorRT provider caches its engines by the ONNX file, so it cannot "
                "take replaced weights (LoRA); use the cuda provider, or the native tensorrt backend (refit)")
        arrays = {n: np.ascontiguousarray(a) for n, a in arrays.items()}
        same = arrays.keys() == self._initializers.keys() and all(
            arrays[n] is self._initializers[n] or np.array_equal(arrays[n], self._initializers[n]) for n in arrays)
        if same:
            return
        self._initializers = arrays
        if self._other_shapes is not None:
            self._other_shapes.set_initializers(arrays)
        if self._session is not None:
            self._session = self._runner = None
            self._initializer_values = []

    def release(self) -> None:
        if self._other_shapes is not None:
            self._other_shapes.release()
        self._session = self._runner = self._other_shapes = None
        self._initializer_values = []
        self._fixed_dims = self._session_dims = None  # the next first feed fixes the shapes again
