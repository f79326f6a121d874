"""Scheduler + classifier-free-guidance cost per step, in microseconds, without the UNet.

    python bench/scheduler_overhead.py [--steps 25] [--out bench/results]
    python bench/scheduler_overhead.py --folder EXPORTED_FOLDER [--label after-core]   # + the real loop

With --folder, also times the pipeline's own denoise loop (StableDiffusionPipeline, CFG 7.5, output_type
"latent") with the UNet engine replaced by a stand-in that returns a fixed array at once: every step's
work outside the network (feeds, CFG batch, guidance, solver, tasks' hooks, callback checks), per UNet
evaluation. The same script runs on an older checkout (PYTHONPATH pointing a `sdrt` folder at its
runtime/engines/export), so that before/after figures come from the same machine and run.

For every registered scheduler, runs the pipeline's per-step work around the UNet call — scale the
model input, build the 2N CFG batch, combine the halves (guide), solver step — on latents of 64x64
(512 px SD1.5) and 128x128 (1024 px), with a fixed fake UNet output. Runtime only: no torch.
The goal is under 1% of a UNet step (a 512 px SD1.5 CFG step is ~10 s on 2 CPU cores and ~10 ms on
an H100, so tens of microseconds to a few hundred).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.guidance import guide
from sdrt.runtime.rng import TorchGenerator
from sdrt.runtime.schedulers import SCHEDULER_NAMES, load_scheduler

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
}


def per_step_us(name: str, size: int, steps: int, repeats: int) -> float:
    scheduler = load_scheduler(SD15_SCHEDULER, name=name)
    rng = TorchGenerator(0)
    plan = scheduler.plan(steps)
    fake_unet = rng.randn((2, 4, size, size)) * np.float32(0.1)
    samples = []
    for _ in range(repeats):
        latents = rng.randn((1, 4, size, size)) * np.float32(plan.init_noise_sigma)
        state = scheduler.initial_state(plan)
        t0 = time.perf_counter()
        for i in range(plan.num_evaluations):
            x = scheduler.scale_model_input(plan, i, latents)
            np.concatenate([x, x])  # the CFG batch the UNet would get
            noise_pred = guide(fake_unet, 7.5)
            latents, state = scheduler.step(plan, i, noise_pred, latents, state, rng)
        samples.append((time.perf_counter() - t0) / plan.num_evaluations * 1e6)
    return statistics.median(samples)


class StandInUNet:
    """The folder's UNet engine with `run` replaced: a fixed out_sample of the sample's shape, no network."""

    def __init__(self, engine):
        self._engine = engine
        self._outputs = {}

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def device_resident(self, feed):
        return feed

    def run(self, feed):
        shape = feed["sample"].shape
        if shape not in self._outputs:
            self._outputs[shape] = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.1
        return {"out_sample": self._outputs[shape]}


def loop_us(folder: str, name: str, size: int, steps: int, repeats: int) -> float:
    """The pipeline loop's own time per UNet evaluation (median of repeats), with the stand-in UNet."""
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler=name)
    pipe.unet = StandInUNet(pipe.unet)
    samples = []
    for k in range(repeats + 1):
        out = pipe("a red circle", num_inference_steps=steps, guidance_scale=7.5, height=8 * size, width=8 * size,
                   seed=k, output_type="latent")
        t = out.timings
        evaluations = t.get("unet_evaluations", t["steps"])  # older checkouts counted evaluations as "steps"
        if k:  # the first run warms up
            samples.append((t["unet"] + t["scheduler_and_guidance"]) / evaluations * 1e6)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--folder", default=None, help="an exported folder: also time the pipeline's loop")
    ap.add_argument("--label", default="", help="added to the result's name, e.g. before-core / after-core")
    args = ap.parse_args()
    table, loop_table = {}, {}
    for name in SCHEDULER_NAMES:
        table[name] = {f"{s}x{s}": round(per_step_us(name, s, args.steps, args.repeats), 1) for s in (64, 128)}
        if args.folder:
            loop_table[name] = {f"{s}x{s}": round(loop_us(args.folder, name, s, args.steps, args.repeats), 1)
                                for s in (64, 128)}
        print(f"{name:<22} " + "  ".join(f"{k}: {v:8.1f} us/step" for k, v in table[name].items())
              + ("  loop " + "  ".join(f"{k}: {v:8.1f} us" for k, v in loop_table[name].items()) if args.folder else ""),
              file=sys.stderr)
    date = datetime.date.today().isoformat()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"what": "scheduler + CFG cost per step (no UNet), median of repeats", "date": date,
              "machine": {"cpu": cpu, "cores": os.cpu_count()}, "steps": args.steps,
              "numpy": np.__version__, "microseconds_per_step": table,
              "loop_microseconds_per_unet_evaluation": loop_table or None, "label": args.label}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scheduler-overhead-{date}-{platform.machine()}-{os.cpu_count()}cpu" + (f"-{args.label}" if args.label else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Scheduler + CFG cost per step ({date}, {cpu}, {os.cpu_count()} cores)", "",
             "Per step: scale the model input, build the 2N CFG batch, guide, solver step; fake UNet output.", "",
             "| scheduler | 64x64 latents (512 px) | 128x128 latents (1024 px) |", "|---|---|---|"]
    lines += [f"| {n} | {v['64x64']} us | {v['128x128']} us |" for n, v in table.items()]
    if loop_table:
        lines += ["", f"The pipeline's own loop ({args.label or 'this checkout'}), per UNet evaluation, stand-in UNet, "
                  "CFG 7.5, batch 1:", "", "| scheduler | 64x64 latents (512 px) | 128x128 latents (1024 px) |",
                  "|---|---|---|"]
        lines += [f"| {n} | {v['64x64']} us | {v['128x128']} us |" for n, v in loop_table.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
