"""Export the real SD 1.5 architecture (random weights) and record time and peak memory.

    python bench/export_sd15.py [--components unet] [--cache /tmp/sdrt-sd15] [--out bench/results]

A script, not a test: the UNet alone is 860M parameters (3.4 GB in fp32, so its ONNX file keeps
its weights in model.onnx_data). Random weights give honest figures: export time and memory do not
depend on the weight values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", default="unet", help="comma-separated (default: unet)")
    ap.add_argument("--cache", default="/tmp/sdrt-sd15", help="where the random-weight checkpoint is kept")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    from sdrt.export.api import export_pipeline
    from sdrt.export.fixtures import save_sd15_pipeline

    cache = Path(args.cache)
    ckpt, onnx_dir = cache / "checkpoint", cache / "onnx"
    t0 = time.perf_counter()
    if not (ckpt / "model_index.json").is_file():
        print(f"building the SD1.5 architecture with random weights in {ckpt}", file=sys.stderr)
        save_sd15_pipeline(ckpt)
    build_s = time.perf_counter() - t0
    rss_before = peak_rss_gb()
    events = []

    def log(msg):
        events.append((round(time.perf_counter() - t1, 1), msg))
        print(msg, file=sys.stderr, flush=True)

    t1 = time.perf_counter()
    export_pipeline(ckpt, onnx_dir, components=args.components.split(","), force=True, log=log)
    export_s = time.perf_counter() - t1
    manifest = json.loads((onnx_dir / "sdrt.json").read_text())
    files = {k: v["size"] for k, v in manifest["files"].items() if k.endswith((".onnx", ".onnx_data"))}
    result = {
        "what": "sdrt export of the SD1.5 architecture (random weights)",
        "date": datetime.date.today().isoformat(),
        "machine": {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": manifest["versions"],
        "components": args.components.split(","),
        "checkpoint_build_seconds": round(build_s, 1),
        "export_and_validation_seconds": round(export_s, 1),
        "per_component_export_seconds": {k: v["export_seconds"] for k, v in manifest["components"].items()},
        "peak_rss_gb_before_export": round(rss_before, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "onnx_files_bytes": files,
        "validation_max_abs": {k: max(c["max_abs"] for c in v["checks"]) for k, v in manifest["validation"].items()},
        "log": events,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"export-sd15-{result['date']}-{platform.machine()}-{os.cpu_count()}cpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# {result['what']}", "", f"{result['date']}, {result['machine']['cpu']}, {result['machine']['cores']} cores", "",
          "| figure | value |", "|---|---|",
          f"| components | {', '.join(result['components'])} |",
          f"| export + validation | {result['export_and_validation_seconds']} s |",
          *[f"| {k} export (trace + save) | {v} s |" for k, v in result["per_component_export_seconds"].items()],
          f"| peak RSS (whole process) | {result['peak_rss_gb']} GB |",
          *[f"| {k} | {v / 1e9:.2f} GB |" for k, v in files.items()],
          *[f"| {k} max abs error vs torch | {v:.2e} |" for k, v in result["validation_max_abs"].items()],
          "", "Random weights: export time and memory do not depend on weight values.", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
