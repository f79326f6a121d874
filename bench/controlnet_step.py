"""What ControlNet support costs per UNet step, on the SD1.5 architecture (random weights), CPU provider.

    flock /tmp/sdrt-heavy.lock python bench/controlnet_step.py [--sizes 256x256 512x512] [--rounds 7] [--steps 3]
    python bench/controlnet_step.py --out bench/results --stem controlnet-step-2026-12-07
    python bench/controlnet_step.py --tiny            # the tiny sd1 fixture: checks the script in a minute or two

Preparation (a subprocess with torch, cached in --cache, default /tmp/sdrt-controlnet-bench, reused when present):

- the random-weight SD1.5 checkpoint (sdrt.export.fixtures.save_sd15_pipeline, seed 0);
- B: its export by sdrt.export.api.export_pipeline (text encoder, UNet, VAE decoder), the UNet taking the
  ControlNet residuals as inputs (`sdrt_control_residuals`, what every `sdrt export` now writes);
- A: the same UNet exported without them (exported_config monkeypatched to drop the mark: the spec then has no
  residual inputs), the UNet only;
- a ControlNet of the SD1.5 ControlNet architecture: diffusers.ControlNetModel.from_unet(unet) with the default
  conditioning_embedding_out_channels (16, 32, 96, 256), every weight then random as export/fixtures_controlnet.py
  makes them (N(0, 1) * 0.3; from_unet zero-initializes the residual convs, which would make it a no-op), exported
  by sdrt.export.controlnet.export_controlnet. A torch forward (ControlNet, then the UNet with its residuals)
  checks that the residuals and the UNet's output stay finite (the pipeline refuses NaN/Inf); where they would
  not, the weights are drawn with std 1/sqrt(fan_in) instead, and the JSON says so.

1. One denoising step with CFG (batch 2), each variant in its own process-wide session, loaded side by side
   (fresh subprocess, no torch), calls interleaved, the order rotated every round (ABC, BCA, CAB, ...), after one
   warm-up call each:
   A: the plain UNet; B: the residual-input UNet fed zeros (engines.spec.zero_residuals); C: the ControlNet on
   batch 2, then B's session fed its residuals (scale 1). Median, p10, p90 per variant; B/A and C/A as the
   ratio of medians and the median of the per-round ratios. The first size runs with onnxruntime's default
   session settings (those of the normal pipeline); sizes in --lean-sizes (default 512x512) with the memory arena
   and memory pattern off (low-memory mode's settings), so that three sessions fit in 24 GB; a size is skipped
   when its warm-up plain step exceeds --max-step-s.
2. Low-memory mode, through the Python API, each configuration in a fresh subprocess (peak RSS = the child's
   ru_maxrss): StableDiffusionControlNetPipeline.from_pretrained(B, controlnet=CN) plain, with low_memory=True,
   and with low_memory=True, alternate_controlnet=True (the ControlNet and the UNet take turns in memory, each
   reloaded at every UNet call). --gens generations each (the first one of the plain pipeline makes its
   sessions), --steps PNDM steps at --gen-size, CFG 7.5, seed 0; engine loads counted and timed by wrapping each
   engine's `load` on the instance. Images compared with the plain pipeline's.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdrt.runtime import bench as rb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
CONFIGS = {  # part 2: name -> (from_pretrained options, label)
    "plain": ({}, "ControlNet pipeline (normal mode)"),
    "low_memory": ({"low_memory": True}, "low_memory=True"),
    "alternate": ({"low_memory": True, "alternate_controlnet": True}, "low_memory=True, alternate_controlnet=True"),
}
VARIANTS = ("A", "B", "C")
LABEL = {"A": "A: UNet without residual inputs", "B": "B: residual-input UNet, zeros",
         "C": "C: ControlNet + residual-input UNet"}


def log(msg: str) -> None:
    print(f"[controlnet_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def _name(size) -> str:
    return f"{size[0]}x{size[1]}"


def folder_bytes(path: Path, pattern: str = "model.onnx*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def paths(cache: Path) -> dict:
    return {"checkpoint": cache / "checkpoint", "full": cache / "onnx", "plain": cache / "onnx-plain-unet",
            "controlnet_src": cache / "controlnet-diffusers", "controlnet": cache / "controlnet-onnx"}


# -- preparation (subprocess: torch, diffusers) ------------------------------------------------------------

def random_controlnet(unet, tiny: bool, seed: int, fan_in: bool):
    import torch
    from diffusers import ControlNetModel

    if tiny:
        from sdrt.export.fixtures_controlnet import tiny_controlnet

        return tiny_controlnet(unet, seed)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)  # (16, 32, 96, 256): the default
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            std = 1.0 / np.sqrt(p[0].numel()) if fan_in and p.ndim >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return controlnet.eval()


def forward_check(unet, controlnet, size: int) -> dict:
    """ControlNet then UNet in torch, batch 1: are the residuals and the UNet's output finite, and how large."""
    import torch

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    sample = torch.randn(1, 4, lat, lat, generator=g)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    cond = torch.rand(1, 3, size, size, generator=g)
    with torch.no_grad():
        down, mid = controlnet(sample, 500, hidden, controlnet_cond=cond, return_dict=False)
        out = unet(sample, 500, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = unet(sample, 500, hidden).sample
    residuals = [*down, mid]
    return {"size": size, "residuals_finite": bool(all(torch.isfinite(r).all() for r in residuals)),
            "residual_max_abs": float(max(r.abs().max() for r in residuals)),
            "unet_out_finite": bool(torch.isfinite(out).all()), "unet_out_max_abs": float(out.abs().max()),
            "unet_out_max_abs_without_residuals": float(plain.abs().max()),
            "max_abs_change_by_residuals": float((out - plain).abs().max())}


def prepare(cache: Path, tiny: bool) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.engines.spec import CONTROL_RESIDUALS
    from sdrt.export import api
    from sdrt.export.controlnet import export_controlnet
    from sdrt.export.fixtures import save_sd15_pipeline, save_tiny_pipeline

    p = paths(cache)
    info_path = cache / "prepare.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not (p["checkpoint"] / "model_index.json").is_file():
        log(f"building {'the tiny sd1 fixture' if tiny else 'the SD1.5 architecture'} (random weights, seed 0)")
        t0 = time.perf_counter()
        save_tiny_pipeline(p["checkpoint"], "sd1") if tiny else save_sd15_pipeline(p["checkpoint"], 0)
        info["checkpoint_build_seconds"] = round(time.perf_counter() - t0, 1)
    if not (p["full"] / "sdrt.json").is_file():
        log(f"B: exporting text encoder, UNet (residual inputs), VAE decoder to {p['full']}")
        t0 = time.perf_counter()
        api.export_pipeline(p["checkpoint"], p["full"], components=["text_encoder", "unet", "vae_decoder"],
                            force=True, log=log)
        info["export_b_seconds"] = round(time.perf_counter() - t0, 1)
    if not (p["plain"] / "sdrt.json").is_file():
        log(f"A: exporting the UNet without residual inputs to {p['plain']}")
        original = api.exported_config

        def without_residuals(name, ckpt):
            config = original(name, ckpt)
            return {k: v for k, v in config.items() if k != CONTROL_RESIDUALS} if name == "unet" else config

        api.exported_config = without_residuals
        t0 = time.perf_counter()
        try:
            api.export_pipeline(p["checkpoint"], p["plain"], components=["unet"], force=True, log=log)
        finally:
            api.exported_config = original
        info["export_a_seconds"] = round(time.perf_counter() - t0, 1)
    if not (p["controlnet"] / "sdrt.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(p["checkpoint"] / "unet").eval()
        check_size = 64 if tiny else 256
        log("building the ControlNet (from_unet, every weight N(0, 1) * 0.3 as fixtures_controlnet)")
        t0 = time.perf_counter()
        controlnet = random_controlnet(unet, tiny, seed=1, fan_in=False)
        check = forward_check(unet, controlnet, check_size)
        randomization = "N(0, 1) * 0.3, every parameter (as export/fixtures_controlnet.py)"
        if not (check["residuals_finite"] and check["unet_out_finite"]):
            log(f"  not finite ({check}): drawing the >= 2-D weights with std 1/sqrt(fan_in) instead")
            controlnet = random_controlnet(unet, tiny, seed=1, fan_in=True)
            check = forward_check(unet, controlnet, check_size)
            randomization = "N(0, 1) / sqrt(fan_in) for >= 2-D weights, N(0, 1) * 0.3 for 1-D (0.3 overflowed)"
        log(f"  torch check at {check_size} px: {check}")
        controlnet.save_pretrained(p["controlnet_src"], safe_serialization=True)
        info["controlnet_build_seconds"] = round(time.perf_counter() - t0, 1)
        info["controlnet_randomization"] = randomization
        info["controlnet_torch_check"] = check
        info["controlnet_params"] = int(sum(q.numel() for q in controlnet.parameters()))
        info["unet_params"] = int(sum(q.numel() for q in unet.parameters()))
        info["controlnet_conditioning_embedding_out_channels"] = list(
            controlnet.config.conditioning_embedding_out_channels)
        del controlnet, unet
        t0 = time.perf_counter()
        export_controlnet(p["controlnet_src"], p["controlnet"], force=True, log=log)
        info["export_controlnet_seconds"] = round(time.perf_counter() - t0, 1)
    info["paths"] = {k: str(v) for k, v in p.items()}
    info["weights_bytes"] = {
        "A_unet_plain": folder_bytes(p["plain"] / "unet"), "B_unet_residual_inputs": folder_bytes(p["full"] / "unet"),
        "controlnet": folder_bytes(p["controlnet"]), "text_encoder": folder_bytes(p["full"] / "text_encoder"),
        "vae_decoder": folder_bytes(p["full"] / "vae_decoder")}
    info["torch"] = torch.__version__
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- part 1: one CFG step, A / B / C interleaved (subprocess, runtime only) --------------------------------------

def stats(values) -> dict:
    p10, med, p90 = np.percentile(values, [10, 50, 90])
    return {"median": round(float(med), 4), "p10": round(float(p10), 4), "p90": round(float(p90), 4)}


def part1(args, info: dict) -> dict:
    import onnxruntime

    from sdrt.engines.onnxruntime import OrtEngine, SessionOptions
    from sdrt.engines.spec import spec_for, zero_residuals
    from sdrt.runtime.config import ModelFolder
    from sdrt.runtime.control import ControlNetFolder
    from sdrt.runtime.memory import LOW_MEMORY_SESSION

    p = {k: Path(v) for k, v in info["paths"].items()}
    folder = ModelFolder.open(p["full"])
    spec_b = folder.spec("unet")
    spec_a = spec_for("unet", json.loads((p["plain"] / "unet" / "config.json").read_text()),
                      vae_config=folder.configs["vae_decoder"])
    residual_names = [n for n in spec_b.input_names if n.startswith("down_block_additional_residual_")] + [
        "mid_block_additional_residual"]
    assert not any(n in spec_a.input_names for n in residual_names), "A's spec takes residuals"
    assert all(n in spec_b.input_names for n in residual_names), "B's spec lacks residuals"
    net = ControlNetFolder.open(p["controlnet"])
    net.check_fits(folder)
    result = {"onnxruntime": onnxruntime.__version__, "unet_inputs": {"A": spec_a.input_names, "B": spec_b.input_names},
              "controlnet_outputs": len(net.spec.output_names), "sizes": {}}

    engines: dict = {}
    current_options = None
    cross = folder.unet_config["cross_attention_dim"]
    for index, size in enumerate(args.sizes):
        width, height = size
        lean = size in args.lean_sizes
        options = SessionOptions(**LOW_MEMORY_SESSION) if lean else SessionOptions()
        entry = {"session_options": "memory arena and memory pattern off (low-memory mode's)" if lean
                 else "onnxruntime defaults (arena, memory pattern on; graph optimization all)",
                 "load_average_1m_before": round(os.getloadavg()[0], 2)}
        if options != current_options:
            for e in engines.values():
                e.release()
            engines.clear()
            malloc_trim()
            load_s = {}
            for key, path, spec in (("A", p["plain"] / "unet" / "model.onnx", spec_a),
                                    ("B", folder.onnx_path("unet"), spec_b),
                                    ("controlnet", net.path / "model.onnx", net.spec)):
                engines[key] = OrtEngine(path, spec, options=options)
                t0 = time.perf_counter()
                engines[key].load()
                load_s[key] = round(time.perf_counter() - t0, 2)
                log(f"{_name(size)}: {key} session made in {load_s[key]:.1f} s")
            entry["session_seconds"] = load_s
            entry["rss_sessions_loaded_mib"] = round(status_kib("VmRSS") / 1024, 1)
            current_options = options
        a, b, cn = engines["A"], engines["B"], engines["controlnet"]
        rng = np.random.default_rng(index)
        lat = (height // folder.vae.scale_factor, width // folder.vae.scale_factor)
        common = {"sample": rng.standard_normal((2, folder.vae.latent_channels, *lat)).astype(np.float32),
                  "encoder_hidden_states": rng.standard_normal((2, 77, cross)).astype(np.float32)}
        feed_a = {**common, "timestep": np.full((2,), 500, dtype=a.input_dtypes["timestep"])}
        feed_b = {**common, "timestep": np.full((2,), 500, dtype=b.input_dtypes["timestep"]),
                  **zero_residuals(spec_b, 2, height, width)}
        feed_cn = {**common, "timestep": np.full((2,), 500, dtype=np.float32),
                   "controlnet_cond": rng.random((2, 3, height, width), dtype=np.float32)}

        def run_c():
            t0 = time.perf_counter()
            out = cn.run(feed_cn)
            t1 = time.perf_counter()
            residuals = dict(zip(residual_names, (out[n] for n in net.spec.output_names)))
            y = b.run({**feed_b, **residuals})["out_sample"]
            t2 = time.perf_counter()
            return y, t1 - t0, t2 - t1, residuals

        def run_plain(engine, feed):
            t0 = time.perf_counter()
            y = engine.run(feed)["out_sample"]
            return y, time.perf_counter() - t0

        # warm-up (one call each), then the gate for this size: the first call pays one-off costs, so a slow one
        # is followed by a second plain call, and the size is skipped when that one too exceeds --max-step-s
        y_a, warm_a = run_plain(a, feed_a)
        log(f"{_name(size)}: warm-up A {warm_a:.2f} s")
        probe = warm_a
        if warm_a > args.max_step_s:
            probe = run_plain(a, feed_a)[1]
            entry["probe_s"] = round(probe, 3)
            log(f"{_name(size)}: second A call {probe:.2f} s")
        if probe > args.max_step_s:
            entry["skipped"] = (f"a plain step took {warm_a:.1f} s (first call) and {probe:.1f} s (second), over "
                                f"--max-step-s {args.max_step_s:g}")
            entry["warmup_s"] = {"A": round(warm_a, 3)}
            log(f"{_name(size)}: skipped ({entry['skipped']})")
            result["sizes"][_name(size)] = entry
            continue
        y_b, warm_b = run_plain(b, feed_b)
        y_c, warm_cn, warm_cu, residuals = run_c()
        entry["warmup_s"] = {"A": round(warm_a, 3), "B": round(warm_b, 3), "C": round(warm_cn + warm_cu, 3)}
        entry["checks"] = {
            "max_abs_A_minus_B_zeros": float(np.abs(y_a - y_b).max()),
            "A_equals_B_bitwise": bool(np.array_equal(y_a, y_b)),
            "C_out_finite": bool(np.isfinite(y_c).all()),
            "C_max_abs_change_vs_B": float(np.abs(y_c - y_b).max()),
            "residual_max_abs": float(max(np.abs(r).max() for r in residuals.values())),
            "residual_mib_batch2": round(sum(r.nbytes for r in residuals.values()) / 2**20, 2),
        }
        log(f"{_name(size)}: warm-up B {warm_b:.2f} s, C {warm_cn:.2f} + {warm_cu:.2f} s; checks {entry['checks']}")
        times = {"A": [], "B": [], "C": [], "C_controlnet": [], "C_unet": []}
        orders = []
        rounds = args.rounds if index == 0 else args.rounds_large
        for r in range(rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            orders.append("".join(order))
            for v in order:
                if v == "A":
                    times["A"].append(run_plain(a, feed_a)[1])
                elif v == "B":
                    times["B"].append(run_plain(b, feed_b)[1])
                else:
                    _, t_cn, t_un, _ = run_c()
                    times["C_controlnet"].append(t_cn)
                    times["C_unet"].append(t_un)
                    times["C"].append(t_cn + t_un)
            log(f"{_name(size)}: round {r + 1}/{rounds} ({orders[-1]}): A {times['A'][-1]:.2f} s, "
                f"B {times['B'][-1]:.2f} s, C {times['C'][-1]:.2f} s (ControlNet {times['C_controlnet'][-1]:.2f} s)"
                f", load {os.getloadavg()[0]:.2f}")
        med = {k: float(np.median(v)) for k, v in times.items()}
        entry.update({
            "latents": list(lat), "rounds": rounds, "orders": orders,
            "calls_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "stats_s": {k: stats(v) for k, v in times.items()},
            "ratios": {
                f"{v}/A": {"ratio_of_medians": round(med[v] / med["A"], 4),
                           "per_round": [round(x / y, 4) for x, y in zip(times[v], times["A"])],
                           "median_per_round": round(float(np.median([x / y for x, y in zip(times[v], times["A"])])), 4)}
                for v in ("B", "C", "C_controlnet", "C_unet")},
            "C_unet_over_B": round(med["C_unet"] / med["B"], 4),
            "controlnet_share_of_C": round(med["C_controlnet"] / med["C"], 4),
            "peak_rss_mib_so_far": round(status_kib("VmHWM") / 1024, 1),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        })
        log(f"{_name(size)}: medians A {med['A']:.2f} s, B {med['B']:.2f} s, C {med['C']:.2f} s: "
            f"B/A {entry['ratios']['B/A']['ratio_of_medians']:.3f}, C/A {entry['ratios']['C/A']['ratio_of_medians']:.3f}")
        result["sizes"][_name(size)] = entry
    for e in engines.values():
        e.release()
    return result


# -- part 2: low-memory mode, one configuration per fresh subprocess ---------------------------------------------

def control_image(width: int, height: int) -> np.ndarray:
    """An edge-map-like control image: white outlines of a few boxes and a circle on black (HWC uint8)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in ((0.1, 0.1, 0.5, 0.6), (0.55, 0.3, 0.9, 0.9), (0.2, 0.7, 0.45, 0.95)):
        a, b, c, d = int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)
        img[b:d, a:a + 2] = img[b:d, c - 2:c] = img[b:b + 2, a:c] = img[d - 2:d, a:c] = 255
    yy, xx = np.mgrid[:height, :width]
    ring = np.abs(np.hypot(xx - 0.7 * width, yy - 0.2 * height) - 0.12 * min(width, height)) < 1.2
    img[ring] = 255
    return img


def part2(args, info: dict, config: str) -> dict:
    import onnxruntime

    from sdrt.runtime.controlnet import StableDiffusionControlNetPipeline

    options, label = CONFIGS[config]
    width, height = args.gen_size
    p = info["paths"]
    t0 = time.perf_counter()
    pipe = StableDiffusionControlNetPipeline.from_pretrained(p["full"], controlnet=p["controlnet"], **options)
    open_s = time.perf_counter() - t0
    models = pipe.core.models
    loads: list[tuple[str, float]] = []
    named = {"text_encoder": models.text_encoder, "unet": models.unet, "vae_decoder": models.vae_decoder,
             **{f"controlnet{'' if k == 0 else k}": e for k, (_, e) in enumerate(models.controlnets)}}
    for name, engine in named.items():
        original = engine.load

        def timed(original=original, name=name, engine=engine):
            was = engine.loaded
            t = time.perf_counter()
            original()
            if not was:
                loads.append((name, time.perf_counter() - t))

        engine.load = timed
    image = control_image(width, height)
    gens = []
    for g in range(args.gens):
        loads.clear()
        t0 = time.perf_counter()
        out = pipe(PROMPT, image=image, height=height, width=width, num_inference_steps=args.steps, guidance_scale=7.5,
                   negative_prompt=NEGATIVE, seed=0, output_type="np")
        wall = time.perf_counter() - t0
        per = {}
        for name, s in loads:
            c = per.setdefault(name, {"count": 0, "seconds": 0.0})
            c["count"] += 1
            c["seconds"] += s
        gens.append({"wall_s": round(wall, 3), "timings": {k: round(float(v), 4) for k, v in out.timings.items()},
                     "session_loads": {k: {"count": v["count"], "seconds": round(v["seconds"], 2)} for k, v in per.items()},
                     "session_load_s_total": round(sum(s for _, s in loads), 2),
                     "load_average_1m": round(os.getloadavg()[0], 2)})
        log(f"{config}: generation {g + 1}/{args.gens}: {wall:.1f} s, loads "
            f"{ {k: (v['count'], round(v['seconds'], 1)) for k, v in per.items()} }, RSS peak so far "
            f"{status_kib('VmHWM') / 1024:,.0f} MiB")
    np.save(args.cache / f"part2-{config}.npy", out.images)
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"config": config, "label": label, "options": options, "open_s": round(open_s, 3), "generations": gens,
            "peak_rss_mib": round(ru / 1024, 1), "vm_hwm_mib": round(status_kib("VmHWM") / 1024, 1),
            "onnxruntime": onnxruntime.__version__, "torch_imported": "torch" in sys.modules}


# -- report -------------------------------------------------------------------------------------------------------

def _part_heads(r: dict) -> str:
    """Where a part ran at another commit than the run's start (a shared checkout moves under a long run)."""
    parts = {"part 1": r["step"].get("git"), **{f"part 2 {k}": q.get("git") for k, q in r["low_memory"]["configs"].items()}}
    seen = {}
    for name, g in parts.items():
        if g:
            key = g["head"] + (" + uncommitted " + ", ".join(x[3:] for x in g["uncommitted_runtime_engines"])
                               if g["uncommitted_runtime_engines"] else "")
            seen.setdefault(key, []).append(name)
    if not seen or list(seen) == [r["git"]["head"]]:
        return ""
    return " Each part at its own start: " + "; ".join(f"{', '.join(v)} at {k}" for k, v in seen.items()) + "."


def to_markdown(r: dict) -> str:
    m, s, info = r["machine"], r["settings"], r["prepare"]
    w = info["weights_bytes"]
    gib = 2**30
    uncommitted = r["git"]["uncommitted_runtime_engines"]
    lines = [
        f"# ControlNet cost per UNet step: {r['model']}",
        "",
        f"{r['date']} on {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), {m['ram_gib']} GiB RAM, "
        f"no GPU; onnxruntime {s['onnxruntime']} CPU provider, default threads. Load average "
        f"{m['load_average_1m']:.2f} at start, {r['load_average_1m_after']:.2f} at the end (2 shared cores: read the "
        f"ratios, measured in the same run). sdrt at {r['git']['head']}"
        + (f" with uncommitted changes in {', '.join(x[3:] for x in uncommitted)}" if uncommitted else "") + "."
        + _part_heads(r),
        "",
        f"ControlNet: `ControlNetModel.from_unet(unet)`, conditioning_embedding_out_channels "
        f"{tuple(info.get('controlnet_conditioning_embedding_out_channels') or ())}, "
        f"{info.get('controlnet_params', 0) / 1e6:.0f} M parameters (UNet {info.get('unet_params', 0) / 1e6:.0f} M), "
        f"weights {info.get('controlnet_randomization')}.",
        "",
        "Weights files (model.onnx + model.onnx_data, fp32): "
        f"A UNet without residual inputs {w['A_unet_plain'] / gib:.3f} GiB, B UNet with them "
        f"{w['B_unet_residual_inputs'] / gib:.3f} GiB ({w['B_unet_residual_inputs'] - w['A_unet_plain']:+,} bytes), "
        f"ControlNet {w['controlnet'] / gib:.3f} GiB; text encoder {w['text_encoder'] / gib:.3f} GiB, "
        f"VAE decoder {w['vae_decoder'] / gib:.3f} GiB.",
        "",
        "## 1. One denoising step with CFG (batch 2)",
        "",
        "A: the UNet exported without the ControlNet residual inputs; B: the same UNet with them (every `sdrt export` "
        "now), fed zeros; C: the ControlNet on batch 2, then B fed its residuals. Three sessions side by side, calls "
        "interleaved (order rotated ABC, BCA, CAB, ...) after one warm-up call each.",
        "",
        "| size | session settings | rounds | A s (p10-p90) | B s (p10-p90) | C s (p10-p90) | of which ControlNet s | "
        "**B/A** | **C/A** | ControlNet / A | per-round B/A | per-round C/A |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, e in r["step"]["sizes"].items():
        if "skipped" in e:
            lines.append(f"| {size} | {e['session_options']} | - | skipped: {e['skipped']} |||||||||")
            continue
        st, ra = e["stats_s"], e["ratios"]

        def cell(k):
            return f"{st[k]['median']:.2f} ({st[k]['p10']:.2f}-{st[k]['p90']:.2f})"

        lines.append(f"| {size} | {e['session_options']} | {e['rounds']} | {cell('A')} | {cell('B')} | {cell('C')} | "
                     f"{cell('C_controlnet')} | **{ra['B/A']['ratio_of_medians']:.3f}** | "
                     f"**{ra['C/A']['ratio_of_medians']:.3f}** | {ra['C_controlnet/A']['ratio_of_medians']:.3f} | "
                     f"{ra['B/A']['median_per_round']:.3f} | {ra['C/A']['median_per_round']:.3f} |")
    lines += ["", "Per size: session creation, memory and checks:", ""]
    for size, e in r["step"]["sizes"].items():
        if "skipped" in e:
            continue
        c = e["checks"]
        load = e.get("session_seconds")
        lines.append(
            f"- {size} (latents {e['latents'][0]}x{e['latents'][1]}): "
            + (f"sessions A {load['A']:.1f} s, B {load['B']:.1f} s, ControlNet {load['controlnet']:.1f} s; RSS with the "
               f"three loaded {e['rss_sessions_loaded_mib']:,.0f} MiB; " if load else "")
            + f"peak RSS so far {e['peak_rss_mib_so_far']:,.0f} MiB; load average {e['load_average_1m_before']:.2f} -> "
            f"{e['load_average_1m_after']:.2f}. B's UNet call inside C (non-zero residuals) / B (zeros): "
            f"{e['C_unet_over_B']:.3f}. Outputs: max |A - B(zeros)| = {c['max_abs_A_minus_B_zeros']:.2e} "
            f"(bitwise equal: {c['A_equals_B_bitwise']}); C finite: {c['C_out_finite']}, max |C - B| = "
            f"{c['C_max_abs_change_vs_B']:.3g} (residuals up to {c['residual_max_abs']:.3g}, "
            f"{c['residual_mib_batch2']:.1f} MiB per call).")
    lines += [
        "",
        f"## 2. Low-memory mode with a ControlNet ({s['gen_size'][0]}x{s['gen_size'][1]}, {s['steps']} PNDM steps, "
        "CFG 7.5, seed 0)",
        "",
        "`StableDiffusionControlNetPipeline.from_pretrained(B, controlnet=CN, ...)`, each configuration in a fresh "
        f"subprocess, {s['gens']} generations; peak RSS = the child's ru_maxrss (the whole process: both generations). "
        "In low-memory mode guidance runs as two UNet calls of batch 1, each with its own ControlNet call.",
        "",
        "| configuration | generation 1 s | generation 2 s | denoising loop s (gen 2; UNet + ControlNet calls, loads inside the loop) | session loads (gen 2): "
        "count, s | peak RSS MiB | max abs image diff vs normal mode |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    reused = sorted({q["reused_from_earlier_run"] for q in r["low_memory"]["configs"].values()
                     if q.get("reused_from_earlier_run")})
    if reused:
        lines[-3:-3] = [f"(Part 2's figures come from this script's previous run, finished {', '.join(reused)}, same "
                        "cache and machine: only part 1 was measured again.)", ""]
    for name, q in r["low_memory"]["configs"].items():
        g = q["generations"]
        last = g[-1]
        loads = ", ".join(f"{k} {v['count']}x {v['seconds']:.1f}" for k, v in last["session_loads"].items()) or "none"
        diff = r["low_memory"]["image_max_abs_diff_vs_plain"].get(name)
        lines.append(f"| {q['label']} | {g[0]['wall_s']:.1f} | {g[-1]['wall_s']:.1f} | {last['timings']['unet']:.1f} | "
                     f"{loads} | {q['peak_rss_mib']:,.0f} | {'-' if diff is None else f'{diff:.2e}'} |")
    lines += ["", "## Summary", ""] + [f"- {x}" for x in r["summary"]] + [""]
    return "\n".join(lines)


def summarize(r: dict) -> list[str]:
    out = []
    for size, e in r["step"]["sizes"].items():
        if "skipped" in e:
            out.append(f"{size}: not measured ({e['skipped']}).")
            continue
        ra, st = e["ratios"], e["stats_s"]
        out.append(
            f"{size}: the residual-input UNet fed zeros costs **{(ra['B/A']['ratio_of_medians'] - 1) * 100:+.1f}%** per "
            f"step vs the plain UNet (B/A {ra['B/A']['ratio_of_medians']:.3f}, per-round median "
            f"{ra['B/A']['median_per_round']:.3f}; {st['A']['median']:.2f} vs {st['B']['median']:.2f} s, p10-p90 of A "
            f"{st['A']['p10']:.2f}-{st['A']['p90']:.2f} s)"
            + (": within the run's noise" if st["A"]["p10"] <= st["B"]["median"] <= st["A"]["p90"] else "")
            + f". A ControlNet step costs **{ra['C/A']['ratio_of_medians']:.2f}x** the plain "
            f"step ({st['C']['median']:.2f} s, of which the ControlNet call {st['C_controlnet']['median']:.2f} s = "
            f"{ra['C_controlnet/A']['ratio_of_medians']:.2f} of a plain UNet step; the UNet call fed its residuals / fed "
            f"zeros {e['C_unet_over_B']:.3f}). Outputs of A and B (zeros) bitwise equal: "
            f"{e['checks']['A_equals_B_bitwise']}.")
    c = r["low_memory"]["configs"]
    if all(k in c for k in CONFIGS):
        pl, lm, al = (c[k] for k in ("plain", "low_memory", "alternate"))
        t = {k: c[k]["generations"][-1]["wall_s"] for k in CONFIGS}
        alt_loads = al["generations"][-1]["session_loads"]
        out.append(
            f"Low-memory mode: alternate_controlnet saves {lm['peak_rss_mib'] - al['peak_rss_mib']:,.0f} MiB of peak RSS "
            f"({lm['peak_rss_mib']:,.0f} -> {al['peak_rss_mib']:,.0f} MiB, x{al['peak_rss_mib'] / lm['peak_rss_mib']:.2f}) "
            f"and costs {t['alternate'] - t['low_memory']:+.0f} s per generation ({t['low_memory']:.1f} -> "
            f"{t['alternate']:.1f} s, x{t['alternate'] / t['low_memory']:.2f}): "
            + ", ".join(f"{v['count']} {k} loads ({v['seconds']:.0f} s)" for k, v in alt_loads.items()
                        if k in ("unet", "controlnet"))
            + f" per generation ({2 * int(al['generations'][-1]['timings']['unet_evaluations'])} UNet calls of batch 1). "
            f"The normal ControlNet pipeline: {t['plain']:.1f} s per (warm) generation, peak {pl['peak_rss_mib']:,.0f} "
            f"MiB.")
        calls = 2 * int(al["generations"][-1]["timings"]["unet_evaluations"])
        if alt_loads.get("unet", {}).get("count", 0) > calls:
            out.append(
                f"Alternate mode loads the UNet {alt_loads['unet']['count']} times for {calls} calls: the denoising loop "
                "reads `unet.input_dtypes` before its first step (runtime/core/loop.py), which makes the UNet's "
                "session, and the first ControlNet call then sends it away unused.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None,
                   help="checkpoint, exports, ControlNet (made once; default /tmp/sdrt-controlnet-bench)")
    p.add_argument("--sizes", type=_size, nargs="+", default=None, help="part 1 sizes (default 256x256 512x512)")
    p.add_argument("--lean-sizes", type=_size, nargs="*", default=None,
                   help="part 1 sizes run with the arena and memory pattern off (default 512x512)")
    p.add_argument("--max-step-s", type=float, default=20.0,
                   help="skip a part 1 size whose warm-up plain step takes longer (default 20)")
    p.add_argument("--rounds", type=int, default=7, help="part 1 rounds at the first size (default 7)")
    p.add_argument("--rounds-large", type=int, default=5, help="part 1 rounds at the other sizes (default 5)")
    p.add_argument("--gen-size", type=_size, default=None, help="part 2 size (default 256x256)")
    p.add_argument("--steps", type=int, default=3, help="part 2 PNDM steps (default 3: 4 UNet evaluations)")
    p.add_argument("--gens", type=int, default=2, help="part 2 generations per configuration (default 2)")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--reuse", choices=["part1", "part2"], nargs="*", default=[],
                   help="take these parts' results from the cache's last run instead of measuring them again "
                        "(the JSON records when each part ran)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default=None, help="result file stem (default controlnet-step-<date>)")
    p.add_argument("--tiny", action="store_true", help="the tiny sd1 fixture (cache /tmp/sdrt-controlnet-bench-tiny, "
                   "sizes 64x64 128x128): checks the script, results not meant for the README")
    p.add_argument("--worker", choices=["prepare", "part1", *CONFIGS], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cache is None:
        args.cache = Path("/tmp/sdrt-controlnet-bench-tiny" if args.tiny else "/tmp/sdrt-controlnet-bench")
    if args.sizes is None:
        args.sizes = [(64, 64), (128, 128)] if args.tiny else [(256, 256), (512, 512)]
    if args.lean_sizes is None:
        args.lean_sizes = [(128, 128)] if args.tiny else [(512, 512)]
    if args.gen_size is None:
        args.gen_size = (64, 64) if args.tiny else (256, 256)
    args.cache.mkdir(parents=True, exist_ok=True)

    if args.worker:
        if args.worker == "prepare":
            prepare(args.cache, args.tiny)
            return 0
        info = json.loads((args.cache / "prepare.json").read_text())
        result = part1(args, info) if args.worker == "part1" else part2(args, info, args.worker)
        (args.cache / f"result-{args.worker}.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0

    def child(worker: str, reuse: bool = False) -> dict:
        path = args.cache / f"result-{worker}.json"
        if reuse and path.is_file():
            log(f"{worker}: reusing {path}")
            written = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
            return {**json.loads(path.read_text()), "reused_from_earlier_run": written}
        path.unlink(missing_ok=True)
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        started_at = datetime.datetime.now().isoformat(timespec="seconds")
        head = git_state()
        subprocess.run([sys.executable, __file__, *forwarded, "--cache", str(args.cache), "--worker", worker],
                       check=True)
        if not path.is_file():
            return {}
        result = {**json.loads(path.read_text()), "started": started_at, "git": head}
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    import onnxruntime

    machine = rb.machine_info()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    repo = Path(__file__).resolve().parent.parent

    def git_state() -> dict:  # the runtime may change under a long run in a shared checkout: recorded per part
        return rb.source_state(repo)

    git = git_state()
    seconds = {}
    t0 = time.perf_counter()
    child("prepare")  # torch stays out of the measuring processes
    info = json.loads((args.cache / "prepare.json").read_text())
    seconds["prepare"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    step = {} if args.skip_part1 else child("part1", "part1" in args.reuse)
    seconds["part1"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    configs = {} if args.skip_part2 else {name: child(name, "part2" in args.reuse) for name in CONFIGS}
    seconds["part2"] = round(time.perf_counter() - t0, 1)
    images = {k: np.load(args.cache / f"part2-{k}.npy") for k in configs if (args.cache / f"part2-{k}.npy").is_file()}
    diffs = {k: float(np.abs(v - images["plain"]).max()) for k, v in images.items() if k != "plain" and "plain" in images}
    result = {
        "kind": "sdrt-controlnet-step",
        "date": started,
        "model": "tiny-sd1 (script check)" if args.tiny else
                 "sd15-arch (random weights) + SD1.5-architecture ControlNet (random weights), fp32",
        "settings": {"sizes": [list(x) for x in args.sizes], "lean_sizes": [list(x) for x in args.lean_sizes],
                     "max_step_s": args.max_step_s, "rounds": args.rounds, "rounds_large": args.rounds_large,
                     "gen_size": list(args.gen_size), "steps": args.steps, "gens": args.gens, "guidance": 7.5,
                     "cfg": "batch 2 (part 1; part 2 normal mode), two batch-1 calls (part 2 low-memory)",
                     "provider": "cpu (onnxruntime default threads, graph optimization all)",
                     "onnxruntime": onnxruntime.__version__},
        "machine": machine,
        "git": git,
        "prepare": info,
        "step": step,
        "low_memory": {"configs": configs, "image_max_abs_diff_vs_plain": diffs},
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "script_seconds": seconds,
    }
    result["summary"] = summarize(result) if step and configs else []
    markdown = to_markdown(result) if step and configs else json.dumps(result, indent=2)
    markdown += (f"\nScript: preparation {seconds['prepare']:.0f} s (cached in {args.cache}), part 1 "
                 f"{seconds['part1']:.0f} s, part 2 {seconds['part2']:.0f} s. "
                 f"`python bench/controlnet_step.py{' --tiny' if args.tiny else ''}`.\n")
    print(markdown)
    stem = args.stem or f"controlnet-step-{datetime.date.today().isoformat()}{'-tiny' if args.tiny else ''}"
    for path in rb.write_results(result, args.out, stem, markdown):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
