"""Bad input reaches the user as one line, before any work, and files are written safely: output paths, device
nodes and symlinks, decompression bombs, text that is not valid Unicode, impossible scheduler settings."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import image as imageio
from sdrt.runtime.cli import main
from sdrt.runtime.demo import default_model
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.pipeline import StableDiffusionPipeline
from sdrt.runtime.schedulers import load_scheduler

DEMO = str(default_model())


def generate(tmp_path, capsys, *extra, output=None):
    argv = ["generate", DEMO, "a red circle", "--steps", "2", "-q", "-o",
            str(tmp_path / "out.png") if output is None else output, *extra]
    code = main(argv)
    return code, capsys.readouterr().err


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- output paths, checked before the work ---------------------------------------------------------------------

class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the pipeline was used ({name}) before the output path was checked")


@pytest.mark.parametrize("output,message", [
    ("{tmp}/file/out.png", "is not a folder"),  # a missing folder is made; one under a file cannot be
    ("{tmp}", "is a directory"),
    ("", "is empty"),
    ("   ", "is empty"),
])
def test_bad_output_paths_are_refused_before_generating(tmp_path, capsys, monkeypatch, output, message):
    import sdrt.runtime.families as families

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(families, "text_to_image_pipeline", lambda *a, **k: Untouchable())
    code, err = generate(tmp_path, capsys, output=output.format(tmp=tmp_path))
    assert code == 2 and message in err and one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_is_refused_before_generating(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = generate(tmp_path, capsys, output=str(locked / "out.png"))
    finally:
        locked.chmod(0o700)
    assert code == 2 and "permission denied" in err and one_line(err)


def test_several_images_check_their_numbered_names_too(tmp_path, capsys):
    (tmp_path / "out-0.png").mkdir()  # the first numbered name is taken by a folder
    code, err = generate(tmp_path, capsys, "--num-images", "2")
    assert code == 2 and "out-0.png is a directory" in err


def test_a_device_node_is_written_through_never_replaced(tmp_path, capsys):
    code, err = generate(tmp_path, capsys, output="/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device, not a PNG


def test_a_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = f"import sys; sys.stdout.write(str(len(open({str(fifo)!r}, 'rb').read())))"
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    imageio.save_png(Image.new("RGB", (8, 8), "red"), fifo, parameters="x")
    assert int(reader.communicate(timeout=30)[0]) > 0
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlink_keeps_pointing_at_its_target_which_gets_the_image(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    imageio.save_png(Image.new("RGB", (8, 8), "blue"), link)
    assert link.is_symlink() and Image.open(target).size == (8, 8)


def test_nothing_is_left_behind_when_the_write_fails(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        imageio.save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_bench_out_at_a_file_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "results").write_text("not a folder")
    code = main(["bench", DEMO, "--steps", "1", "--runs", "1", "--out", str(tmp_path / "results"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "is a file; give a folder" in err and one_line(err)


def test_demo_output_is_checked_before_drawing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["demo", "-o", str(tmp_path / "file" / "demo.png")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# -- pictures and text ----------------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("content,message", [
    (png_header_only(100_000, 100_000), "decompression bomb"),
    (png_header_only(64, 64)[:40], "cannot read --image"),
    (b"not a picture at all", "cannot read --image"),
])
def test_untrusted_pictures_are_refused_with_one_line(tmp_path, capsys, content, message):
    (tmp_path / "in.png").write_bytes(content)
    code, err = generate(tmp_path, capsys, "--image", str(tmp_path / "in.png"))
    assert code == 2 and message in err and one_line(err)
    assert not (tmp_path / "out.png").exists()


def test_invalid_utf8_on_the_command_line_is_a_clear_error(tmp_path):
    prompt = b"a red \xff\xfe circle"
    out = subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", "generate", DEMO.encode(), prompt,
                          "--steps", "1", "-q", "-o", str(tmp_path / "o.png").encode()],
                         capture_output=True, timeout=120)
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 2 and "prompt is not valid text" in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt="a \ud800 b"), "prompt is not valid text"),
    (dict(prompt="a", negative_prompt=["x\udcff"]), "negative_prompt is not valid text"),
    (dict(prompt="a", negative_prompt=5), "negative_prompt must be a string"),
])
def test_text_that_is_not_unicode_is_refused(kwargs, message):
    pipe = StableDiffusionPipeline.from_pretrained(DEMO)
    pipe.text_encoder = Untouchable()
    with pytest.raises(InvalidInputError, match=message):
        pipe(num_inference_steps=1, **kwargs)


# -- schedulers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_with_its_warm_up_needs_four_steps(steps):
    """diffusers' PNDMScheduler fails with a broadcast error below 4 steps when skip_prk_steps is off."""
    scheduler = load_scheduler({"_class_name": "PNDMScheduler", "skip_prk_steps": False})
    with pytest.raises(InvalidInputError, match="needs num_inference_steps >= 4"):
        scheduler.plan(steps)


def test_pndm_without_its_warm_up_runs_one_step_as_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012}
    ours = load_scheduler(config)
    theirs = diffusers.PNDMScheduler(**{k: v for k, v in config.items() if k != "_class_name"})
    theirs.set_timesteps(1)
    plan = ours.plan(1)
    assert list(plan.timesteps) == theirs.timesteps.tolist()
    rng = np.random.default_rng(0)
    sample, output = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(2))
    got, _ = ours.step(plan, 0, output, sample, ours.initial_state(plan), None)
    expected = theirs.step(torch.from_numpy(output), theirs.timesteps[0], torch.from_numpy(sample)).prev_sample
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("option,message", [
    (dict(beta_start=-0.001), "0 <= beta_start <= beta_end < 1"),
    (dict(beta_start=0.02, beta_end=0.01), "0 <= beta_start <= beta_end < 1"),
    (dict(beta_end=1.5), "0 <= beta_start <= beta_end < 1"),
    (dict(beta_end=float("nan")), "must be finite"),
])
def test_impossible_betas_are_refused(option, message):
    with pytest.raises(InvalidInputError, match=message):
        load_scheduler({"_class_name": "DDIMScheduler", **option})


def test_a_corrupt_network_file_gives_one_line_and_no_onnxruntime_log(tmp_path):
    """A weight file damaged in place (same size, so the default size check passes): onnxruntime's own
    "[E:onnxruntime ...]" line must not reach stderr, only sdrt's error."""
    import shutil

    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    model = folder / "unet" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[:64] = b"\xff" * 64
    model.write_bytes(bytes(data))
    out = subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", "generate", str(folder), "a red circle",
                          "--steps", "1", "-q", "-o", str(tmp_path / "o.png")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "[E:onnxruntime" not in out.stderr and "Traceback" not in out.stderr
    assert "unet" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- model folders whose JSON files are of the wrong shape ---------------------------------------------------------

def _tamper(tmp_path, rel, change):
    import json
    import shutil

    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    file = folder / rel
    data = json.loads(file.read_text())
    data = change(data)
    file.write_text(json.dumps(data))
    if rel != "sdrt.json":  # keep the manifest's record of the file, so that only the field is wrong
        from sdrt.engines.files import sha256_file

        manifest = json.loads((folder / "sdrt.json").read_text())
        if rel in manifest["files"]:
            manifest["files"][rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
            (folder / "sdrt.json").write_text(json.dumps(manifest))
    return folder


def _set(key, value):
    def change(data):
        data[key] = value
        return data
    return change


def _drop(key):
    def change(data):
        data.pop(key)
        return data
    return change


def _first_file(change):
    def apply(data):
        rel = next(iter(data["files"]))
        data["files"][rel] = change(dict(data["files"][rel]))
        return data
    return apply


@pytest.mark.parametrize("rel,change,message", [
    ("model_index.json", lambda d: [d], "must be a JSON object"),
    ("model_index.json", _set("_class_name", 5), "'_class_name' must be a string"),
    ("unet/config.json", _set("sample_size", "32"), "'sample_size' must be a positive integer"),
    ("unet/config.json", _set("block_out_channels", 64), "'block_out_channels' must be a non-empty list"),
    ("vae_decoder/config.json", _set("scaling_factor", "0.18"), "'scaling_factor' must be a finite number"),
    ("vae_decoder/config.json", _drop("latent_channels"), "lacks 'latent_channels'"),
    ("text_encoder/config.json", _set("hidden_size", None), "'hidden_size' must be a positive integer"),
    ("scheduler/scheduler_config.json", lambda d: "DDIM", "must be a JSON object"),
    ("sdrt.json", _set("files", []), "'files' must be an object"),
    ("sdrt.json", _first_file(_drop("size")), "must hold an integer 'size'"),
    ("sdrt.json", _set("files", {"../../etc/passwd": {"size": 1, "sha256": "0"}}), "a path outside the folder"),
    ("sdrt.json", _set("family", ["stable-diffusion"]), "'family' must be a string"),
])
def test_malformed_folder_files_are_named_with_their_field(tmp_path, capsys, rel, change, message):
    folder = _tamper(tmp_path, rel, change)
    code = main(["generate", str(folder), "a red circle", "--steps", "1", "-q", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and one_line(err), err
    assert rel in err or rel.split("/")[0] in err


# -- integrity -----------------------------------------------------------------------------------------------

def test_verify_sha256_catches_a_flipped_byte_and_remembers_good_hashes(tmp_path, capsys, monkeypatch):
    import shutil

    from sdrt.engines import files

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    hashed, sha256_file = [], files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path, *a: hashed.append(path) or sha256_file(path, *a))
    argv = ["generate", str(folder), "a red circle", "--steps", "1", "-q", "--verify", "sha256"]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    first = len(hashed)
    assert first >= 4 and (tmp_path / "cache" / files.HASH_CACHE).is_file()
    assert main([*argv, "-o", str(tmp_path / "b.png")]) == 0
    assert len(hashed) == first  # unchanged files: the remembered hashes
    weights = folder / "vae_decoder" / "model.onnx"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))  # same size: the default check cannot see it
    assert main([*argv[:-2], "-o", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert "does not match its sha256" in err and "vae_decoder" in err and one_line(err)
    assert not (tmp_path / "d.png").exists()
    assert main(["bench", str(folder), "--steps", "1", "--runs", "1", "--warmup", "0", "--no-cold-start", "-q",
                 "--verify", "sha256"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def _model_with_external_data(folder, location):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    if location != "w.bin":  # point the tensor elsewhere, as a tampered or hostile file would
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.mark.parametrize("kind", ["absolute", "parent", "symlink"])
def test_external_data_outside_the_folder_is_refused_before_onnxruntime(tmp_path, kind):
    from sdrt.engines.errors import EngineError
    from sdrt.engines.files import check_external_data, external_data_locations
    from sdrt.engines.onnxruntime import OrtEngine
    from sdrt.engines.spec import NetworkSpec, TensorSpec

    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(1024, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    location = {"absolute": str(outside), "parent": "../outside.bin", "symlink": "w.bin"}[kind]
    path = _model_with_external_data(folder, location)
    if kind == "symlink":
        (folder / "w.bin").unlink()
        (folder / "w.bin").symlink_to(outside)
    assert external_data_locations(path) == {location}
    with pytest.raises(EngineError, match="keeps its weights outside its folder"):
        check_external_data(path)
    spec = NetworkSpec("n", (TensorSpec("x", "float32", (1024,)),), (TensorSpec("y", "float32", (1024,)),), 8)
    with pytest.raises(EngineError, match="outside its folder"):
        OrtEngine(path, spec).run({"x": np.zeros(1024, np.float32)})


def test_external_data_inside_the_folder_loads(tmp_path):
    from sdrt.engines.files import check_external_data, external_data_locations

    path = _model_with_external_data(tmp_path / "model", "w.bin")
    assert external_data_locations(path) == {"w.bin"}
    check_external_data(path)
    assert external_data_locations(DEMO + "/unet/model.onnx") == set()  # weights inside the file
