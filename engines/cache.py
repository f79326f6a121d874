"""The build cache of compiled engines: keys, compatibility records and the on-disk store.

A TensorRT plan is valid only for the exact ONNX file, GPU model (name and compute capability),
TensorRT version, optimization profile and precision it was built with. `BuildKey` holds all of
them; its digest names the cache entry, and a JSON sidecar beside each plan records the key. A
plan is checked field by field against the key wanted before it is used, and refused with the
differing fields named when it was built for something else, so a shape, GPU or version change
rebuilds (or picks another entry) and never reuses a wrong plan. Pure Python: no GPU needed.

Layout under the cache folder (default `$SDRT_CACHE_DIR`, else `~/.cache/sdrt`):

    tensorrt/<network>-<digest16>/model.plan, key.json     native TensorRT plans
    tensorrt/timing-<gpu>-<trt>.cache                         timing cache, shared per GPU and version
    tensorrt-ep/<network>-<digest16>/...                      onnxruntime TensorRT provider caches
    hashes.json                                               sha256 of ONNX files by (path, size, mtime)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sdrt.engines.errors import EngineError
from sdrt.engines.files import atomic_write_bytes, atomic_write_json, memo_sha256, sha256_file

CACHE_ENV = "SDRT_CACHE_DIR"
KEY_FILE = "key.json"
PLAN_FILE = "model.plan"
KEY_VERSION = 1  # bump when BuildKey's meaning changes: old entries then miss instead of matching


class PlanMismatchError(EngineError):
    """A compiled plan was built for another ONNX file, GPU, TensorRT version, profile or precision."""


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor", e.g. "9.0"


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """The GPU's name and compute capability (cuda-python, else NVML, else nvidia-smi); None without one."""
    for probe in (gpu_from_cudart, _gpu_from_nvml, _gpu_from_smi):
        try:
            info = probe(device)
        except Exception:  # a probe's library is missing or has no device: try the next
            info = None
        if info is not None:
            return info
    return None


def gpu_from_cudart(device: int) -> GpuInfo | None:
    from sdrt.engines.cudart import import_cudart, succeeded

    cudart = import_cudart()
    err, prop = cudart.cudaGetDeviceProperties(device)
    if not succeeded(err):
        return None
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.strip("\x00 "), f"{prop.major}.{prop.minor}")


def _gpu_from_nvml(device: int) -> GpuInfo | None:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device)
    name = pynvml.nvmlDeviceGetName(handle)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(name.decode() if isinstance(name, bytes) else name, f"{major}.{minor}")


def _gpu_from_smi(device: int) -> GpuInfo | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run([smi, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or "," not in out.stdout:
        return None
    name, cc = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
    return GpuInfo(name, cc)


@dataclass(frozen=True)
class BuildKey:
    """Everything a compiled engine depends on. Two plans with equal keys are interchangeable."""

    network: str  # the spec's name, e.g. "unet"
    onnx_sha256: str  # of model.onnx (+ its external data file)
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    profile: tuple  # canonical_profile(): ((input, min, opt, max), ...) as nested tuples
    precision: str  # "fp16" | "fp32", + "+refit" for a refittable plan (TrtOptions.refit)
    backend: str = "tensorrt"  # "tensorrt" (native) or "tensorrt-ep <onnxruntime version>"
    key_version: int = KEY_VERSION

    def __post_init__(self):
        object.__setattr__(self, "profile", _freeze(self.profile))

    def to_json(self) -> dict:
        d = asdict(self)
        d["profile"] = _thaw(self.profile)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "BuildKey":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(n for n in names - set(d) if n not in ("backend", "key_version"))
        if unknown or missing:
            raise PlanMismatchError(f"not a build key record (unknown fields {unknown}, missing {missing})")
        return cls(**d)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @property
    def entry_name(self) -> str:
        return f"{_slug(self.network)}-{self.digest[:16]}"

    def differences(self, other: "BuildKey") -> list[tuple[str, object, object]]:
        """(field, this key's value, other's value) for every field that differs."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name))
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


_WHAT_TO_DO = {
    "onnx_sha256": "the ONNX file changed since the plan was built; it will be rebuilt",
    "gpu_name": "plans are specific to the GPU model; build on this GPU (delete the plan or let sdrt rebuild it)",
    "compute_capability": "plans are specific to the GPU architecture; build on this GPU",
    "tensorrt_version": "plans only load in the TensorRT version that built them; rebuild with this version",
    "profile": "the plan does not cover these shapes; build a plan with a profile that does",
    "precision": "the plan was built at another precision, or with/without refit ('+refit'); rebuild with the "
                 "ones asked for (TrtOptions precision and refit)",
}


def check_compatible(recorded: BuildKey, wanted: BuildKey, where: str = "plan", only=None) -> None:
    """Raise PlanMismatchError naming every field where `recorded` (the plan's) differs from `wanted`
    (among the fields in `only`, when given)."""
    diffs = [d for d in recorded.differences(wanted) if only is None or d[0] in only]
    if not diffs:
        return
    lines = [f"{name}: built for {_short(mine)}, here {_short(theirs)} ({_WHAT_TO_DO.get(name, 'rebuild')})"
             for name, mine, theirs in diffs]
    raise PlanMismatchError(f"refusing {where}: it was built for a different setup:\n  " + "\n  ".join(lines))


def _short(value) -> str:
    text = json.dumps(_thaw(value)) if isinstance(value, tuple) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def onnx_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of an ONNX file and its external data, memoized by (path, size, mtime) under cache_dir."""
    path = Path(path).resolve()
    files = [path] + [p for p in (path.with_name(path.name + "_data"), path.with_suffix(".onnx_data")) if p.is_file()]
    files = list(dict.fromkeys(files))

    def combined(files):
        return sha256_file(files[0]) if len(files) == 1 else \
            hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()

    return memo_sha256(path, files, cache_dir, combined)


class PlanCache:
    """Plans on disk, one folder per BuildKey digest: the plan bytes and key.json."""

    def __init__(self, root: str | os.PathLike | None = None, kind: str = "tensorrt"):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.folder = self.root / kind

    def entry(self, key: BuildKey) -> Path:
        return self.folder / key.entry_name

    def plan_path(self, key: BuildKey) -> Path:
        return self.entry(key) / PLAN_FILE

    def timing_cache_path(self, gpu_name: str, tensorrt_version: str) -> Path:
        return self.folder / f"timing-{_slug(gpu_name)}-{_slug(tensorrt_version)}.cache"

    def load(self, key: BuildKey) -> bytes | None:
        """The plan stored for `key`; None when there is none. A plan whose record disagrees is refused."""
        plan = self.plan_path(key)
        if not plan.is_file():
            return None
        check_compatible(read_key(plan), key, where=str(plan))
        return plan.read_bytes()

    def store(self, key: BuildKey, plan: bytes) -> Path:
        """Write the plan, then its key record (both atomically): a reader never sees a plan without its key."""
        entry = self.entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        (entry / KEY_FILE).unlink(missing_ok=True)
        atomic_write_bytes(entry / PLAN_FILE, plan)
        write_key(entry / PLAN_FILE, key)
        return entry / PLAN_FILE


def key_path(plan: str | os.PathLike) -> Path:
    return Path(plan).with_name(KEY_FILE)


def write_key(plan: str | os.PathLike, key: BuildKey) -> None:
    atomic_write_json(key_path(plan), {"build_key": key.to_json(), "sha256": sha256_file(plan)})


def write_key_record(folder: str | os.PathLike, key: BuildKey) -> None:
    """Record the key of a cache folder whose contents another tool writes (onnxruntime's TensorRT provider)."""
    atomic_write_json(Path(folder) / KEY_FILE, {"build_key": key.to_json()})


def read_key(plan: str | os.PathLike) -> BuildKey:
    """The BuildKey recorded beside a plan; refuses a plan without a record or that was modified."""
    record_path = key_path(plan)
    if not record_path.is_file():
        raise PlanMismatchError(f"{plan} has no {KEY_FILE} beside it, so what it was built for is unknown; "
                                "refusing it (delete it and let sdrt build a plan here)")
    try:
        record = json.loads(record_path.read_text())
        key = BuildKey.from_json(record["build_key"])
    except (ValueError, KeyError, TypeError) as e:
        raise PlanMismatchError(f"{record_path} is not a valid build record ({e}); delete the entry") from e
    if record.get("sha256") != sha256_file(plan):
        raise PlanMismatchError(f"{plan} does not match the sha256 in {record_path}: modified or replaced; "
                                "delete the entry")
    return key
