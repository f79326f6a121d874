"""sdrt vs diffusers on torch, in one run: same checkpoint, seed, steps, size and scheduler.

    python bench/compare.py --tiny sd1 --steps 5 --runs 5
    python bench/compare.py --sd15 --steps 3 --size 512x512 --runs 1 --plot
    python bench/compare.py --checkpoint CKPT --exported FOLDER --steps 20 --runs 3

Each side runs in its own worker subprocess (so peak RSS is per side, and sdrt's worker never
imports torch); the parent drives them alternately, A B A B, one warm-up each first. Reported:
per-stage medians (text encoder, UNet step, VAE decode, rest) and end-to-end, the ratio
sdrt / diffusers of each, peak RSS per side, and the difference between the two images.

--sd15 builds the real SD1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random
weights: latency does not depend on weight values, so the speed figures are honest; the images
are noise. Needs the export extra (torch, diffusers, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.runtime import bench as rb
from sdrt.runtime.cli import _size

RESULTS = Path(__file__).parent / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt" / "bench"
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SIDES = ("sdrt", "diffusers")
STAGES = ("text_encoder", "unet_step", "vae_decoder", "other", "end_to_end")

# sdrt scheduler name -> (diffusers class, from_config overrides).
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun-karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}


# -- model preparation (torch side) ---------------------------------------------------------------

def prepare(args) -> tuple[Path, Path, str]:
    """(checkpoint, exported folder, label), building and exporting into the cache when asked."""
    if args.checkpoint:
        if not args.exported:
            sys.exit("compare: --checkpoint needs --exported (the `sdrt export` folder of that checkpoint)")
        return Path(args.checkpoint), Path(args.exported), Path(args.checkpoint).name
    label = "sd15-arch" if args.sd15 else f"tiny-{args.tiny}"
    ckpt, exported = args.cache / label / "checkpoint", args.cache / label / "onnx"
    if not (ckpt / "model_index.json").is_file():
        log(f"building {label} (random weights) in {ckpt}")
        from sdrt.export.fixtures import save_sd15_pipeline, save_tiny_pipeline

        if args.sd15:
            save_sd15_pipeline(ckpt)  # SD1.5's architecture with seeded random weights
        else:
            save_tiny_pipeline(ckpt, args.tiny)
    if not (exported / "sdrt.json").is_file():
        from sdrt.export.api import export_pipeline

        log(f"exporting {label} to {exported}")
        t0 = time.perf_counter()
        export_pipeline(ckpt, exported, components=["text_encoder", "unet", "vae_decoder"], force=True)
        log(f"export took {time.perf_counter() - t0:.0f} s")
    return ckpt, exported, label


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- workers: one subprocess per side, driven over stdin/stdout (one JSON object per line) -----------

def _sdrt_worker(spec: dict):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(spec["exported"], scheduler=spec["scheduler"])
    for engine in (pipe.text_encoder, pipe.unet, pipe.vae_decoder):
        engine.load()
    load_seconds = time.perf_counter() - t0

    def run() -> tuple[dict, np.ndarray]:
        t0 = time.perf_counter()
        out = pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                   guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"],
                   seed=spec["seed"], output_type="np")
        end_to_end = time.perf_counter() - t0
        t = out.timings
        return {"text_encoder": t["text_encoder"], "unet": t["unet"], "unet_calls": t["unet_evaluations"],
                "vae_decoder": t["vae_decoder"], "end_to_end": end_to_end}, out.images

    import onnxruntime

    info = {"load_seconds": load_seconds, "engine": f"onnxruntime {onnxruntime.__version__} "
            f"({pipe.unet.providers[0]}, default threads)", "torch_imported": "torch" in sys.modules}
    return run, info


def _diffusers_worker(spec: dict):
    import torch
    import diffusers

    t0 = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(spec["checkpoint"], safety_checker=None,
                                                             torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if spec["scheduler"]:
        cls_name, overrides = DIFFUSERS_SCHEDULERS[spec["scheduler"]]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    load_seconds = time.perf_counter() - t0
    seconds, calls = {}, {}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
                calls[key] = calls.get(key, 0) + 1
        return wrapper

    pipe.text_encoder.forward = timed(pipe.text_encoder.forward, "text_encoder")
    pipe.unet.forward = timed(pipe.unet.forward, "unet")
    pipe.vae.decode = timed(pipe.vae.decode, "vae_decoder")

    def run() -> tuple[dict, np.ndarray]:
        seconds.clear()
        calls.clear()
        generator = torch.Generator("cpu").manual_seed(spec["seed"])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                       guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"],
                       generator=generator, output_type="np")
        end_to_end = time.perf_counter() - t0
        return {**seconds, "unet_calls": calls["unet"], "end_to_end": end_to_end}, out.images

    info = {"load_seconds": load_seconds,
            "engine": f"torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}"}
    return run, info


def worker(side: str, spec: dict) -> None:
    """Load one side, then answer `run PATH` (generate, save the image to PATH) until `quit`."""
    protocol = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not mix with the protocol
    run, info = (_sdrt_worker if side == "sdrt" else _diffusers_worker)(spec)

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    reply({"ready": True, **info})
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "run":
            timing, images = run()
            np.save(arg, images.astype(np.float32))
            reply(timing)
        else:
            break
    reply({"peak_rss_mib": rb.peak_rss_mb(),
           "torch_imported": "torch" in sys.modules})


class Worker:
    def __init__(self, side: str, spec: dict):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"compare: the {self.side} worker died (exit {self.proc.wait()}); see its messages above")
        return json.loads(line)

    def close(self) -> dict:
        final = self.ask("quit")
        self.proc.wait(timeout=120)
        return final


# -- the comparison -------------------------------------------------------------------------------

def stage_seconds(timing: dict) -> dict:
    unet_step = timing["unet"] / timing["unet_calls"]
    other = timing["end_to_end"] - timing["text_encoder"] - timing["unet"] - timing["vae_decoder"]
    return {"text_encoder": timing["text_encoder"], "unet_step": unet_step, "vae_decoder": timing["vae_decoder"],
            "other": other, "end_to_end": timing["end_to_end"]}


def image_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """max |a - b| and PSNR (dB) on images in [0, 1]."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    return {"max_abs": float(np.abs(diff).max()), "mean_abs": float(np.abs(diff).mean()),
            "psnr_db": float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)}


def compare(args) -> dict:
    ckpt, exported, label = prepare(args)
    width, height = args.size
    spec = {"checkpoint": str(ckpt), "exported": str(exported), "prompt": PROMPT,
            "negative": NEGATIVE if args.guidance > 1 else None, "steps": args.steps, "guidance": args.guidance,
            "width": width, "height": height, "seed": args.seed, "scheduler": args.scheduler}
    machine = rb.machine_info(extra_libraries=("torch", "diffusers", "transformers"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log(f"loading both sides ({label}, {width}x{height}, {args.steps} steps, guidance {args.guidance})")
    workers = {side: Worker(side, spec) for side in SIDES}  # load concurrently: it is not measured
    info = {side: w.ask() for side, w in workers.items()}
    runs: dict[str, list] = {side: [] for side in SIDES}
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.warmup + args.runs):
            for side in SIDES:  # alternate: A B A B
                path = Path(tmp) / f"{side}.npy"
                timing = workers[side].ask(f"run {path}")
                images[side] = np.load(path)
                kind = "warm-up" if r < args.warmup else f"run {r - args.warmup + 1}/{args.runs}"
                log(f"{side:9s} {kind}: end to end {timing['end_to_end']:.2f} s, "
                    f"UNet {timing['unet'] / timing['unet_calls']:.2f} s/step x {timing['unet_calls']}")
                if r >= args.warmup:
                    runs[side].append(stage_seconds(timing) | {"unet_calls": timing["unet_calls"]})
    final = {side: w.close() for side, w in workers.items()}
    sides = {}
    for side in SIDES:
        sides[side] = {
            "stages": {s: rb.summarize([run[s] for run in runs[side]]) for s in STAGES},
            "unet_calls_per_image": runs[side][0]["unet_calls"],
            "load_seconds": info[side]["load_seconds"],
            "engine": info[side]["engine"],
            "peak_rss_mib": final[side]["peak_rss_mib"],
            "torch_imported": final[side]["torch_imported"],
        }
    ratios = {s: sides["sdrt"]["stages"][s]["median"] / sides["diffusers"]["stages"][s]["median"]
              for s in STAGES if s != "other"}
    ratios["peak_rss"] = sides["sdrt"]["peak_rss_mib"] / sides["diffusers"]["peak_rss_mib"]
    return {
        "kind": "sdrt-compare",
        "date": started,
        "model": label,
        "random_weights": label.startswith(("sd15-arch", "tiny-")),
        "checkpoint": str(ckpt),
        "exported": str(exported),
        "settings": {**{k: spec[k] for k in ("steps", "guidance", "width", "height", "seed", "prompt", "negative")},
                     "scheduler": args.scheduler or "the checkpoint's", "cfg": args.guidance > 1, "batch": 1,
                     "runs": args.runs, "warmup": args.warmup, "order": "alternating, sdrt then diffusers each round"},
        "machine": machine,
        "load_average_1m_after": os.getloadavg()[0],
        "sides": sides,
        "ratios_sdrt_over_diffusers": ratios,
        "image_difference": image_difference(images["sdrt"], images["diffusers"]),
        "notes": NOTES,
    }


NOTES = [
    "Random weights give honest speed figures: latency depends on the architecture, shapes and dtype, "
    "not on weight values (no data-dependent control flow in these networks).",
    "Ratios are sdrt / diffusers medians measured in the same run, alternating sides; below 1 means sdrt is faster.",
    "Each side runs in its own subprocess: peak RSS is per side (the sdrt side never imports torch).",
    "sdrt encodes the prompt and the negative prompt in one text-encoder batch; diffusers makes two calls "
    "(its text-encoder time is the sum of both).",
    "'other' is end to end minus the timed stages: tokenizer, scheduler, guidance, noise, image conversion.",
]


def to_markdown(result: dict) -> str:
    s, sides, ratios = result["settings"], result["sides"], result["ratios_sdrt_over_diffusers"]
    d = result["image_difference"]
    labels = {"text_encoder": "text encoder", "unet_step": "UNet, per step", "vae_decoder": "VAE decode",
              "other": "other (scheduler, CFG, tokenizer, conversion)", "end_to_end": "end to end"}
    lines = [
        f"# sdrt vs diffusers: {result['model']}",
        "",
        f"{result['date']} on {rb.machine_line(result['machine'])}.",
        "",
        f"{s['width']}x{s['height']}, {s['steps']} steps ({sides['sdrt']['unet_calls_per_image']} UNet evaluations) with "
        f"{s['scheduler']} scheduler, guidance {s['guidance']} ({'CFG on' if s['cfg'] else 'no CFG'}), batch 1, seed "
        f"{s['seed']}; {s['runs']} measured run(s) per side after {s['warmup']} warm-up, {s['order']}.",
        f"sdrt: {sides['sdrt']['engine']}. diffusers: {sides['diffusers']['engine']}.",
        "",
        "| stage | sdrt median s | diffusers median s | sdrt / diffusers |",
        "|---|---:|---:|---:|",
    ]
    for name, label in labels.items():
        a, b = sides["sdrt"]["stages"][name]["median"], sides["diffusers"]["stages"][name]["median"]
        ratio = f"{ratios[name]:.3g}" if name in ratios else "-"
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio} |")
    lines.append(f"| peak RSS (MiB) | {sides['sdrt']['peak_rss_mib']:,.0f} | {sides['diffusers']['peak_rss_mib']:,.0f} "
                 f"| {ratios['peak_rss']:.3g} |")
    lines += [
        "",
        f"p10-p90 end to end: sdrt {sides['sdrt']['stages']['end_to_end']['p10']:.2f}-"
        f"{sides['sdrt']['stages']['end_to_end']['p90']:.2f} s, diffusers "
        f"{sides['diffusers']['stages']['end_to_end']['p10']:.2f}-{sides['diffusers']['stages']['end_to_end']['p90']:.2f} s. "
        f"Load: sdrt {sides['sdrt']['load_seconds']:.1f} s, diffusers {sides['diffusers']['load_seconds']:.1f} s "
        "(loaded concurrently, not a cold-start figure).",
        "",
        "End-to-end ratio per round (sdrt / diffusers, the pair measured back to back): "
        + ", ".join(f"{a / b:.3g}" for a, b in zip(sides["sdrt"]["stages"]["end_to_end"]["values"],
                                                   sides["diffusers"]["stages"]["end_to_end"]["values"])) + ".",
        "",
        f"Image difference (same seed, [0, 1] scale): max |sdrt - diffusers| = {d['max_abs']:.2e}, "
        f"mean {d['mean_abs']:.2e}, PSNR {d['psnr_db']:.1f} dB.",
        "",
        f"Load average (1 min): {result['machine']['load_average_1m']:.2f} at start, {result['load_average_1m_after']:.2f} "
        f"after, on {result['machine']['cpu_cores']} cores.",
        "",
        *[f"- {n}" for n in result["notes"]],
        "",
    ]
    return "\n".join(lines)


def chart(result: dict) -> dict:
    rows = []
    for side in SIDES:
        st, n = result["sides"][side]["stages"], result["sides"][side]["unet_calls_per_image"]
        rows.append({"label": side, "end_to_end": st["end_to_end"], "stages": {
            "text encoder": st["text_encoder"]["median"], "UNet": st["unet_step"]["median"] * n,
            "VAE decode": st["vae_decoder"]["median"], "other": max(0.0, st["other"]["median"])}})
    s = result["settings"]
    title = (f"sdrt vs diffusers: {result['model']}, {s['width']}x{s['height']}, {s['steps']} steps, "
             f"{'CFG' if s['cfg'] else 'no CFG'}, CPU ({result['machine']['cpu_cores']} cores)")
    return {"title": title, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a diffusers checkpoint folder (with --exported)")
    src.add_argument("--tiny", choices=("sd1", "sd2"), help="build and export the tiny test fixture")
    src.add_argument("--sd15", action="store_true", help="SD1.5's architecture with random weights")
    p.add_argument("--exported", help="the `sdrt export` folder of --checkpoint")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the model's size)")
    p.add_argument("--guidance", type=float, default=7.5, help="<= 1: no CFG")
    p.add_argument("--scheduler", choices=sorted(DIFFUSERS_SCHEDULERS), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"built/exported models (default {DEFAULT_CACHE})")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--plot", action="store_true", help="also write a PNG chart")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.spec))
        return 0
    if not (args.checkpoint or args.tiny or args.sd15):
        p.error("give --checkpoint DIR --exported DIR, --tiny sd1|sd2 or --sd15")
    if args.runs < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--runs and --steps must be >= 1, --warmup >= 0")
    if args.size is None:
        args.size = (512, 512) if args.sd15 else (64, 64)
    result = compare(args)
    markdown = to_markdown(result)
    print(markdown)
    stem = rb.result_stem("compare", result["machine"], "cpu", f"{result['model']}-{args.size[0]}x{args.size[1]}-{args.steps}steps")
    for path in rb.write_results(result, args.out, stem, markdown, chart(result) if args.plot else None):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
