"""`sdrt generate` and folders without sdrt.json (optimum's layout)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.cli import main
from sdrt.runtime.pipeline import StableDiffusionPipeline


def test_generate_writes_pngs_with_parameters(exported, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", str(exported["sd1"]), "a red circle", "-o", str(out), "--steps", "2", "--seed", "5",
               "--num-images", "2", "--negative", "blurry", "--scheduler", "euler-a", "--size", "64x80", "-q"])
    assert rc == 0
    files = sorted(tmp_path.glob("img-*.png"))
    assert [f.name for f in files] == ["img-0.png", "img-1.png"]
    with Image.open(files[0]) as im:
        assert im.size == (64, 80)
        text = im.text["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Steps: 2" in text and "Seed: 5" in text and "Size: 64x80" in text and "euler-a" in text


def test_generate_bad_size_is_a_clear_error(exported, tmp_path, capsys):
    rc = main(["generate", str(exported["sd1"]), "x", "-o", str(tmp_path / "a.png"), "--size", "70x64", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "width=70 is not a multiple of 16" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_folder_without_manifest_runs(exported, tmp_path):
    """optimum's ONNX folders have no sdrt.json: they must load and give the same image."""
    folder = tmp_path / "optimum-like"
    shutil.copytree(exported["sd1"], folder)
    (folder / "sdrt.json").unlink()
    a = StableDiffusionPipeline.from_pretrained(folder)("a cat", num_inference_steps=2, seed=1, output_type="np")
    b = StableDiffusionPipeline.from_pretrained(exported["sd1"])("a cat", num_inference_steps=2, seed=1, output_type="np")
    assert np.array_equal(a.images, b.images)


def test_generate_cuda_graph_on_the_cpu_is_a_clear_error(exported, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", str(exported["sd1"]), "x", "-o", str(out), "--steps", "1", "--cuda-graph", "-q"]) == 2
    err = capsys.readouterr().err
    assert "cuda_graph needs the CUDA or TensorRT execution provider" in err and "Traceback" not in err
    assert main(["generate", str(exported["sd1"]), "x", "-o", str(out), "--cuda-graph", "--no-io-binding"]) == 2
    assert "--cuda-graph needs IO binding" in capsys.readouterr().err
    assert not out.exists()


def test_generate_io_flags_give_the_same_image(exported, tmp_path):
    """--no-io-binding, and --cuda-graph dropped by the fallback from cuda to the CPU, change nothing in the image."""
    import onnxruntime

    args = ["generate", str(exported["sd1"]), "a red circle", "--steps", "2", "--seed", "1", "-q"]
    assert main(args + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "unbound.png"), "--no-io-binding"]) == 0
    images = [tmp_path / "plain.png", tmp_path / "unbound.png"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.warns(RuntimeWarning, match="running on cpu instead"):
            assert main(args + ["-o", str(tmp_path / "fallback.png"), "--provider", "cuda", "--allow-fallback",
                                "--cuda-graph"]) == 0
        images.append(tmp_path / "fallback.png")
    pixels = [np.asarray(Image.open(path)) for path in images]
    assert all(np.array_equal(p, pixels[0]) for p in pixels[1:])
