"""Pick a backend from a provider name: onnxruntime providers, or native TensorRT; fall back only when allowed.

Names users type (`--provider`): cpu, cuda (or cuda:1 for a device), tensorrt-ep (onnxruntime's
TensorRT provider), tensorrt (the native backend, engines/tensorrt.py), any onnxruntime provider
by its full name, or a comma-separated list of onnxruntime providers in priority order; openvino[:DEVICE] is
the OpenVINO backend (engines/openvino.py; openvino-ep is onnxruntime's OpenVINO provider). A backend
that is not installed fails with the extra to install. With `allow_fallback=True` a backend that is
missing or fails to build or load is replaced by the next one down tensorrt / tensorrt-ep -> cuda
-> cpu, with a warning saying why; without it, the error is raised.

IO binding is on by default where it pays: onnxruntime on a GPU (cuda, tensorrt-ep), where it keeps
tensors on the device between calls (`Engine.device_resident`); `io_binding=False` turns it off.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from sdrt.engines.base import Engine
from sdrt.engines.errors import EngineError
from sdrt.engines.onnxruntime import PROVIDER_ALIASES as SHORT_NAMES  # short name -> onnxruntime provider
from sdrt.engines.onnxruntime import short_name

NATIVE = ("tensorrt", "trt")
FALLBACKS = {"tensorrt": ("cuda", "cpu"), "tensorrt-ep": ("cuda", "cpu"), "cuda": ("cpu",), "openvino": ("cpu",)}
ENGINE_OPTIONS = ("io_binding", "fixed_shapes", "cuda_graph")
IO_BINDING_BY_DEFAULT = ("cuda", "tensorrt-ep")  # onnxruntime on a GPU: tensors stay on the device between calls
TENSORRT_OPTIONS = ("precision", "profile", "cache_dir", "workspace_mib", "build", "optimization_level", "refit")
TENSORRT_EP_OPTIONS = ("precision", "profile", "cache_dir", "workspace_mib")
OPENVINO = "openvino"
OPENVINO_OPTIONS = ("precision", "performance_hint", "num_threads", "cache_dir", "validate")


class ProviderError(EngineError):
    """A provider name that sdrt does not know, or options that do not apply to the chosen backend."""


@dataclass(frozen=True)
class ProviderChoice:
    """A parsed provider: the backend, and for onnxruntime its provider entries (name or (name, options))."""

    kind: str  # "cpu", "cuda", "tensorrt-ep", "tensorrt", or the first onnxruntime provider's full name
    backend: str  # "onnxruntime" | "tensorrt"
    providers: tuple = ()
    device_id: int = 0
    device: str = ""  # the OpenVINO backend's device name (CPU, GPU, GPU.1, NPU, ...)


def _entry(item: str) -> tuple[str, int | None]:
    name, _, device = item.strip().partition(":")
    if device and not device.isdigit():
        raise ProviderError(f"provider {item!r}: the device after ':' must be a number, e.g. cuda:1")
    return name, int(device) if device else None


def parse_provider(provider: str | Sequence[Any]) -> ProviderChoice:
    """Parse what a user gave as provider; checks the syntax only (availability is checked on use)."""
    if not isinstance(provider, str):
        entries = list(provider)
        if not entries:
            raise ProviderError("the provider list is empty")
        names = [SHORT_NAMES.get(e, e) if isinstance(e, str) else (SHORT_NAMES.get(e[0], e[0]), dict(e[1]))
                 for e in entries]
        first = names[0] if isinstance(names[0], str) else names[0][0]
        return ProviderChoice(short_name(first), "onnxruntime", tuple(names))
    name, _, device = provider.strip().partition(":")
    if name.lower() == OPENVINO:
        if "," in provider:
            raise ProviderError(f"provider {provider!r}: the OpenVINO backend cannot be combined with others")
        return ProviderChoice(OPENVINO, OPENVINO, (), 0, device.strip() or "CPU")
    items = [_entry(item) for item in provider.split(",")]
    if any(name.lower() in NATIVE for name, _ in items):
        if len(items) > 1:
            raise ProviderError(f"provider {provider!r}: the native TensorRT backend cannot be combined with others")
        return ProviderChoice("tensorrt", "tensorrt", (), items[0][1] or 0)
    entries = []
    for name, device in items:
        full = SHORT_NAMES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            raise ProviderError(
                f"unknown provider {name!r}; use one of {', '.join(['tensorrt', *SHORT_NAMES])}, "
                "or an onnxruntime provider's full name such as CUDAExecutionProvider")
        entries.append(full if device is None else (full, {"device_id": device}))
    first = entries[0] if isinstance(entries[0], str) else entries[0][0]
    return ProviderChoice(short_name(first), "onnxruntime", tuple(entries), items[0][1] or 0)


def create_engine(path, spec=None, provider="cpu", *, allow_fallback: bool = False, **options) -> Engine:
    """Open the network at `path` with the backend `provider` names (see the module docstring).

    options: io_binding (None, the default: on for onnxruntime on a GPU) / fixed_shapes / cuda_graph
    (engine), precision / profile / cache_dir /
    workspace_mib (TensorRT backends; build and optimization_level native only), session_options or
    SessionOptions fields (onnxruntime).
    """
    choice = parse_provider(provider)
    chain = [choice]
    if allow_fallback:
        chain += [parse_provider(p) for p in FALLBACKS.get(choice.kind, ())]
    failures: list[str] = []
    for step, current in enumerate(chain):
        opts = dict(options)
        if step > 0:
            opts = _for_fallback(current, opts)
        try:
            engine = _create(path, spec, current, opts)
            if allow_fallback:
                engine.load()  # build/load now, while another backend can still take over
        except ProviderError:
            raise
        except EngineError as e:
            if step == len(chain) - 1:
                if failures:
                    raise EngineError(f"{path}: no provider worked: " + "; ".join(failures + [f"{current.kind}: {e}"])) from e
                raise
            failures.append(f"{current.kind}: {e}")
            continue
        if failures:
            warnings.warn(f"{path}: running on {current.kind} instead ({'; '.join(failures)})", RuntimeWarning,
                          stacklevel=2)
        return engine
    raise AssertionError("unreachable")


def _for_fallback(choice: ProviderChoice, options: dict) -> dict:
    """Drop the options the fallback backend cannot take (TensorRT settings, CUDA graph on the CPU)."""
    keep = dict(options)
    if choice.kind != "tensorrt-ep":
        for k in OPENVINO_OPTIONS:
            keep.pop(k, None)
        for k in TENSORRT_OPTIONS:
            keep.pop(k, None)
    if choice.kind == "cpu":
        keep.pop("cuda_graph", None)
    return keep


def engine_options_for(choice: ProviderChoice, options: dict) -> dict:
    """Pop the engine options from `options`; io_binding None (or absent) becomes this backend's default."""
    engine_kw = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
    if engine_kw.get("io_binding") is None:
        engine_kw["io_binding"] = choice.backend == "onnxruntime" and choice.kind in IO_BINDING_BY_DEFAULT
    return engine_kw


def _create(path, spec, choice: ProviderChoice, options: dict) -> Engine:
    if choice.backend == OPENVINO:
        return _create_openvino(path, spec, choice, options)
    engine_kw = engine_options_for(choice, options)
    trt_kw = {k: options.pop(k) for k in TENSORRT_OPTIONS if k in options}
    if choice.backend == "tensorrt":
        from sdrt.engines.cudart import import_cudart
        from sdrt.engines.tensorrt import TrtEngine, TrtOptions, import_tensorrt

        import_tensorrt()
        import_cudart()
        if options:
            warnings.warn(f"onnxruntime session options {sorted(options)} do not apply to the native TensorRT "
                          "backend; ignored", RuntimeWarning, stacklevel=3)
        unsupported = sorted(k for k, v in engine_kw.items() if v and k != "cuda_graph")
        if unsupported:
            raise ProviderError(f"{unsupported} are onnxruntime options; the native TensorRT backend keeps its "
                                "own device buffers (cuda_graph is supported)")
        return TrtEngine(path, spec, TrtOptions(cuda_graph=engine_kw.get("cuda_graph", False),
                                                device=choice.device_id, **trt_kw))

    from sdrt.engines.onnxruntime import OrtEngine, SessionOptions

    providers = list(choice.providers)
    if trt_kw:
        if choice.kind != "tensorrt-ep" or set(trt_kw) - set(TENSORRT_EP_OPTIONS):
            raise ProviderError(f"options {sorted(trt_kw)} do not apply to provider {choice.kind}")
    if choice.kind == "tensorrt-ep" and isinstance(providers[0], str):
        from sdrt.engines.trt_ep import tensorrt_ep_options

        providers[0] = (providers[0], tensorrt_ep_options(path, spec, device_id=choice.device_id, **trt_kw))
    session_options = options.pop("session_options", None)
    if options:
        try:
            session_options = SessionOptions(**options)
        except TypeError as e:
            raise ProviderError(f"unknown engine option: {e}") from e
    return OrtEngine(path, spec=spec, provider=providers, options=session_options, **engine_kw)


def _create_openvino(path, spec, choice: ProviderChoice, options: dict) -> Engine:
    """The OpenVINO engine: its options (precision None: auto), fixed_shapes as static reshaping; onnxruntime's
    session settings (which low-memory mode passes) do not apply and are dropped; CUDA/IO-binding options refused."""
    from sdrt.engines.openvino import OvEngine, OvOptions, import_openvino

    import_openvino()
    ov_kw = {k: options.pop(k) for k in OPENVINO_OPTIONS if k in options}
    ov_kw = {k: v for k, v in ov_kw.items() if v is not None}
    static = bool(options.pop("fixed_shapes", False))
    options.pop("session_options", None)
    for k in ("io_binding", "enable_mem_arena", "enable_mem_pattern"):
        options.pop(k, None)
    if options.pop("cuda_graph", False):
        raise ProviderError("cuda_graph applies to the cuda / tensorrt-ep providers and native tensorrt, not openvino")
    if options:
        raise ProviderError(f"options {sorted(options)} do not apply to the OpenVINO backend (it takes "
                            f"{', '.join(OPENVINO_OPTIONS)} and fixed_shapes)")
    return OvEngine(path, spec, OvOptions(device=choice.device, static_shapes=static, **ov_kw))
