"""The runtime, engines and server never import torch, diffusers or transformers: proven in a subprocess
where importing them raises, by importing every module and generating an image."""

from __future__ import annotations

import pkgutil

import sdrt.engines
import sdrt.runtime
import sdrt.serve

from conftest import run_without_torch


def _modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def test_every_runtime_and_engine_module_imports_without_torch():
    names = _modules(sdrt.engines) + _modules(sdrt.runtime) + _modules(sdrt.serve)
    assert "sdrt.runtime.pipeline" in names and "sdrt.engines.onnxruntime" in names and "sdrt.serve.app" in names
    result = run_without_torch(f"""
import importlib
for name in {names!r}:
    importlib.import_module(name)
print("imported", len({names!r}))
""")
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


def test_pipeline_generates_without_torch(exported):
    result = run_without_torch("""
import sys
from sdrt.runtime.pipeline import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], scheduler="euler-a")
out = pipe("a red circle", num_inference_steps=2, seed=0, output_type="uint8")
assert out.images.shape == (1, 64, 64, 3)
assert "torch" not in sys.modules and "diffusers" not in sys.modules and "transformers" not in sys.modules
print("ok")
""", str(exported["sd1"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_export_without_the_extra_names_it(tmp_path):
    result = run_without_torch("""
import sys
from sdrt.runtime.cli import main
sys.exit(main(["export", sys.argv[1], sys.argv[2]]))
""", str(tmp_path / "src"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "sdrt[export]" in result.stderr and "Traceback" not in result.stderr
