"""OpenVINO backend: sdrt's exported ONNX files compiled by OpenVINO for a CPU (or an Intel GPU / NPU by name).

`--provider openvino[:DEVICE]` (DEVICE: CPU by default; GPU, GPU.1, NPU, AUTO... as OpenVINO names them).
OpenVINO reads the ONNX file itself (`Core.read_model`): no conversion step, no second copy of the weights.

- precision (`--precision`): auto | fp32 | bf16 | f16, OpenVINO's INFERENCE_PRECISION_HINT. auto is bf16 on a
  CPU with AVX-512-BF16 or AMX (its matrix products then run on those units) and fp32 on other CPUs; on
  other devices auto keeps the device's own default (f16 on Intel GPUs). bf16 asked of a CPU without those
  units is emulated, slower than fp32, and warned about; f16 on a CPU without fp16 arithmetic runs fp32.
- the model cache (OpenVINO's CACHE_DIR): compiled blobs under `<cache>/openvino/<network>-<digest16>/`,
  keyed like the TensorRT plans (sdrt.engines.cache.BuildKey: ONNX sha256, device, OpenVINO version,
  precision, static shapes), so the second start of a network skips the compilation.
- performance hint LATENCY (default: one request uses every core) or THROUGHPUT; INFERENCE_NUM_THREADS.
- dynamic shapes by default; `static_shapes=True` (the engine option `fixed_shapes`) reshapes the network
  to the first feed's shapes and compiles that, and runs other shapes in a second, dynamic compilation.
- parity: before first use, the outputs are checked against onnxruntime's on the folder's own validation
  shapes, once per (file, device, precision); the verdict is cached (sdrt.engines.parity).

What it does not read: an `sdrt optimize` folder's onnxruntime-only operators are read where OpenVINO has
them (com.microsoft MultiHeadAttention and the CPU profile's fusions, tested), and a file that holds others
is refused with the plain export named; int8 (QDQ) folders from `sdrt quantize` are read as they are.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from sdrt.engines.base import Engine
from sdrt.engines.errors import BackendNotInstalledError, EngineError
from sdrt.engines.files import check_external_data
from sdrt.engines.spec import NetworkSpec

PRECISIONS = ("auto", "fp32", "bf16", "f16")
PERFORMANCE_HINTS = ("latency", "throughput")
_HINT = {"fp32": "f32", "bf16": "bf16", "f16": "f16"}  # sdrt's name -> INFERENCE_PRECISION_HINT
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the units bf16 runs fast on
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")
INSTALL = 'pip install "sdrt[openvino]"'


class OpenVinoPrecisionWarning(RuntimeWarning):
    """The precision asked for does not run natively on this device (emulated, or run at fp32 instead)."""


def import_openvino():
    """The openvino module, or BackendNotInstalledError naming the extra."""
    try:
        import openvino
    except ImportError as e:
        raise BackendNotInstalledError(f"the OpenVINO backend needs the openvino package: {INSTALL}") from e
    return openvino


_core = None
_warned: set = set()  # (device, precision) pairs already warned about


def ov_core():
    """One openvino.Core per process (it enumerates the devices when made)."""
    global _core
    if _core is None:
        _core = import_openvino().Core()
    return _core


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_cpu(device: str) -> bool:
    return device.split(".")[0].upper() == "CPU"


def capabilities(device: str) -> set[str]:
    """What the device computes natively: OpenVINO's OPTIMIZATION_CAPABILITIES (FP32, BF16, FP16, INT8, ...), and on
    a CPU the bf16/fp16 units /proc/cpuinfo names (a hypervisor may hide AMX from one and not the other)."""
    try:
        caps = {str(c).upper() for c in ov_core().get_property(device, "OPTIMIZATION_CAPABILITIES")}
    except Exception:  # a device name OpenVINO does not know: load() reports it
        caps = set()
    if is_cpu(device):
        flags = cpu_flags()
        if flags & set(CPU_BF16_FLAGS):
            caps.add("BF16")
        if flags & set(CPU_FP16_FLAGS):
            caps.add("FP16")
    return caps


def resolve_precision(precision: str, device: str, caps: set[str]) -> tuple[str, str | None]:
    """(the precision that runs: fp32 | bf16 | f16 | "device" for the device's default, a warning or None)."""
    if precision not in PRECISIONS:
        raise EngineError(f"OpenVINO precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not is_cpu(device):
        return ("device" if precision == "auto" else precision), None
    if precision == "auto":
        return ("bf16" if "BF16" in caps else "fp32"), None
    if precision == "bf16" and "BF16" not in caps:
        return "bf16", ("this CPU has no AVX-512-BF16 or AMX units: OpenVINO emulates bf16, which is slower than "
                        "fp32 (same results as on a bf16 CPU); use --precision auto or fp32 here")
    if precision == "f16" and "FP16" not in caps:
        return "fp32", "this CPU has no fp16 arithmetic (AVX512-FP16 / AMX-FP16): OpenVINO runs fp32 instead of f16"
    return precision, None


@dataclass(frozen=True)
class OvOptions:
    """The OpenVINO settings sdrt exposes (see the module docstring)."""

    device: str = "CPU"
    precision: str = "auto"
    performance_hint: str = "latency"
    num_threads: int = 0  # 0: OpenVINO's choice (every core for LATENCY)
    cache_dir: str | os.PathLike | None = None  # None: sdrt's cache folder; "" turns the model cache off
    static_shapes: bool = False
    validate: bool = True  # check against onnxruntime once per (file, device, precision)

    def check(self) -> None:
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise EngineError(f"OpenVINO performance hint {self.performance_hint!r}: use latency or throughput")
        if not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise EngineError(f"OpenVINO num_threads must be an integer >= 0 (0: OpenVINO's choice), got "
                              f"{self.num_threads!r}")
        if not self.device or not isinstance(self.device, str):
            raise EngineError(f"OpenVINO device {self.device!r}: name one, e.g. CPU, GPU, GPU.1, NPU")


class OvEngine(Engine):
    """A network in an ONNX file, compiled and run by OpenVINO (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec | None = None, options: OvOptions | None = None):
        self.path = Path(path)
        self.spec = spec
        self.options = options or OvOptions()
        self.options.check()
        if not self.path.is_file():
            raise EngineError(f"no ONNX file at {self.path}")
        import_openvino()
        self.precision, note = resolve_precision(self.options.precision, self.options.device,
                                                 capabilities(self.options.device))
        if note and (self.options.device, self.options.precision) not in _warned:  # once per process, not per network
            _warned.add((self.options.device, self.options.precision))
            warnings.warn(f"OpenVINO --precision {self.options.precision}: {note}", OpenVinoPrecisionWarning,
                          stacklevel=3)
        self.parity: dict | None = None  # the cached verdict against onnxruntime (sdrt.engines.parity)
        self._compiled = self._request = None
        self._static_shapes: dict | None = None  # the shapes the compiled network was reshaped to
        self._other_shapes: OvEngine | None = None  # shapes other than the static ones
        self._file_model = None  # the file read for its interface before anything is compiled

    @property
    def reduced_precision(self) -> bool:
        return self.precision in ("bf16", "f16", "device")

    def at_full_precision(self) -> "OvEngine | None":
        """The same network at fp32 (the NaN-safe re-run, sdrt.engines.fallback), or None when this one is fp32."""
        if not self.reduced_precision:
            return None
        return OvEngine(self.path, self.spec, replace(self.options, precision="fp32", validate=False))

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._compiled is not None

    def _config(self) -> dict:
        config = {"PERFORMANCE_HINT": self.options.performance_hint.upper()}
        if self.precision != "device":
            config["INFERENCE_PRECISION_HINT"] = _HINT[self.precision]
        if self.options.num_threads:
            config["INFERENCE_NUM_THREADS"] = self.options.num_threads
        cache = self.cache_folder()
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        return config

    def cache_folder(self) -> Path | None:
        """Where OpenVINO keeps this network's compiled blobs (None: model cache off)."""
        if self.options.cache_dir == "":
            return None
        from sdrt.engines.parity import build_key
        from sdrt.engines.cache import PlanCache, write_key_record

        key = build_key(self, profile=tuple(sorted(self._static_shapes.items())) if self._static_shapes else ())
        folder = PlanCache(self.options.cache_dir, kind="openvino").entry(key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_key_record(folder, key)
        except OSError as e:
            warnings.warn(f"OpenVINO model cache {folder} cannot be written ({e}); compiling without it",
                          RuntimeWarning, stacklevel=4)
            return None
        return folder

    def load(self) -> None:
        if self._compiled is not None:
            return
        core = ov_core()
        check_external_data(self.path)  # weights outside the folder are refused before OpenVINO opens them
        try:
            if self._static_shapes:
                model = core.read_model(str(self.path))
                model.reshape({name: list(shape) for name, shape in self._static_shapes.items()})
                self._compiled = core.compile_model(model, self.options.device, self._config())
            else:  # from the path: with a cache hit OpenVINO does not even read the ONNX file
                self._compiled = core.compile_model(str(self.path), self.options.device, self._config())
        except Exception as e:  # OpenVINO raises untyped RuntimeErrors
            raise EngineError(_load_failure(self.path, self.options.device, e)) from e
        self._request = self._compiled.create_infer_request()
        self._file_model = None  # the compiled network answers for its interface now
        if self.options.validate:
            from sdrt.engines.parity import check_against_onnxruntime

            try:
                self.parity = check_against_onnxruntime(self)
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        if self._other_shapes is not None:
            self._other_shapes.release()
        self._compiled = self._request = self._other_shapes = self._file_model = None
        self._static_shapes = None

    # -- interface ---------------------------------------------------------------------------------------

    @property
    def _model_ports(self):
        if self._compiled is None:  # metadata without compiling: the file's own interface
            if self._file_model is None:
                try:
                    self._file_model = ov_core().read_model(str(self.path))
                except Exception as e:
                    raise EngineError(_load_failure(self.path, self.options.device, e)) from e
            return self._file_model.inputs, self._file_model.outputs
        return self._compiled.inputs, self._compiled.outputs

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        if self._compiled is None and self.spec is not None and self.options.static_shapes:
            return {t.name: np.dtype(t.dtype) for t in self.spec.inputs}  # the spec's, not to compile too early
        return {_name(p, self.spec and self.spec.input_names): np.dtype(p.get_element_type().to_dtype())
                for p in self._model_ports[0]}

    @property
    def output_names(self) -> list[str]:
        return [_name(p, self.spec and self.spec.output_names) for p in self._model_ports[1]]

    @property
    def provider_name(self) -> str:
        return "openvino" if self.options.device.upper() == "CPU" else f"openvino:{self.options.device}"

    def set_initializers(self, arrays: Mapping[str, np.ndarray]) -> None:
        if arrays:
            raise EngineError(f"{self.path}: the OpenVINO backend cannot replace a network's weights (LoRA); run "
                              "LoRAs with --provider cpu (onnxruntime)")

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not (self.options.static_shapes and self._compiled is None):
            self.load()  # before reading the interface: reading it from the file would hold a second copy of the weights
        dtypes = self.input_dtypes
        missing = [n for n in dtypes if n not in feed]
        if missing:
            raise EngineError(f"{self.path}: feed lacks inputs {missing}")
        inputs = {n: np.ascontiguousarray(feed[n], dtype=dtypes[n]) for n in dtypes}
        shapes = {n: a.shape for n, a in inputs.items()}
        if self.options.static_shapes and self._compiled is None:
            self._static_shapes = shapes
        self.load()
        if self._static_shapes and shapes != self._static_shapes:
            return self._for_other_shapes(shapes).run(inputs)
        try:
            result = self._request.infer(inputs)
        except Exception as e:
            raise EngineError(f"OpenVINO failed to run {self.path} on {self.options.device} with shapes {shapes}: "
                              f"{e}") from e
        names = self.spec and self.spec.output_names
        return {_name(port, names): np.array(array, copy=True) for port, array in result.items()}

    def _for_other_shapes(self, shapes: dict) -> "OvEngine":
        if self._other_shapes is None:
            warnings.warn(f"{self.path}: shapes {shapes} differ from the static ones {self._static_shapes}; running "
                          "them in a second, dynamic compilation", RuntimeWarning, stacklevel=3)
            self._other_shapes = OvEngine(self.path, self.spec, replace(self.options, static_shapes=False))
        return self._other_shapes


def _name(port, preferred) -> str:
    """The port's name as the spec spells it (a port may carry several names), else any of its names."""
    names = port.get_names()
    for name in preferred or ():
        if name in names:
            return name
    return port.get_any_name()


def _load_failure(path: Path, device: str, error: Exception) -> str:
    text = str(error).strip().splitlines()
    detail = next((line for line in text if "com.microsoft" in line or "not supported" in line.lower()),
                  text[-1] if text else repr(error))
    if "com.microsoft" in str(error) or "No conversion rule" in str(error):
        return (f"OpenVINO cannot read {path}: it holds onnxruntime-only operators ({detail.strip()}). Run OpenVINO "
                "on the plain `sdrt export` folder (OpenVINO makes its own fusions), or run this folder with "
                "--provider cpu")
    return f"OpenVINO could not compile {path} for device {device}: {detail.strip()}"
