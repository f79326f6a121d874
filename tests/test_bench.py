"""`sdrt bench` on the tiny exported fixture: every field present, figures positive and ordered, bad
input refused with a clear message and no traceback. No speed thresholds (benchmarks never fail a
test run for being slow)."""

from __future__ import annotations

import json
import math

import pytest

from sdrt.runtime import bench
from sdrt.runtime.cli import main
from sdrt.runtime.errors import InvalidInputError

STAGE_FIELDS = ("median", "p10", "p90", "min", "max", "n", "values")


@pytest.fixture(scope="module")
def bench_run(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main([
        "bench", str(exported["sd1"]), "--steps", "2", "--runs", "3", "--warmup", "1",
        "--out", str(out), "--plot", "-q",
    ])
    assert code == 0
    return out


def test_bench_writes_json_markdown_and_chart(bench_run):
    files = sorted(p.name for p in bench_run.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"]
    stem = files[0].rsplit(".", 1)[0]
    assert stem.startswith("bench-20") and "-sd1" in stem  # date, machine and model in the name
    assert not [p for p in bench_run.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_bench_json_has_every_field(bench_run):
    result = json.loads(next(bench_run.glob("*.json")).read_text())
    assert result["kind"] == "sdrt-bench"
    for key in ("date", "folder", "model", "settings", "machine", "stages", "load_seconds", "cold_start", "memory"):
        assert key in result, key
    settings = result["settings"]
    assert settings["steps"] == 2 and settings["runs"] == 3 and settings["warmup"] == 1
    assert settings["width"] == settings["height"] == 64 and settings["cfg"] is True
    assert settings["provider"] == "cpu" and settings["scheduler"]
    assert settings["allow_fallback"] is False and settings["cuda_graph"] is False and settings["io_binding"] is None
    assert result["provider_used"] == "cpu"
    assert result["providers_used"] == {"text_encoder": "cpu", "unet": "cpu", "vae_decoder": "cpu"}
    assert result["unet_io"] == {"io_binding": False, "fixed_shapes": False, "cuda_graph": False}  # CPU's default
    machine = result["machine"]
    for key in ("cpu", "cpu_cores", "ram_gib", "gpus", "versions"):
        assert key in machine, key
    for lib in ("sdrt", "onnxruntime", "numpy", "python"):
        assert machine["versions"][lib], lib
    assert "torch" not in machine["versions"]

    for name in bench.STAGES:
        st = result["stages"][name]
        assert set(STAGE_FIELDS) <= set(st), name
        assert st["n"] == 3 and len(st["values"]) == 3
        assert all(v > 0 for v in st["values"]), name
        assert st["min"] <= st["p10"] <= st["median"] <= st["p90"] <= st["max"], name
    stages = result["stages"]
    assert stages["end_to_end"]["median"] > stages["unet_step"]["median"]

    cold = result["cold_start"]
    for key in ("process_start_to_first_image_seconds", "interpreter_start_seconds", "import_seconds",
                "load_seconds", "first_image_seconds", "peak_rss_mib"):
        assert cold[key] > 0, key
    assert cold["process_start_to_first_image_seconds"] >= cold["import_seconds"] + cold["load_seconds"]
    memory = result["memory"]
    assert memory["peak_host_rss_mib"] > 0
    assert memory["peak_device_memory_mib"] is None  # CPU provider


def test_bench_markdown_names_the_stages(bench_run):
    text = next(bench_run.glob("*.md")).read_text()
    for label in bench.STAGES.values():
        assert label in text
    assert "Cold start" in text


def test_summarize_percentiles():
    s = bench.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 5.0
    assert math.isclose(s["p10"], 1.4) and math.isclose(s["p90"], 4.6)
    one = bench.summarize([0.5])
    assert one["p10"] == one["median"] == one["p90"] == 0.5


def test_pillow_chart_without_matplotlib(tmp_path):
    rows = [{"label": "sdrt", "stages": {"text encoder": 0.1, "UNet": 1.0, "VAE decode": 0.3},
             "end_to_end": {"median": 1.4, "p10": 1.3, "p90": 1.6}}]
    path = bench._plot_pillow(tmp_path / "chart.png", "test chart", rows)
    from PIL import Image

    with Image.open(path) as img:
        assert img.size[0] > 500 and img.size[1] > 100


@pytest.mark.parametrize("args,message", [
    (["--runs", "0"], "--runs must be an integer >= 1"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--size", "100x64"], "width=100 is not a multiple of"),
    (["--provider", "cuda"], "not available here"),
    (["--provider", "NoSuchExecutionProvider"], "not available here"),
    (["--scheduler", "no-such-solver"], "unknown scheduler 'no-such-solver'"),  # argparse's type check
    (["--guidance", "-1"], "--guidance must be >= 0"),
])
def test_bad_input_is_a_clear_error(exported, capsys, args, message):
    pytest.importorskip("onnxruntime")
    if args[:2] == ["--provider", "cuda"]:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is installed here")
    try:
        code = main(["bench", str(exported["sd1"]), "--no-cold-start", "-q", *args])
    except SystemExit as e:  # a usage error (argparse) exits here, as from the command line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="CUDA is installed here")
def test_allow_fallback_runs_on_cpu_and_records_it(exported, tmp_path, capsys):
    args = ["bench", str(exported["sd1"]), "--provider", "cuda", "--cuda-graph", "--steps", "1", "--runs", "1",
            "--warmup", "0", "--no-cold-start", "-q", "--out", str(tmp_path)]
    assert main(args[:-2]) == 2  # without --allow-fallback: the missing provider is an error
    assert "CUDAExecutionProvider is not available here" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="running on cpu instead"):
        assert main(args + ["--allow-fallback"]) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["settings"]["provider"] == "cuda" and result["settings"]["allow_fallback"] is True
    assert result["provider_used"] == "cpu" and set(result["providers_used"].values()) == {"cpu"}
    assert result["unet_io"]["cuda_graph"] is False  # dropped with the fallback to the CPU
    assert "provider cuda (fell back to cpu)" in next(tmp_path.glob("*.md")).read_text()


def test_bench_passes_io_options_to_the_pipeline(exported, capsys):
    """--cuda-graph reaches the UNet's engine: on the CPU provider that is onnxruntime's clear refusal."""
    assert main(["bench", str(exported["sd1"]), "--cuda-graph", "--no-cold-start", "-q"]) == 2
    assert "cuda_graph needs the CUDA or TensorRT execution provider" in capsys.readouterr().err
    settings = bench.BenchSettings(io_binding=False, cuda_graph=True, allow_fallback=True)
    assert settings.pipeline_options() == dict(provider="cpu", scheduler=None, allow_fallback=True, io_binding=False,
                                               cuda_graph=True, verify="size")


def test_folder_that_is_not_an_export(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    for folder in (tmp_path / "missing", tmp_path):
        assert main(["bench", str(folder), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdrt bench: error:") and "Traceback" not in err


def test_settings_check_raises_invalid_input():
    with pytest.raises(InvalidInputError):
        bench.BenchSettings(runs=0).check()
