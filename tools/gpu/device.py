"""The GPU kit's stages on the GPU machine (no network), run from the repository root by device.sh.

    python3 -m tools.gpu.device STAGE       (device.sh sets PYTHONPATH, LD_LIBRARY_PATH and OUT first)

collect   keep the parts and wheels carried in .gpu0/ .gpu1/ ... in .gpu/ (each checked by sha256 against
          the manifest; hard links) and say which parts are still missing; every other stage does it first
check     versions of python, torch, CUDA, cuDNN, onnxruntime, cupy and the rest, nvidia-smi, and which
          needed modules are missing -> $OUT/check.json
assemble  install the small wheels (diffusers) and sdrt from this working tree into .gpu/site; once every
          part is there, join the onnxruntime-gpu wheel (sha256 checked), install it and prove that
          onnxruntime's CUDA provider runs a network. Idempotent.
export    build the SD1.5-architecture checkpoint and export it (cached in .gpu/cache)
optimize  optimize it for the GPU in fp16 (needs onnxruntime-gpu's optimizer: after assemble)
tests     the GPU tests and the CPU tests that matter here -> $OUT/tests.log
bench     bench/gpu_sd15.py -> $OUT and bench/results/ (more options in $BENCH_ARGS, e.g. "--variants graph")
ld-path   print the library folders of the CUDA pip packages (device.sh puts them on LD_LIBRARY_PATH)

Standard library only until `assemble` has installed the rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.gpu import parts  # noqa: E402
from tools.gpu.parts import KitError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STARTED = time.monotonic()
# Modules the kit needs on the device: import name -> (distribution name, where it comes from if missing).
NEEDED = {
    "torch": ("torch", "the GPU machine's image"),
    "transformers": ("transformers", "the GPU machine's image"),
    "diffusers": ("diffusers", ".gpu0 (tools/gpu/prepare.py)"),
    "onnx": ("onnx", "the GPU machine's image"),
    "onnxscript": ("onnxscript", "prepare.py --export-deps"),
    "onnx_ir": ("onnx-ir", "prepare.py --export-deps"),
    "ml_dtypes": ("ml_dtypes", "prepare.py --export-deps"),
    "onnxruntime": ("onnxruntime", ".gpu1.. (onnxruntime-gpu)"),
    "numpy": ("numpy", "the GPU machine's image"),
    "tokenizers": ("tokenizers", "the GPU machine's image"),
    "PIL": ("pillow", "the GPU machine's image"),
    "safetensors": ("safetensors", "the GPU machine's image"),
    "tqdm": ("tqdm", "the GPU machine's image"),
    "pytest": ("pytest", "the GPU machine's image"),
    "pynvml": ("nvidia-ml-py", "optional: peak GPU memory in the bench"),
    "cupy": ("cupy-cuda13x", "optional"),
    "setuptools": ("setuptools", "installing sdrt from the tree (else the carried wheel)"),
    "sdrt.runtime": ("sdrt", "assemble"),
}
# The GPU tests: the engines, and the gpu optimize profile on the real CUDA kernels.
GPU_TESTS = ["tests/test_engines_gpu.py", "tests/test_optimize.py::test_gpu_profile_on_the_cuda_provider"]
# The CPU tests that matter on the GPU machine (engines, export, optimize, pipeline, no-torch, this kit): only
# with SDRT_GPU_CPU_TESTS=1, as they take ~2.5 min of a 15-minute device budget.
CPU_TESTS = ["tests/test_engine_providers.py", "tests/test_nan_fallback.py", "tests/test_export.py",
             "tests/test_optimize.py", "tests/test_pipeline.py", "tests/test_no_torch.py", "tests/test_gpu_kit.py"]
CUDA_PROBE = r"""
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
print(f"onnxruntime {ort.__version__} from {ort.__file__}")
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
print("providers:", ort.get_available_providers())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("no CUDAExecutionProvider: this onnxruntime is not the GPU build")
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
# ir_version 10: onnx 1.23 writes 14 by default, which onnxruntime 1.31 refuses (it reads up to 13)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
if session.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit(f"the session fell back to {session.get_providers()}: the CUDA provider did not load "
             "(CUDA/cuDNN libraries?)")
a = np.arange(6, dtype=np.float32).reshape(2, 3)
assert np.array_equal(session.run(None, {"x": a})[0], a + a)
print("CUDA provider ran a network: ok")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - STARTED:5.0f}s] {msg}", flush=True)


class Kit:
    """The kit's folders on the device: .gpu/ under the repository root (ignored; kept while the machine is)."""

    def __init__(self, root: Path = ROOT, home: Path | None = None, out: Path | None = None):
        self.root = Path(root)
        self.home = Path(home or os.environ.get("KIT") or self.root / ".gpu")
        self.out = Path(out or os.environ.get("OUT") or self.home / "out")
        self.site = self.home / "site"
        self.wheels = self.home / "wheels"
        self.cache = self.home / "cache"

    @property
    def manifest(self) -> dict | None:
        return parts.read_manifest(self.home)

    def part_store(self, manifest: dict) -> Path:
        return self.home / "parts" / manifest["big_wheel"]["sha256"][:16]


# -- collect ---------------------------------------------------------------------------------------

def _check_and_keep(src: Path, dest: Path, record: dict) -> bool:
    """Keep a carried file in the kit (a hard link, else a copy: the carried folder stays as it came) once its
    sha256 is the manifest's; False when the kit has it already."""
    if dest.is_file() and dest.stat().st_size == record["size"]:
        return False
    digest = parts.sha256_file(src)
    if digest != record["sha256"]:
        raise KitError(f"{src} has sha256 {digest}, the manifest says {record['sha256']}: damaged in transfer; "
                       f"carry {src.parent.name} again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)
    return True


def collect(kit: Kit) -> dict:
    """Keep the carried parts and wheels in the kit; the status: parts present and missing, wheels there."""
    carried = sorted(p for p in kit.root.glob(".gpu[0-9]*") if p.is_dir())
    for folder in carried:
        manifest = parts.read_manifest(folder)
        if manifest is None:
            continue
        current = kit.manifest
        if current is None or current["big_wheel"]["sha256"] != manifest["big_wheel"]["sha256"] \
                or current["created"] < manifest["created"]:
            parts.write_manifest(kit.home, manifest)
        for record in manifest["big_wheel"]["parts"]:
            src = folder / record["file"]
            if src.is_file() and _check_and_keep(src, kit.part_store(manifest) / record["file"], record):
                log(f"part {record['index']}/{len(manifest['big_wheel']['parts'])} arrived ({folder.name})")
        for record in manifest["small_wheels"]:
            src = folder / record["file"]
            if src.is_file() and _check_and_keep(src, kit.wheels / record["file"], record):
                log(f"wheel {record['file']} arrived")
    return status(kit)


def status(kit: Kit) -> dict:
    manifest = kit.manifest
    if manifest is None:
        return {"manifest": False, "missing_parts": None, "big_wheel_ready": False}
    big = manifest["big_wheel"]
    joined = (kit.wheels / big["file"]).is_file()
    missing = [] if joined else [p["index"] for p in big["parts"]
                                 if not (kit.part_store(manifest) / p["file"]).is_file()]
    return {"manifest": True, "created": manifest["created"], "big_wheel": big["file"], "parts": len(big["parts"]),
            "missing_parts": missing, "big_wheel_ready": joined or not missing,
            "small_wheels": [w["file"] for w in manifest["small_wheels"] if (kit.wheels / w["file"]).is_file()]}


def report_status(state: dict) -> None:
    if not state["manifest"]:
        log("no kit here yet: carry .gpu0 and .gpu1 (tools/gpu/prepare.py made them); see bench/GPU_RUNBOOK.md")
    elif state["missing_parts"]:
        log(f"onnxruntime-gpu: parts {state['missing_parts']} of {state['parts']} still to carry "
            f"(.gpu{', .gpu'.join(map(str, state['missing_parts']))})")
    else:
        log(f"onnxruntime-gpu: all {state['parts']} parts here")


# -- check -----------------------------------------------------------------------------------------

def module_versions() -> tuple[dict, list[str]]:
    """{import name: {"version", "path"}} for NEEDED, and the missing ones with where they come from."""
    found, missing = {}, []
    for name, (dist, source) in NEEDED.items():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            missing.append(f"{name} (from {source})")
            continue
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = None
        found[name] = {"version": version, "path": spec.origin or str(list(spec.submodule_search_locations or []))}
    return found, missing


def _run_text(command: list[str], timeout: float = 60) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"(could not run {command[0]}: {e})"


def torch_facts() -> dict:
    try:
        import torch
    except ImportError as e:
        return {"error": str(e)}
    facts = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if facts["cuda_available"]:
        facts["device"] = torch.cuda.get_device_name(0)
        facts["capability"] = list(torch.cuda.get_device_capability(0))
    return facts


def onnxruntime_facts() -> dict:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"error": str(e)}
    return {"version": ort.__version__, "path": ort.__file__, "providers": ort.get_available_providers(),
            "dists": {d: _version(d) for d in ("onnxruntime", "onnxruntime-gpu")}}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check(kit: Kit) -> dict:
    found, missing = module_versions()
    ort_facts = onnxruntime_facts()
    if "CUDAExecutionProvider" not in ort_facts.get("providers", []):
        missing.append("onnxruntime's CUDAExecutionProvider (from .gpu1.., installed by assemble)")
    facts = {
        "python": sys.version, "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "disk_free_gib": round(shutil.disk_usage(kit.root).free / 2**30, 1),
        "nvidia_smi": _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                 "--format=csv"]),
        "torch": torch_facts(), "onnxruntime": ort_facts, "modules": found, "missing": missing,
        "kit": status(kit), "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
    }
    kit.out.mkdir(parents=True, exist_ok=True)
    (kit.out / "check.json").write_text(json.dumps(facts, indent=2) + "\n")
    for key in ("python", "platform", "cpu_count", "disk_free_gib", "nvidia_smi", "torch", "onnxruntime"):
        log(f"{key}: {facts[key]}")
    for name, info in found.items():
        log(f"  {name:13s} {info['version']}  {info['path']}")
    log(f"missing: {', '.join(missing) or 'nothing'}")
    return facts


# -- assemble --------------------------------------------------------------------------------------

def pip_install(kit: Kit, targets: list[str], extra: tuple[str, ...] = ()) -> None:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(kit.site),
               *extra, *targets]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KitError(f"pip could not install {targets} into {kit.site}:\n{proc.stderr[-3000:]}")


def _stamp(kit: Kit) -> dict:
    path = kit.site / ".kit-installed.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _add_stamp(kit: Kit, file: str, sha256: str) -> None:
    stamp = _stamp(kit)
    stamp[file] = sha256
    (kit.site / ".kit-installed.json").write_text(json.dumps(stamp, indent=2) + "\n")


def install_wheels(kit: Kit, records: list[dict]) -> None:
    """pip install --target the wheels not installed yet (by sha256)."""
    todo = [r for r in records if _stamp(kit).get(r["file"]) != r["sha256"] and not r["file"].startswith("sdrt-")]
    if todo:
        log(f"installing {', '.join(r['file'] for r in todo)} into {kit.site}")
        pip_install(kit, [str(kit.wheels / r["file"]) for r in todo])
        for r in todo:
            _add_stamp(kit, r["file"], r["sha256"])


def install_sdrt(kit: Kit, records: list[dict]) -> str:
    """sdrt from this working tree (always fresh); the wheel prepare.py built if that cannot be done here."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pip_install(kit, [str(parts.copy_package_sources(kit.root, Path(tmp) / "src"))], ("--no-build-isolation",))
        return "from the working tree"
    except (KitError, OSError, KeyError) as e:
        carried = [r for r in records if r["file"].startswith("sdrt-") and (kit.wheels / r["file"]).is_file()]
        if not carried:
            raise
        log(f"could not install sdrt from the tree ({str(e).splitlines()[0]}); installing the carried wheel")
        pip_install(kit, [str(kit.wheels / carried[0]["file"])])
        return f"the carried {carried[0]['file']} (built when prepare.py ran: later edits are not in it)"


def nvidia_packages() -> list[Path]:
    """The folders of the `nvidia` namespace package (the CUDA pip packages), as found on sys.path."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    return [Path(p).absolute() for p in (spec.submodule_search_locations if spec else None) or []]


def nvidia_lib_dirs() -> list[str]:
    """The lib folders of the CUDA pip packages (nvidia/cu13/lib, nvidia/cudnn/lib, ...), each once."""
    dirs = [str(lib.resolve()) for base in nvidia_packages() for lib in sorted(base.glob("*/lib"))
            if any(lib.glob("lib*.so*"))]
    return list(dict.fromkeys(dirs))


def link_nvidia(kit: Kit) -> None:
    """.gpu/site/nvidia -> the image's nvidia packages: onnxruntime.preload_dlls() looks beside onnxruntime."""
    link = kit.site / "nvidia"
    if link.is_symlink() or link.exists():
        return
    bases = [b for b in nvidia_packages() if not b.is_relative_to(kit.site.absolute())]
    if bases:
        link.symlink_to(bases[0], target_is_directory=True)
        log(f"linked {link} -> {bases[0]}")
    else:
        log("note: no nvidia pip packages found; onnxruntime must find CUDA and cuDNN on LD_LIBRARY_PATH")


def probe_cuda(kit: Kit) -> str:
    path = [str(kit.site)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, env=env, timeout=300)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise KitError(f"onnxruntime-gpu is installed but its CUDA provider does not run:\n{text[-3000:]}")
    return text


def assemble(kit: Kit, verify_cuda: bool = True, with_sdrt: bool = True) -> dict:
    state = collect(kit)
    manifest = kit.manifest
    if manifest is None:
        raise KitError("nothing to assemble: no manifest arrived; carry .gpu0 and .gpu1 (bench/GPU_RUNBOOK.md)")
    kit.site.mkdir(parents=True, exist_ok=True)
    install_wheels(kit, [r for r in manifest["small_wheels"] if (kit.wheels / r["file"]).is_file()])
    if with_sdrt:
        log(f"sdrt installed {install_sdrt(kit, manifest['small_wheels'])}")
    link_nvidia(kit)
    big = manifest["big_wheel"]
    if not state["big_wheel_ready"]:
        return state
    wheel = kit.wheels / big["file"]
    if not wheel.is_file():
        log(f"joining {len(big['parts'])} parts into {big['file']}")
        parts.join_parts([kit.part_store(manifest) / p["file"] for p in big["parts"]], wheel, big["sha256"])
        log(f"sha256 checked: {big['sha256'][:16]}...")
    install_wheels(kit, [big])
    if verify_cuda:
        log(probe_cuda(kit))
    return status(kit)


# -- the stages that run the project -----------------------------------------------------------------

def run_logged(command: list[str], log_path: Path, cwd: Path) -> int:
    """Run `command` in `cwd`, its output both printed and appended to `log_path`; its exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {' '.join(command)}")
    with open(log_path, "a") as f:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def tests(kit: Kit) -> int:
    log_path = kit.out / "tests.log"
    common = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
    gpu = run_logged(common + GPU_TESTS, log_path, kit.root)
    cpu = run_logged(common + CPU_TESTS, log_path, kit.root) if os.environ.get("SDRT_GPU_CPU_TESTS") == "1" else 0
    log(f"GPU tests exit {gpu}, CPU subset exit {cpu} (log: {log_path})")
    return gpu or cpu


def bench_command(kit: Kit, *extra: str) -> list[str]:
    return [sys.executable, str(kit.root / "bench" / "gpu_sd15.py"), "--device", "cuda", "--cache", str(kit.cache),
            *extra]


def stage(name: str, kit: Kit) -> int:
    if name == "ld-path":
        print(os.pathsep.join(nvidia_lib_dirs()))
        return 0
    if name == "collect":
        report_status(collect(kit))
        return 0
    if name == "check":
        report_status(collect(kit))
        check(kit)
        return 0
    if name == "assemble":
        report_status(assemble(kit))
        return 0
    collect(kit)
    if name == "export":
        return run_logged(bench_command(kit, "--prepare", "export"), kit.out / "model.log", kit.root)
    if name == "optimize":
        return run_logged(bench_command(kit, "--prepare", "all"), kit.out / "model.log", kit.root)
    if name == "tests":
        return tests(kit)
    if name == "bench":
        extra = shlex.split(os.environ.get("BENCH_ARGS", ""))
        return run_logged(bench_command(kit, "--out", str(kit.root / "bench" / "results"), "--copy-to", str(kit.out),
                                        *extra), kit.out / "bench.log", kit.root)
    raise KitError(f"unknown stage {name!r}; stages: collect check assemble export optimize tests bench ld-path")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return stage(argv[0], Kit())
    except KitError as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
