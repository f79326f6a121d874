"""A single-file checkpoint of the full SD 1.5 architecture (random weights), exported with the configs sdrt ships.

    python bench/single_file_sd15.py [--work /tmp/sdrt-single-file] [--out bench/results]

Real checkpoints are full size, and the configs sdrt ships for them (sdrt.export.single_file) are only exercised
at full size: the tests use tiny models with --config. This script writes the SD 1.5 architecture as one
original-layout .safetensors (sdrt.export.fixtures_single_file), exports it with `sdrt export FILE OUT` (no
--config) and the diffusers folder it came from with `sdrt export FOLDER OUT`, then generates one image with each
(256 px, 2 steps, CFG) and records: every weight read back equal, the two images equal, the times, the disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sdrt-single-file", help="scratch folder (about 12 GB)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    import numpy as np
    import torch

    from sdrt.export import single_file
    from sdrt.export.api import export_pipeline
    from sdrt.export.fixtures import sd15_pipeline
    from sdrt.export.fixtures_single_file import save_single_file
    from sdrt.runtime.bench import _cpu_model
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    figures = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpu": _cpu_model()}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    t = time.perf_counter()
    pipe = sd15_pipeline(seed=0)
    pipe.save_pretrained(work / "diffusers", safe_serialization=True)
    path = save_single_file(pipe, work / "sd15-random.safetensors")
    figures["single_file_bytes"] = path.stat().st_size
    figures["write_seconds"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    source = single_file.inspect(path)
    figures["architecture"] = source.architecture
    converted = single_file.convert(source, work / "converted", log=log)  # the shipped configs: no --config
    figures["convert_seconds"] = round(time.perf_counter() - t, 1)
    from diffusers import StableDiffusionPipeline as Reference

    back = Reference.from_pretrained(converted, safety_checker=None)
    unequal = [f"{name}.{key}" for name in ("unet", "vae", "text_encoder")
               for key, value in getattr(pipe, name).state_dict().items()
               if not torch.equal(value, getattr(back, name).state_dict()[key])]
    figures["weights_read_back_equal"] = not unequal
    figures["unequal_weights"] = unequal[:10]
    del back

    outputs = {}
    for name, src in (("single_file", path), ("folder", work / "diffusers")):
        t = time.perf_counter()
        export_pipeline(src, work / f"onnx-{name}", log=log, components=["text_encoder", "unet", "vae_decoder"])
        figures[f"export_{name}_seconds"] = round(time.perf_counter() - t, 1)
        sdrt = StableDiffusionPipeline.from_pretrained(work / f"onnx-{name}")
        outputs[name] = sdrt("a photo of a cat", seed=1, num_inference_steps=2, height=256, width=256,
                             output_type="np").images
        del sdrt
    figures["images_max_abs_difference"] = float(np.abs(outputs["single_file"] - outputs["folder"]).max())
    manifest = json.loads((work / "onnx-single_file" / "sdrt.json").read_text())
    figures["recorded"] = manifest.get("single_file")
    print(json.dumps(figures, indent=2))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"single-file-sd15-{figures['date']}"
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join([
        f"# Single-file SD 1.5 architecture (random weights), {figures['date']}",
        "",
        f"CPU: {figures['cpu']}. Script: bench/single_file_sd15.py.",
        "",
        f"- the file: {figures['single_file_bytes'] / 1e9:.2f} GB, recognized as `{figures['architecture']}`",
        f"- read with the configs sdrt ships (no --config): {figures['convert_seconds']} s; every weight equal to "
        f"the source pipeline's: {figures['weights_read_back_equal']}",
        f"- `sdrt export FILE`: {figures['export_single_file_seconds']} s; `sdrt export FOLDER`: "
        f"{figures['export_folder_seconds']} s (text encoder, UNet, VAE decoder; each validated against torch)",
        f"- one image each (256 px, 2 steps, CFG 7.5, seed 1): max |difference| = "
        f"{figures['images_max_abs_difference']:.3g}",
        "",
    ]))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if figures["weights_read_back_equal"] and figures["images_max_abs_difference"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
