"""LoRA switching on the SD1.5 architecture (random weights): switch cost, resident memory, UNet step time with
and without the NCHWc pass, and the base image after a round trip.

    flock /tmp/sdrt-heavy.lock python bench/lora_switch.py [--size 256x256] [--steps 3] [--unet-calls 3]
    python bench/lora_switch.py --cache /tmp/sdrt-lora-switch --out bench/results --stem lora-switch-2026-12-07

Preparation (a subprocess with torch, cached in --cache, outside the repository): the random-weight SD1.5
checkpoint (sdrt.export.fixtures.save_sd15_pipeline), its export (text encoder, UNet, VAE decoder: fp32,
external data) and kohya LoRA files made by sdrt.export.fixtures_lora from the same torch UNet and text encoder:

- A: rank 16 (alpha 8) on the UNet's attention / feed-forward / proj_in / proj_out modules (UNET_LINEAR) and the
  text encoder's q/k/v/out_proj/fc1/fc2 (TEXT_LINEAR);
- A-lin: A without proj_in / proj_out (same factors). In SD1.5 (use_linear_projection False) proj_in and
  proj_out are 1x1 *convolutions*: a LoRA on them replaces a 4-D Conv weight, which turns onnxruntime's NCHWc
  pass off for the UNet just as 3x3 convs do (engines/onnxruntime.py). A-lin is the LoRA that really keeps it;
- B: rank 8 (alpha 4) on A's modules plus the resnets' 3x3 convs (LoCon, module_names(convs=True)).

Measurement (this process, runtime only: no torch): one StableDiffusionPipeline over the export, CFG 7.5, the
folder's PNDM solver, a fixed seed, output_type "np". The adapters are loaded once (load_lora_weights) and
switched with set_adapters. The states are visited in the order of VISITS; at each visit:

1. the first run in that state (the switch: sdrt merges the weights in NumPy in `Adapters._apply`, then the
   networks whose weights changed make a new onnxruntime session on their first run). `_apply` and each
   engine's `load` (session creation) are timed by wrapping them on this pipeline's instances; the switch cost
   is first run - second run (the second run of the same state, nothing to switch);
2. the second run, then `--unet-calls` direct UNet calls (batch 2 = one CFG step, latents size/8) timed alone;
3. VmRSS (/proc/self/status) after the runs, and again after glibc's malloc_trim(0) (how much of the RSS is
   freed heap the allocator kept); VmHWM (peak so far).

Then the UNet step time per LoRA, paired: a second UNet engine on the plain folder and the pipeline's UNet with
one LoRA merged (B, A, A-lin in turn) are loaded side by side and called alternately (ABBA, --paired-rounds),
so that a neighbour's load on the shared cores hits both sides alike; the per-visit direct calls above are
minutes apart and only indicative.

Images are compared bit for bit across visits of the same state: the base image before and after
A -> B -> none must be identical (no LoRA gives the folder's weights bit for bit).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
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
SCALE = 0.8  # the adapters' weight in every LoRA state
LORAS = {  # name: (file stem, description)
    "a": "A: rank 16, UNet attention/ff/proj_in/proj_out + text encoder",
    "a-lin": "A-lin: A without proj_in/proj_out (Linear weights only)",
    "b": "B: rank 8, A's modules + resnet 3x3 convs",
}
# (state, why) in order: the brief's none -> A -> B -> none -> A, then A-lin, and each state a second time.
VISITS = ["none", "a", "b", "none", "a", "a-lin", "none", "b", "a-lin"]
STATE_LABEL = {"none": "no LoRA", "a": "A", "a-lin": "A-lin", "b": "B"}


def log(msg: str) -> None:
    print(f"[lora_switch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


# -- preparation (subprocess: torch, diffusers) ------------------------------------------------------------

def prepare(cache: Path, magnitude: float, tiny: bool = False) -> dict:
    """Checkpoint, export and LoRA files in `cache` (each made once); returns what prepare.json records."""
    from sdrt.export.api import export_pipeline
    from sdrt.export.fixtures import save_sd15_pipeline, save_tiny_pipeline

    ckpt, onnx_dir, lora_dir = cache / "checkpoint", cache / "onnx", cache / "loras"
    info_path = cache / "prepare.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not (ckpt / "model_index.json").is_file():
        log(f"building {'the tiny sd1 fixture' if tiny else 'the SD1.5 architecture'} (random weights, seed 0) in {ckpt}")
        t0 = time.perf_counter()
        save_tiny_pipeline(ckpt, "sd1") if tiny else save_sd15_pipeline(ckpt)
        info["checkpoint_build_seconds"] = round(time.perf_counter() - t0, 1)
    if not (onnx_dir / "sdrt.json").is_file():
        log(f"exporting to {onnx_dir} (text encoder, UNet, VAE decoder)")
        t0 = time.perf_counter()
        export_pipeline(ckpt, onnx_dir, components=["text_encoder", "unet", "vae_decoder"], force=True, log=log)
        info["export_seconds"] = round(time.perf_counter() - t0, 1)
    files = {name: lora_dir / f"{name}.safetensors" for name in LORAS}
    if not all(p.is_file() for p in files.values()) or info.get("magnitude") != magnitude:
        import sdrt.export.fixtures_lora as fl
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        log("making the LoRA files from the checkpoint's torch UNet and text encoder")
        unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
        text = CLIPTextModel.from_pretrained(ckpt / "text_encoder")
        unet_lin = fl.module_names(unet, fl.UNET_LINEAR)
        unet_conv = fl.module_names(unet, fl.UNET_LINEAR, convs=True)
        text_lin = fl.module_names(text, fl.TEXT_LINEAR)
        a_unet = fl.random_lora(unet, unet_lin, rank=16, alpha=8.0, seed=1, magnitude=magnitude)
        a_text = fl.random_lora(text, text_lin, rank=16, alpha=8.0, seed=2, magnitude=magnitude)
        b_unet = fl.random_lora(unet, unet_conv, rank=8, alpha=4.0, seed=3, magnitude=magnitude)
        b_text = fl.random_lora(text, text_lin, rank=8, alpha=4.0, seed=4, magnitude=magnitude)
        modules = dict(unet.named_modules())
        is_1x1 = [n for n in unet_lin if modules[n].weight.ndim == 4]
        a_lin_unet = {n: e for n, e in a_unet.items() if n not in is_1x1}
        dicts = {
            "a": {**fl.kohya_state_dict(a_unet), **fl.kohya_state_dict(a_text, "lora_te_", text_model=True)},
            "a-lin": {**fl.kohya_state_dict(a_lin_unet), **fl.kohya_state_dict(a_text, "lora_te_", text_model=True)},
            "b": {**fl.kohya_state_dict(b_unet), **fl.kohya_state_dict(b_text, "lora_te_", text_model=True)},
        }
        unet_sets = {"a": a_unet, "a-lin": a_lin_unet, "b": b_unet}
        info["loras"] = {}
        for name, state_dict in dicts.items():
            fl.save(files[name], state_dict)
            u = unet_sets[name]
            info["loras"][name] = {
                "description": LORAS[name],
                "file": str(files[name]), "file_bytes": files[name].stat().st_size,
                "unet_modules": len(u), "text_encoder_modules": len(a_text if name != "b" else b_text),
                "unet_4d_weights": sum(modules[n].weight.ndim == 4 for n in u),
                "unet_3x3_convs": sum(modules[n].weight.ndim == 4 and modules[n].weight.shape[2:] != (1, 1) for n in u),
                "unet_weight_params_touched": int(sum(modules[n].weight.numel() for n in u)),
            }
        info["unet_weight_params_total"] = int(sum(p.numel() for p in unet.parameters()))
        info["magnitude"] = magnitude
    info.update(checkpoint=str(ckpt), exported=str(onnx_dir), files={k: str(v) for k, v in files.items()})
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- measurement (this process: sdrt runtime only) -----------------------------------------------------------

def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux: 5 > /proc/self/clear_refs), to read one stage's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory(label: str) -> dict:
    rss = status_kib("VmRSS") / 1024
    malloc_trim()
    trimmed = status_kib("VmRSS") / 1024
    return {"point": label, "rss_mib": round(rss, 1), "rss_after_malloc_trim_mib": round(trimmed, 1),
            "peak_rss_mib": round(status_kib("VmHWM") / 1024, 1)}


class Clock:
    """Times calls of methods of given instances (wrapped on the instance, the class is untouched)."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []

    def wrap(self, obj, attr: str, label: str, only_if=None) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            record = only_if is None or only_if()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if record:
                    self.events.append((label, time.perf_counter() - t0))

        setattr(obj, attr, timed)

    def take(self) -> dict:
        out: dict[str, float] = {}
        for label, seconds in self.events:
            out[label] = out.get(label, 0.0) + seconds
        self.events = []
        return {k: round(v, 3) for k, v in out.items()}


def nchwc_off(engine) -> bool:
    """The condition engines/onnxruntime.py turns the NCHWc pass off by: a replaced weight of 3 or more dims."""
    return any(a.ndim >= 3 for a in getattr(engine, "initializers", {}).values())


def replaced_mib(engine) -> float:
    return round(sum(a.nbytes for a in getattr(engine, "initializers", {}).values()) / 2**20, 1)


def measure(args, info: dict) -> dict:
    import onnxruntime

    from sdrt.runtime.pipeline import StableDiffusionPipeline

    width, height = args.size
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
              height=height, width=width, seed=args.seed, output_type="np")
    machine = rb.machine_info()
    repo = Path(__file__).resolve().parent.parent
    git = rb.source_state(repo)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    mem = [memory("process start (sdrt + onnxruntime imported)")]

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(info["exported"])
    models = pipe.core.models
    open_s = time.perf_counter() - t0
    engines = {"text_encoder": models.text_encoder, "unet": models.unet, "vae_decoder": models.vae_decoder}
    initial_load = {}
    for name, engine in engines.items():
        t0 = time.perf_counter()
        engine.load()
        initial_load[name] = round(time.perf_counter() - t0, 3)
        log(f"{name}: session made in {initial_load[name]:.1f} s ({type(engine).__name__})")
    mem.append(memory("plain pipeline, engines loaded"))

    clock = Clock()
    clock.wrap(pipe.core.adapters, "_apply", "merge (Adapters._apply)")
    for name, engine in engines.items():
        clock.wrap(engine, "load", f"session {name}", only_if=lambda e=engine: not e.loaded)

    lora_load = {}
    reset_peak()
    for name in LORAS:
        t0 = time.perf_counter()
        pipe.load_lora_weights(info["files"][name], adapter_name=name)
        lora_load[name] = round(time.perf_counter() - t0, 2)
        log(f"load_lora_weights({name}): {lora_load[name]:.1f} s")
    pipe.set_adapters([])
    mem.append(memory("LoRA files loaded (not applied)"))

    unet = models.unet
    rng = np.random.default_rng(0)
    folder = models.folder
    lh, lw = height // folder.vae.scale_factor, width // folder.vae.scale_factor
    feed = {"sample": rng.standard_normal((2, folder.vae.latent_channels, lh, lw)).astype(np.float32),
            "timestep": np.full((2,), 500, dtype=unet.input_dtypes["timestep"]),
            "encoder_hidden_states": rng.standard_normal(
                (2, 77, folder.unet_config["cross_attention_dim"])).astype(np.float32)}

    visits, images, previous = [], {}, None
    for index, state in enumerate(VISITS):
        pipe.set_adapters([] if state == "none" else [state], None if state == "none" else [SCALE])
        transition = f"{STATE_LABEL[previous] if previous else 'loaded'} -> {STATE_LABEL[state]}"
        log(f"visit {index + 1}/{len(VISITS)}: {transition}")
        clock.take()
        peak_reset = reset_peak()
        t0 = time.perf_counter()
        first = pipe(**kw)
        first_s = time.perf_counter() - t0
        first_parts = clock.take()
        first_peak = status_kib("VmHWM") / 1024
        t0 = time.perf_counter()
        second = pipe(**kw)
        second_s = time.perf_counter() - t0
        leftover = clock.take()  # nothing expected: the second run switches nothing
        calls = []
        for _ in range(args.unet_calls):
            t0 = time.perf_counter()
            unet.run(feed)
            calls.append(time.perf_counter() - t0)
        merge_s = first_parts.get("merge (Adapters._apply)", 0.0)
        session_s = sum(v for k, v in first_parts.items() if k.startswith("session "))
        visit = {
            "index": index + 1, "state": state, "transition": transition,
            "first_run_s": round(first_s, 3), "second_run_s": round(second_s, 3),
            "switch_cost_s": round(first_s - second_s, 3),
            "first_run_parts_s": first_parts, "merge_s": round(merge_s, 3), "sessions_s": round(session_s, 3),
            "first_run_rest_s": round(first_s - merge_s - session_s, 3),
            "second_run_switch_events": leftover,
            "first_run_timings": {k: round(v, 4) for k, v in first.timings.items()},
            "second_run_timings": {k: round(v, 4) for k, v in second.timings.items()},
            "loop_unet_per_evaluation_s": round(second.timings["unet"] / second.timings["unet_evaluations"], 3),
            "unet_call_s": [round(c, 3) for c in calls], "unet_call_median_s": round(float(np.median(calls)), 3),
            "nchwc_off": {name: nchwc_off(e) for name, e in engines.items() if name != "vae_decoder"},
            "replaced_weights_mib": {name: replaced_mib(e) for name, e in engines.items() if name != "vae_decoder"},
            "first_equals_second": bool(np.array_equal(first.images, second.images)),
            "image_sha256_prefix": hashlib.sha256(second.images.tobytes()).hexdigest()[:16],
            "memory": memory(f"after visit {index + 1} ({STATE_LABEL[state]})"),
            "peak_rss_first_run_mib": round(first_peak, 1) if peak_reset else None,
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
        images.setdefault(state, []).append(second.images)
        visits.append(visit)
        log(f"  first run {first_s:.1f} s (merge {merge_s:.1f} s, sessions {session_s:.1f} s {first_parts}), "
            f"second {second_s:.1f} s, UNet call {visit['unet_call_median_s']:.2f} s, "
            f"RSS {visit['memory']['rss_mib']:,.0f} MiB ({visit['memory']['rss_after_malloc_trim_mib']:,.0f} trimmed), "
            f"NCHWc off {visit['nchwc_off']}, load {visit['load_average_1m']}")
        previous = state

    # correctness: every visit of a state gives the same image; LoRA states differ from the base
    base = images["none"][0]
    correctness = {
        "base_before_and_after_round_trip_identical": bool(np.array_equal(images["none"][0], images["none"][1])),
        "same_state_images_identical": {STATE_LABEL[s]: all(np.array_equal(ims[0], im) for im in ims[1:])
                                        for s, ims in images.items()},
        "first_and_second_run_identical_every_visit": all(v["first_equals_second"] for v in visits),
        "max_abs_diff_vs_base": {STATE_LABEL[s]: float(np.abs(ims[0] - base).max())
                                 for s, ims in images.items() if s != "none"},
    }
    log(f"base image before vs after A -> B -> none: np.array_equal = "
        f"{correctness['base_before_and_after_round_trip_identical']}")

    # 3. paired UNet calls: a session of the plain folder and the pipeline's UNet with one LoRA merged, loaded side
    # by side, calls alternated (ABBA), so that a neighbour's load hits both sides alike
    paired = {}
    if args.paired_rounds:
        adapters = pipe.core.adapters
        plain = models.engine("unet")
        t0 = time.perf_counter()
        plain.load()
        plain_load_s = time.perf_counter() - t0
        log(f"paired UNet calls: plain session made in {plain_load_s:.1f} s")
        for state in ("b", "a", "a-lin"):  # B first: its merge (the largest) runs while no LoRA session is held
            pipe.set_adapters([state], [SCALE])
            unet.release()  # the previous state's session goes before the merge (less memory)
            clock.take()
            reset_peak()
            t0 = time.perf_counter()
            with adapters.using(adapters.wanted(None)):  # what a run does first: merge, hand the engines the weights
                pass
            merge_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            unet.load()
            session_s = time.perf_counter() - t0
            clock.take()
            plain.run(feed), unet.run(feed)  # warm-up, both sides
            times = {"none": [], state: []}
            for i in range(args.paired_rounds):
                order = [(plain, "none"), (unet, state)]
                for engine, key in (order if i % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    engine.run(feed)
                    times[key].append(time.perf_counter() - t0)
            per_round = [v / p for v, p in zip(times[state], times["none"])]
            paired[state] = {
                "merge_s": round(merge_s, 3), "session_s": round(session_s, 3),
                "nchwc_off": nchwc_off(unet),
                "none_call_s": [round(t, 4) for t in times["none"]],
                "lora_call_s": [round(t, 4) for t in times[state]],
                "none_median_s": round(float(np.median(times["none"])), 4),
                "lora_median_s": round(float(np.median(times[state])), 4),
                "ratio_of_medians": round(float(np.median(times[state]) / np.median(times["none"])), 3),
                "median_ratio_per_round": round(float(np.median(per_round)), 3),
                "ratio_per_round": [round(x, 3) for x in per_round],
                "memory": memory(f"paired calls, plain UNet + {STATE_LABEL[state]} UNet sessions"),
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
            log(f"  paired {STATE_LABEL[state]}: merge {merge_s:.1f} s, session {session_s:.1f} s, "
                f"no LoRA {paired[state]['none_median_s']:.2f} s vs {paired[state]['lora_median_s']:.2f} s: ratio "
                f"{paired[state]['ratio_of_medians']:.3f} (per round {paired[state]['ratio_per_round']}), "
                f"NCHWc off {paired[state]['nchwc_off']}, load {paired[state]['load_average_1m']}")
        plain.release()

    def per_state(key):
        return {s: float(np.median([v[key] for v in visits if v["state"] == s])) for s in images}

    step = per_state("unet_call_median_s")
    loop_step = per_state("loop_unet_per_evaluation_s")
    return {
        "kind": "sdrt-lora-switch",
        "date": started,
        "model": "tiny-sd1 (script check)" if args.tiny else "sd15-arch (random weights), fp32 export with external data",
        "settings": {"width": width, "height": height, "latents": [lh, lw], "steps": args.steps,
                     "unet_evaluations": visits[0]["second_run_timings"].get("unet_evaluations"),
                     "guidance": 7.5, "cfg": "batched (UNet batch 2)", "seed": args.seed, "scheduler": "PNDM (folder's)",
                     "lora_scale": SCALE, "unet_calls_per_visit": args.unet_calls, "visits": VISITS,
                     "provider": "cpu (onnxruntime default threads, graph optimization all)",
                     "onnxruntime": onnxruntime.__version__},
        "machine": machine,
        "git": git,
        "torch_imported_in_measuring_process": "torch" in sys.modules,
        "prepare": {k: info.get(k) for k in ("checkpoint_build_seconds", "export_seconds", "magnitude",
                                             "unet_weight_params_total", "exported")},
        "loras": {n: {**info["loras"][n], "load_lora_weights_s": lora_load[n]} for n in LORAS},
        "open_seconds": round(open_s, 3),
        "initial_session_seconds": initial_load,
        "memory": mem + [v["memory"] for v in visits] + [v["memory"] for v in paired.values()],
        "visits": visits,
        "paired_unet_calls": paired,
        "unet_call_median_s_per_state": step,
        "unet_call_ratio_vs_none": {s: round(step[s] / step["none"], 3) for s in step},
        "loop_unet_per_evaluation_s_per_state": loop_step,
        "loop_unet_ratio_vs_none": {s: round(loop_step[s] / loop_step["none"], 3) for s in loop_step},
        "correctness": correctness,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def to_markdown(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    visits = r["visits"]
    lines = [
        f"# LoRA switching: {r['model']}",
        "",
        f"{r['date']} on {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), {m['ram_gib']} GiB RAM, "
        f"no GPU; {s['provider']}, onnxruntime {s['onnxruntime']}. Load average {m['load_average_1m']:.2f} at start, "
        f"{r['load_average_1m_after']:.2f} at the end (2 shared cores: read the ratios). sdrt at {r['git']['head']}"
        + (f" with uncommitted changes in {', '.join(x[3:] for x in r['git']['uncommitted_runtime_engines'])}"
           if r["git"]["uncommitted_runtime_engines"] else "") + ".",
        "",
        f"{s['width']}x{s['height']} (latents {s['latents'][0]}x{s['latents'][1]}), {s['steps']} PNDM steps "
        f"({s['unet_evaluations']} UNet evaluations), CFG 7.5 batched, seed {s['seed']}, LoRA scale {s['lora_scale']}; "
        "kohya files made by export/fixtures_lora.py (fp32):",
        "",
        "| LoRA | UNet modules (4-D weights, of which 3x3 convs) | text encoder modules | UNet weight params touched | "
        "file | load_lora_weights |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = r["prepare"]["unet_weight_params_total"]
    for name, lo in r["loras"].items():
        lines.append(f"| {lo['description']} | {lo['unet_modules']} ({lo['unet_4d_weights']}, {lo['unet_3x3_convs']}) | "
                     f"{lo['text_encoder_modules']} | {lo['unet_weight_params_touched'] / 1e6:.0f} M "
                     f"({lo['unet_weight_params_touched'] / total:.0%}) | {lo['file_bytes'] / 2**20:.0f} MiB | "
                     f"{lo['load_lora_weights_s']:.1f} s |")
    lines += [
        "",
        "In SD1.5 (use_linear_projection false) proj_in / proj_out are 1x1 convolutions: A replaces 4-D Conv weights, "
        "so it turns the UNet's NCHWc pass off just as B's 3x3 convs do; A-lin is the LoRA that keeps the pass.",
    ]
    lines += [
        "",
        "## 1. Switch cost (first run in a state vs the second run in the same state)",
        "",
        f"Initial session creation, plain folder: text encoder {r['initial_session_seconds']['text_encoder']:.1f} s, "
        f"UNet {r['initial_session_seconds']['unet']:.1f} s, VAE decoder {r['initial_session_seconds']['vae_decoder']:.1f} s.",
        "",
        "| # | switch | first run s | second run s | switch cost s | merge (_apply) s | new sessions s (text enc + UNet) "
        "| first / second | UNet NCHWc pass |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in visits:
        parts = v["first_run_parts_s"]
        sess = " + ".join(f"{parts[k]:.1f}" for k in ("session text_encoder", "session unet") if k in parts) or "-"
        lines.append(f"| {v['index']} | {v['transition']} | {v['first_run_s']:.1f} | {v['second_run_s']:.1f} | "
                     f"{v['switch_cost_s']:.1f} | {v['merge_s']:.1f} | {sess} | "
                     f"{v['first_run_s'] / v['second_run_s']:.2f} | {'off' if v['nchwc_off']['unet'] else 'on'} |")
    lines += [
        "",
        "## 2. Resident memory (VmRSS, then again after glibc's malloc_trim(0): the heap a merge freed but the "
        "allocator kept)",
        "",
        "| point | RSS MiB | after malloc_trim | trimmed RSS vs visit 1 (no LoRA, after its runs) | "
        "merged weights the engines hold (UNet + text enc) | peak of the switch + first run | peak of the stage (VmHWM reset at each row's start) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    plain = visits[0]["memory"]
    for point in r["memory"]:
        v = next((v for v in visits if v["memory"] is point), None)
        held = "-" if v is None else f"{v['replaced_weights_mib']['unet'] + v['replaced_weights_mib']['text_encoder']:,.0f} MiB"
        delta = "" if v is None else f"{point['rss_after_malloc_trim_mib'] - plain['rss_after_malloc_trim_mib']:+,.0f}"
        first_peak = "-" if v is None or v["peak_rss_first_run_mib"] is None else f"{v['peak_rss_first_run_mib']:,.0f}"
        lines.append(f"| {point['point']} | {point['rss_mib']:,.0f} | {point['rss_after_malloc_trim_mib']:,.0f} | "
                     f"{delta} | {held} | {first_peak} | {point['peak_rss_mib']:,.0f} |")
    step, loop = r["unet_call_median_s_per_state"], r["loop_unet_per_evaluation_s_per_state"]
    nchwc = {v["state"]: v["nchwc_off"]["unet"] for v in visits}
    if r["paired_unet_calls"]:
        lines += [
            "",
            "## 3. UNet step time (one CFG call, batch 2)",
            "",
            "Paired: a session of the plain folder and the UNet with the LoRA merged, loaded side by side, "
            f"{len(next(iter(r['paired_unet_calls'].values()))['none_call_s'])} calls each alternated (ABBA) after one "
            "warm-up each:",
            "",
            "| LoRA | UNet NCHWc pass | no LoRA s (median) | with LoRA s (median) | ratio of medians | median per-round "
            "ratio | per-round ratios |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for state, q in r["paired_unet_calls"].items():
            lines.append(f"| {STATE_LABEL[state]} | {'off' if q['nchwc_off'] else 'on'} | {q['none_median_s']:.2f} | "
                         f"{q['lora_median_s']:.2f} | **{q['ratio_of_medians']:.2f}** | {q['median_ratio_per_round']:.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in q['ratio_per_round'])} |")
    lines += [
        "",
        "Sequential (each state's own visits, minutes apart: a neighbour's load moves these, read the paired table), "
        "median over visits:",
        "",
        f"| state | UNet NCHWc pass | direct call s ({s['unet_calls_per_visit']} per visit) | / no LoRA | "
        "in the loop, s per evaluation | / no LoRA |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for state in ("none", "a-lin", "a", "b"):
        if state in step:
            label = {"none": "no LoRA", "a-lin": "A-lin (Linear only)", "a": "A (incl. 1x1 proj convs)",
                     "b": "B (3x3 convs)"}[state]
            lines.append(f"| {label} | {'off' if nchwc[state] else 'on'} | {step[state]:.2f} | "
                         f"{r['unet_call_ratio_vs_none'][state]:.2f} | {loop[state]:.2f} | "
                         f"{r['loop_unet_ratio_vs_none'][state]:.2f} |")
    c = r["correctness"]
    lines += [
        "",
        "## 4. Correctness",
        "",
        f"- Base image before and after A -> B -> none, `np.array_equal`: **{c['base_before_and_after_round_trip_identical']}**.",
        "- Every state's image identical across its visits: " +
        ", ".join(f"{k} {v}" for k, v in c["same_state_images_identical"].items()) +
        f"; first and second run of every visit identical: {c['first_and_second_run_identical_every_visit']}.",
        "- Max |image - base| on [0, 1] (the LoRA is applied): " +
        ", ".join(f"{k} {v:.3f}" for k, v in c["max_abs_diff_vs_base"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/sdrt-lora-switch"),
                   help="checkpoint, export and LoRA files (made once; default /tmp/sdrt-lora-switch)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 256x256; --tiny 64x64)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-calls", type=int, default=3, help="direct UNet calls timed per visit (default 3)")
    p.add_argument("--paired-rounds", type=int, default=6,
                   help="rounds of alternated UNet calls, plain vs each LoRA, sessions side by side (default 6)")
    p.add_argument("--magnitude", type=float, default=0.05,
                   help="std of the random LoRA factors (fixtures_lora's default 0.3 swamps random base weights)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default=None, help="result file stem (default lora-switch-<date>)")
    p.add_argument("--tiny", action="store_true", help="the tiny sd1 test fixture: checks the script in a minute "
                   "(cache /tmp/sdrt-lora-switch-tiny, default size 64x64, results not meant for the README)")
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny and args.cache == Path("/tmp/sdrt-lora-switch"):
        args.cache = Path("/tmp/sdrt-lora-switch-tiny")
    if args.size is None:
        args.size = (64, 64) if args.tiny else (256, 256)
    if args.prepare:
        prepare(args.cache, args.magnitude, args.tiny)
        return 0
    t_start = time.perf_counter()
    # torch stays out of the measuring process: the preparation runs in a subprocess
    subprocess.run([sys.executable, __file__, "--prepare", "--cache", str(args.cache),
                    "--magnitude", repr(args.magnitude), *(["--tiny"] if args.tiny else [])], check=True)
    info = json.loads((args.cache / "prepare.json").read_text())
    t_measure = time.perf_counter()
    result = measure(args, info)
    result["script_seconds"] = {"prepare": round(t_measure - t_start, 1),
                                "measure": round(time.perf_counter() - t_measure, 1)}
    markdown = to_markdown(result)
    markdown += (f"\nScript: preparation {result['script_seconds']['prepare']:.0f} s (cached in {args.cache}), "
                 f"measurement {result['script_seconds']['measure']:.0f} s. "
                 f"`python bench/lora_switch.py --size {args.size[0]}x{args.size[1]} --steps {args.steps}`.\n")
    print(markdown)
    stem = args.stem or f"lora-switch-{datetime.date.today().isoformat()}{'-tiny' if args.tiny else ''}"
    for path in rb.write_results(result, args.out, stem, markdown):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
