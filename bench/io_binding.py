"""Does keeping the UNet's conditioning on the device change the speed? The UNet's per-step time per engine mode.

    python bench/io_binding.py FOLDER --steps 5 --runs 5                      # a tiny export: seconds
    flock /tmp/sdrt-heavy.lock python bench/io_binding.py ~/.cache/sdrt/bench/sd15-arch/onnx --steps 2 --runs 2
    python bench/io_binding.py FOLDER --provider cuda --modes plain,io_binding,cuda_graph   # on a GPU

Modes (the UNet's engine options; the text encoder runs plain in every mode): plain (session.run with
host arrays), io_binding (the conditioning uploaded once per generation, outputs in reused buffers),
fixed_shapes (inputs copied into fixed buffers, CUDA graphs' mode without the graph), cuda_graph.
Each mode opens its own pipeline, checks that its latents equal the plain mode's, warms up once, then
times --runs generations (CFG, output_type "latent": the VAE is left out). A mode named twice is
measured twice, its runs pooled (plain,io_binding,io_binding,plain: against drift on a busy machine).
With --interleave the pipelines stay loaded and the runs alternate between modes (fairer, but every
mode's pipeline in memory at once: too much for SD1.5 on 24 GB).
Prints and writes bench/results/io-binding-<date>-<machine>-<model>.json + .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdrt.runtime import bench as rb  # noqa: E402
from sdrt.runtime.config import ModelFolder  # noqa: E402
from sdrt.runtime.pipeline import StableDiffusionPipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = {"plain": {"io_binding": False}, "io_binding": {"io_binding": True}, "fixed_shapes": {"fixed_shapes": True},
         "cuda_graph": {"cuda_graph": True}}


def open_mode(folder, mode: str, args):
    return StableDiffusionPipeline.from_pretrained(folder, provider=args.provider, scheduler="ddim", **MODES[mode])


def generate(pipe, args) -> tuple[np.ndarray, float]:
    """One generation's latents and its UNet seconds per evaluation."""
    out = pipe(rb.PROMPT, negative_prompt=rb.NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
               height=args.size, width=args.size, seed=0, output_type="latent")
    return out.images, out.timings["unet"] / out.timings["unet_evaluations"]


def measure(folder, modes: list[str], args) -> dict:
    """{mode: {"unet_step": summary, "same_latents": bool}}; pipelines one at a time unless --interleave."""
    reference, per_step, same = None, {m: [] for m in modes}, {}
    pipes = {}
    if args.interleave:
        modes = list(dict.fromkeys(modes))
    for mode in modes:
        pipe = pipes[mode] = open_mode(folder, mode, args)
        latents, _ = generate(pipe, args)  # warm-up, and the check
        reference = latents if reference is None else reference
        same[mode] = same.get(mode, True) and bool(np.array_equal(latents, reference))
        if not args.interleave:
            for _ in range(args.runs):
                per_step[mode].append(generate(pipe, args)[1])
            pipe.release()
            del pipes[mode]
        print(f"{mode}: loaded, latents {'equal' if same[mode] else 'DIFFER'} to {modes[0]}'s", flush=True)
    for _ in range(args.runs if args.interleave else 0):
        for mode in modes:
            per_step[mode].append(generate(pipes[mode], args)[1])
    return {m: {"unet_step": rb.summarize(per_step[m]), "same_latents": same[m]} for m in dict.fromkeys(modes)}


def to_markdown(result: dict) -> str:
    s, base = result["settings"], result["modes"][result["settings"]["modes"][0]]["unet_step"]["median"]
    lines = [f"# UNet per step by engine mode: {result['model']}", "",
             f"{result['date']} on {rb.machine_line(result['machine'])}.", "",
             f"Provider {s['provider']}, {s['size']}x{s['size']}, CFG batch 2, {s['steps']} DDIM steps, {s['runs']} "
             f"measured runs per mode after one warm-up{', interleaved' if s['interleave'] else ''}.", "",
             "| mode | UNet per step, median ms | min ms | p90 ms | median vs first mode | latents equal |",
             "|---|---:|---:|---:|---:|---|"]
    for mode, r in result["modes"].items():
        st = r["unet_step"]
        lines.append(f"| {mode} | {st['median'] * 1e3:,.2f} | {st['min'] * 1e3:,.2f} | {st['p90'] * 1e3:,.2f} | "
                     f"{st['median'] / base:.3f} | {'yes' if r['same_latents'] else 'NO'} |")
    lines += ["", f"Load average (1 min) after the runs: {result['load_average_1m_after']:.2f}; on a shared machine "
                  "read the ratios, not the absolute times.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--modes", default="plain,io_binding,fixed_shapes", help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", type=int, default=None, help="px (default: the model's)")
    p.add_argument("--interleave", action="store_true", help="keep every mode loaded and alternate the runs")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    args.size = args.size or ModelFolder.open(args.folder).default_size
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    machine = rb.machine_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    result = {"kind": "sdrt-io-binding", "date": started.isoformat(timespec="seconds"),
              "model": rb.model_label(args.folder), "settings": {**vars(args), "modes": modes}, "machine": machine,
              "modes": measure(args.folder, modes, args)}
    result["load_average_1m_after"] = os.getloadavg()[0]
    markdown = to_markdown(result)
    print(markdown)
    stem = rb.result_stem("io-binding", machine, args.provider, result["model"])
    for path in rb.write_results(result, args.out, stem, markdown):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
