"""sdrt's CUDA path against diffusers fp16 on torch, in one process: SD1.5 architecture, 512x512, 50 steps, CFG 7.5.

    python bench/gpu_sd15.py                                    # on the GPU machine: bench/GPU_RUNBOOK.md
    python bench/gpu_sd15.py --device cpu --tiny --steps 2      # smoke mode, anywhere, in seconds

Prepares, each step cached under --cache so that a re-run skips what is done (`--prepare export` or
`--prepare all` stops there): the random-weight checkpoint (sdrt.export.fixtures), its ONNX export
(text encoder, UNet, VAE decoder: bench/compare.py's `prepare`), and the optimized folder
(sdrt.export.optimize: gpu profile in fp16 on cuda; cpu profile in fp32 in smoke mode).

Then, in one process, one side after the other (each loaded, warmed up, measured, released):
- diffusers: StableDiffusionPipeline in fp16 on cuda, torch's SDPA attention (fp32 on cpu);
- sdrt: StableDiffusionPipeline.from_pretrained(folder, provider="cuda", ...) once per variant:
  iobinding (io_binding), graph (io_binding + cuda_graph), plain (neither).
Same prompt and negative prompt, seed (the same initial noise: sdrt's torch-compatible generator),
size, steps, guidance 7.5 and scheduler (the checkpoint's PNDM), batch 1.

Reported per side: end to end (median, p10, p90 of --runs after --warmup), per stage (text encoder,
UNet per evaluation, VAE decode, the rest), load time, peak GPU memory over the side's life (NVML,
device-wide, minus what was in use before it loaded; torch's own peak for diffusers), then the
speed-up diffusers / sdrt per variant and stage, the goals (50 steps under 0.40 s, >= 2.5x diffusers'
eager fp16), and each sdrt image's difference from diffusers' (fp16 on both sides: a sanity check,
not a parity gate; random weights give noise images).

How stages are timed. sdrt's engines hand back host arrays, so the pipeline's own `timings` are
synchronous: every measured run gives its stages and its end to end. diffusers runs asynchronously
on the GPU: its --runs end-to-end calls are plain, then --stage-runs more calls time its stages with
the text encoder's `forward`, the UNet's `forward` and the VAE's `decode` wrapped in
torch.cuda.synchronize() before and after; those calls' own end to end (which pays for the syncs)
is reported apart, never as diffusers' end to end.

Writes <out>/gpu-<model>-<YYYYmmdd-HHMM>-<machine>-<size>-<steps>steps.json + .md after every side
(a run cut short keeps what it measured), and the same files into --copy-to.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import (DEFAULT_CACHE, NEGATIVE, PROMPT, RESULTS, image_difference, log, prepare,  # noqa: E402
                           stage_seconds)
from sdrt.runtime import bench as rb  # noqa: E402
from sdrt.runtime.cli import _size  # noqa: E402

# sdrt's engine options per variant (create_engine's io_binding / cuda_graph).
VARIANTS = {"graph": {"io_binding": True, "cuda_graph": True}, "iobinding": {"io_binding": True},
            "plain": {"io_binding": False}}  # io_binding is on by default on cuda since the device-resident loop
DEFAULT_VARIANTS = {"cuda": "iobinding,graph,plain", "cpu": "iobinding,plain"}  # the likeliest to work first
PROFILE = {"cuda": ("gpu", "fp16"), "cpu": ("cpu", "fp32")}  # optimize_folder's profile and precision
STAGES = ("text_encoder", "unet_step", "vae_decoder", "other", "end_to_end")
STAGE_LABELS = {"text_encoder": "text encoder (prompt + negative)", "unet_step": "UNet, per evaluation",
                "vae_decoder": "VAE decode", "other": "rest (tokenizer, scheduler, CFG, conversion)",
                "end_to_end": "end to end"}
GOALS = {"end_to_end_under_s": 0.40, "speedup_at_least": 2.5, "steps": 50, "size": [512, 512]}
NOTES = [
    "Random weights give honest speed figures: latency depends on the architecture, shapes and dtype, not on "
    "weight values. The images are noise; their difference is a sanity check of the fp16 graphs, not parity.",
    "Speed-up = diffusers median / sdrt median, measured in the same process, one side after the other.",
    "diffusers' stage figures come from separate runs with torch.cuda.synchronize() around each stage; its end to "
    "end comes from plain runs. sdrt's figures are its pipeline's own timings (synchronous: host arrays).",
    "sdrt encodes the prompt and the negative prompt in one text-encoder batch; diffusers makes two calls "
    "(its text-encoder figure is their sum).",
    "Peak GPU memory: NVML's device-wide use during the side's life minus the use before it loaded (includes "
    "CUDA graphs, cuDNN workspaces, onnxruntime's arena; torch's context stays loaded for every side).",
]


@dataclass
class Run:
    stages: dict  # STAGES -> seconds (only end_to_end for diffusers' plain runs)
    unet_calls: int | None
    image: np.ndarray


# -- preparation (cached) --------------------------------------------------------------------------

def prepare_folders(args) -> tuple[Path, Path | None, str]:
    """(checkpoint, optimized folder, label); the folder is None with --prepare export."""
    spec = SimpleNamespace(checkpoint=None, exported=None, sd15=not args.tiny, tiny="sd1" if args.tiny else None,
                           cache=args.cache)
    ckpt, exported, label = prepare(spec)
    if args.prepare == "export":
        return ckpt, None, label
    profile, precision = PROFILE[args.device]
    optimized = exported.with_name(f"onnx-{profile}-{precision}")
    if not (optimized / "sdrt.json").is_file():
        from sdrt.export.optimize import optimize_folder

        log(f"optimizing {exported} -> {optimized} ({profile} profile, {precision})")
        t0 = time.perf_counter()
        optimize_folder(exported, optimized, profile=profile, precision=precision, force=True, log=log)
        log(f"optimize took {time.perf_counter() - t0:.0f} s")
    return ckpt, optimized, label


# -- the two sides ---------------------------------------------------------------------------------

class DiffusersSide:
    """diffusers' StableDiffusionPipeline on torch: fp16 on cuda, fp32 on cpu."""

    separate_stage_runs = True

    def __init__(self, ckpt: Path, args):
        import diffusers
        import torch

        self.torch, self.args, self.cuda = torch, args, args.device == "cuda"
        dtype = torch.float16 if self.cuda else torch.float32
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(ckpt, dtype=dtype, safety_checker=None)
        self.pipe = self.pipe.to(args.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.sync()
        self.load_seconds = time.perf_counter() - t0
        self.timing, self.seconds, self.calls = False, {}, {}
        self._wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self._wrap(self.pipe.unet, "forward", "unet")
        self._wrap(self.pipe.vae, "decode", "vae_decoder")
        attention = sorted({type(p).__name__ for p in self.pipe.unet.attn_processors.values()})
        self.engine = (f"diffusers {diffusers.__version__}, torch {torch.__version__} ({str(dtype).split('.')[-1]} on "
                       f"{args.device}, attention {', '.join(attention)})")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _wrap(self, module, attr: str, key: str) -> None:
        """Time `module.attr` (synchronized on both sides) while self.timing is on; a plain call otherwise."""
        fn = getattr(module, attr)

        def timed(*a, **k):
            if not self.timing:
                return fn(*a, **k)
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(module, attr, timed)

    def run(self, staged: bool) -> Run:
        a = self.args
        self.timing, self.seconds, self.calls = staged, {}, {}
        generator = self.torch.Generator("cpu").manual_seed(a.seed)
        self.sync()
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            images = self.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=a.steps, guidance_scale=a.guidance,
                               height=a.size[1], width=a.size[0], generator=generator, output_type="np").images
        end_to_end = time.perf_counter() - t0  # output_type="np" ends with a copy to the host: synchronized
        if not staged:
            return Run({"end_to_end": end_to_end}, None, images)
        timing = {**self.seconds, "unet_calls": self.calls["unet"], "end_to_end": end_to_end}
        return Run(stage_seconds(timing), self.calls["unet"], images)

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        return {"torch_max_allocated_mib": round(self.torch.cuda.max_memory_allocated() / 2**20),
                "torch_max_reserved_mib": round(self.torch.cuda.max_memory_reserved() / 2**20)}

    def release(self) -> None:
        del self.pipe
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


class SdrtSide:
    """sdrt's StableDiffusionPipeline over onnxruntime, with one variant's engine options."""

    separate_stage_runs = False

    def __init__(self, folder: Path, args, variant: str):
        import onnxruntime

        from sdrt.runtime.pipeline import StableDiffusionPipeline

        self.args = args
        options = VARIANTS[variant]
        t0 = time.perf_counter()
        self.pipe = StableDiffusionPipeline.from_pretrained(folder, provider=args.device, **options)
        for engine in (self.pipe.text_encoder, self.pipe.unet, self.pipe.vae_decoder):
            engine.load()
        self.load_seconds = time.perf_counter() - t0
        settings = ", ".join(f"{k}={v}" for k, v in options.items()) or "no IO binding, no CUDA graph"
        self.engine = f"sdrt, onnxruntime {onnxruntime.__version__} ({args.device} provider; {settings})"

    def run(self, staged: bool) -> Run:
        a = self.args
        t0 = time.perf_counter()
        out = self.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=a.steps, guidance_scale=a.guidance,
                        height=a.size[1], width=a.size[0], seed=a.seed, output_type="np")
        end_to_end = time.perf_counter() - t0
        t = out.timings
        timing = {"text_encoder": t["text_encoder"], "unet": t["unet"], "unet_calls": t["unet_evaluations"],
                  "vae_decoder": t["vae_decoder"], "end_to_end": end_to_end}
        return Run(stage_seconds(timing), t["unet_evaluations"], out.images)

    def memory(self) -> dict:
        return {"vae_fp32_fallback_runs": getattr(self.pipe.vae_decoder, "fallback_runs", 0)}

    def release(self) -> None:
        self.pipe.release()
        del self.pipe
        gc.collect()


# -- measuring -------------------------------------------------------------------------------------

def measure(name: str, make_side, args) -> tuple[dict, np.ndarray | None]:
    """Load, warm up, measure and release one side; its summary (with "error" when it failed) and last image."""
    log(f"{name}: loading")
    summary: dict = {"error": None}
    image = None
    with rb.DeviceMemoryPeak(args.device) as memory:
        side = None
        try:
            side = make_side()
            summary.update(engine=side.engine, load_seconds=side.load_seconds)
            for i in range(args.warmup):
                log(f"{name}: warm-up {i + 1}/{args.warmup}: {side.run(staged=False).stages['end_to_end']:.3f} s")
            runs = [side.run(staged=not side.separate_stage_runs) for _ in range(args.runs)]
            staged = [side.run(staged=True) for _ in range(args.stage_runs)] if side.separate_stage_runs else runs
            image = runs[-1].image
            summary["end_to_end"] = rb.summarize([r.stages["end_to_end"] for r in runs])
            if staged:
                summary["stages"] = {s: rb.summarize([r.stages[s] for r in staged]) for s in STAGES[:-1]}
                summary["unet_evaluations"] = staged[0].unet_calls
            if side.separate_stage_runs and staged:
                summary["end_to_end_of_stage_runs"] = rb.summarize([r.stages["end_to_end"] for r in staged])
            summary.update(side.memory())
            log(f"{name}: end to end median {summary['end_to_end']['median']:.3f} s over {args.runs} runs")
        except Exception as e:  # a side that fails is recorded, and the other sides still run
            summary["error"] = f"{type(e).__name__}: {e}"
            log(f"{name}: FAILED: {summary['error']}\n{traceback.format_exc()}")
        finally:
            if side is not None:
                side.release()
    if memory.peak_mib is not None:
        summary["device_memory"] = {"peak_mib": memory.peak_mib - memory.baseline_mib,
                                    "baseline_mib": memory.baseline_mib}
    return summary, image


def speedups(sides: dict) -> dict:
    """diffusers median / sdrt median, per sdrt variant and stage (above 1: sdrt is faster)."""
    reference = sides.get("diffusers", {})
    out = {}
    for name, side in sides.items():
        if name == "diffusers" or side.get("error") or reference.get("error") or "end_to_end" not in reference:
            continue
        ratios = {"end_to_end": reference["end_to_end"]["median"] / side["end_to_end"]["median"]}
        for stage in STAGES[:-1]:
            if stage in side.get("stages", {}) and stage in reference.get("stages", {}):
                ratios[stage] = reference["stages"][stage]["median"] / side["stages"][stage]["median"]
        out[name] = ratios
    return out


def goals(result: dict) -> dict:
    """The issue's goals for each sdrt variant, when the settings are the goals' (cuda, 50 steps, 512x512)."""
    s = result["settings"]
    applies = s["device"] == "cuda" and s["steps"] == GOALS["steps"] and [s["width"], s["height"]] == GOALS["size"] \
        and not result["tiny"]
    out = {**GOALS, "applies": applies, "variants": {}}
    for name, ratios in result["speedup_diffusers_over_sdrt"].items():
        median = result["sides"][name]["end_to_end"]["median"]
        out["variants"][name] = {"end_to_end_s": median, "speedup": ratios["end_to_end"],
                                 "met": applies and median < GOALS["end_to_end_under_s"]
                                 and ratios["end_to_end"] >= GOALS["speedup_at_least"]}
    return out


def compare_images(images: dict) -> dict:
    reference = images.get("diffusers")
    out = {}
    for name, image in images.items():
        if name == "diffusers" or image is None or reference is None:
            continue
        finite = bool(np.isfinite(image).all() and np.isfinite(reference).all())
        out[name] = image_difference(image, reference) if finite else {"finite": False}
    return out


# -- the report ------------------------------------------------------------------------------------

def runtime_info(device: str) -> dict:
    """The onnxruntime actually imported (the GPU machine has two) and torch's CUDA facts."""
    import onnxruntime
    import torch

    info = {"onnxruntime": {"version": onnxruntime.__version__, "path": onnxruntime.__file__,
                            "providers": onnxruntime.get_available_providers()},
            "torch": {"version": torch.__version__, "cuda": torch.version.cuda}}
    if device == "cuda":
        info["torch"].update(device=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version())
    return info


def _ms(summary: dict | None) -> str:
    return "-" if summary is None else f"{summary['median'] * 1e3:,.1f}"


def to_markdown(result: dict) -> str:
    s, sides = result["settings"], result["sides"]
    names = list(sides)
    lines = [
        f"# sdrt on {s['device']} vs diffusers: {result['model']}",
        "",
        f"{result['date']} on {rb.machine_line(result['machine'])}.",
        "",
        f"{s['width']}x{s['height']}, {s['steps']} steps with the checkpoint's scheduler, guidance {s['guidance']} "
        f"(CFG), batch 1, seed {s['seed']}; per side {s['warmup']} warm-up, {s['runs']} measured runs (diffusers' "
        f"stages: {s['stage_runs']} more synchronized runs). Folder: {result['folder_optimize']}.",
        "",
        *[f"- {name}: {side.get('engine', '-')}" + (f" **failed: {side['error']}**" if side.get("error") else "")
          for name, side in sides.items()],
        "",
        "| median, ms | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for stage in STAGES:
        cells = [_ms(side.get("end_to_end") if stage == "end_to_end" else side.get("stages", {}).get(stage))
                 for side in sides.values()]
        lines.append(f"| {STAGE_LABELS[stage]} | " + " | ".join(cells) + " |")
    spread = [f"{s['end_to_end']['p10'] * 1e3:,.0f}-{s['end_to_end']['p90'] * 1e3:,.0f}" if "end_to_end" in s else "-"
              for s in sides.values()]
    lines.append("| end to end p10-p90 | " + " | ".join(spread) + " |")
    lines.append("| peak GPU memory, MiB | " + " | ".join(
        f"{side['device_memory']['peak_mib']:,}" if "device_memory" in side else "-" for side in sides.values()) + " |")
    lines.append("| load, s | " + " | ".join(
        f"{side['load_seconds']:.1f}" if "load_seconds" in side else "-" for side in sides.values()) + " |")
    lines += ["", "Speed-up, diffusers / sdrt (above 1: sdrt is faster):", ""]
    for name, ratios in result["speedup_diffusers_over_sdrt"].items():
        lines.append(f"- {name}: " + ", ".join(f"{STAGE_LABELS[k]} {v:.2f}x" for k, v in ratios.items()))
    g = result["goals"]
    lines += ["", f"Goals ({g['steps']} steps at {g['size'][0]}x{g['size'][1]} on cuda: end to end under "
                  f"{g['end_to_end_under_s']} s and >= {g['speedup_at_least']}x diffusers): "
                  + ("not applicable to these settings" if not g["applies"] else
                     "; ".join(f"{n} {v['end_to_end_s']:.3f} s, {v['speedup']:.2f}x: {'met' if v['met'] else 'NOT met'}"
                               for n, v in g["variants"].items()))]
    lines += ["", "Image difference from diffusers ([0, 1] scale): " + ("; ".join(
        f"{n}: " + (f"max {d['max_abs']:.2e}, PSNR {d['psnr_db']:.1f} dB" if "max_abs" in d else "NaN/Inf in an image")
        for n, d in result["image_difference"].items()) or "-") + ".", ""]
    lines += [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def write(result: dict, args, stem: str) -> None:
    markdown = to_markdown(result)
    for folder in [args.out] + ([args.copy_to] if args.copy_to else []):
        for path in rb.write_results(result, folder, stem, markdown):
            log(f"wrote {path}")


# -- main ------------------------------------------------------------------------------------------

def check_cuda() -> None:
    """onnxruntime-gpu's CUDA provider must be there (the GPU machine also has a CPU-only onnxruntime)."""
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit(f"gpu_sd15: onnxruntime {onnxruntime.__version__} at {onnxruntime.__file__} has no "
                         "CUDAExecutionProvider; install onnxruntime-gpu first (tools/gpu/device.sh assemble puts it "
                         "in .gpu/site, which device.sh puts first on PYTHONPATH)")


def run(args) -> int:
    ckpt, folder, label = prepare_folders(args)
    if args.prepare:
        log(f"prepared {folder or ckpt}")
        return 0
    if args.device == "cuda":
        check_cuda()
    manifest = json.loads((folder / "sdrt.json").read_text())
    machine = rb.machine_info(extra_libraries=("torch", "diffusers", "transformers", "onnx"))
    result = {
        "kind": "sdrt-gpu-sd15", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": label, "tiny": args.tiny,
        "random_weights": True, "checkpoint": str(ckpt), "folder": str(folder),
        "folder_optimize": f"{manifest.get('optimize', {}).get('profile', 'no')} profile, {manifest.get('precision')}",
        "settings": {"device": args.device, "steps": args.steps, "guidance": args.guidance, "width": args.size[0],
                     "height": args.size[1], "seed": args.seed, "prompt": PROMPT, "negative": NEGATIVE,
                     "runs": args.runs, "warmup": args.warmup, "stage_runs": args.stage_runs, "batch": 1,
                     "variants": args.variants},
        "machine": machine, "runtime": runtime_info(args.device), "sides": {}, "notes": NOTES,
    }
    kind = "gpu-tiny-sd1" if args.tiny else "gpu-sd15"
    stem = rb.result_stem(kind, machine, args.device, f"{args.size[0]}x{args.size[1]}-{args.steps}steps")
    sides = [] if args.no_diffusers else [("diffusers", lambda: DiffusersSide(ckpt, args))]
    sides += [(f"sdrt-{v}", lambda v=v: SdrtSide(folder, args, v)) for v in args.variants]
    images = {}
    for name, make in sides:
        result["sides"][name], images[name] = measure(name, make, args)
        result["speedup_diffusers_over_sdrt"] = speedups(result["sides"])
        result["goals"] = goals(result)
        result["image_difference"] = compare_images(images)
        result["load_average_1m_after"] = os.getloadavg()[0]
        write(result, args, stem)
    print(to_markdown(result))
    return 1 if any(side.get("error") for side in result["sides"].values()) else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: fp16 on both sides; cpu: the smoke mode's fp32 (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="the tiny test fixture instead of SD1.5's architecture")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 512x512; 64x64 with --tiny)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=5, help="measured end-to-end runs per side")
    p.add_argument("--warmup", type=int, default=2, help="runs before measuring (CUDA graphs are captured then)")
    p.add_argument("--stage-runs", type=int, default=3, help="diffusers' extra synchronized runs for stage figures")
    p.add_argument("--variants", default=None, help=f"sdrt variants, comma-separated, of {', '.join(VARIANTS)} "
                   f"(default: {DEFAULT_VARIANTS['cuda']} on cuda, {DEFAULT_VARIANTS['cpu']} on cpu)")
    p.add_argument("--no-diffusers", action="store_true", help="measure sdrt only (no speed-ups then)")
    p.add_argument("--prepare", choices=("export", "all"), default=None,
                   help="only prepare: the checkpoint and its export, or all (also the optimized folder)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"built models (default {DEFAULT_CACHE})")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--copy-to", type=Path, default=None, help="also write the results here (the GPU machine's $OUT)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in (args.variants or DEFAULT_VARIANTS[args.device]).split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "graph" in args.variants and args.device != "cuda":
        p.error("the graph variant (CUDA graphs) needs --device cuda")
    if min(args.steps, args.runs) < 1 or min(args.warmup, args.stage_runs) < 0:
        p.error("--steps and --runs must be >= 1, --warmup and --stage-runs >= 0")
    if args.size is None:
        args.size = (64, 64) if args.tiny else (512, 512)
    return args


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
