"""What the full-size SD3.5-medium and FLUX.1-schnell architectures need in memory, against this machine.

    python bench/dit_memory.py [--out bench/results] [--stem NAME]

Each network of both families is built at full size on torch's "meta" device (shapes only, no memory) from the
published configs, and its parameters counted: the fp32 weights an `sdrt export` folder holds. Against the
machine's memory (MemTotal) the script says, network by network, whether

- export fits: torch holds the module's fp32 weights while onnxruntime validates a session of the same weights
  (the ONNX file is written one tensor at a time): 2.3x the weights, as measured on the SD3.5-medium transformer;
- a normal generation fits: every network's weights loaded together, plus the transformer's activations at
  512 and 1024 px (sdrt.runtime.core.budget.transformer_activations, CFG batched where the family guides);
- a low-memory generation fits (--low-memory: one network at a time, CFG halves in turn): the largest network
  alone plus its activations.

With --measure, SD3.5-medium's peak RSS is measured (not estimated) where its networks can be exported here:
without T5-XXL (text_encoder_3=None: diffusers allows it, and sdrt feeds zeros for T5's states), so the
transformer, CLIP-L, CLIP-G and the 16-channel VAE, random weights at full size.

    flock /tmp/sdrt-heavy.lock python bench/dit_memory.py --measure [--scratch DIR] [--sizes 512 1024]

- build: the diffusers folder (seeded random weights, saved in fp16 in shards of 2 GB) in DIR/diffusers, in a
  subprocess;
- export: sdrt.export.api.export_pipeline of that folder to DIR/onnx (fp32; each network validated against torch;
  no VAE encoder; for the disk, each source network's weights deleted once loaded and the CLIPs' files in
  /dev/shm) in a subprocess, its VmHWM read (and reset through /proc/self/clear_refs) at each line the export logs: the peak of
  each network's loading, ONNX export and validation;
- generation: StableDiffusion3Pipeline.from_pretrained(DIR/onnx, low_memory=...) in a fresh subprocess per
  configuration (no torch imported), one image, 1 step, guidance 7.0, seed 0, SDRT_AVAILABLE_MEMORY=1e11 so
  sdrt's own check never refuses; VmHWM at the VAE decoder's first call (loading, text encoders, transformer)
  and at the end. A configuration whose estimate (sdrt.runtime.core.budget) is over --max-estimate-gib is not
  run; a child killed (SIGKILL: the kernel's out-of-memory killer) counts as "does not fit".
FLUX.1-schnell is not measured: its transformer alone (44 GiB fp32) cannot be exported here.
Results are written after every step (a run cut short keeps what it measured); DIR is removed at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Export's peak per byte of a network's fp32 weights: torch's module and onnxruntime's validation session of the
# same weights at once, with the streamed save (measured: the SD3.5-medium transformer, 8.4 GiB of weights, peaked
# at 19.2 GiB, 2.3x; see the measured section of the results).
EXPORT_FACTOR = 2.3
GIB = 2**30
SCRATCH = Path("/tmp/sdrt-dit-memory")
SHM = Path("/dev/shm/sdrt-dit-memory")  # the CLIPs' ONNX files: the disk here cannot hold the whole export
IN_MEMORY = ("text_encoder", "text_encoder_2")
PROMPT = "a photograph of an astronaut riding a horse"
RUNS = ((512, False), (512, True), (1024, False), (1024, True))  # (side, low_memory), in the order measured

SD35_MEDIUM = dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                   num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                   pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128,
                   dual_attention_layers=tuple(range(13)))
FLUX_SCHNELL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=False, axes_dims_rope=(16, 56, 56))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)


def parameters(build) -> int:
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def networks(family: str) -> dict[str, int]:
    """network -> parameter count, at full size."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vae = parameters(lambda: AutoencoderKL(**VAE_16))
    t5 = parameters(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    clip_l = parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
    if family == "sd3.5-medium":
        return {"transformer": parameters(lambda: SD3Transformer2DModel(**SD35_MEDIUM)),
                "text_encoder (CLIP-L)": clip_l,
                "text_encoder_2 (CLIP-G)": parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
                "text_encoder_3 (T5-XXL)": t5, "vae": vae}
    return {"transformer": parameters(lambda: FluxTransformer2DModel(**FLUX_SCHNELL)),
            "text_encoder (CLIP-L)": parameters(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            "text_encoder_2 (T5-XXL)": t5, "vae": vae}


def activations(family: str, side: int) -> int:
    from sdrt.runtime.core.budget import transformer_activations

    config = dict(SD35_MEDIUM, _class_name="SD3Transformer2DModel") if family == "sd3.5-medium" else \
        dict(FLUX_SCHNELL, _class_name="FluxTransformer2DModel")
    rows = 2 if family == "sd3.5-medium" else 1  # SD3 guides with CFG (batched), schnell does not
    text = 77 + 256 if family == "sd3.5-medium" else 512
    return transformer_activations(config, rows, side // 8, side // 8, text, fused=False, arena=True)


def memory_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def count(total: int) -> tuple[dict, list[str]]:
    """The counting part: parameters on the meta device, and what fits against `total` bytes."""
    report = {"machine_memory_gib": round(total / GIB, 1), "families": {}}
    lines = [f"# SD3.5-medium and FLUX.1-schnell at full size: what fits in {total / GIB:.1f} GiB", "",
             "Parameters counted on torch's meta device from the published configs (fp32 bytes = 4 x parameters). "
             f"Export needs about {EXPORT_FACTOR:g}x a network's weights (torch's copy and onnxruntime's validation copy, "
             "measured below). Activations: sdrt.runtime.core.budget.transformer_activations (unfused attention, "
             "an `sdrt export` folder; `sdrt optimize` fuses it away).", ""]
    for family in ("sd3.5-medium", "flux.1-schnell"):
        counts = networks(family)
        weights = {name: 4 * n for name, n in counts.items()}
        biggest = max(weights.values())
        entry = {"parameters": counts, "fp32_gib": {k: round(v / GIB, 2) for k, v in weights.items()},
                 "export_fits": {k: EXPORT_FACTOR * v < total for k, v in weights.items()}, "runs": {}}
        lines += [f"## {family}", "", "| network | parameters | fp32 weights | export fits here |", "|---|---|---|---|"]
        for name, n in counts.items():
            lines.append(f"| {name} | {n / 1e6:,.0f} M | {weights[name] / GIB:.2f} GiB | "
                         f"{'yes' if entry['export_fits'][name] else 'no (needs ~%.0f GiB)' % (EXPORT_FACTOR * weights[name] / GIB)} |")
        lines += ["", "| size | normal mode (all networks + activations) | low-memory (largest network + activations) |",
                  "|---|---|---|"]
        for side in (512, 1024):
            act = activations(family, side)
            normal, low = sum(weights.values()) + act, biggest + act
            entry["runs"][side] = {"normal_gib": round(normal / GIB, 1), "low_memory_gib": round(low / GIB, 1),
                                   "normal_fits": normal < total, "low_memory_fits": low < total}
            lines.append(f"| {side}x{side} | {normal / GIB:.1f} GiB: {'fits' if normal < total else 'does not fit'} | "
                         f"{low / GIB:.1f} GiB: {'fits' if low < total else 'does not fit'} |")
        lines.append("")
        report["families"][family] = entry
    return report, lines


# -- measured: SD3.5-medium without T5 ------------------------------------------------------------------------------

def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current RSS
        f.write("5")


def log(msg: str) -> None:
    print(f"[dit_memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_child(path: Path) -> dict:
    """Save SD3.5-medium without T5 (seeded random weights, full size) as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdrt.export.fixtures import clip_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35_MEDIUM), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**VAE_16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.float16)  # half the disk (the export loads fp32); shards: no 8 GiB serialised at once
    pipe.save_pretrained(path, safe_serialization=True, max_shard_size="2GB")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_bytes": status_bytes("VmHWM")}


def export_child(src: Path, out: Path) -> dict:
    """export_pipeline(src, out) without the VAE encoder (txt2img needs none); VmHWM read and reset at each line
    it logs: each phase's own peak. For the disk (12.5 GiB free here; the export is 12.4 GiB: the transformer's
    9.2 with its 0.8 GiB position table): each source network's weight files are deleted once loaded, and the
    CLIPs are written to SHM (tmpfs: machine memory, not this process's), linked from the folder."""
    from sdrt.export import api

    load_module, marks, t0 = api.load_module, [], time.perf_counter()

    def load_and_delete(checkpoint, subfolder):
        module = load_module(checkpoint, subfolder)  # fp16 files -> fp32 tensors: copies, no mapping kept
        for weights in (checkpoint.path / subfolder).glob("*.safetensors*"):
            weights.unlink()
        return module

    def mark(msg: str) -> None:
        marks.append({"t_s": round(time.perf_counter() - t0, 1), "line": msg,
                      "peak_before_bytes": status_bytes("VmHWM"), "rss_bytes": status_bytes("VmRSS")})
        reset_peak()
        print(msg, file=sys.stderr, flush=True)
        for name in IN_MEMORY:
            if f"] {name}: loading" in msg:  # before export_onnx makes the staged network's folder
                for staged in out.parent.glob(f".{out.name}.*.partial"):
                    (SHM / name).mkdir(parents=True, exist_ok=True)
                    (staged / name).symlink_to(SHM / name)

    reset_peak()
    api.load_module = load_and_delete
    api.export_pipeline(src, out, log=mark, force=True,
                        components=["transformer", "text_encoder", "text_encoder_2", "vae_decoder"])
    manifest = json.loads((out / "sdrt.json").read_text())
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_bytes": max(m["peak_before_bytes"] for m in marks),
            "marks": marks, "export_seconds": {k: v["export_seconds"] for k, v in manifest["components"].items()},
            "validation_max_abs": {k: max(c["max_abs"] for c in v["checks"]) for k, v in manifest["validation"].items()},
            "files_bytes": {p.parent.name + "/" + p.name: p.stat().st_size for p in sorted(out.glob("*/model.onnx*"))}}


def generate_child(folder: Path, side: int, low: bool) -> dict:
    """One SD3 image, one step, in this (fresh, torch-free) process: its peak RSS before and during decoding."""
    from sdrt.runtime.core import budget
    from sdrt.runtime.sd3 import StableDiffusion3Pipeline

    checked = {}
    original_check = budget.check

    def recording_check(run):
        found = original_check(run)
        checked["estimate_bytes"] = None if found is None else found.total
        return found

    budget.check = recording_check  # generate.py calls budget.check through the module
    t0 = time.perf_counter()
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, low_memory=low)
    open_s = time.perf_counter() - t0
    decoder, stage = pipe.models.vae_decoder, {}
    original_run = decoder.run

    def run_and_mark(*a, **k):
        stage.setdefault("peak_before_decode_bytes", status_bytes("VmHWM"))
        return original_run(*a, **k)

    decoder.run = run_and_mark
    t0 = time.perf_counter()
    out = pipe(PROMPT, height=side, width=side, num_inference_steps=1, guidance_scale=7.0, seed=0)
    return {"side": side, "low_memory": low, "open_s": round(open_s, 1),
            "generation_s": round(time.perf_counter() - t0, 1), "peak_bytes": status_bytes("VmHWM"), **stage,
            "timings_s": {k: round(float(v), 2) for k, v in out.timings.items() if isinstance(v, (int, float))},
            "pipeline_check_estimate_bytes": checked.get("estimate_bytes"), "torch_imported": "torch" in sys.modules}


def child(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run this script's `--child ARGS` in a fresh process; its JSON, or how it failed."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
    if done.returncode != 0:
        killed = done.returncode == -9
        return {"failed": "killed by SIGKILL (out of memory)" if killed else f"exit status {done.returncode}",
                "killed": killed, "stderr_tail": done.stderr[-2000:], "wall_s": round(time.perf_counter() - t0, 1)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimates(folder: Path, sides) -> dict:
    """budget.estimate of each (side, low_memory), for one image with CFG (tests/test_budget.py's way)."""
    from sdrt.runtime.core import budget
    from sdrt.runtime.core.generate import Run
    from sdrt.runtime.core.request import Request
    from sdrt.runtime.guidance import Guidance
    from sdrt.runtime.sd3 import StableDiffusion3Pipeline

    found = {}
    for low in (False, True):
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, low_memory=low)
        for side in sides:
            run = Run(Request(PROMPT, height=side, width=side, num_images_per_prompt=1), pipe.core.family, (),
                      pipe.models, pipe.scheduler, Guidance(True, 7.0), "sequential" if low else "batched", None)
            run.height = run.width = side
            e = budget.estimate(run)
            found[(side, low)] = {"total_bytes": e.total, "parts_bytes": dict(e.parts)}
    return found


def measure(args, save) -> dict:
    """Build, export and run SD3.5-medium without T5; `save(measured)` after each step."""
    scratch = args.scratch
    diffusers_dir, onnx_dir = scratch / "diffusers", scratch / "onnx"
    m = {"model": "SD3.5-medium architecture without T5-XXL (text_encoder_3=None), seeded random weights, fp32",
         "settings": {"images": 1, "steps": 1, "guidance": 7.0, "seed": 0, "prompt": PROMPT,
                      "scheduler": "FlowMatchEulerDiscreteScheduler(shift=3.0)", "SDRT_AVAILABLE_MEMORY": 1e11,
                      "max_estimate_gib": args.max_estimate_gib, "peak": "VmHWM of a fresh subprocess"},
         "started": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine_memory_gib": round(memory_total() / GIB, 1), "runs": []}
    if not (diffusers_dir / "model_index.json").is_file():
        log(f"building the diffusers folder in {diffusers_dir}")
        m["build"] = child(["build", str(diffusers_dir)], args.timeout)
        save(m)
        if "failed" in m["build"]:
            return m
    if not (onnx_dir / "sdrt.json").is_file():
        log(f"exporting to {onnx_dir}")
        m["export"] = child(["export", str(diffusers_dir), str(onnx_dir)], args.timeout)
        save(m)
        if "failed" in m["export"]:
            return m
    shutil.rmtree(diffusers_dir, ignore_errors=True)  # the generations read only the export
    found = estimates(onnx_dir, args.sizes)
    env = {**os.environ, "SDRT_AVAILABLE_MEMORY": "100000000000"}
    for side, low in [r for r in RUNS if r[0] in args.sizes]:
        e = found[(side, low)]
        run = {"side": side, "low_memory": low, "estimate": e}
        if e["total_bytes"] > args.max_estimate_gib * GIB:
            run["skipped"] = f"estimate {e['total_bytes'] / GIB:.1f} GiB > {args.max_estimate_gib:g} GiB"
        else:
            log(f"{side}x{side} {'low-memory' if low else 'normal'}: estimate {e['total_bytes'] / GIB:.1f} GiB; "
                "measuring")
            run["measured"] = child(["generate", str(onnx_dir), str(side), "1" if low else "0"], args.timeout, env)
        log(f"{side}x{side} {'low-memory' if low else 'normal'}: "
            f"{run.get('skipped') or run['measured'].get('failed') or '%.2f GiB' % (run['measured']['peak_bytes'] / GIB)}")
        m["runs"].append(run)
        save(m)
    return m


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def export_phases(export: dict) -> list[dict]:
    """Per network: the peak of its loading, ONNX export and validation (from the export's logged lines)."""
    rows, current = {}, None
    phase_of = {"exporting to ONNX": "load", "validating against torch": "export", "ok, max": "validate"}
    for mark in export.get("marks", []):
        line = mark["line"]
        if line.startswith("[") and "] " in line and ": " in line:
            current = line.split("] ", 1)[1].split(": ", 1)[0]
        for key, phase in phase_of.items():
            if key in line and current:
                rows.setdefault(current, {})[phase] = mark["peak_before_bytes"]
    return [{"network": k, **v} for k, v in rows.items()]


def measured_lines(m: dict) -> list[str]:
    lines = ["## Measured: SD3.5-medium without T5-XXL", "",
             f"{m['model']}; diffusers folder with text_encoder_3=None, exported by `sdrt.export.api.export_pipeline` "
             "(every network validated against torch), generated by sdrt's StableDiffusion3Pipeline (T5's states "
             f"zeros): one image, {m['settings']['steps']} step, guidance {m['settings']['guidance']}, seed 0, CPU "
             "provider; peak RSS = VmHWM of a fresh subprocess (file-backed pages that are resident count too). "
             f"Started {m['started']}.", ""]
    if "build" in m:
        b = m["build"]
        lines.append("- Building and saving the diffusers folder (random init, saved in fp16 in shards of 2 GB): "
                     + (b["failed"] if "failed" in b else f"{b['wall_s']:.0f} s, peak {gib(b['peak_bytes'])} GiB") + ".")
    if "export" in m:
        x = m["export"]
        if "failed" in x:
            lines.append(f"- Export: **{x['failed']}** after {x['wall_s']:.0f} s.")
        else:
            lines += [f"- Export (`export_pipeline`: transformer, CLIP-L, CLIP-G, VAE decoder; one process): **{x['wall_s']:.0f} s, peak "
                      f"{gib(x['peak_bytes'])} GiB**. Per network (GiB at the peak of each phase; the process's "
                      "RSS carries over from phase to phase):", "",
                      "| network | load | ONNX export + save | validation vs torch | export s | max abs diff |",
                      "|---|---:|---:|---:|---:|---:|"]
            for r in export_phases(x):
                lines.append(f"| {r['network']} | {gib(r.get('load'))} | {gib(r.get('export'))} | "
                             f"{gib(r.get('validate'))} | {x['export_seconds'].get(r['network'], 0):.0f} | "
                             f"{x['validation_max_abs'].get(r['network'], float('nan')):.1e} |")
            lines.append("")
    if m["runs"]:
        lines += ([""] if lines[-1] else []) + ["| size | mode | estimate GiB | measured peak GiB (before decode / total) | open s | "
                  "generation s |", "|---|---|---:|---:|---:|---:|"]
        for r in m["runs"]:
            mode = "low-memory" if r["low_memory"] else "normal"
            head = f"| {r['side']}x{r['side']} | {mode} | {gib(r['estimate']['total_bytes'])} |"
            if "skipped" in r:
                lines.append(f"{head} not run: {r['skipped']} | - | - |")
            elif "failed" in r["measured"]:
                lines.append(f"{head} **does not fit / failed: {r['measured']['failed']}** | - | - |")
            else:
                g = r["measured"]
                lines.append(f"{head} **{gib(g['peak_bytes'])}** ({gib(g.get('peak_before_decode_bytes'))} / "
                             f"{gib(g['peak_bytes'])}) | {g['open_s']:.0f} | {g['generation_s']:.0f} |")
    lines += ["", "### What fit, what did not, and why", ""]
    lines += [f"- {line}" for line in summary(m, m.get("machine_memory_gib", round(memory_total() / GIB, 1)))]
    lines.append("")
    return lines


def summary(m: dict, machine_gib: float) -> list[str]:
    """What fit, what did not and why, from the measured figures."""
    out = ["T5-XXL (17.7 GiB fp32) and the FLUX.1-schnell transformer (44.3 GiB) were not built: exporting either "
           f"needs more than this machine's {machine_gib:g} GiB (see the counts above), so SD3.5-medium ran without "
           "T5 and Flux was not measured."]
    x = m.get("export", {})
    if x and "failed" not in x:
        phases = {r["network"]: r for r in export_phases(x)}
        t = phases.get("transformer", {})
        out.append(f"Export: the peak ({gib(x['peak_bytes'])} GiB) is the transformer's validation: torch's fp32 module "
                   "and onnxruntime's session of the same weights at once. Its ONNX export and save peaked at "
                   f"{gib(t.get('export'))} GiB (weights written one tensor at a time). Later networks' phases start "
                   "from what the process still held of the transformer (glibc returns freed memory late), so their "
                   "figures are upper bounds of their own cost.")
        files = x.get("files_bytes", {})
        out.append(f"Disk: the fp32 export is {gib(sum(files.values()))} GiB (the transformer's "
                   f"{gib(files.get('transformer/model.onnx_data'))} GiB, with its 384 x 384 x 1536 position table) "
                   "against 12.5 GiB free here, so the diffusers source was saved in fp16 and each of its networks "
                   "deleted once loaded, and the CLIPs' files lay in /dev/shm (tmpfs: machine memory, not the "
                   "processes' RSS until onnxruntime reads them).")
    if m.get("export_branch_check"):
        out.append(m["export_branch_check"])
    for r in m["runs"]:
        name = f"{r['side']}x{r['side']} {'low-memory' if r['low_memory'] else 'normal'}"
        e = r["estimate"]["total_bytes"]
        if "skipped" in r:
            out.append(f"{name}: not run ({r['skipped']}): every network's weights stay loaded and batched CFG's "
                       "unfused attention holds score maps of 2 rows x 24 heads x (64 x 64 + 333)^2 tokens, 3.5 GiB "
                       "each, several at once with onnxruntime's arena.")
        elif "failed" in r["measured"]:
            out.append(f"{name}: does not fit / failed: {r['measured']['failed']} (estimate {gib(e)} GiB).")
        else:
            g = r["measured"]
            out.append(f"{name}: fits, peak {gib(g['peak_bytes'])} GiB (estimate / measured "
                       f"{e / g['peak_bytes']:.2f}), one step in {g['timings_s'].get('unet', 0):.0f} s of transformer "
                       f"and {g['timings_s'].get('vae_decoder', 0):.0f} s of VAE decoding.")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--stem", default=f"dit-memory-{datetime.date.today().isoformat()}")
    parser.add_argument("--measure", action="store_true", help="build, export and run SD3.5-medium without T5")
    parser.add_argument("--scratch", type=Path, default=SCRATCH, help=f"working folder (default {SCRATCH})")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--max-estimate-gib", type=float, default=21.0,
                        help="configurations estimated over this are not run (default 21)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess (default 1800)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--from-json", type=Path, help="re-render the markdown of an earlier --measure result")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"build": lambda: build_child(Path(rest[0])),
                  "export": lambda: export_child(Path(rest[0]), Path(rest[1])),
                  "generate": lambda: generate_child(Path(rest[0]), int(rest[1]), rest[2] == "1"),
                  "count": lambda: count(memory_total())}[kind]()
        print(json.dumps(result))
        return 0
    # --measure counts in a subprocess too: this process, alive while the others run, never imports torch
    counted = child(["count"], args.timeout) if args.measure else count(memory_total())
    if isinstance(counted, dict):
        raise RuntimeError(f"counting the parameters failed: {counted['failed']}\n{counted.get('stderr_tail', '')}")
    report, lines = counted
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(measured: dict | None) -> None:
        if measured is not None:
            report["measured"] = measured
        text = lines + (measured_lines(measured) if measured is not None else [])
        (out / f"{args.stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{args.stem}.md").write_text("\n".join(text) + "\n")

    if args.from_json:
        save(json.loads(args.from_json.read_text())["measured"])
        return 0
    if not args.measure:
        save(None)
        print("\n".join(lines))
        return 0
    try:
        measured = measure(args, save)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
            shutil.rmtree(SHM, ignore_errors=True)
    save(measured)
    print("\n".join(lines + measured_lines(measured)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
