"""What the attention fusion (sdrt.export.attention) buys on the CPU: one network call with and without it.

    flock /tmp/sdrt-heavy.lock python bench/attention.py                  # SD1.5 UNet, one CFG call at 512 px
    flock /tmp/sdrt-heavy.lock python bench/attention.py --component vae_decoder
    python bench/attention.py --onnx /tmp/tiny/onnx --latent 8            # seconds; checks the script

Variants of one network of an exported folder (default: the SD1.5-architecture export that
bench/export_sd15.py writes), each built once into the cache in its own subprocess:
- export:            the exported fp32 file as it is
- export+attention:  only our attention fusion (no onnxruntime optimizer)
- cpu:               `sdrt optimize --optimize cpu` (fp32) without the attention fusion (what it was before)
- cpu+attention:     `sdrt optimize --optimize cpu` (fp32) as it is now
Each variant runs in its own fresh process; the two of a pair (cpu vs cpu+attention, export vs
export+attention) are loaded side by side and called alternately, one warm-up call each then `--runs`
rounds (medians reported), so that the load other jobs put on a shared machine hits both alike (the
pair needs ~14 GiB for the SD1.5 UNet). Memory is each process's own peak RSS (Linux VmHWM: loading
included; the RSS after loading is reported beside it). The UNet call is
one classifier-free-guidance batch (2 x 4 x 64 x 64 latents at 512 px, 77 tokens); the decoder
decodes one latent. Outputs are compared with the plain export's (max |difference|).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import DEFAULT_CACHE, RESULTS  # noqa: E402
from sdrt.runtime import bench as rb  # noqa: E402

SD15_EXPORT = DEFAULT_CACHE / "sd15-arch" / "onnx"
VARIANTS = ("export", "export+attention", "cpu", "cpu+attention")
REFERENCE = "export"
BASELINE, FUSED = "cpu", "cpu+attention"  # the headline ratio
PAIRS = ((BASELINE, FUSED), (REFERENCE, "export+attention"))  # measured side by side, calls alternating


def log(msg: str) -> None:
    print(f"[attention {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def code_version() -> str:
    """Hash of the code that builds the variants: a rebuild when it changes."""
    root = Path(__file__).resolve().parent.parent / "export"
    return hashlib.sha256(b"".join((root / f).read_bytes() for f in ("attention.py", "optimize.py"))).hexdigest()[:16]


# -- workers (each its own process) ------------------------------------------------------------------

def build(variant: str, src: Path, dst: Path, model_type: str) -> dict:
    """Write the variant's file at dst; returns the build time, peak RSS and attention counts."""
    import onnx

    from sdrt.export.attention import fuse_attention
    from sdrt.export.optimize import optimize_file, save_model

    t0 = time.perf_counter()
    if variant == "export+attention":
        model = onnx.load(str(src))
        counts = {"fused": fuse_attention(model)}
        save_model(model, dst)
    else:
        counts = optimize_file(src, dst, model_type, "cpu", "fp32", attention=variant == FUSED)["attention"]
    return {"build_seconds": time.perf_counter() - t0, "build_peak_rss_mib": rb.peak_rss_mb(), "attention": counts}


def feed_for(spec: dict, dims: dict) -> dict:
    """Seeded inputs of a network spec at `dims`."""
    rng = np.random.default_rng(0)
    feed = {}
    for t in spec["inputs"]:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in t["shape"])
        if t["name"] == "timestep":
            feed[t["name"]] = np.full(shape, 500, np.float32)
        else:
            feed[t["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def serve(path: Path, spec: dict, dims: dict, output: Path) -> None:
    """Load `path` on the CPU provider, then answer stdin commands with one JSON line each: "run" (one
    timed call), "quit" (save the last output; report the peak RSS)."""
    from sdrt.engines.onnxruntime import OrtEngine

    t0 = time.perf_counter()
    engine = OrtEngine(path, provider="cpu")
    engine.load()
    print(json.dumps({"load_seconds": time.perf_counter() - t0, "rss_after_load_mib": rb.peak_rss_mb()}), flush=True)
    feed, result = feed_for(spec, dims), None
    for command in sys.stdin:
        if command.strip() == "quit":
            break
        t0 = time.perf_counter()
        result = engine.run(feed)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    np.save(output, next(iter(result.values())))
    print(json.dumps({"peak_rss_mib": rb.peak_rss_mb()}), flush=True)


def worker(argv: list[str]) -> None:
    job = json.loads(argv[0])
    if job["kind"] == "build":
        print(json.dumps(build(job["variant"], Path(job["src"]), Path(job["dst"]), job["model_type"])), flush=True)
    else:
        serve(Path(job["path"]), job["spec"], job["dims"], Path(job["output"]))


def in_subprocess(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], stdout=subprocess.PIPE, check=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class Runner:
    """One variant loaded in its own process, running one call per `call()`."""

    def __init__(self, job: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(job)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.record = self._reply()

    def _reply(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"attention: a worker died (exit {self.proc.wait()}); see its messages above")
        return json.loads(line)

    def call(self) -> float:
        return self._reply("run")["seconds"]

    def close(self) -> dict:
        self.record.update(self._reply("quit"))
        self.proc.wait(timeout=120)
        return self.record


def measure_pair(pair: tuple[str, str], jobs: dict, runs: int) -> dict:
    """Both variants of `pair` loaded side by side, one warm-up call each, then `runs` rounds of one call
    each, alternating which goes first: machine load that drifts hits both alike."""
    runners = {v: Runner(jobs[v]) for v in pair}
    seconds = {v: [] for v in pair}
    for v in pair:
        runners[v].call()
    for round_ in range(runs):
        for v in (pair if round_ % 2 == 0 else pair[::-1]):
            seconds[v].append(runners[v].call())
    return {v: {**runners[v].close(), "call_seconds": rb.summarize(seconds[v])} for v in pair}


# -- driver -------------------------------------------------------------------------------------------

def prepare(args, folder: Path, model_type: str) -> dict:
    """Build the variants missing from the cache (or stale); return their paths and build records."""
    src = folder / args.component / "model.onnx"
    stamp = {"source": str(src.resolve()), "source_mtime": src.stat().st_mtime, "code": code_version()}
    records = {}
    for variant in VARIANTS:
        if variant == REFERENCE:
            records[variant] = {"path": str(src)}
            continue
        dst = args.cache / folder.parent.name / args.component / variant / "model.onnx"
        stamp_file = dst.with_name("build.json")
        if stamp_file.is_file() and json.loads(stamp_file.read_text())["stamp"] == stamp and not args.rebuild:
            log(f"{variant}: reusing {dst}")
        else:
            log(f"{variant}: building {dst}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            for old in dst.parent.glob("model.onnx*"):
                old.unlink()
            built = in_subprocess({"kind": "build", "variant": variant, "src": str(src), "dst": str(dst),
                                   "model_type": model_type})
            stamp_file.write_text(json.dumps({"stamp": stamp, **built}, indent=2))
        records[variant] = {"path": str(dst), **{k: v for k, v in json.loads(stamp_file.read_text()).items()
                                                  if k != "stamp"}}
    return records


def dims_for(args) -> dict:
    latent = args.latent
    return {"batch": 2 if args.component == "unet" else 1, "sequence": 77, "latent_height": latent,
            "latent_width": latent, "height": 8 * latent, "width": 8 * latent}


def run(args) -> dict:
    from sdrt.export.optimize import MODEL_TYPE

    folder = args.onnx
    manifest = json.loads((folder / "sdrt.json").read_text())
    spec = manifest["components"][args.component]["spec"]
    machine = rb.machine_info()
    records = prepare(args, folder, MODEL_TYPE[args.component])
    dims = dims_for(args)
    work = args.cache / folder.parent.name / args.component
    work.mkdir(parents=True, exist_ok=True)
    outputs = {v: work / f"output-{v.replace('+', '-')}.npy" for v in VARIANTS}
    jobs = {v: {"kind": "run", "path": records[v]["path"], "spec": spec, "dims": dims, "output": str(outputs[v])}
            for v in VARIANTS}
    for pair in PAIRS:
        log(f"{' vs '.join(pair)}: {args.runs} alternating calls each after a warm-up")
        for variant, measured in measure_pair(pair, jobs, args.runs).items():
            records[variant].update(measured)
            log(f"{variant}: median {measured['call_seconds']['median']:.4g} s, "
                f"peak RSS {measured['peak_rss_mib']:,.0f} MiB")
    reference = np.load(outputs[REFERENCE])
    for variant in VARIANTS:
        records[variant]["max_abs_vs_export"] = float(np.max(np.abs(np.load(outputs[variant]) - reference)))
        records[variant]["max_abs_export_output"] = float(np.max(np.abs(reference)))
    median = {v: records[v]["call_seconds"]["median"] for v in VARIANTS}
    return {
        "kind": "attention", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine, "load_average_1m_after": rb.machine_info()["load_average_1m"],
        "folder": str(folder), "component": args.component, "dims": dims, "runs": args.runs,
        "variants": records,
        "ratios": {"cpu+attention / cpu time": median[FUSED] / median[BASELINE],
                   "cpu+attention / cpu peak RSS": records[FUSED]["peak_rss_mib"] / records[BASELINE]["peak_rss_mib"],
                   "export+attention / export time": median["export+attention"] / median["export"],
                   "export+attention / export peak RSS":
                       records["export+attention"]["peak_rss_mib"] / records["export"]["peak_rss_mib"]},
    }


def to_markdown(result: dict) -> str:
    d = result["dims"]
    shape = f"batch {d['batch']}, {d['latent_height']}x{d['latent_width']} latents ({d['height']}x{d['width']} px)"
    if result["component"] == "unet":
        shape += f", {d['sequence']} tokens (batch 2: one classifier-free-guidance call)"
    lines = [
        f"# Attention fusion on the CPU: {result['component']} of {Path(result['folder']).parent.name}", "",
        f"{result['date']} on {rb.machine_line(result['machine'])}.", "",
        f"One {result['component']} call: {shape}; onnxruntime CPU provider (default threads); median of "
        f"{result['runs']} calls after a warm-up; each variant in its own fresh process, the two of a pair "
        "(cpu vs cpu+attention, export vs export+attention) loaded side by side and called alternately.", "",
        "| variant | attentions fused | median s | peak RSS MiB | RSS after load MiB | load s | max abs vs export |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["variants"].items():
        fused = (r.get("attention") or {}).get("fused", 0)
        lines.append(f"| {name} | {fused} | {r['call_seconds']['median']:.4g} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['rss_after_load_mib']:,.0f} | {r['load_seconds']:.1f} | {r['max_abs_vs_export']:.2e} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    reference = result["variants"][REFERENCE]["max_abs_export_output"]
    lines += [
        "",
        f"Load average (1 min): {result['machine']['load_average_1m']:.2f} at start, "
        f"{result['load_average_1m_after']:.2f} after, on {result['machine']['cpu_cores']} cores.", "",
        "- export: the exported fp32 file; export+attention: only sdrt.export.attention; cpu: `sdrt optimize "
        "--optimize cpu` without the attention fusion (as before it existed); cpu+attention: as it is now.",
        "- Peak RSS is the process's VmHWM, loading included; the weights alone are the RSS after load.",
        f"- Outputs are compared with the export's output (max |output| {reference:.3g}); random weights give "
        "honest speed figures (no data-dependent control flow).",
        "- Without the fusion every attention materializes its B x H x S x S_kv scores (at 512 px: "
        "2 x 8 x 4096 x 4096 floats, 1 GiB, per self-attention of the first level); MultiHeadAttention's "
        "CPU kernel runs a flash-attention loop instead.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=SD15_EXPORT, help="an exported fp32 folder (default: SD1.5 arch)")
    parser.add_argument("--component", default="unet", choices=("unet", "vae_decoder"))
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64 = 512 px)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "attention")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the variants even if cached")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.onnx / "sdrt.json").is_file():
        sys.exit(f"attention: {args.onnx} is not an exported folder; make the SD1.5 one with bench/export_sd15.py")
    result = run(args)
    label = f"{Path(result['folder']).parent.name}-{args.component}-{8 * args.latent}px"
    stem = rb.result_stem("attention", result["machine"], "cpu", label)
    for path in rb.write_results(result, args.results, stem, to_markdown(result)):
        log(f"wrote {path}")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
