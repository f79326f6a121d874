"""Provider options for onnxruntime's TensorRT execution provider: fp16, profile, engine and timing caches.

The provider builds TensorRT engines itself; we give it a cache folder keyed like the native
backend's plans (engines/cache.py: ONNX hash, GPU, versions, profile, precision), so a change of
any of those lands in another folder instead of reusing an engine built for something else. The
GPU is detected without tensorrt (cuda-python, NVML or nvidia-smi); the onnxruntime version stands
in for the TensorRT version it was built against, plus tensorrt's own version when importable.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from sdrt.engines.cache import BuildKey, GpuInfo, PlanCache, detect_gpu, onnx_sha256, write_key_record
from sdrt.engines.profiles import Profile, ProfileRange, canonical_profile
from sdrt.engines.spec import NetworkSpec

PROVIDER = "TensorrtExecutionProvider"


def shapes_option(profile: Profile, which: int) -> str:
    """onnxruntime's profile shape syntax: "name:1x4x64x64,other:2x77x768" (which: 0 min, 1 opt, 2 max)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in sorted(profile.items()))


def versions() -> str:
    import onnxruntime

    text = f"onnxruntime {onnxruntime.__version__}"
    try:
        import tensorrt

        text += f", tensorrt {tensorrt.__version__}"
    except ImportError:
        pass
    return text


def ep_key(path: str | os.PathLike, spec: NetworkSpec | None, profile: Profile | None, precision: str,
           gpu: GpuInfo | None, cache_root: Path) -> BuildKey:
    gpu = gpu or GpuInfo("unknown", "unknown")
    return BuildKey(network=spec.name if spec is not None else Path(path).parent.name,
                    onnx_sha256=onnx_sha256(path, cache_root), gpu_name=gpu.name,
                    compute_capability=gpu.compute_capability, tensorrt_version=versions(),
                    profile=canonical_profile(profile or {}), precision=precision, backend="tensorrt-ep")


def tensorrt_ep_options(path: str | os.PathLike, spec: NetworkSpec | None = None, *, precision: str = "fp16",
                        profile: ProfileRange | None = None, cache_dir: str | os.PathLike | None = None,
                        gpu: GpuInfo | None = None, device_id: int = 0, workspace_mib: int | None = None) -> dict:
    """The provider options dict for `path`; creates its cache folder and records the key in it."""
    cache = PlanCache(cache_dir, kind="tensorrt-ep")
    shapes = profile.profile(spec) if profile is not None and spec is not None else None
    key = ep_key(path, spec, shapes, precision, gpu if gpu is not None else detect_gpu(device_id), cache.root)
    folder = cache.entry(key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_key_record(folder, key)
    except OSError as e:  # a read-only $SDRT_CACHE_DIR or home: this run builds into a private temporary cache
        fallback = Path(tempfile.gettempdir()) / f"sdrt-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        warnings.warn(f"the engine cache {cache.root} cannot be written ({e}); caching in {fallback} instead "
                      "(set SDRT_CACHE_DIR to a writable folder to keep engines between runs)", RuntimeWarning,
                      stacklevel=2)
        cache = PlanCache(fallback, kind="tensorrt-ep")
        folder = cache.entry(key)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_key_record(folder, key)
    options = {
        "device_id": device_id,
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache.folder),  # shared by every network on this GPU
    }
    if workspace_mib:
        options["trt_max_workspace_size"] = int(workspace_mib) << 20
    if shapes is not None:
        for which, option in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            options[option] = shapes_option(shapes, which)
    return options
