"""int8 quantization on the CPU: image difference, prompt adherence and speed against fp32 and torch.

    python bench/quantize.py demo [--n 16] [--steps 20] [--guidance 3]
    flock /tmp/sdrt-heavy.lock python bench/quantize.py sd15 --onnx DIR --checkpoint DIR [--int8 MODE=DIR ...]

demo: the bundled trained model (models/shapes-demo-onnx, diffusers weights in models/shapes-demo),
since random weights say little about quantization error. Each mode of `sdrt quantize` is made
from the fp32 folder (calibrated at the same guidance), then the same prompts and seeds run through
fp32 and every int8 folder: PSNR of each int8 image against its fp32 image, adherence
(bench.adherence.score) of each, end-to-end seconds, and the UNet's CFG call (batch 2) timed in
torch (diffusers' UNet2DConditionModel), onnxruntime fp32 and onnxruntime int8, alternating.

sd15: the SD1.5 architecture (random weights; export with bench/export_sd15.py): one CFG UNet call
at 512x512 (batch 2, 64x64 latents, 77 tokens; about 1.6 TFLOP) on a feed recorded from a real
pipeline step, in torch fp32, onnxruntime fp32 and onnxruntime int8 (each --int8 folder made by
`sdrt quantize`), alternating in one process; medians, ratios against torch, and each int8 UNet
output's relative RMS error against fp32 on that feed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402
from bench.adherence import score  # noqa: E402
from sdrt.runtime import bench as rb  # noqa: E402

MODES = ("dynamic", "static", "qdq")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [0, 1] images (N, H, W, C)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-20))


def torch_unet(checkpoint: Path):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet", torch_dtype=torch.float32).eval()

    def run(feed):
        with torch.inference_mode():
            return unet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                        torch.from_numpy(feed["encoder_hidden_states"])).sample.numpy()
    return run


def ort_unet(folder: Path):
    from sdrt.engines.onnxruntime import OrtEngine

    engine = OrtEngine(folder / "unet" / "model.onnx")
    engine.load()
    return lambda feed: engine.run(feed)["out_sample"]


def time_alternating(runners: dict, feed: dict, calls: int) -> tuple[dict, dict]:
    """One warm-up call each, then `calls` rounds of one call each; seconds per call and each last output."""
    seconds = {name: [] for name in runners}
    outputs = {}
    for name, run in runners.items():
        log(f"warm-up: {name}")
        outputs[name] = run(feed)
    for r in range(calls):
        for name, run in runners.items():
            t0 = time.perf_counter()
            outputs[name] = run(feed)
            seconds[name].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{calls}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()))
    return seconds, outputs


def unet_rows(seconds: dict, outputs: dict) -> list[dict]:
    torch_s = statistics.median(seconds["torch fp32"]) if "torch fp32" in seconds else None
    fp32_s = statistics.median(seconds["onnxruntime fp32"])
    ref = outputs["onnxruntime fp32"]
    rows = []
    for name, values in seconds.items():
        med = statistics.median(values)
        out = outputs[name]
        rows.append({"runtime": name, "median_s": med, "min_s": min(values), "calls": len(values),
                     "speedup_vs_torch": torch_s / med if torch_s else None, "speedup_vs_ort_fp32": fp32_s / med,
                     "rel_rms_vs_ort_fp32": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))})
    return rows


def unet_table(rows: list[dict]) -> list[str]:
    lines = ["| UNet (CFG call, batch 2) | median s | min s | speed-up vs torch fp32 | vs onnxruntime fp32 "
             "| rel. RMS error vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_torch = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        lines.append(f"| {r['runtime']} | {r['median_s']:.4g} | {r['min_s']:.4g} | {vs_torch} | "
                     f"{r['speedup_vs_ort_fp32']:.2f}x | {r['rel_rms_vs_ort_fp32']:.2g} |")
    return lines


def demo(args) -> dict:
    from sdrt.export.calibration import record_feeds
    from sdrt.export.quantize import quantize_folder
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    fp32 = Path(args.onnx)
    prompts = shapes.prompts(seed=2024, n=args.n)
    seeds = list(range(1000, 1000 + args.n))
    work = Path(tempfile.mkdtemp(prefix="sdrt-bench-quantize-"))
    folders, quantize_s = {"fp32": fp32}, {}
    for mode in args.modes:
        t0 = time.perf_counter()
        folders[mode] = quantize_folder(fp32, work / mode, mode=mode, guidance_scale=args.guidance, log=log)
        quantize_s[mode] = time.perf_counter() - t0
    images, seconds, adherence = {}, {}, {}
    for key, folder in folders.items():
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        t0 = time.perf_counter()
        images[key] = np.concatenate([pipe(p, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=s,
                                           output_type="np").images for p, s in zip(prompts, seeds)])
        seconds[key] = time.perf_counter() - t0
        adherence[key] = score((images[key] * 255).round().astype(np.uint8), prompts)
        log(f"{key}: {seconds[key]:.1f} s, adherence {adherence[key]['all']:.3f}")
    modes = {}
    for key in folders:
        manifest = json.loads((folders[key] / "sdrt.json").read_text())
        p = psnr(images[key], images["fp32"]) if key != "fp32" else None
        modes[key] = {
            "generate_seconds": round(seconds[key], 2), "adherence": adherence[key],
            "quantize_seconds": round(quantize_s[key], 1) if key in quantize_s else None,
            "validation_rel_rms": {n: r["checks"][0]["max_rel_rms"]
                                   for n, r in manifest.get("validation_quantize", {}).items()},
            "psnr_db": None if p is None else {"median": float(np.median(p)), "mean": float(np.mean(p)),
                                               "min": float(np.min(p)), "p25": float(np.percentile(p, 25)),
                                               "above_30db": float(np.mean(p > 30)), "per_image": np.round(p, 2).tolist()},
        }
    feed = record_feeds(fp32, prompts[:1], components=("unet",), steps=1, guidance_scale=args.guidance)["unet"][0]
    runners = {"torch fp32": torch_unet(Path(args.checkpoint)), "onnxruntime fp32": ort_unet(fp32)}
    runners.update({f"onnxruntime int8 {m}": ort_unet(folders[m]) for m in args.modes})
    unet_seconds, outputs = time_alternating(runners, feed, args.calls)
    return {"what": "int8 quantization of the bundled demo model: images, adherence and speed vs fp32 and torch",
            "model": str(fp32.relative_to(ROOT)) if fp32.is_relative_to(ROOT) else str(fp32),
            "settings": {"n": args.n, "steps": args.steps, "guidance": args.guidance, "prompts": "bench.shapes.prompts"
                         "(seed=2024)", "seeds": "1000..", "calibration": "4 built-in prompts x 4 steps (default)"},
            "modes": modes, "unet": unet_rows(unet_seconds, outputs), "unet_feed_shapes":
                {k: list(v.shape) for k, v in feed.items()}}


def demo_markdown(result: dict) -> list[str]:
    s = result["settings"]
    lines = [f"Model {result['model']} (trained; 32x32 images, 8x8 latents). {s['n']} prompts from {s['prompts']}, "
             f"seeds {s['seeds']}, {s['steps']} steps, guidance {s['guidance']}; int8 calibrated with {s['calibration']}.",
             "", "| precision | PSNR vs fp32 median dB | mean | p25 | min | images > 30 dB | adherence (all) | "
             "adherence (objects) | UNet / text encoder rel. RMS (validation) | generate s | quantize s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for key, m in result["modes"].items():
        p = m["psnr_db"]
        cells = ["-"] * 5 if p is None else [f"{p['median']:.1f}", f"{p['mean']:.1f}", f"{p['p25']:.1f}", f"{p['min']:.1f}",
                                             f"{p['above_30db']:.0%}"]
        val = " / ".join(f"{v:.3f}" for v in m["validation_rel_rms"].values()) or "-"
        lines.append(f"| {key} | {' | '.join(cells)} | {m['adherence']['all']:.3f} | {m['adherence']['objects']:.3f} | "
                     f"{val} | {m['generate_seconds']:.1f} | {m['quantize_seconds'] or '-'} |")
    lines += ["", f"UNet CFG call on the demo model (feed {result['unet_feed_shapes']}), alternating, "
              f"median of {result['unet'][0]['calls']} calls:", ""] + unet_table(result["unet"])
    return lines


def sd15(args) -> dict:
    from sdrt.export.calibration import record_feeds

    fp32 = Path(args.onnx)
    int8 = dict(item.split("=", 1) for item in args.int8)
    feed = record_feeds(fp32, ["a photograph of an astronaut riding a horse"], components=("unet",), steps=1,
                        guidance_scale=7.5)["unet"][0]
    runners = {"onnxruntime fp32": ort_unet(fp32)}
    runners.update({f"onnxruntime int8 {m}": ort_unet(Path(d)) for m, d in int8.items()})
    if args.checkpoint:
        runners = {"torch fp32": torch_unet(Path(args.checkpoint)), **runners}
    seconds, outputs = time_alternating(runners, feed, args.calls)
    quantization = {m: json.loads((Path(d) / "sdrt.json").read_text()).get("quantization", {}) for m, d in int8.items()}
    return {"what": "SD1.5 architecture (random weights): one CFG UNet call at 512x512, torch fp32 vs onnxruntime "
                    "fp32 vs int8", "feed_shapes": {k: list(v.shape) for k, v in feed.items()},
            "unet": unet_rows(seconds, outputs), "int8_folders": {m: {"mode": q.get("mode"),
            "calibration_samples": (q.get("calibration") or {}).get("samples")} for m, q in quantization.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--n", type=int, default=16)
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--guidance", type=float, default=3.0)
    d.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    d.add_argument("--calls", type=int, default=20, help="UNet calls per runtime")
    d.add_argument("--onnx", default=str(ROOT / "models" / "shapes-demo-onnx"))
    d.add_argument("--checkpoint", default=str(ROOT / "models" / "shapes-demo"))
    s = sub.add_parser("sd15")
    s.add_argument("--onnx", required=True, help="the fp32 SD1.5-architecture export")
    s.add_argument("--checkpoint", default=None, help="its diffusers folder (for the torch column)")
    s.add_argument("--int8", nargs="*", default=[], metavar="MODE=DIR", help="int8 folders made by sdrt quantize")
    s.add_argument("--calls", type=int, default=3)
    for p in (d, s):
        p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    machine = rb.machine_info(extra_libraries=("torch", "diffusers"))
    result = demo(args) if args.part == "demo" else sd15(args)
    result["machine"] = machine
    result["notes"] = [
        "Same process, runtimes alternating call by call; medians. Ratios, not absolute times, carry over: "
        "the machine is shared (load average in the header).",
        f"onnxruntime CPUExecutionProvider, default threads; torch {machine['versions'].get('torch')} with "
        "one thread per usable core.",
    ]
    title = {"demo": "int8 quantization: demo model", "sd15": "int8 quantization: SD1.5 architecture UNet, 512x512"}
    body = demo_markdown(result) if args.part == "demo" else (
        [f"Feed {result['feed_shapes']} recorded from a real pipeline step (CFG); int8 folders "
         f"{result['int8_folders']}.", ""] + unet_table(result["unet"]))
    markdown = "\n".join([f"# {title[args.part]}", "", rb.machine_line(machine), "", *body, "",
                          *[f"- {n}" for n in result["notes"]], ""])
    print(markdown)
    stem = rb.result_stem("quantize", machine, "cpu", args.part)
    for path in rb.write_results(result, args.out, stem, markdown):
        log(str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
