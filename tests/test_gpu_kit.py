"""The GPU kit (tools/gpu, bench/gpu_sd15.py) without a GPU or a network: parts split and joined back
by sha256, a carried kit collected call by call and installed with pip, the carry plan, the tree
estimate, and bench/gpu_sd15.py's smoke mode (tiny model, CPU, sdrt against diffusers)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tools.gpu import device, parts, prepare
from tools.gpu.parts import KitError


def fake_wheel(folder: Path, name: str, value: int, padding: int = 0) -> Path:
    """A real (installable) pure-Python wheel: `import name` gives VALUE; `padding` random bytes make it big."""
    files = {f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
             f"{name}/blob.bin": np.random.default_rng(value).bytes(padding),
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              b"Tag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    files[f"{name}-1.0.dist-info/RECORD"] = record.encode()
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for member, data in files.items():
            z.writestr(member, data)
    return path


def small_record(wheel: Path) -> dict:
    return {"file": wheel.name, "size": wheel.stat().st_size, "sha256": parts.sha256_file(wheel)}


# -- parts ---------------------------------------------------------------------------------------------

def test_plan_parts_gives_the_fewest_equal_parts_under_the_cap():
    assert parts.plan_parts(10, 4) == (3, 4)
    assert parts.plan_parts(8, 4) == (2, 4)
    assert parts.plan_parts(9, 10) == (1, 9)
    size = 255_569_273  # onnxruntime-gpu 1.31.1's wheel
    count, part = parts.plan_parts(size, parts.PART_CAP)
    assert count == 5 and part <= parts.PART_CAP and part * count >= size > part * (count - 1)
    with pytest.raises(KitError, match="no room"):
        parts.plan_parts(size, 0)


def test_part_cap_leaves_room_for_the_tree_and_the_small_wheels():
    assert parts.part_cap(5 * parts.MiB, 7 * parts.MiB) == 51 * parts.MiB  # 64 - 1 margin - 5 - 7
    assert parts.part_cap(0, 0) == parts.PART_CAP


def test_split_then_join_gives_the_file_back(tmp_path):
    src = tmp_path / "big.whl"
    src.write_bytes(np.random.default_rng(0).bytes(1_000_003))
    count, size = parts.plan_parts(src.stat().st_size, 300_000)
    records = parts.split_file(src, tmp_path, size)
    assert [r["folder"] for r in records] == [".gpu1", ".gpu2", ".gpu3", ".gpu4"] and count == 4
    paths = [tmp_path / r["folder"] / r["file"] for r in records]
    assert sum(p.stat().st_size for p in paths) == src.stat().st_size
    assert parts.sha256_stream(paths) == parts.sha256_file(src)
    joined = parts.join_parts(paths, tmp_path / "out" / "big.whl", parts.sha256_file(src))
    assert joined.read_bytes() == src.read_bytes()


def test_join_refuses_a_damaged_or_missing_part(tmp_path):
    src = tmp_path / "big.whl"
    src.write_bytes(np.random.default_rng(1).bytes(100_000))
    records = parts.split_file(src, tmp_path, 40_000)
    paths = [tmp_path / r["folder"] / r["file"] for r in records]
    damaged = bytearray(paths[1].read_bytes())
    damaged[7] ^= 1
    paths[1].write_bytes(bytes(damaged))
    dest = tmp_path / "out" / "big.whl"
    with pytest.raises(KitError, match="sha256"):
        parts.join_parts(paths, dest, parts.sha256_file(src))
    assert not dest.exists() and not list(dest.parent.iterdir())  # no half-written file left
    with pytest.raises(KitError, match="missing parts"):
        parts.join_parts(paths[:1] + [tmp_path / "nowhere"], dest, parts.sha256_file(src))


def test_tree_bytes_leaves_out_ignored_paths(tmp_path):
    (tmp_path / ".gitignore").write_text(".gpu*/\n*.pyc\n/out/\n# a comment\n")
    files = {"a.py": 10, ".gpu1/part": 1000, "b.pyc": 100, "out/x": 100, "sub/out/y": 5, ".git/objects/z": 50}
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert parts.tree_bytes(tmp_path) == 10 + 5 + (tmp_path / ".gitignore").stat().st_size  # a.py, sub/out/y


# -- prepare's plan ------------------------------------------------------------------------------------

def test_check_cuda_build_reads_the_wheel(tmp_path):
    def wheel(cuda: str) -> Path:
        path = tmp_path / f"ort-{cuda}.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("onnxruntime/capi/build_and_package_info.py",
                       f"package_name = 'onnxruntime-gpu'\ncuda_version = '{cuda}'\n")
            z.writestr("onnxruntime_gpu-1.0.dist-info/METADATA",
                       "Requires-Dist: nvidia-cuda-runtime~=13.0; extra == \"cuda\"\n")
        return path

    assert prepare.check_cuda_build(wheel("13.0")) == "13.0"
    with pytest.raises(KitError, match="CUDA 12.8, not CUDA 13"):
        prepare.check_cuda_build(wheel("12.8"))


def test_carry_plan_fits_the_limit_and_orders_the_stages():
    records = [{"index": i, "folder": f".gpu{i}", "size": 49 * parts.MiB} for i in range(1, 6)]
    manifest = {"big_wheel": {"parts": records}, "small_wheels": [{"size": 7 * parts.MiB}]}
    calls = prepare.carry_plan(manifest, tree=5 * parts.MiB)
    assert [c["carry"] for c in calls] == [[".gpu0", ".gpu1"], [".gpu2"], [".gpu3"], [".gpu4"], [".gpu5"], []]
    assert calls[0]["command"] == "bash tools/gpu/device.sh check assemble export"
    assert calls[1]["command"] == "bash tools/gpu/device.sh collect"
    assert calls[4]["command"] == "bash tools/gpu/device.sh assemble tests optimize"
    assert calls[5]["command"] == "bash tools/gpu/device.sh bench"
    assert calls[0]["bytes"] == 61 * parts.MiB and all(c["bytes"] <= parts.CARRY_LIMIT for c in calls)
    assert all(c["timeout_s"] <= 600 for c in calls)
    assert prepare.call_stages(1, 1) == ["check", "assemble", "export", "tests", "optimize"]


# -- the device side: a kit carried call by call --------------------------------------------------------

@pytest.fixture
def kit_here(tmp_path):
    """What prepare.py leaves here: .gpu0 (a small wheel) and .gpu1-3 (a big wheel in three parts)."""
    here = tmp_path / "here"
    (here / ".gpu0").mkdir(parents=True)
    big = fake_wheel(tmp_path, "bigprobe", 42, padding=250_000)
    small = [small_record(fake_wheel(here / ".gpu0", "smallprobe", 7))]
    records = prepare.split_big_wheel(big, 100_000, None, root=here)
    manifest = prepare.make_manifest(big, "13.0", records, small, root=here)
    return here, manifest


def carry(here: Path, device_root: Path, *folders: str) -> None:
    """What one `run` call does with its carry list: the folders appear in the device's checkout."""
    for name in folders:
        subprocess.run(["cp", "-r", str(here / name), str(device_root / name)], check=True)


def test_device_collects_parts_call_by_call_then_installs(kit_here, tmp_path):
    here, manifest = kit_here
    assert len(manifest["big_wheel"]["parts"]) == 3
    root = tmp_path / "device"
    root.mkdir()
    kit = device.Kit(root, out=tmp_path / "out")
    carry(here, root, ".gpu0", ".gpu1")
    state = device.collect(kit)
    assert state["missing_parts"] == [2, 3] and state["small_wheels"] == ["smallprobe-1.0-py3-none-any.whl"]
    assert (kit.part_store(manifest) / manifest["big_wheel"]["parts"][0]["file"]).is_file()
    carry(here, root, ".gpu2")
    assert device.collect(kit)["missing_parts"] == [3]
    state = device.assemble(kit, verify_cuda=False, with_sdrt=False)  # installs what it has, waits for the rest
    assert not state["big_wheel_ready"] and (kit.site / "smallprobe").is_dir() and not (kit.site / "bigprobe").exists()
    carry(here, root, ".gpu3")
    state = device.assemble(kit, verify_cuda=False, with_sdrt=False)
    assert state["big_wheel_ready"] and state["missing_parts"] == []
    assert parts.sha256_file(kit.wheels / manifest["big_wheel"]["file"]) == manifest["big_wheel"]["sha256"]
    code = "import bigprobe, smallprobe; print(bigprobe.VALUE, smallprobe.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(kit.site))).stdout
    assert out.split() == ["42", "7"]
    installed = [(kit.site / name / "__init__.py").stat().st_mtime_ns for name in ("bigprobe", "smallprobe")]
    device.assemble(kit, verify_cuda=False, with_sdrt=False)  # again: nothing to install, nothing changes
    assert [(kit.site / name / "__init__.py").stat().st_mtime_ns for name in ("bigprobe", "smallprobe")] == installed


def test_device_refuses_a_part_damaged_in_transfer(kit_here, tmp_path):
    here, manifest = kit_here
    root = tmp_path / "device"
    root.mkdir()
    carry(here, root, ".gpu2")
    part = root / ".gpu2" / manifest["big_wheel"]["parts"][1]["file"]
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(KitError, match="damaged in transfer; carry .gpu2 again"):
        device.collect(device.Kit(root, out=tmp_path / "out"))


def test_device_check_writes_what_is_missing(tmp_path):
    facts = device.check(device.Kit(tmp_path, out=tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "check.json").read_text())
    assert written["modules"]["numpy"]["version"] == np.__version__
    assert written["kit"] == {"manifest": False, "missing_parts": None, "big_wheel_ready": False}
    if "CUDAExecutionProvider" not in facts["onnxruntime"]["providers"]:
        assert any("CUDAExecutionProvider" in m for m in written["missing"])


def test_device_finds_the_cuda_pip_packages(tmp_path, monkeypatch):
    image = tmp_path / "image"
    for lib in ("cu13/lib/libcublas.so.13", "cudnn/lib/libcudnn.so.9", "cu13/include/cuda.h"):
        (image / "nvidia" / lib).parent.mkdir(parents=True, exist_ok=True)
        (image / "nvidia" / lib).write_bytes(b"")
    (image / "nvidia" / "empty" / "lib").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(image))
    expected = [str(image / "nvidia" / "cu13" / "lib"), str(image / "nvidia" / "cudnn" / "lib")]
    assert device.nvidia_lib_dirs() == expected
    kit = device.Kit(tmp_path / "repo", out=tmp_path / "out")
    kit.site.mkdir(parents=True)
    device.link_nvidia(kit)
    assert (kit.site / "nvidia").resolve() == (image / "nvidia").resolve()
    monkeypatch.syspath_prepend(str(kit.site))  # as on the device: the kit's site first, its link found too
    assert device.nvidia_lib_dirs() == expected
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(kit.site), str(image)]))
    out = subprocess.run([sys.executable, "-m", "tools.gpu.device", "ld-path"], capture_output=True, text=True,
                         cwd=device.ROOT, check=True, env=env)
    assert out.stdout.strip() == os.pathsep.join(expected)


# -- bench/gpu_sd15.py's smoke mode -------------------------------------------------------------------

def test_gpu_bench_smoke_mode_on_cpu(checkpoints, exported, tmp_path):
    from bench import gpu_sd15

    cache = tmp_path / "cache" / "tiny-sd1"
    cache.mkdir(parents=True)
    (cache / "checkpoint").symlink_to(checkpoints["sd1"])  # what bench/compare.py's prepare() would build
    (cache / "onnx").symlink_to(exported["sd1"])
    out, copy = tmp_path / "results", tmp_path / "OUT"
    code = gpu_sd15.main(["--device", "cpu", "--tiny", "--steps", "2", "--runs", "2", "--warmup", "1",
                          "--stage-runs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out),
                          "--copy-to", str(copy)])
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in copy.iterdir()) and [f.rsplit(".", 1)[1] for f in files] == ["json", "md"]
    assert files[0].startswith("gpu-tiny-sd1-20") and files[0].endswith("-64x64-2steps.json")
    result = json.loads((out / files[0]).read_text())
    assert list(result["sides"]) == ["diffusers", "sdrt-iobinding", "sdrt-plain"]
    assert (cache / "onnx-cpu-fp32" / "sdrt.json").is_file() and result["folder_optimize"] == "cpu profile, fp32"
    for name, side in result["sides"].items():
        assert side["error"] is None, name
        assert side["end_to_end"]["n"] == 2 and side["stages"]["unet_step"]["median"] > 0
        assert side["unet_evaluations"] == result["sides"]["diffusers"]["unet_evaluations"]
    for name in ("sdrt-iobinding", "sdrt-plain"):
        assert result["image_difference"][name]["max_abs"] < 1e-4  # fp32 on both sides: the same image
        ratios = result["speedup_diffusers_over_sdrt"][name]
        diffusers, sdrt = result["sides"]["diffusers"], result["sides"][name]
        assert ratios["end_to_end"] == pytest.approx(diffusers["end_to_end"]["median"] / sdrt["end_to_end"]["median"])
    assert result["goals"]["applies"] is False and not any(v["met"] for v in result["goals"]["variants"].values())
    markdown = (out / files[1]).read_text()
    assert "| UNet, per evaluation |" in markdown and "not applicable" in markdown


def test_gpu_bench_refuses_cuda_graphs_on_cpu():
    from bench import gpu_sd15

    with pytest.raises(SystemExit):
        gpu_sd15.parse_args(["--device", "cpu", "--variants", "graph"])
    assert gpu_sd15.parse_args(["--device", "cpu"]).variants == ["iobinding", "plain"]
    assert gpu_sd15.parse_args([]).variants == ["iobinding", "graph", "plain"]
