"""Prepare the GPU kit here (with network), so that a session with a GPU machine only carries and runs.

    .venv/bin/python tools/gpu/prepare.py [--export-deps] [--part-mib 57]

Downloads, for CPython 3.12 on manylinux x86_64 (what the GPU machine runs; pip download --no-deps):
onnxruntime-gpu (checked to be a CUDA 13 build) and diffusers (pinned to the version installed
here, which the tests compare against); with --export-deps also onnxscript, onnx-ir and ml_dtypes,
for when `device.sh check` says the GPU machine lacks them. Builds sdrt's own wheel (the package
maps folders, so PYTHONPATH alone cannot import `sdrt`). Splits the onnxruntime-gpu wheel into
equal parts in .gpu1/ .gpu2/ ..., each under 60 MB and small enough to travel beside the working
tree and .gpu0/ (the small wheels), checks that the parts join back to the wheel's sha256, writes
the manifest into every folder, and prints the `run` calls to make (bench/GPU_RUNBOOK.md).

Idempotent: a wheel already downloaded is reused, parts already split from the same wheel with the
same size are kept. Everything goes into ignored folders (.gpu*/ in .gitignore); the full wheel is
kept in .gpu-download/, which never travels.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools.gpu` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.gpu import parts  # noqa: E402
from tools.gpu.parts import MiB, KitError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOWNLOADS = ".gpu-download"
ORT_GPU = "onnxruntime-gpu==1.31.1"  # the CUDA 13 build (shared/GPU.md); checked in the wheel
CUDA_MAJOR = "13"
DIFFUSERS_FALLBACK = "0.42.1"
EXPORT_DEPS = {"onnxscript": "0.7.2", "onnx-ir": "1.1.0", "ml-dtypes": "0.6.0"}  # fallbacks: the versions here win
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CALL_TIMEOUTS = {"first": 600, "part": 180, "last": 600, "bench": 600}


def log(msg: str) -> None:
    print(f"[prepare {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def pinned(name: str, fallback: str) -> str:
    """name==the version installed here (what the tests compare against), else the fallback version."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return f"{name}=={fallback}"


def wheel_name_prefix(requirement: str) -> str:
    """'onnxruntime-gpu==1.31.1' -> 'onnxruntime_gpu-1.31.1-' (how a wheel file of it starts)."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def download(requirement: str, dest: Path) -> Path:
    """The cp312 manylinux x86_64 wheel of `requirement` (name==version) in `dest`, downloaded unless there."""
    dest.mkdir(parents=True, exist_ok=True)
    prefix = wheel_name_prefix(requirement)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if found:
        log(f"{requirement}: have {found[0].name}")
        return found[0]
    log(f"{requirement}: downloading")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--dest", str(dest), requirement]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KitError(f"pip could not download {requirement} for cp312 manylinux x86_64:\n{proc.stderr[-2000:]}")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        raise KitError(f"pip downloaded {requirement} but no wheel named {prefix}*.whl is in {dest}")
    return found[0]


def check_cuda_build(wheel: Path, major: str = CUDA_MAJOR) -> str:
    """The CUDA version onnxruntime-gpu's wheel was built for; an error unless it is `major`.x."""
    with zipfile.ZipFile(wheel) as z:
        info = z.read("onnxruntime/capi/build_and_package_info.py").decode()
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist")]
    match = re.search(r"cuda_version\s*=\s*['\"]([^'\"]*)['\"]", info)
    version = match.group(1) if match else ""
    if not version.startswith(f"{major}."):
        raise KitError(f"{wheel.name} is built for CUDA {version or '(none)'}, not CUDA {major} as the GPU machine's "
                       f"torch and libraries are; pick another onnxruntime-gpu version ({ORT_GPU} was expected)")
    if not any(f"nvidia-cuda-runtime~={major}" in line for line in requires):
        log(f"note: {wheel.name} does not name nvidia-cuda-runtime~={major} in its requirements")
    return version


def build_sdrt_wheel(dest: Path) -> Path:
    """sdrt's wheel, built from a clean copy of this checkout's sources (no build isolation: this
    environment's setuptools)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = parts.copy_package_sources(ROOT, Path(tmp) / "src")
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp,
                               str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KitError(f"could not build sdrt's wheel (pip wheel --no-build-isolation needs setuptools>=68 "
                           f"here):\n{proc.stderr[-2000:]}")
        built = next(Path(tmp).glob("sdrt-*.whl"))
        for old in dest.glob("sdrt-*.whl"):
            old.unlink()
        return Path(shutil.copy2(built, dest / built.name))


def small_wheels(requirements: list[str], downloads: Path, folder: Path) -> list[dict]:
    """Download each requirement and copy its wheel into `folder` (.gpu0), plus sdrt's own; their records."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = [download(r, downloads) for r in requirements]
    for old in folder.glob("*.whl"):
        if old.name not in {w.name for w in keep} and not old.name.startswith("sdrt-"):
            old.unlink()
    for wheel in keep:
        if not (folder / wheel.name).is_file():
            shutil.copy2(wheel, folder / wheel.name)
    log("building sdrt's wheel from this checkout")
    wheels = [folder / w.name for w in keep] + [build_sdrt_wheel(folder)]
    return [{"file": w.name, "size": w.stat().st_size, "sha256": parts.sha256_file(w)} for w in wheels]


def split_big_wheel(wheel: Path, cap: int, previous: dict | None, root: Path = ROOT) -> list[dict]:
    """The wheel's parts in root/.gpu1/ .. .gpuN/ (kept when the previous manifest has the same wheel and size)."""
    count, size = parts.plan_parts(wheel.stat().st_size, cap)
    digest = parts.sha256_file(wheel)
    old = (previous or {}).get("big_wheel") or {}
    kept = old.get("parts", [])
    if old.get("sha256") == digest and old.get("part_size") == size and len(kept) == count and all(
            (root / p["folder"] / p["file"]).is_file() and (root / p["folder"] / p["file"]).stat().st_size == p["size"]
            for p in kept):
        log(f"parts of {wheel.name} already split ({count} x {size / MiB:.1f} MiB)")
        records = kept
    else:
        log(f"splitting {wheel.name} ({wheel.stat().st_size / MiB:.1f} MiB) into {count} parts of {size / MiB:.1f} MiB")
        records = parts.split_file(wheel, root, size)
    for stale in root.glob(".gpu[0-9]*"):
        if stale.name != parts.SMALL_FOLDER and int(stale.name[4:]) > count:
            shutil.rmtree(stale)
    joined = parts.sha256_stream(root / p["folder"] / p["file"] for p in records)
    if joined != digest:
        raise KitError(f"the parts of {wheel.name} join to sha256 {joined}, not the wheel's {digest}; delete "
                       f"{root}/.gpu[1-9]* and run prepare again")
    log(f"checked: the {count} parts join back to the wheel's sha256 {digest[:16]}...")
    return records


def make_manifest(big: Path, cuda: str, records: list[dict], small: list[dict], root: Path = ROOT) -> dict:
    """The manifest, written into .gpu0/ and every part's folder (each call can check what it carries)."""
    manifest = {
        "kit_version": parts.KIT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "big_wheel": {"file": big.name, "size": big.stat().st_size, "sha256": parts.sha256_file(big), "cuda": cuda,
                      "part_size": records[0]["size"], "parts": records},
        "small_wheels": small,
        "python": "cp312 manylinux x86_64",
    }
    for folder in [parts.SMALL_FOLDER] + [p["folder"] for p in records]:
        parts.write_manifest(root / folder, manifest)
    return manifest


def call_stages(index: int, count: int) -> list[str]:
    """device.sh's stages for the call that carries part `index` of `count` (every stage collects first)."""
    stages = ["check", "assemble", "export"] if index == 1 else ["collect"]
    if index == count:  # the last part: onnxruntime-gpu can be installed, then tested and used to optimize
        stages = [s for s in stages if s != "collect"] + ["assemble", "tests", "optimize"]
    return list(dict.fromkeys(stages))


def carry_plan(manifest: dict, tree: int) -> list[dict]:
    """The `run` calls of bench/GPU_RUNBOOK.md: what each carries, its size with the tree, and its command."""
    big = manifest["big_wheel"]["parts"]
    small = sum(w["size"] for w in manifest["small_wheels"])
    calls = []
    for p in big:
        first, last = p["index"] == 1, p["index"] == len(big)
        calls.append({"carry": [parts.SMALL_FOLDER, p["folder"]] if first else [p["folder"]],
                      "bytes": tree + p["size"] + (small if first else 0),
                      "command": f"bash tools/gpu/device.sh {' '.join(call_stages(p['index'], len(big)))}",
                      "timeout_s": CALL_TIMEOUTS["first" if first else "last" if last else "part"]})
    calls.append({"carry": [], "bytes": tree, "command": "bash tools/gpu/device.sh bench",
                  "timeout_s": CALL_TIMEOUTS["bench"]})
    return calls


def print_plan(calls: list[dict], tree: int) -> bool:
    """Print the calls; False when one of them would exceed the carry limit."""
    ok = True
    print(f"\nworking tree (estimate, what travels besides carried paths): {tree / MiB:.1f} MiB; limit per call "
          f"{parts.CARRY_LIMIT / MiB:.0f} MiB with the carried paths\n")
    for i, call in enumerate(calls, 1):
        over = call["bytes"] > parts.CARRY_LIMIT
        ok &= not over
        print(f"call {i}: run(carry={call['carry']}, timeout_s={call['timeout_s']}, command={call['command']!r})"
              f"   # {call['bytes'] / MiB:.1f} MiB{'  OVER THE LIMIT' if over else ''}")
    return ok


def prepare(cap_mib: float, export_deps: bool, assume_tree_mib: float | None = None) -> dict:
    downloads = ROOT / DOWNLOADS
    previous = parts.read_manifest(ROOT / parts.SMALL_FOLDER)
    big = download(ORT_GPU, downloads)
    cuda = check_cuda_build(big)
    log(f"{big.name}: built for CUDA {cuda}")
    requirements = [pinned("diffusers", DIFFUSERS_FALLBACK)]
    requirements += [pinned(name, version) for name, version in EXPORT_DEPS.items()] if export_deps else []
    small = small_wheels(requirements, downloads, ROOT / parts.SMALL_FOLDER)
    tree = parts.tree_bytes(ROOT) if assume_tree_mib is None else int(assume_tree_mib * MiB)
    cap = parts.part_cap(tree, sum(w["size"] for w in small), int(cap_mib * MiB))
    if cap < 8 * MiB:
        raise KitError(f"the working tree is {tree / MiB:.1f} MiB, which leaves {max(cap, 0) / MiB:.1f} MiB per call "
                       f"for the parts under the {parts.CARRY_LIMIT / MiB:.0f} MiB carry limit: make the tree smaller "
                       "(stop tracking big model files), or plan for the size it will have with --assume-tree-mib")
    records = split_big_wheel(big, cap, previous)
    return make_manifest(big, cuda, records, small)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part-mib", type=float, default=parts.PART_CAP / MiB,
                   help="largest part in MiB (default %(default)s; lowered further when the tree is large)")
    p.add_argument("--export-deps", action="store_true",
                   help="also carry onnxscript, onnx-ir and ml_dtypes (when `device.sh check` says they are missing)")
    p.add_argument("--assume-tree-mib", type=float, default=None,
                   help="size the parts for a working tree of this size (when it is about to shrink); the plan "
                        "printed at the end still checks the tree as it is")
    args = p.parse_args(argv)
    try:
        manifest = prepare(args.part_mib, args.export_deps, args.assume_tree_mib)
    except KitError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 1
    tree = parts.tree_bytes(ROOT)
    if not print_plan(carry_plan(manifest, tree), tree):
        print("\nprepare: some calls exceed the carry limit: the working tree is too large. Make it smaller "
              "(e.g. stop tracking big model files), then run prepare again.", file=sys.stderr)
        return 2
    print("\nIssue the calls back to back: the machine is given back 30 s after a call ends, and the parts "
          "carried so far go with it (bench/GPU_RUNBOOK.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
