"""Load test of `sdrt serve` on loopback: throughput and latency at several concurrencies, continuous batching on
vs off, with the official openai client (AsyncOpenAI) as the load generator.

    python bench/serve_load.py [--model models/shapes-demo-onnx] [--concurrency 1 4 16] [--steps 20] [--size 32]
                               [--requests-per-client 3] [--budget 60] [--out bench/results]

For each mode (batching on: `--max-batch 16`; off: `--no-batching`, one request at a time as diffusion servers
queue them) a fresh server process starts; for each concurrency C, C clients each send requests back to back
(C x --requests-per-client in all, fewer if --budget seconds run out), every request with its own seed.
Reported: images per minute, p50 / p95 latency, and the mean requests per batched UNet call (from /metrics).
Every image is checked against the same seed's image from the other mode: batching must not change a bit.
Writes serve-load-<date>.json and .md (and .png, a Pillow chart) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left on a white background",
           "a yellow square on a black background", "a large white circle on a red background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sdrt serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, batching: bool, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "sdrt.runtime.cli", "serve", model, "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queue", "256", "--preload"]
        if not batching:
            command.append("--no-batching")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {self.process.stderr.read()}")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def load(url: str, model: str, concurrency: int, per_client: int, steps: int, size: int, budget: float,
               seed_base: int) -> dict:
    """C clients, each sending requests back to back; latencies, wall time and each image's digest by seed."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    latencies, digests = [], {}
    t0 = time.perf_counter()

    async def one_client(c: int):
        for k in range(per_client):
            if time.perf_counter() - t0 > budget:
                return
            seed = seed_base + c * per_client + k
            start = time.perf_counter()
            result = await client.images.generate(
                model=model, prompt=PROMPTS[seed % len(PROMPTS)], size=f"{size}x{size}", response_format="b64_json",
                extra_body={"seed": seed, "steps": steps})
            latencies.append(time.perf_counter() - start)
            digests[seed] = hashlib.sha256(base64.b64decode(result.data[0].b64_json)).hexdigest()

    await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    latencies.sort()
    return {"requests": len(latencies), "wall_s": wall, "images_per_min": 60 * len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1,
                                                                          int(round(0.95 * (len(latencies) - 1))))],
            "digests": digests}


def measure(server: Server, model: str, batching: bool, concurrency: int, args) -> dict:
    calls0 = server.metric("sdrt_batch_requests_count")
    stepped0 = server.metric("sdrt_batch_requests_sum")
    result = asyncio.run(load(server.url, model, concurrency, args.requests_per_client, args.steps, args.size,
                              args.budget, 1000 * concurrency))
    calls = server.metric("sdrt_batch_requests_count") - calls0
    result["mean_requests_per_unet_call"] = (server.metric("sdrt_batch_requests_sum") - stepped0) / calls
    result.update(batching=batching, concurrency=concurrency)
    print(f"  batching {'on ' if batching else 'off'} c={concurrency:>2}: {result['requests']} requests, "
          f"{result['images_per_min']:.0f} images/min, p50 {result['p50_s']:.2f} s, p95 "
          f"{result['p95_s']:.2f} s, {result['mean_requests_per_unet_call']:.1f} requests per UNet call",
          file=sys.stderr)
    return result


def run_all(model: str, args) -> list[dict]:
    """Both servers up at once (the idle one costs nothing); at each concurrency the two modes run back to back,
    in alternating order, so that the machine's drift (shared cores) falls on both alike."""
    name = Path(model).resolve().name
    servers = {}
    try:
        for batching in (False, True):
            servers[batching] = Server(model, batching, args.max_batch)
            asyncio.run(load(servers[batching].url, name, 1, 1, args.steps, args.size, args.budget, 10**6))
        rows = []
        for k, concurrency in enumerate(args.concurrency):
            for batching in ((False, True) if k % 2 == 0 else (True, False)):
                rows.append(measure(servers[batching], name, batching, concurrency, args))
        return rows
    finally:
        for server in servers.values():
            server.stop()


def chart(path: Path, title: str, rows: list[dict]) -> None:
    """Grouped bars: images per minute per concurrency, batching off vs on (Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()

    levels = sorted({r["concurrency"] for r in rows})
    width, height, left, bottom, top = 900, 460, 80, 60, 70
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 15), title, fill="black", font=font(16))
    vmax = max(r["images_per_min"] for r in rows) * 1.15
    plot_h = height - top - bottom
    group_w = (width - left - 40) / len(levels)
    colours = {False: "#DD8452", True: "#4C72B0"}
    for g, level in enumerate(levels):
        for b, batching in enumerate((False, True)):
            row = next((r for r in rows if r["concurrency"] == level and r["batching"] == batching), None)
            if row is None:
                continue
            x0 = left + g * group_w + 20 + b * (group_w - 40) / 2
            x1 = x0 + (group_w - 40) / 2 - 6
            y0 = top + plot_h * (1 - row["images_per_min"] / vmax)
            d.rectangle((x0, y0, x1, top + plot_h), fill=colours[batching])
            d.text(((x0 + x1) / 2, y0 - 4), f"{row['images_per_min']:.0f}", fill="black", font=font(13), anchor="md")
            d.text(((x0 + x1) / 2, y0 + 14), f"p95 {row['p95_s']:.1f}s", fill="white", font=font(11), anchor="mm")
        d.text((left + g * group_w + group_w / 2, top + plot_h + 18), f"concurrency {level}", fill="black",
               font=font(14), anchor="mm")
    d.line((left, top + plot_h, width - 20, top + plot_h), fill="black")
    d.text((20, top + plot_h / 2), "images\n/min", fill="black", font=font(13))
    for k, (batching, label) in enumerate(((False, "batching off (one request at a time)"),
                                           (True, "continuous batching"))):
        d.rectangle((left + k * 330, height - 28, left + k * 330 + 14, height - 14), fill=colours[batching])
        d.text((left + k * 330 + 20, height - 21), label, fill="black", font=font(13), anchor="lm")
    img.save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "shapes-demo-onnx"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per (mode, concurrency) before clients stop")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from sdrt.runtime.bench import machine_info, source_state

    rows = run_all(args.model, args)
    # Batching must not change a bit: the same seed's image from both modes.
    off = {s: d for r in rows if not r["batching"] for s, d in r["digests"].items()}
    on = {s: d for r in rows if r["batching"] for s, d in r["digests"].items()}
    common = sorted(set(off) & set(on))
    mismatches = [s for s in common if off[s] != on[s]]
    date = datetime.date.today().isoformat()
    result = {"date": date, "model": Path(args.model).resolve().name, "settings": vars(args),
              "machine": machine_info(), "source": source_state(REPO),
              "identical_images": {"compared": len(common), "different": mismatches},
              "rows": [{k: v for k, v in r.items() if k != "digests"} for r in rows]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-load-{date}" + ("" if result["model"] == "shapes-demo-onnx" else f"-{result['model']}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# sdrt serve under load: {result['model']}, {args.size}x{args.size}, {args.steps} steps (CFG 7.5), "
             "loopback", "",
             f"`python bench/serve_load.py` ({result['machine']['cpu']}, {result['machine']['cpu_cores']} cores, "
             f"shared; load average {os.getloadavg()[0]:.1f} after). Clients: the openai package's AsyncOpenAI, each "
             f"sending {args.requests_per_client} requests back to back; two `sdrt serve --preload` processes (batching "
             f"on: --max-batch {args.max_batch}; off: --no-batching), measured back to back at each concurrency in "
             "alternating order. At concurrency 1 nothing is batched in either mode: the ratio there is the "
             "measurement's noise on this shared machine.", "",
             "| batching | concurrency | requests | images/min | p50 latency (s) | p95 latency (s) | "
             "requests per UNet call |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['requests']} | "
                     f"{r['images_per_min']:.0f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r['mean_requests_per_unet_call']:.2f} |")
    lines += ["", "Throughput with batching on / off at the same concurrency: " + ", ".join(
        f"c={c}: {next(r for r in rows if r['batching'] and r['concurrency'] == c)['images_per_min'] / next(r for r in rows if not r['batching'] and r['concurrency'] == c)['images_per_min']:.2f}x"
        for c in args.concurrency) + ".", "",
        f"Images identical between the two modes (same seed): {len(common) - len(mismatches)} of {len(common)}"
        + (f"; different: seeds {mismatches}" if mismatches else "") + ".", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    chart(out / f"{stem}.png", f"sdrt serve: {result['model']}, {args.size}px, {args.steps} steps, "
          f"{result['machine']['cpu_cores']} CPU cores", rows)
    print("\n".join(lines))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
