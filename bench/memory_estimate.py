"""sdrt's memory estimate (runtime/core/budget.py) against the measured peak RSS of real generations, on the SD1.5
architecture (random weights), CPU provider.

    flock /tmp/sdrt-heavy.lock python bench/memory_estimate.py [--folder DIR] [--out bench/results] [--stem NAME]

sdrt refuses a run whose estimate exceeds 1.25x the memory available (budget.REFUSE_ABOVE), so the estimate must
err high (a run it lets through must fit) but not absurdly (it must not refuse what fits). This checks both on the
architecture people run, where tests/test_budget.py can only afford the bundled demo model.

- The folder: an SD1.5-architecture export (text encoder, UNet, VAE decoder; default
  /tmp/sdrt-controlnet-bench/onnx, which bench/controlnet_step.py makes: its UNet takes ControlNet residual
  inputs, fed zeros by the pipeline). Made elsewhere when missing: sdrt.export.fixtures.save_sd15_pipeline, then
  sdrt.export.api.export_pipeline (about 5 minutes).
- Configurations: normal mode (CFG batched: one UNet call of batch 2) at 256, 384 and 512 px; low-memory mode (one
  network at a time, CFG halves in turn, sessions without arena) at 512 px, and at 768 px when its estimate is
  under --max-estimate-gib (default 16).
- Estimate: as tests/test_budget.py's estimate() builds it: a Run of a Request with the pipeline's family, models
  and scheduler, Guidance(True, 7.5), cfg_mode "batched" ("sequential" in low-memory mode), run.height/width set,
  budget.estimate(run): total and parts (denoising, decoding). The child also records what the pipeline's own
  budget.check computed for the real run (the same figure, or the JSON says otherwise).
- Measurement: each configuration in a fresh subprocess (no torch): StableDiffusionPipeline.from_pretrained(folder,
  low_memory=...), one image, 1 PNDM step, guidance 7.5, seed 0, with SDRT_AVAILABLE_MEMORY=1e11 so that sdrt's
  own check never refuses it. Peak RSS is /proc/self/status VmHWM (not ru_maxrss, which Linux carries over from
  the parent across exec). Split by stage: at the VAE decoder's first call VmHWM is read (the peak of text
  encoding + denoising), then reset (`5` to /proc/self/clear_refs sets it to the current RSS), and read again at
  the end (the peak of decoding, counted from the RSS the decode started with).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdrt.runtime import bench as rb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_FOLDER = Path("/tmp/sdrt-controlnet-bench/onnx")
PROMPT = "a photograph of an astronaut riding a horse"
GIB = 2**30
NORMAL_SIZES = (256, 384, 512)
LOW_SIZES = (512, 768)  # 768 only when its estimate is under --max-estimate-gib


def log(msg: str) -> None:
    print(f"[memory_estimate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def estimate(pipe, size: int, low: bool):
    """tests/test_budget.py's estimate(): the Run the pipeline would make for one image at size x size."""
    from sdrt.runtime.core import budget
    from sdrt.runtime.core.generate import Run
    from sdrt.runtime.core.request import Request
    from sdrt.runtime.guidance import Guidance

    run = Run(Request(PROMPT, height=size, width=size, num_images_per_prompt=1), pipe.core.family, (), pipe.models,
              pipe.scheduler, Guidance(True, 7.5), "sequential" if low else "batched", None)
    run.height = run.width = size
    return budget.estimate(run)


def re_estimate(result: dict, folder: Path) -> None:
    """Recompute each configuration's estimate (and ratios) with the current budget factors, in place."""
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipes = {low: StableDiffusionPipeline.from_pretrained(folder, low_memory=low) for low in (False, True)}
    for c in result["configs"]:
        e, m = estimate(pipes[c["low_memory"]], c["size"], c["low_memory"]), c["measured"]
        c["previous_estimate"] = {"estimate": c["estimate"], "ratio": c["ratio"], "part_ratios": c["part_ratios"]}
        c["estimate"], c["ratio"] = estimate_dict(e), round(e.total / m["peak_bytes"], 3)
        c["part_ratios"] = {part: round(e.parts[part] / m[f"peak_{part}_bytes"], 3)
                            for part in ("denoising", "decoding") if m.get(f"peak_{part}_bytes")}
    result["previous_budget_factors"] = result.get("budget_factors")
    result["budget_factors"] = _factors()
    result["re_estimated"] = datetime.datetime.now().isoformat(timespec="seconds")


def estimate_dict(e) -> dict:
    return {"total_bytes": e.total, "parts_bytes": dict(e.parts), "weights_bytes": dict(e.weights)}


# -- the child: one generation ------------------------------------------------------------------------------------

def worker(folder: Path, size: int, low: bool) -> dict:
    rss_start = status_bytes("VmRSS")
    import onnxruntime

    from sdrt.runtime.core import budget
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    checked = {}
    original_check = budget.check

    def recording_check(run):
        found = original_check(run)
        checked["estimate"] = None if found is None else estimate_dict(found)
        checked["available_bytes"] = budget.available_bytes()
        return found

    budget.check = recording_check  # generate.py calls budget.check through the module
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, low_memory=low)
    open_s = time.perf_counter() - t0
    rss_open = status_bytes("VmRSS")

    stage = {}
    decoder = pipe.models.vae_decoder
    original_run = decoder.run

    def run_and_mark(*a, **k):
        if "denoise_peak" not in stage:
            stage["denoise_peak"] = status_bytes("VmHWM")
            stage["rss_at_decode_start"] = status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current RSS
                f.write("5")
            stage["hwm_after_reset"] = status_bytes("VmHWM")
        return original_run(*a, **k)

    decoder.run = run_and_mark
    t0 = time.perf_counter()
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=1, guidance_scale=7.5, seed=0)
    wall = time.perf_counter() - t0
    end_hwm = status_bytes("VmHWM")
    reset_ok = stage.get("hwm_after_reset", 1 << 62) <= stage.get("denoise_peak", 0)
    decode_peak = end_hwm if reset_ok else None
    return {
        "size": size, "low_memory": low, "open_s": round(open_s, 2), "generation_s": round(wall, 2),
        "timings_s": {k: round(float(v), 3) for k, v in out.timings.items() if isinstance(v, (int, float))},
        "rss_at_start_bytes": rss_start, "rss_after_open_bytes": rss_open,
        "peak_denoising_bytes": stage.get("denoise_peak"),
        "rss_at_decode_start_bytes": stage.get("rss_at_decode_start"),
        "peak_decoding_bytes": decode_peak,
        "vm_hwm_reset_worked": reset_ok,
        "peak_bytes": max(stage.get("denoise_peak", 0), end_hwm),
        "pipeline_check": checked,
        "onnxruntime": onnxruntime.__version__, "torch_imported": "torch" in sys.modules,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


# -- the parent ---------------------------------------------------------------------------------------------------

def g(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def to_markdown(r: dict) -> str:
    rows = r["configs"]
    lines = [
        f"# Memory estimate vs measured peak RSS: SD1.5 architecture ({r['date'][:10]})",
        "",
        f"sdrt's estimate (`budget.estimate`, runtime/core/budget.py) of a generation's peak against the peak RSS "
        f"(VmHWM) of the same generation in a fresh process: {r['model']}, folder `{r['folder']}`, one image, "
        f"1 PNDM step, guidance 7.5 (normal mode: one UNet call of batch 2; low-memory mode: two of batch 1), seed 0, "
        f"CPU provider (onnxruntime {r['onnxruntime']}, default threads), SDRT_AVAILABLE_MEMORY=1e11 so the check "
        f"never refuses. sdrt at commit {r['git']['head']}"
        + (f" with uncommitted changes in {', '.join(x[3:] for x in r['git']['uncommitted_runtime_engines'])}"
           if r["git"]["uncommitted_runtime_engines"] else "") + ".",
        "",
        f"Machine: {rb.machine_line(r['machine'])}.",
        "",
        "| config | estimate GiB (denoising / decoding) | measured GiB (denoising / decoding) | estimate / measured | "
        "generation s |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in rows:
        e, m = c["estimate"], c["measured"]
        p = e["parts_bytes"]
        lines.append(
            f"| {c['name']} | {g(e['total_bytes'])} ({g(p.get('denoising'))} / {g(p.get('decoding'))}) | "
            f"{g(m['peak_bytes'])} ({g(m['peak_denoising_bytes'])} / {g(m['peak_decoding_bytes'])}) | "
            f"**{c['ratio']:.2f}** | {m['generation_s']:.0f} |")
    for c in r.get("skipped", []):
        lines.append(f"| {c['name']} | {g(c['estimate']['total_bytes'])} | not run: {c['why']} | - | - |")
    lines += ["", "Per-stage measured peaks: denoising = VmHWM at the VAE decoder's first call (process start, "
              "loading, text encoder, UNet); decoding = VmHWM from that moment (reset through /proc/self/clear_refs) "
              "to the end, so it starts from the RSS still held then (in normal mode every network's weights and "
              "the UNet's arena). Ratios of the parts: "
              + "; ".join(f"{c['name']}: denoising {c['part_ratios'].get('denoising', float('nan')):.2f}, decoding "
                          f"{c['part_ratios'].get('decoding', float('nan')):.2f}" for c in rows) + ".", ""]
    lines += ["## Verdict", ""] + [f"- {s}" for s in r["summary"]] + [""]
    lines += [f"Script: {r['script_s']:.0f} s. `flock /tmp/sdrt-heavy.lock python bench/memory_estimate.py`.", ""]
    return "\n".join(lines)


def summarize(r: dict) -> list[str]:
    rows = r["configs"]
    if not rows:
        return ["nothing was measured"]
    ratios = [c["ratio"] for c in rows]
    below = [c for c in rows if c["ratio"] < 1]
    margin = r["budget_factors"]["REFUSE_ABOVE"]
    base = r["budget_factors"]["BASE_BYTES"]
    out = []
    if not below:
        out.append(f"The estimate stayed above the measured peak in every configuration, by a factor of "
                   f"{min(ratios):.2f} to {max(ratios):.2f}.")
    else:
        worst = min(ratios)
        out.append("The estimate did NOT stay above the measured peak everywhere: it was below it in "
                   + ", ".join(f"{c['name']} ({c['ratio']:.2f}x: estimate {g(c['estimate']['total_bytes'])} GiB, "
                               f"measured {g(c['measured']['peak_bytes'])} GiB)" for c in below)
                   + f"; over all configurations estimate / measured ranged from {worst:.2f} to {max(ratios):.2f}.")
        out.append(f"What that means for the guard: a run estimated at or under the memory available goes ahead "
                   f"silently, and at a ratio of {worst:.2f} its real peak can be {1 / worst:.2f}x that memory; one "
                   f"estimated up to {margin:g}x it goes ahead with a warning (budget.REFUSE_ABOVE), and its real "
                   f"peak can be {margin / worst:.2f}x the memory available. The margin assumes the estimate errs "
                   f"high; here it does not at every size.")
    high = [c for c in rows if c["ratio"] > 2]
    if high:
        out.append("Above 2x (refuses what would fit on a machine with less memory than the estimate): "
                   + ", ".join(f"{c['name']} ({c['ratio']:.2f}x)" for c in high) + ".")
    else:
        out.append(f"Nowhere absurdly high: at most {max(ratios):.2f}x the measured peak.")
    for c in rows:  # where the peak fell, and what the estimate's parts missed there
        m, e = c["measured"], c["estimate"]
        if not m.get("vm_hwm_reset_worked") or m["peak_decoding_bytes"] is None:
            continue
        weights = e["weights_bytes"]
        held = sum(weights.values()) if not c["low_memory"] else weights.get("vae_decoder", 0)
        est_decode = e["parts_bytes"]["decoding"] - held - base  # decoder activations + the images
        added = m["peak_decoding_bytes"] - m["rss_at_decode_start_bytes"]
        where = "decoding" if m["peak_decoding_bytes"] > m["peak_denoising_bytes"] else "denoising"
        text = (f"{c['name']}: peak during {where} (stage ratios: denoising {c['part_ratios']['denoising']:.2f}, "
                f"decoding {c['part_ratios']['decoding']:.2f}). The decode started at "
                f"{g(m['rss_at_decode_start_bytes'])} GiB RSS")
        if not c["low_memory"]:
            extra = m["rss_at_decode_start_bytes"] - sum(weights.values()) + weights.get("vae_decoder", 0) - base
            retained = r.get("budget_factors", {}).get("UNET_RETAINED")
            counted = (f"which the estimate's decoding part counts as UNET_RETAINED={retained} of the UNet's "
                       "activations") if retained else ("which the estimate's decoding part (every network's "
                                                         "weights + the decoder's activations) does not count")
            text += (f", {g(extra)} GiB above the weights loaded by then (all but the decoder's) + BASE_BYTES"
                     + (f": what the UNet call left held (its arena), {counted}" if extra > 0.1 * GIB else ""))
        text += (f"; the decode itself (its session loaded then: engines load at first use) added {g(added)} GiB "
                 f"where the estimate counts {g(weights.get('vae_decoder', 0))} GiB of decoder weights + "
                 f"{g(est_decode)} GiB of decoder activations and images"
                 + (" (with the UNet's retained arena)" if not c["low_memory"] and
                    r.get("budget_factors", {}).get("UNET_RETAINED") else "") + ".")
        out.append(text)
    mismatched = [c["name"] for c in rows if not c.get("pipeline_check_matches", True)]
    if mismatched:
        out.append("The pipeline's own budget.check computed another estimate than the helper's in: "
                   + ", ".join(mismatched) + " (see the JSON).")
    else:
        out.append("The pipeline's own budget.check computed the same estimate for each real run as the helper "
                   "(tests/test_budget.py's way).")
    if r.get("re_estimated"):
        out.append(f"Estimates recomputed on {r['re_estimated']} with the budget factors then in force "
                   f"({r['budget_factors']}); the measurements are those of the run above; the earlier estimates "
                   "are in the JSON (previous_estimate).")
    out.append("One run per configuration (peak RSS is far less noisy than time, but one run is one run). VmHWM "
               "counts file-backed pages too: the UNet's weights in model.onnx_data are mapped by onnxruntime, and "
               "resident pages of that mapping count as RSS.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help=f"the SD1.5 export (default {DEFAULT_FOLDER})")
    p.add_argument("--normal-sizes", type=int, nargs="*", default=list(NORMAL_SIZES))
    p.add_argument("--low-sizes", type=int, nargs="*", default=list(LOW_SIZES))
    p.add_argument("--max-estimate-gib", type=float, default=16.0,
                   help="low-memory sizes above 512 run only when estimated under this (default 16)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child (default 900)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default=None, help="result file stem (default memory-estimate-sd15-<date>)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the summary and markdown of an earlier result (measures nothing)")
    p.add_argument("--re-estimate", action="store_true",
                   help="with --from-json: keep the measurements, recompute every estimate with today's "
                        "runtime/core/budget.py (after its factors change); the earlier estimates are kept as "
                        "previous_estimate")
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "LOW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.folder, int(args.worker[0]), args.worker[1] == "1")))
        return 0

    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if args.re_estimate:
            re_estimate(result, args.folder)
        result["summary"] = summarize(result)
        markdown = to_markdown(result)
        print(markdown)
        for path in rb.write_results(result, args.out, args.stem or args.from_json.stem, markdown):
            log(f"wrote {path}")
        return 0

    if not (args.folder / "sdrt.json").is_file():
        log(f"{args.folder} is not an sdrt export: make one with sdrt.export.fixtures.save_sd15_pipeline(path), then "
            "sdrt.export.api.export_pipeline(path, out)")
        return 2
    import onnxruntime

    from sdrt.runtime.pipeline import StableDiffusionPipeline

    repo = Path(__file__).resolve().parent.parent
    git = rb.source_state(repo)
    machine = rb.machine_info()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t_script = time.perf_counter()
    pipes = {low: StableDiffusionPipeline.from_pretrained(args.folder, low_memory=low) for low in (False, True)}
    plan = [(s, False) for s in args.normal_sizes] + [(s, True) for s in args.low_sizes]
    configs, skipped = [], []
    env = {**os.environ, "SDRT_AVAILABLE_MEMORY": "100000000000"}
    for size, low in plan:
        name = f"{'low-memory' if low else 'normal'} {size}x{size}"
        e = estimate(pipes[low], size, low)
        if low and size > 512 and e.total > args.max_estimate_gib * GIB:
            log(f"{name}: estimate {e.total / GIB:.2f} GiB > {args.max_estimate_gib} GiB: skipped")
            skipped.append({"name": name, "size": size, "low_memory": low, "estimate": estimate_dict(e),
                            "why": f"estimate over {args.max_estimate_gib:g} GiB"})
            continue
        log(f"{name}: estimate {e.total / GIB:.2f} GiB ({e.describe()}); measuring (load "
            f"{os.getloadavg()[0]:.2f})")
        load_before = round(os.getloadavg()[0], 2)
        out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--folder", str(args.folder), "--worker",
                              str(size), "1" if low else "0"], capture_output=True, text=True, env=env,
                             timeout=args.timeout)
        if out.returncode != 0:
            log(f"{name}: child failed ({out.returncode}):\n{out.stderr[-3000:]}")
            return 1
        m = json.loads(out.stdout.strip().splitlines()[-1])
        m["load_average_1m_before"] = load_before
        ratio = e.total / m["peak_bytes"]
        part_ratios = {}
        if m["peak_denoising_bytes"]:
            part_ratios["denoising"] = round(e.parts["denoising"] / m["peak_denoising_bytes"], 3)
        if m["peak_decoding_bytes"]:
            part_ratios["decoding"] = round(e.parts["decoding"] / m["peak_decoding_bytes"], 3)
        seen = (m["pipeline_check"].get("estimate") or {}).get("total_bytes")
        configs.append({"name": name, "size": size, "low_memory": low,
                        "cfg_mode": "sequential" if low else "batched", "estimate": estimate_dict(e),
                        "measured": m, "ratio": round(ratio, 3), "part_ratios": part_ratios,
                        "pipeline_check_matches": seen == e.total})
        log(f"{name}: measured {m['peak_bytes'] / GIB:.2f} GiB (denoising {g(m['peak_denoising_bytes'])}, decoding "
            f"{g(m['peak_decoding_bytes'])}) in {m['generation_s']:.0f} s; estimate/measured {ratio:.2f}")
    result = {
        "kind": "sdrt-memory-estimate",
        "date": started,
        "model": "sd15-arch (random weights), fp32, unoptimized export (unfused attention)",
        "folder": str(args.folder),
        "settings": {"images": 1, "steps": 1, "scheduler": "pndm (the folder's)", "guidance": 7.5, "seed": 0,
                     "prompt": PROMPT, "provider": "cpu (onnxruntime default threads)",
                     "max_estimate_gib": args.max_estimate_gib, "SDRT_AVAILABLE_MEMORY": 100000000000,
                     "peak": "VmHWM of a fresh subprocess per configuration"},
        "budget_factors": _factors(),
        "onnxruntime": onnxruntime.__version__,
        "machine": machine,
        "git": git,
        "configs": configs,
        "skipped": skipped,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "script_s": round(time.perf_counter() - t_script, 1),
    }
    result["summary"] = summarize(result)
    markdown = to_markdown(result)
    print(markdown)
    stem = args.stem or f"memory-estimate-sd15-{datetime.date.today().isoformat()}"
    for path in rb.write_results(result, args.out, stem, markdown):
        log(f"wrote {path}")
    return 0


def _factors() -> dict:
    from sdrt.runtime.core import budget

    return {"SCORE_COPIES": {"arena": budget.SCORE_COPIES[True], "no_arena": budget.SCORE_COPIES[False]},
            "FEATURE_COPIES": budget.FEATURE_COPIES, "BASE_BYTES": budget.BASE_BYTES,
            "REFUSE_ABOVE": budget.REFUSE_ABOVE,
            **{k: getattr(budget, k) for k in ("DECODER_COPIES", "PREPACKED", "UNET_RETAINED") if hasattr(budget, k)}}


if __name__ == "__main__":
    sys.exit(main())
