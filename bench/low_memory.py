"""Peak memory of sdrt's low-memory mode and tiled VAE against diffusers, one fresh process per side.

    flock /tmp/sdrt-heavy.lock python bench/low_memory.py --sd15 --steps 20
    flock /tmp/sdrt-heavy.lock python bench/low_memory.py --sd15 --steps 20 --onnx FUSED --int8 FUSED_INT8
    python bench/low_memory.py --tiny sd1 --steps 5        # seconds; checks the script

Sides (each its own subprocess, run one after the other so that they never share the machine's
memory): diffusers on torch (fp32), sdrt normal, sdrt --low-memory, sdrt --low-memory with tiled VAE,
and with --int8 DIR, --low-memory on that int8 folder, whole and tiled decode. The sdrt fp32 sides run
the plain export, or the folder --onnx names (e.g. `sdrt optimize --optimize cpu`'s, whose fused
attention never materializes the score maps).
Each makes one image from process start (prompt + negative, CFG, the same seed) and reports its
peak RSS (Linux VmHWM: the process's whole life, loading included), the peak when the last denoising
step ends (so whether the UNet stage or the VAE decode sets the peak), the time from process start
to the image (cold start) and the pipeline call alone (end to end). The images are compared:
low-memory must equal normal exactly; tiled vs whole decode is reported as PSNR.

Peak RSS does not depend on the number of steps beyond the first (every step runs the same
shapes), so a run with few steps gives the same memory figures as one with 20.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import DEFAULT_CACHE, NEGATIVE, PROMPT, RESULTS, image_difference, log, prepare  # noqa: E402
from sdrt.runtime import bench as rb  # noqa: E402
from sdrt.runtime.cli import _size  # noqa: E402

SIDES = {
    "diffusers": {},
    "sdrt": {},
    "sdrt-low-memory": {"low_memory": True},
    "sdrt-low-memory-tiled": {"low_memory": True, "tiled": True},
}
# With --int8 DIR (an `sdrt quantize` copy of the same export): low-memory mode on the int8 UNet/text encoder.
INT8_SIDES = {"sdrt-low-memory-int8": {"low_memory": True, "int8": True},
              "sdrt-low-memory-int8-tiled": {"low_memory": True, "int8": True, "tiled": True}}


def worker(side: str, spec: dict, started: float) -> dict:
    """Load one side and make one image; `started` is the parent's clock when it spawned this process."""
    t_import = time.time()
    denoised = {}

    def record_peak():  # at each denoising step: the peak so far, kept from the last one
        denoised["peak_rss_mib"] = rb.peak_rss_mb()

    if side == "diffusers":
        import diffusers
        import torch

        t0 = time.time()
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(spec["checkpoint"], safety_checker=None,
                                                                 torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.time()
        with torch.inference_mode():
            image = pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                         guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"],
                         generator=torch.Generator("cpu").manual_seed(spec["seed"]), output_type="np",
                         callback_on_step_end=lambda p, i, t, tensors: record_peak() or tensors).images
        engine = f"torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}"
    else:
        import onnxruntime

        from sdrt.runtime.pipeline import StableDiffusionPipeline
        from sdrt.runtime.tiling import Tiling

        options = {**SIDES, **INT8_SIDES}[side]
        tiling = Tiling(spec["tile_size"], spec["tile_overlap"]) if options.get("tiled") else None
        t0 = time.time()
        folder = spec["int8"] if options.get("int8") else spec["exported"]
        pipe = StableDiffusionPipeline.from_pretrained(folder, low_memory=options.get("low_memory", False),
                                                       vae_tiling=tiling)
        if not pipe.low_memory:  # the normal mode loads every engine up front; low-memory mode loads per stage
            for engine in (pipe.text_encoder, pipe.unet, pipe.vae_decoder):
                engine.load()
        loaded = time.time()
        out = pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                   guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"], seed=spec["seed"],
                   output_type="np", callback=lambda i, t, latents: record_peak())
        image = out.images
        engine = f"onnxruntime {onnxruntime.__version__} (CPU provider, default threads)"
    done = time.time()
    np.save(spec["image_path"], image.astype(np.float32))
    return {"peak_rss_mib": rb.peak_rss_mb(), "peak_rss_denoised_mib": denoised.get("peak_rss_mib"),
            "folder": spec["int8"] if side != "diffusers" and options.get("int8") else
            spec["exported"] if side != "diffusers" else spec["checkpoint"], "cold_start_s": done - started, "interpreter_s": t_import - started,
            "import_s": t0 - t_import, "load_s": loaded - t0, "end_to_end_s": done - loaded, "engine": engine,
            "torch_imported": "torch" in sys.modules}


def run_side(side: str, spec: dict, tmp: Path) -> tuple[dict, np.ndarray]:
    spec = {**spec, "image_path": str(tmp / f"{side}.npy")}
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--spec", json.dumps(spec),
                           "--started", repr(started)], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"low_memory: the {side} worker failed (exit {proc.returncode}); see its messages above")
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(spec["image_path"])


def measure(args) -> dict:
    ckpt, exported, label = prepare(args)
    if args.onnx:
        exported, label = args.onnx, f"{label}-{args.onnx.name}"
    width, height = args.size
    spec = {"checkpoint": str(ckpt), "exported": str(exported), "prompt": PROMPT, "negative": NEGATIVE,
            "steps": args.steps, "guidance": args.guidance, "width": width, "height": height, "seed": args.seed,
            "tile_size": args.tile_size, "tile_overlap": args.tile_overlap,
            "int8": str(args.int8) if args.int8 else None}
    sides_run = {**SIDES, **(INT8_SIDES if args.int8 else {})}
    machine = rb.machine_info(extra_libraries=("torch", "diffusers", "transformers"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sides, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides_run:
            log(f"{side}: {label}, {width}x{height}, {args.steps} steps, guidance {args.guidance}")
            sides[side], images[side] = run_side(side, spec, Path(tmp))
            log(f"{side}: peak RSS {sides[side]['peak_rss_mib']:,.0f} MiB, cold start "
                f"{sides[side]['cold_start_s']:.1f} s, end to end {sides[side]['end_to_end_s']:.1f} s")
    reference = sides["diffusers"]
    ratios = {side: {"peak_rss": s["peak_rss_mib"] / reference["peak_rss_mib"],
                     "end_to_end": s["end_to_end_s"] / reference["end_to_end_s"],
                     "cold_start": s["cold_start_s"] / reference["cold_start_s"]}
              for side, s in sides.items() if side != "diffusers"}
    return {
        "kind": "sdrt-low-memory",
        "date": started,
        "model": label,
        "random_weights": label.startswith(("sd15-arch", "tiny-")),
        "settings": {**{k: spec[k] for k in ("steps", "guidance", "width", "height", "seed", "prompt", "negative",
                                             "tile_size", "tile_overlap")},
                     "cfg": args.guidance > 1, "batch": 1, "scheduler": "the checkpoint's",
                     "order": "one fresh process per side, one after the other: " + ", ".join(sides_run)},
        "machine": machine,
        "load_average_1m_after": os.getloadavg()[0],
        "sides": sides,
        "ratios_over_diffusers": ratios,
        "image_differences": {
            "sdrt_low_memory_vs_sdrt": image_difference(images["sdrt-low-memory"], images["sdrt"]),
            "sdrt_tiled_vs_whole_decode": image_difference(images["sdrt-low-memory-tiled"], images["sdrt-low-memory"]),
            "sdrt_vs_diffusers": image_difference(images["sdrt"], images["diffusers"]),
            **({"sdrt_int8_vs_fp32": image_difference(images["sdrt-low-memory-int8"], images["sdrt-low-memory"]),
                "sdrt_int8_tiled_vs_whole_decode": image_difference(images["sdrt-low-memory-int8-tiled"],
                                                                    images["sdrt-low-memory-int8"])}
               if args.int8 else {}),
        },
    }


LABELS = {"diffusers": "diffusers (torch, fp32)", "sdrt": "sdrt normal", "sdrt-low-memory": "sdrt --low-memory",
          "sdrt-low-memory-tiled": "sdrt --low-memory, tiled VAE",
          "sdrt-low-memory-int8": "sdrt --low-memory, int8 UNet + text encoder (sdrt quantize)",
          "sdrt-low-memory-int8-tiled": "sdrt --low-memory, int8, tiled VAE"}


def to_markdown(result: dict) -> str:
    s, sides, ratios, d = result["settings"], result["sides"], result["ratios_over_diffusers"], result["image_differences"]
    lines = [
        f"# sdrt low-memory mode vs diffusers: {result['model']}",
        "",
        f"{result['date']} on {rb.machine_line(result['machine'])}.",
        "",
        f"{s['width']}x{s['height']}, {s['steps']} steps, guidance {s['guidance']} (CFG), batch 1, seed {s['seed']}; "
        f"tiled VAE: {s['tile_size']} px tiles, {s['tile_overlap']} px overlap. {s['order']}. One image per process: "
        "peak RSS is VmHWM over the whole process (loading included); cold start is process start to image.",
        "",
        "Folders: " + "; ".join(f"{side}: `{sides[side]['folder']}`" for side in sides) + ".",
        "",
        "| side | peak RSS (MiB) | / diffusers | peak at the last step (MiB) | cold start s | load s | end to end s "
        "| e2e / diffusers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, label in LABELS.items():
        if side not in sides:
            continue
        r = ratios.get(side, {"peak_rss": 1.0, "end_to_end": 1.0})
        denoised = sides[side].get("peak_rss_denoised_mib")
        lines.append(f"| {label} | {sides[side]['peak_rss_mib']:,.0f} | {r['peak_rss']:.2f} | "
                     f"{'-' if denoised is None else f'{denoised:,.0f}'} | {sides[side]['cold_start_s']:.1f} | {sides[side]['load_s']:.1f} | "
                     f"{sides[side]['end_to_end_s']:.1f} | {r['end_to_end']:.2f} |")
    lines += [
        "",
        f"Images (same seed, [0, 1] scale): low-memory vs normal max |diff| = "
        f"{d['sdrt_low_memory_vs_sdrt']['max_abs']:.2e}; tiled vs whole decode max |diff| = "
        f"{d['sdrt_tiled_vs_whole_decode']['max_abs']:.2e}, PSNR {d['sdrt_tiled_vs_whole_decode']['psnr_db']:.1f} dB; "
        f"sdrt vs diffusers max |diff| = {d['sdrt_vs_diffusers']['max_abs']:.2e}, "
        f"PSNR {d['sdrt_vs_diffusers']['psnr_db']:.1f} dB." + (
            f" int8 vs fp32 (both low-memory): max |diff| = {d['sdrt_int8_vs_fp32']['max_abs']:.2e}, "
            f"PSNR {d['sdrt_int8_vs_fp32']['psnr_db']:.1f} dB; int8 tiled vs whole decode PSNR "
            f"{d['sdrt_int8_tiled_vs_whole_decode']['psnr_db']:.1f} dB." if "sdrt_int8_vs_fp32" in d else ""),
        "",
        f"Load average (1 min): {result['machine']['load_average_1m']:.2f} at start, "
        f"{result['load_average_1m_after']:.2f} after, on {result['machine']['cpu_cores']} cores.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tiny", choices=("sd1", "sd2"), help="the tiny test fixture (checks the script)")
    src.add_argument("--sd15", action="store_true", help="SD1.5's architecture with random weights")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 512x512 for --sd15)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=256, help="tiled side: tile size in px (default 256)")
    p.add_argument("--tile-overlap", type=int, default=64, help="tiled side: overlap in px (default 64)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--onnx", type=Path, default=None,
                   help="the folder for the sdrt fp32 sides (default: the plain export in the cache), e.g. its "
                        "`sdrt optimize --optimize cpu` copy")
    p.add_argument("--int8", type=Path, default=None,
                   help="also run low-memory mode on this int8 folder (`sdrt quantize` of the same export)")
    p.add_argument("--worker", choices=tuple(SIDES) + tuple(INT8_SIDES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        protocol = sys.stdout
        sys.stdout = sys.stderr  # libraries' prints must not mix with the answer
        protocol.write(json.dumps(worker(args.worker, json.loads(args.spec), args.started)) + "\n")
        return 0
    if not (args.tiny or args.sd15):
        p.error("give --sd15 or --tiny sd1|sd2")
    args.checkpoint = args.exported = None
    if args.size is None:
        args.size = (512, 512) if args.sd15 else (64, 64)
    result = measure(args)
    markdown = to_markdown(result)
    print(markdown)
    stem = rb.result_stem("low-memory", result["machine"], "cpu",
                          f"{result['model']}-{args.size[0]}x{args.size[1]}-{args.steps}steps")
    for path in rb.write_results(result, args.out, stem, markdown):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
