"""Native TensorRT backend: build plans from the ONNX files on the target GPU, cache them, run them.

- Build: TensorRT's ONNX parser, one optimization profile made from the network's spec (min/opt/max
  batch and image size, `ProfileRange`), fp16 (or fp32), and a timing cache file shared by every
  build on the same GPU and TensorRT version.
- Cache: plans are stored under a `BuildKey` of (sha256 of the ONNX, GPU name and compute
  capability, TensorRT version, profile, precision) with a JSON record beside each (engines/cache.py).
  A refittable plan (`TrtOptions(refit=True)`) is keyed with precision "<precision>+refit".
  A feed outside every loaded plan's profile picks another cached plan or builds one; a plan file
  built for another GPU, TensorRT version, ONNX file or precision is refused with the fields named.
- Run: device buffers, a stream and optional CUDA graph replay through cuda-python (not torch).
  `run` copies inputs in, runs, and returns new host arrays the caller owns. `device_resident` values
  (sdrt.engines.resident) are copied in only when their buffer holds something else, so a
  generation's text conditioning crosses to the device once, not every step.
- Refit (LoRA): `set_initializers` replaces weights in the loaded engines in place with TensorRT's
  `Refitter`, by ONNX initializer name, instead of rebuilding; only plans built with `refit=True` allow it.

tensorrt and cuda-python are imported lazily (extra `sdrt[tensorrt]`). Written against TensorRT 10's
documented Python API (named I/O tensors, `execute_async_v3`); it has not run on a GPU yet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from sdrt.engines.base import Engine
from sdrt.engines.cache import (BuildKey, GpuInfo, PlanCache, PlanMismatchError, check_compatible, gpu_from_cudart,
                                onnx_sha256, read_key)
from sdrt.engines.cudart import DeviceBuffer, Stream, call, import_cudart
from sdrt.engines.errors import BackendNotInstalledError, EngineError
from sdrt.engines.files import atomic_write_bytes
from sdrt.engines.profiles import Profile, ProfileError, ProfileRange, canonical_profile, profile_fits
from sdrt.engines.resident import BufferContents, Resident
from sdrt.engines.spec import NetworkSpec

INSTALL_HINT = "pip install 'sdrt[tensorrt]' (tensorrt and cuda-python, on a machine with an NVIDIA GPU)"
PRECISIONS = ("fp16", "fp32")
# Fields a plan file given explicitly must share with this machine (its profile is whatever it was built for).
RUNS_HERE_FIELDS = ("onnx_sha256", "gpu_name", "compute_capability", "tensorrt_version", "precision", "backend")

log = logging.getLogger(__name__)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendNotInstalledError(f"the native TensorRT backend needs tensorrt: {INSTALL_HINT}") from e
    return tensorrt


@dataclass(frozen=True)
class TrtOptions:
    """How plans are built and run."""

    precision: str = "fp16"
    profile: ProfileRange | None = None  # None: a plan for exactly the shapes of each new feed
    cache_dir: str | os.PathLike | None = None  # None: default_cache_dir()
    cuda_graph: bool = False  # replay each plan's work as a CUDA graph while shapes stay the same
    build: bool = True  # False: use cached plans only; a missing plan is an error
    workspace_mib: int | None = None  # builder workspace limit; None: TensorRT's default (device memory)
    optimization_level: int = 3  # TensorRT builder_optimization_level, 0-5
    device: int = 0
    refit: bool = False  # build refittable plans, so that set_initializers (LoRA) can replace weights in place

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise EngineError(f"TensorRT precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise EngineError(f"optimization_level must be in 0..5, got {self.optimization_level}")


def static_profile(shapes: Mapping[str, tuple[int, ...]]) -> Profile:
    """A profile of exactly these shapes."""
    return {name: (tuple(s), tuple(s), tuple(s)) for name, s in shapes.items()}


def profile_for(spec: NetworkSpec | None, options: TrtOptions, shapes: Mapping[str, tuple[int, ...]]) -> Profile:
    """The profile to build for a feed: the configured range when it covers the feed, else the feed's shapes."""
    if spec is not None and options.profile is not None:
        profile = options.profile.profile(spec)
        if profile_fits(profile, shapes):
            return profile
        log.warning("%s: shapes %s are outside the configured profile %s; using a plan for exactly these shapes",
                    spec.name, dict(shapes), options.profile.to_json())
    return static_profile(shapes)


def make_key(network: str, sha256: str, gpu: GpuInfo, tensorrt_version: str, profile: Profile,
             precision: str, refit: bool = False) -> BuildKey:
    """The plan's key. A refittable plan is another plan (the REFIT flag limits some optimizations), so it is
    keyed apart as precision "<precision>+refit"; keys of plans without refit are unchanged."""
    return BuildKey(network=network, onnx_sha256=sha256, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
                    tensorrt_version=tensorrt_version, profile=canonical_profile(profile),
                    precision=f"{precision}+refit" if refit else precision)


def key_profile(key: BuildKey) -> Profile:
    return {name: (tuple(lo), tuple(opt), tuple(hi)) for name, lo, opt, hi in key.profile}


def get_plan(key: BuildKey, cache: PlanCache, build: Callable[[], bytes] | None) -> bytes:
    """The cached plan for `key`, or a new one from `build()` stored under it; refuses a mismatching record."""
    plan = cache.load(key)
    if plan is not None:
        return plan
    if build is None:
        raise EngineError(f"no cached TensorRT plan for {key.network} at {cache.entry(key)} and building is "
                          "disabled; build it on this GPU first (TrtOptions(build=True))")
    plan = build()
    cache.store(key, plan)
    return plan


def check_plan_file(plan: str | os.PathLike, wanted: BuildKey) -> BuildKey:
    """The record of a plan file given by the user, refused unless it was built for this ONNX, GPU and TensorRT."""
    recorded = read_key(plan)
    check_compatible(recorded, wanted, where=str(plan), only=RUNS_HERE_FIELDS)
    return recorded


def build_plan(trt, onnx_path: str | os.PathLike, profile: Profile, precision: str,
               timing_cache: str | os.PathLike | None = None, workspace_mib: int | None = None,
               optimization_level: int = 3, refit: bool = False) -> bytes:
    """Parse the ONNX file, build a serialized plan with one optimization profile; update the timing cache.
    refit: a plan whose weights `refit_plan` can replace (LoRA) without a rebuild."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(str(trt.__version__).split(".")[0]) < 10:  # explicit batch is the only mode (and default) from 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors or 'no details'}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    missing, extra = [n for n in inputs if n not in profile], [n for n in profile if n not in inputs]
    if missing or extra:
        raise ProfileError(f"{onnx_path}: the profile does not match the network's inputs {inputs} "
                           f"(no shapes for {missing}; unknown {extra})")

    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    config.builder_optimization_level = optimization_level
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    opt_profile = builder.create_optimization_profile()
    for name in inputs:
        opt_profile.set_shape(name, *profile[name])
    config.add_optimization_profile(opt_profile)

    timing_path = Path(timing_cache) if timing_cache is not None else None
    seed = timing_path.read_bytes() if timing_path is not None and timing_path.is_file() else b""
    cache = config.create_timing_cache(seed)
    if not config.set_timing_cache(cache, False):  # ignore_mismatch=False: a foreign cache is not used
        log.warning("timing cache %s does not match this GPU/TensorRT; building without it", timing_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build a plan for {onnx_path} (profile {canonical_profile(profile)}, "
                          f"{precision}{'+refit' if refit else ''}); see TensorRT's log above. Try precision='fp32' "
                          "or a smaller profile")
    if timing_path is not None:
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def refit_plan(trt, engine, logger, arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Replace these weights of a deserialized refittable engine in place (names: ONNX initializers).

    TensorRT's ONNX parser names a network's refittable weights after the initializers they come from, so LoRA's
    initializer names serve as they are. Each array is cast to the dtype the plan was built from (the weights
    prototype, TensorRT >= 10; older versions take the array as given) and kept alive until `refit_cuda_engine`
    has copied it: `trt.Weights` only points at the array's memory."""
    if not arrays:
        return
    try:
        refitter = trt.Refitter(engine, logger)
    except Exception as e:  # TensorRT raises untyped errors (e.g. for an engine built without REFIT)
        raise EngineError(f"TensorRT cannot refit {where}: {e}; build its plan with TrtOptions(refit=True)") from e
    kept = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        prototype = refitter.get_weights_prototype(name) if hasattr(refitter, "get_weights_prototype") else None
        if prototype is not None:
            if prototype.size < 0:
                raise EngineError(f"{where} has no refittable weights named {name!r} (TensorRT folded them into "
                                  "others, or they are no initializer of this ONNX file); do not replace them")
            if prototype.size != array.size:
                raise EngineError(f"{where}: weights {name!r} hold {prototype.size} values, the replacement "
                                  f"{array.size} (shape {array.shape}); give an array of the initializer's shape")
            try:
                array = np.ascontiguousarray(array, dtype=trt.nptype(prototype.dtype))
            except TypeError:  # no NumPy type for it (bfloat16): TensorRT checks the array as given
                pass
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise EngineError(f"TensorRT refused weights {name!r} ({array.dtype}, shape {array.shape}) for {where}; "
                              "see TensorRT's log above (unknown name, or another size or type)")
    if not refitter.refit_cuda_engine():
        missing = list(refitter.get_missing_weights())
        raise EngineError(f"TensorRT could not refit {where}: it also needs weights {missing[:10]}"
                          f"{' ...' if len(missing) > 10 else ''} (combined with the ones replaced); replace "
                          "those too, or leave these weights alone")
    del kept  # only now may the arrays go


class _LoadedPlan:
    """One deserialized plan: its execution context, device buffers, stream and CUDA graph."""

    def __init__(self, trt, cudart, runtime, plan: bytes, key: BuildKey, where: str):
        self.key = key
        self.where = where
        self.profile = key_profile(key)
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PlanMismatchError(
                f"TensorRT {trt.__version__} could not load the plan {where}; plans load only in the TensorRT "
                "version and on the GPU model that built them. Delete it and let sdrt rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: DeviceBuffer(cudart) for n in names}
        self.contents = BufferContents()  # which Resident each input buffer holds
        self.stream = Stream(cudart)
        self.bound_shapes: dict | None = None
        self.output_shapes: dict = {}

    def fits(self, shapes) -> bool:
        return profile_fits(self.profile, shapes)

    def _bind(self, shapes: dict) -> None:
        """Set input shapes, size the buffers and give TensorRT their addresses (once per shape set)."""
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise ProfileError(f"{self.key.network}: TensorRT refused shape {shapes[name]} for {name} "
                                   f"(profile {self.profile[name]})")
        self.output_shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs}
        all_shapes = {**shapes, **self.output_shapes}
        for name, buffer in self.buffers.items():
            buffer.reserve(int(np.prod(all_shapes[name])) * self.dtypes[name].itemsize)
            self.context.set_tensor_address(name, buffer.ptr)
        self.stream.drop_graph()  # addresses or shapes changed: a captured graph is stale
        self.contents.forget()
        self.bound_shapes = dict(shapes)

    def _enqueue(self) -> bool:
        return bool(self.context.execute_async_v3(self.stream.ptr))

    def run(self, feed: Mapping[str, np.ndarray], cuda_graph: bool) -> dict[str, np.ndarray]:
        shapes = {n: tuple(feed[n].shape) for n in self.inputs}
        if shapes != self.bound_shapes:
            self._bind(shapes)
        for name in self.inputs:
            if self.contents.needs_copy(name, feed[name]):
                self.stream.upload(self.buffers[name], np.asarray(feed[name], dtype=self.dtypes[name]))
        if cuda_graph and not self.stream.has_graph:
            if not self._enqueue():  # one eager run first: TensorRT may allocate lazily on the first enqueue
                raise EngineError(f"TensorRT failed to run {self.key.network} on shapes {shapes}")
            self.stream.capture(self._enqueue)
        if cuda_graph:
            self.stream.replay()
        elif not self._enqueue():
            raise EngineError(f"TensorRT failed to run {self.key.network} on shapes {shapes}")
        return {n: self.stream.download(self.buffers[n], self.output_shapes[n], self.dtypes[n]) for n in self.outputs}

    def release(self) -> None:
        self.stream.destroy()
        for buffer in self.buffers.values():
            buffer.free()
        self.context = self.engine = None


class TrtEngine(Engine):
    """A network built by TensorRT from its ONNX file, cached per (ONNX, GPU, TensorRT, profile, precision)."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec | None = None, options: TrtOptions | None = None,
                 plan: str | os.PathLike | None = None):
        self.path = Path(path)
        self.spec = spec
        self.options = options or TrtOptions()
        self.plan_file = Path(plan) if plan is not None else None
        if not self.path.is_file():
            raise EngineError(f"no ONNX file at {self.path}")
        self.cache = PlanCache(self.options.cache_dir)
        self._trt = self._cudart = self._runtime = None
        self._gpu: GpuInfo | None = None
        self._plans: list[_LoadedPlan] = []
        self._sha256: str | None = None
        self._logger = None  # one TensorRT logger for the runtime and every refitter
        self._initializers: dict[str, np.ndarray] = {}  # weights replacing the file's (set_initializers)

    @property
    def loaded(self) -> bool:
        return self._runtime is not None

    @property
    def network(self) -> str:
        return self.spec.name if self.spec is not None else self.path.parent.name or self.path.stem

    def load(self) -> None:
        if self._runtime is not None:
            return
        trt, cudart = import_tensorrt(), import_cudart()
        call(cudart.cudaSetDevice(self.options.device), f"cudaSetDevice({self.options.device})")
        gpu = gpu_from_cudart(self.options.device)
        if gpu is None:
            raise EngineError(f"could not read the properties of CUDA device {self.options.device}")
        self._trt, self._cudart, self._gpu = trt, cudart, gpu
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._sha256 = onnx_sha256(self.path, self.cache.root)
        try:
            if self.plan_file is not None:
                wanted = make_key(self.network, self._sha256, gpu, trt.__version__, {}, self.options.precision,
                                  self.options.refit)
                key = check_plan_file(self.plan_file, wanted)
                self._adopt(_LoadedPlan(trt, cudart, self._runtime, self.plan_file.read_bytes(), key,
                                        str(self.plan_file)))
            elif self.spec is not None and self.options.profile is not None:
                self._plan(self.options.profile.profile(self.spec))  # build or load the configured plan up front
        except BaseException:
            self.release()  # not half loaded: the next call loads again (a given plan file is needed by then)
            raise

    def _plan(self, profile: Profile) -> _LoadedPlan:
        key = make_key(self.network, self._sha256, self._gpu, self._trt.__version__, profile, self.options.precision,
                       self.options.refit)
        builder = None
        if self.options.build:
            def builder():
                log.warning("building a TensorRT plan for %s (%s, profile %s); this takes minutes once, "
                            "then it is cached in %s", self.network, key.precision,
                            canonical_profile(profile), self.cache.folder)
                return build_plan(self._trt, self.path, profile, self.options.precision,
                                  self.cache.timing_cache_path(self._gpu.name, self._trt.__version__),
                                  self.options.workspace_mib, self.options.optimization_level, self.options.refit)
        plan = get_plan(key, self.cache, builder)
        return self._adopt(_LoadedPlan(self._trt, self._cudart, self._runtime, plan, key,
                                       str(self.cache.plan_path(key))))

    def _adopt(self, loaded: _LoadedPlan) -> _LoadedPlan:
        """Keep a newly loaded plan, refit first with the weights set now: a plan holds the file's weights."""
        try:
            refit_plan(self._trt, loaded.engine, self._logger, self._initializers, loaded.where)
        except BaseException:
            loaded.release()
            raise
        self._plans.append(loaded)
        return loaded

    def _plan_for(self, shapes: dict) -> _LoadedPlan:
        for plan in self._plans:
            if plan.fits(shapes):
                return plan
        if self.plan_file is not None:
            raise ProfileError(f"{self.plan_file} was built for shapes {self._plans[0].profile}, not {shapes}; "
                               "give a plan that covers them, or no plan file so that sdrt builds one")
        return self._plan(profile_for(self.spec, self.options, shapes))

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        if self.spec is None:
            raise EngineError("input_dtypes of a TensorRT engine needs its spec")
        return {t.name: np.dtype(t.dtype) for t in self.spec.inputs}

    @property
    def output_names(self) -> list[str]:
        if self.spec is not None:
            return self.spec.output_names
        self.load()
        return self._plans[0].outputs if self._plans else []

    @property
    def provider_name(self) -> str:
        return "tensorrt"

    def device_resident(self, inputs: Mapping[str, np.ndarray]) -> dict:
        """`Resident` values: each plan copies one into its input buffer only when the buffer holds another."""
        dtypes = self.input_dtypes if self.spec is not None else {}
        return {n: Resident(np.asarray(a, dtype=dtypes.get(n))) for n, a in inputs.items()}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        names = self.spec.input_names if self.spec is not None else list(feed)
        missing = [n for n in names if n not in feed]
        if missing:
            raise EngineError(f"{self.path}: feed lacks inputs {missing}")
        shapes = {n: tuple(np.shape(feed[n])) for n in names}
        return self._plan_for(shapes).run(feed, self.options.cuda_graph)

    @property
    def initializers(self) -> dict[str, np.ndarray]:
        return dict(self._initializers)

    def set_initializers(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Run with these arrays in place of the file's initializers of the same names (LoRA weights); `{}`
        restores the file's. Loaded plans are refit in place (names set before but not now get the file's
        values back) and their CUDA graphs dropped; plans loaded later are refit when loaded."""
        arrays = {n: np.ascontiguousarray(a) for n, a in arrays.items()}
        if arrays and not self.options.refit:
            raise EngineError(f"{self.path}: the TensorRT plans of {self.network} are built without refit, so their "
                              "weights cannot be replaced (LoRA); use TrtOptions(refit=True), which builds and caches "
                              "refittable plans")
        previous = self._initializers
        changed = {n: a for n, a in arrays.items()
                   if n not in previous or not (a is previous[n] or np.array_equal(a, previous[n]))}
        restored = sorted(set(previous) - set(arrays))
        if self._plans and (changed or restored):
            if restored:
                from sdrt.engines.weights import weight_file

                changed.update(weight_file(self.path).read(restored))
            try:
                for plan in self._plans:
                    refit_plan(self._trt, plan.engine, self._logger, changed, plan.where)
                    plan.stream.drop_graph()  # the captured graph ran the old weights' kernels and arguments
            except EngineError as e:
                self.release()  # a failed refit may leave a plan half replaced: they load again at the next run
                raise EngineError(f"{e}. The engine's plans were released and load again at the next run, with "
                                  "the weights set before") from e
        self._initializers = arrays

    def release(self) -> None:
        for plan in self._plans:
            plan.release()
        self._plans = []
        self._runtime = None
