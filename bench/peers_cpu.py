"""CPU engines side by side on one exported folder: sdrt with onnxruntime and with OpenVINO (fp32, static shapes, bf16),
alternating, one fresh process per measurement; CPU-seconds per image, wall time, UNet seconds per step, load time,
peak RSS, and each image's PSNR against onnxruntime fp32's.

    python bench/peers_cpu.py /tmp/sdrt-sd15/onnx --size 256 --steps 10 --rounds 2 [--configs ort-fp32,ov-bf16]

The folder: the SD1.5 architecture with random weights (bench/export_sd15.py --components text_encoder,unet,vae_decoder).
CPU-seconds (user + system of the process while it makes the image) are the figure to compare: these machines are
shared, and wall time moves with the other work on them. Peers with their own environments (OpenVINO's pipeline in
optimum-intel, stable-diffusion.cpp, diffusers) are not run here: optimum-intel pins transformers 4 and
stable-diffusion-cpp-python needs the single-file layout, each in a venv of its own (issue #21).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name -> pipeline options
    "ort-fp32": {"provider": "cpu"},
    "ov-fp32": {"provider": "openvino", "precision": "fp32"},
    "ov-fp32-static": {"provider": "openvino", "precision": "fp32", "fixed_shapes": True},
    "ov-bf16": {"provider": "openvino", "precision": "bf16"},
    # step caching (needs `sdrt deepcache FOLDER` first)
    "ort-fp32-cache3": {"provider": "cpu", "cache_interval": 3},
    "ov-fp32-cache3": {"provider": "openvino", "precision": "fp32", "cache_interval": 3},
}
PROMPT = "a photograph of an astronaut riding a horse"


def cpu_info() -> dict:
    from sdrt.engines.openvino import cpu_flags
    from sdrt.runtime.bench import _cpu_model

    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    return {"model": _cpu_model(), "cores": os.cpu_count(), "flags": {f: f in flags for f in wanted}}


def child(folder: str, options: dict, steps: int, size: int, guidance: float, image_path: str) -> dict:
    """One measurement in this (fresh) process: load, a one-step warm-up, then the measured image."""
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    pipe = StableDiffusionPipeline.from_pretrained(folder, **options)
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", height=size, width=size, guidance_scale=guidance, seed=0,
                  output_type="uint8")
    pipe(num_inference_steps=1, **kwargs)  # loads (compiles) every network, first calls
    load_wall, load_cpu = time.perf_counter() - t0, cpu() - c0
    t1, c1 = time.perf_counter(), cpu()
    out = pipe(num_inference_steps=steps, **kwargs)
    wall, cpu_s = time.perf_counter() - t1, cpu() - c1
    np.save(image_path, out.images[0])
    hwm = next((int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM")), None)
    unet = pipe.unet
    return {"wall_s": wall, "cpu_s": cpu_s, "unet_s_per_step": out.timings["unet"] / steps,
            "load_and_warmup_wall_s": load_wall, "load_and_warmup_cpu_s": load_cpu, "peak_rss_mib": hwm,
            "precision": getattr(unet, "precision", "fp32"), "provider": unet.provider_name}


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


LABELS = {"ort-fp32": "sdrt, onnxruntime fp32", "ov-fp32": "sdrt, OpenVINO fp32",
          "ov-fp32-static": "sdrt, OpenVINO fp32, static shapes", "ov-bf16": "sdrt, OpenVINO bf16",
          "ort-fp32-cache3": "sdrt, onnxruntime fp32, --cache-interval 3",
          "ov-fp32-cache3": "sdrt, OpenVINO fp32, --cache-interval 3"}


def markdown(result: dict) -> str:
    cpu, s = result["cpu"], result["settings"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    md = [f"# {result['what']}", "",
          f"{result['date'][:16]} UTC; {cpu['model']}, {cpu['cores']} cores (flags: {flags}); onnxruntime "
          f"{result['onnxruntime']}, OpenVINO {result['openvino']}; {s['size']}x{s['size']}, {s['steps']} steps, CFG "
          f"{s['guidance']}, {s['rounds']} rounds alternating, one fresh process per measurement.", "",
          "| engine | precision run | CPU-s / image (best; all) | CPU-s vs onnxruntime fp32 | CPU-s / step | "
          "peak RSS | load + warm-up (wall) | PSNR vs onnxruntime fp32 |", "|---|---|---|---|---|---|---|---|"]
    base = result["summary"].get("ort-fp32", {}).get("cpu_s")
    for name, e in result["summary"].items():
        if "error" in e:
            md.append(f"| {LABELS.get(name, name)} | failed: {e['error']} | | | | | | |")
            continue
        ratio = f"{e['cpu_s'] / base:.2f}x" if base else ""
        psnr = e.get("psnr_vs_ort_fp32_db")
        md.append(f"| {LABELS.get(name, name)} | {e['precision']} | {e['cpu_s']:.1f} ({', '.join(map(str, e['cpu_s_all']))}) | "
                  f"{ratio} | {e['cpu_s'] / s['steps']:.2f} | {e['peak_rss_mib'] / 1024:.1f} GiB | "
                  f"{e['load_and_warmup_wall_s']:.0f} s | {'identical' if psnr == float('inf') else f'{psnr:.1f} dB'} |")
    md += ["", "CPU-seconds are user + system time of the process while it makes the image (text encoder, 10 UNet "
           "CFG calls, VAE): the machine was shared with other work, so wall times (in the JSON) are inflated; "
           "CPU-s / step is CPU-s / image over the steps (it includes the text encoder and VAE's share). Peak RSS and "
           "load are the best run's; a first start also compiles and checks each network against onnxruntime "
           "(both in memory at once).", "", *result.get("notes", []), ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default=f"openvino-cpu-{datetime.date.today().isoformat()}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--markdown", help="only write the markdown again from this result JSON")
    args = ap.parse_args()
    if args.markdown:
        path = Path(args.markdown)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(args.folder, spec["options"], args.steps, args.size, args.guidance, spec["image"])))
        return 0

    import numpy as np

    names = args.configs.split(",")
    images = Path(tempfile.mkdtemp(prefix="peers-cpu-"))
    runs: dict[str, list] = {n: [] for n in names}
    started = datetime.datetime.now(datetime.timezone.utc)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate, so that neither end of a round is favoured
        for name in order:
            spec = {"options": CONFIGS[name], "image": str(images / f"{name}-{r}.npy")}
            cmd = [sys.executable, __file__, args.folder, "--size", str(args.size), "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--child", json.dumps(spec)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                runs[name].append({"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["load_average_1m"] = os.getloadavg()[0]
            runs[name].append(result)
            print(f"round {r + 1} {name}: {result['cpu_s']:.1f} CPU-s, {result['wall_s']:.1f} s wall, "
                  f"UNet {result['unet_s_per_step']:.2f} s/step, load {result['load_and_warmup_wall_s']:.1f} s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    reference = images / "ort-fp32-0.npy"
    summary = {}
    for name, rs in runs.items():
        good = [x for x in rs if "error" not in x]
        if not good:
            summary[name] = {"error": rs[0]["error"] if rs else "not run"}
            continue
        best = min(good, key=lambda x: x["cpu_s"])
        entry = {k: best[k] for k in ("cpu_s", "wall_s", "unet_s_per_step", "peak_rss_mib", "precision", "provider")}
        entry["cpu_s_all"] = [round(x["cpu_s"], 1) for x in good]
        entry["load_and_warmup_wall_s"] = min(x["load_and_warmup_wall_s"] for x in good)
        if reference.is_file() and (images / f"{name}-0.npy").is_file():
            a, b = np.load(reference), np.load(images / f"{name}-0.npy")
            entry["psnr_vs_ort_fp32_db"] = psnr(b, a)
            entry["max_abs_vs_ort_fp32"] = int(np.abs(a.astype(int) - b.astype(int)).max())
        summary[name] = entry
    if (images / "ov-fp32-0.npy").is_file() and (images / "ov-bf16-0.npy").is_file():
        summary.setdefault("ov-bf16", {})["psnr_vs_ov_fp32_db"] = psnr(np.load(images / "ov-bf16-0.npy"),
                                                                       np.load(images / "ov-fp32-0.npy"))
    import onnxruntime

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    result = {"what": "sdrt CPU engines on the SD1.5 architecture (random weights)", "date": started.isoformat(),
              "cpu": cpu_info(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
              "openvino": ov_version, "folder": args.folder,
              "settings": {"size": args.size, "steps": args.steps, "guidance": args.guidance, "rounds": args.rounds,
                           "prompt": PROMPT, "configs": {n: CONFIGS[n] for n in names}},
              "summary": summary, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
