"""Prompt adherence of the bundled demo model, through sdrt and through diffusers, same prompts and seeds.

    python bench/demo_adherence.py [--n 120] [--steps 20] [--guidance 1 3 7] [--no-diffusers]

Runs `bench.shapes.prompts(seed=2024, n)` (one generator seed per prompt, 1000..) through sdrt's
ONNX folder (models/shapes-demo-onnx, torch-compatible seeds) and through diffusers'
StableDiffusionPipeline on the diffusers weights (models/shapes-demo), scores both with
`bench.adherence` (which reads colour, background, shape and position from the pixels) and reports
how far the two runtimes' images are apart. An end-to-end check that export, tokenizer, CFG and
scheduler all work: the two columns must agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402
from bench.adherence import check, score  # noqa: E402

KEYS = ("colour", "background", "shape", "position", "all", "objects")


def run_sdrt(folder, prompts, seeds, steps, guidance) -> np.ndarray:
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    return np.concatenate([
        pipe(p, num_inference_steps=steps, guidance_scale=guidance, seed=s, output_type="uint8").images
        for p, s in zip(prompts, seeds)
    ])


def run_diffusers(checkpoint, prompts, seeds, steps, guidance, batch=40) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch]]
        images = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.0])
    ap.add_argument("--onnx", default=str(ROOT / "models" / "shapes-demo-onnx"))
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "shapes-demo"))
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    prompts = shapes.prompts(seed=2024, n=args.n)
    seeds = list(range(1000, 1000 + args.n))
    rows = []
    for g in args.guidance:
        t0 = time.perf_counter()
        ours = run_sdrt(args.onnx, prompts, seeds, args.steps, g)
        row = {"guidance": g, "sdrt": score(ours, prompts), "sdrt_seconds": round(time.perf_counter() - t0, 1)}
        if not args.no_diffusers:
            t0 = time.perf_counter()
            ref = run_diffusers(args.checkpoint, prompts, seeds, args.steps, g)
            row["diffusers"] = score(ref, prompts)
            row["diffusers_seconds"] = round(time.perf_counter() - t0, 1)
            diff = np.abs(ours.astype(int) - ref.astype(int))
            row["max_abs_pixel_diff_255"] = int(diff.max())
            row["mean_abs_pixel_diff_255"] = float(diff.mean())
            row["verdicts_agree"] = float(np.mean([check(a, p)["all"] == check(b, p)["all"]
                                                   for a, b, p in zip(ours, ref, prompts)]))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    date = datetime.date.today().isoformat()
    result = {"what": "shapes-demo prompt adherence, sdrt vs diffusers", "date": date, "n": args.n,
              "steps": args.steps, "scheduler": "DPM++ 2M (the model's own)", "prompt_seed": 2024,
              "generator_seeds": f"{seeds[0]}..{seeds[-1]}", "rows": rows}
    out = Path(args.out)
    (out / f"shapes-demo-adherence-{date}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# shapes-demo: prompt adherence, sdrt vs diffusers ({date})", "",
             f"{args.n} prompts from `bench.shapes.prompts(seed=2024, n={args.n})`, one seed each "
             f"({seeds[0]}..{seeds[-1]}; sdrt's torch-compatible stream, diffusers' torch.Generator), "
             f"the model's DPM++ 2M scheduler, {args.steps} steps, 32x32, fp32 on CPU. Scored by `bench.adherence`.", "",
             "| guidance | runtime | colour | background | shape | position | all | colour+background+shape |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for side in ("sdrt", "diffusers"):
            if side in row:
                s = row[side]
                cells = " | ".join("–" if s[k] is None else f"{s[k]:.2f}" for k in KEYS)
                lines.append(f"| {row['guidance']:g} | {side} | {cells} |")
    if not args.no_diffusers:
        lines += ["", "| guidance | max pixel diff (of 255) | mean pixel diff | same 'all' verdict |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['guidance']:g} | {r['max_abs_pixel_diff_255']} | {r['mean_abs_pixel_diff_255']:.3f} | "
                  f"{r['verdicts_agree']:.2f} |" for r in rows]
    lines += ["", "Reproduce: `.venv/bin/python bench/demo_adherence.py`", ""]
    (out / f"shapes-demo-adherence-{date}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
