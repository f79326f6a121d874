"""`sdrt bench`: how fast an exported folder generates, stage by stage, on this machine.

Measured per run (warm-up runs excluded): text encoder, UNet per step, scheduler + guidance per step,
VAE decode and end to end, summarized as median / p10 / p90. Cold start (process start -> first
image, with import and load apart) is measured in a fresh subprocess. Also: peak host RSS, peak GPU
memory through NVML when pynvml is importable, the machine and library versions, the settings, and the
provider each network actually ran on (with `allow_fallback` a missing one is replaced, with a warning).
Results are written as JSON + markdown (+ a PNG chart); bench/compare.py reuses these helpers.
Runtime only: numpy, onnxruntime, Pillow, tqdm; never torch.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from sdrt.engines.files import atomic_write_bytes, atomic_write_json
from sdrt.runtime.errors import GenerationError, InvalidInputError

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
GPU_PROVIDERS = ("cuda", "tensorrt-ep", "trt-ep", "CUDAExecutionProvider", "TensorrtExecutionProvider")
# Per-run figures, in seconds, and what the markdown calls them.
STAGES = {
    "text_encoder": "text encoder",
    "unet_step": "UNet, per step",
    "scheduler_and_guidance_step": "scheduler + CFG, per step",
    "vae_decoder": "VAE decode",
    "end_to_end": "end to end",
}


@dataclass(frozen=True)
class BenchSettings:
    provider: str = "cpu"
    steps: int = 10
    width: int | None = None  # None: the model's default size
    height: int | None = None
    batch: int = 1
    guidance: float = 7.5  # <= 1: no classifier-free guidance (one UNet batch, no negative prompt)
    scheduler: str | None = None  # None: the folder's scheduler
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    prompt: str = PROMPT
    cold_start: bool = True
    allow_fallback: bool = False  # a provider that is missing or fails: the next one down (cuda -> cpu), warned
    io_binding: bool | None = None  # None: on for onnxruntime on a GPU
    cuda_graph: bool = False  # the UNet with fixed shapes and a captured CUDA graph
    verify: str = "size"  # the folder's files against sdrt.json first: size, sha256 (remembered per file), none
    precision: str | None = None  # --provider openvino: auto | fp32 | bf16 | f16 (None: auto)
    performance_hint: str | None = None  # --provider openvino: latency | throughput
    num_threads: int | None = None  # --provider openvino: inference threads
    cache_interval: int = 1  # step caching (DeepCache): a full UNet every N steps, the shallow branch between

    def check(self) -> None:
        for name in ("steps", "batch", "runs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"--{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidInputError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if self.guidance < 0:
            raise InvalidInputError(f"--guidance must be >= 0 (<= 1 turns guidance off), got {self.guidance}")

    def pipeline_options(self) -> dict:
        """The keywords that open the pipeline (also sent to the cold-start subprocess)."""
        openvino = {k: getattr(self, k) for k in ("precision", "performance_hint", "num_threads")
                    if getattr(self, k) is not None}
        if self.cache_interval != 1:
            openvino["cache_interval"] = self.cache_interval
        return dict(provider=self.provider, scheduler=self.scheduler, allow_fallback=self.allow_fallback,
                    io_binding=self.io_binding, cuda_graph=self.cuda_graph, verify=self.verify, **openvino)

    def pipeline_kwargs(self, family: str = "stable-diffusion", distilled_guidance: bool = True) -> dict:
        """The keywords of one call of the folder's pipeline (also sent to the cold-start subprocess): a negative
        prompt where the family guides with CFG; Flux's guidance is its distilled input (none for schnell)."""
        kwargs = dict(prompt=self.prompt, negative_prompt=NEGATIVE if self.cfg(family) else None,
                      num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.height,
                      width=self.width, num_images_per_prompt=self.batch, seed=self.seed, output_type="uint8")
        if family == "flux" and not distilled_guidance:
            del kwargs["guidance_scale"]
        return kwargs

    def cfg(self, family: str = "stable-diffusion") -> bool:
        """Whether the runs use classifier-free guidance (LCM's and Flux's guidance is distilled)."""
        return self.guidance > 1 and family not in ("latent-consistency", "flux")


# -- statistics and the machine -------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict:
    """median, p10, p90 (linear interpolation), min, max and the raw values."""
    a = np.asarray(values, dtype=np.float64)
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size), "values": [float(v) for v in a]}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB).

    Linux: VmHWM, which starts afresh at exec; ru_maxrss would carry over the peak of the process
    that forked this one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict]:
    """Name, driver and memory of each NVIDIA GPU (NVML, else nvidia-smi); [] when there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"name": name.decode() if isinstance(name, bytes) else name,
                        "driver": driver.decode() if isinstance(driver, bytes) else driver,
                        "memory_mib": pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20})
        return out
    except Exception:  # not installed, no driver, no GPU
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        text = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in text.strip().splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1], "memory_mib": int(r[2]) if r[2].isdigit() else None} for r in rows if len(r) >= 3]


def library_versions(extra: Sequence[str] = ()) -> dict:
    out = {}
    for name in ("sdrt", "onnxruntime", "onnxruntime-gpu", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name != "onnxruntime-gpu":
                out[name] = None
    out["python"] = platform.python_version()
    return out


def source_state(repo) -> dict:
    """The checkout a benchmark ran from: its short HEAD and the uncommitted files under runtime/ and engines/
    (`git status --porcelain` lines), recorded beside the figures."""
    import subprocess

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout

    return {"head": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_runtime_engines": git("status", "--porcelain", "runtime", "engines").split("\n")[:-1]}


def machine_info(extra_libraries: Sequence[str] = ()) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "ram_gib": _ram_gib(),
        "gpus": _gpus(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": library_versions(extra_libraries),
    }


def machine_tag(machine: dict, provider: str = "cpu") -> str:
    """A short file-name-safe name of the machine: the GPU for GPU providers, else the CPU and its cores."""
    if provider in GPU_PROVIDERS and machine.get("gpus"):
        name = machine["gpus"][0]["name"]
    else:
        name = f"{machine['cpu']}-{machine['cpu_cores']}c"
    name = re.sub(r"\((r|tm)\)|processor|cpu|\d+-core|@.*?ghz", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "machine"


class DeviceMemoryPeak:
    """Samples GPU memory in use (NVML, every 20 ms) while active; `peak_mib` is None without pynvml."""

    def __init__(self, provider: str, index: int = 0):
        self.peak_mib = self.baseline_mib = None
        self._handle = None
        if provider not in GPU_PROVIDERS:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:
            self._handle = None

    def _used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used // 2**20

    def __enter__(self):
        if self._handle is not None:
            self.baseline_mib = self.peak_mib = self._used()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self._used())

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self._used())


# -- measuring ------------------------------------------------------------------------------------

def open_pipeline(folder, settings: BenchSettings):
    """The pipeline, with bad settings refused before anything heavy runs; returns (pipe, load seconds)."""
    from sdrt.runtime.families import text_to_image_pipeline

    settings.check()
    options = settings.pipeline_options()
    pipe = text_to_image_pipeline(folder, verify=options.pop("verify"), **options)
    default = pipe.folder.default_size
    pipe._check_size(settings.height or default, settings.width or default)
    t0 = time.perf_counter()
    for engine in pipe.core.models.engines():
        engine.load()
    return pipe, time.perf_counter() - t0


def call_kwargs(pipe, settings: BenchSettings) -> dict:
    """settings.pipeline_kwargs for the pipeline's family."""
    return settings.pipeline_kwargs(pipe.family, getattr(pipe.core.family, "distilled_guidance", True))


def time_one(pipe, settings: BenchSettings) -> dict:
    """One generation's stage timings in seconds (per step for the UNet and the scheduler)."""
    t0 = time.perf_counter()
    out = pipe(**call_kwargs(pipe, settings))
    end_to_end = time.perf_counter() - t0
    t = out.timings
    return {"text_encoder": t["text_encoder"], "unet_step": t["unet"] / t["unet_evaluations"],
            "scheduler_and_guidance_step": t["scheduler_and_guidance"] / t["unet_evaluations"],
            "vae_decoder": t["vae_decoder"], "end_to_end": end_to_end, "unet_evaluations": t["unet_evaluations"]}


_COLD_START = """
import json, sys, time
t_start = time.time()
t0 = time.perf_counter()
import onnxruntime
from sdrt.runtime.families import text_to_image_pipeline
t_import = time.perf_counter() - t0
s = json.loads(sys.argv[2])
t0 = time.perf_counter()
pipe = text_to_image_pipeline(sys.argv[1], **s["options"])
for engine in pipe.core.models.engines():
    engine.load()
t_load = time.perf_counter() - t0
t0 = time.perf_counter()
pipe(**s["kwargs"])
t_image = time.perf_counter() - t0
from sdrt.runtime.bench import peak_rss_mb
print(json.dumps({"t_start": t_start, "t_end": time.time(), "import_seconds": t_import, "load_seconds": t_load,
                  "first_image_seconds": t_image, "peak_rss_mib": peak_rss_mb()}))
"""


def cold_start(folder, settings: BenchSettings, kwargs: dict | None = None) -> dict:
    """Process start -> first image in a fresh interpreter, with import, load and first image apart; kwargs: the
    call's (call_kwargs of the measured pipeline)."""
    payload = json.dumps({"options": settings.pipeline_options(), "kwargs": kwargs or settings.pipeline_kwargs()})
    t_spawn = time.time()
    proc = subprocess.run([sys.executable, "-c", _COLD_START, str(folder), payload], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise GenerationError(f"the cold-start subprocess failed: {tail[0]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "process_start_to_first_image_seconds": child["t_end"] - t_spawn,
        "interpreter_start_seconds": child["t_start"] - t_spawn,
        "import_seconds": child["import_seconds"],
        "load_seconds": child["load_seconds"],
        "first_image_seconds": child["first_image_seconds"],
        "peak_rss_mib": child["peak_rss_mib"],
    }


def providers_used(pipe) -> dict:
    """The provider each network ran on (onnxruntime's session, after any fallback)."""
    return {name: getattr(pipe, name).provider_name for name in ("text_encoder", "unet", "vae_decoder")}


def unet_io(pipe) -> dict:
    """How the UNet's inputs and outputs travel (False where its engine has no such setting)."""
    return {name: bool(getattr(pipe.unet, name, False)) for name in ("io_binding", "fixed_shapes", "cuda_graph")}


def run_bench(folder, settings: BenchSettings, progress: bool = True) -> dict:
    """Everything `sdrt bench` reports, as one JSON-ready dict."""
    from tqdm.auto import tqdm

    machine = machine_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    with DeviceMemoryPeak(settings.provider) as device_memory:
        pipe, load_seconds = open_pipeline(folder, settings)
        runs = []
        bar = tqdm(total=settings.warmup + settings.runs, desc="sdrt bench", unit="run", disable=not progress)
        for i in range(settings.warmup + settings.runs):
            bar.set_postfix_str("warm-up" if i < settings.warmup else "measured")
            timing = time_one(pipe, settings)
            if i >= settings.warmup:
                runs.append(timing)
            bar.update()
        bar.close()
    rss = peak_rss_mb()
    default = pipe.folder.default_size
    used, io = providers_used(pipe), unet_io(pipe)
    kwargs, family = call_kwargs(pipe, settings), pipe.family
    pipe.release()
    cold = None
    if settings.cold_start:
        if progress:
            print("sdrt bench: cold start in a fresh process ...", file=sys.stderr, flush=True)
        cold = cold_start(folder, settings, kwargs)
    return {
        "kind": "sdrt-bench",
        "date": started.isoformat(timespec="seconds"),
        "folder": str(Path(folder).resolve()),
        "model": model_label(folder),
        "settings": {**asdict(settings), "width": settings.width or default, "height": settings.height or default,
                     "cfg": settings.cfg(family), "scheduler": settings.scheduler or pipe.scheduler.name,
                     "unet_evaluations": runs[0]["unet_evaluations"]},
        "provider_used": used["unet"],
        "providers_used": used,
        "unet_io": io,
        "machine": machine,
        "load_average_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "stages": {name: summarize([r[name] for r in runs]) for name in STAGES},
        "load_seconds": load_seconds,
        "cold_start": cold,
        "memory": {"peak_host_rss_mib": rss, "peak_device_memory_mib": device_memory.peak_mib,
                   "device_memory_baseline_mib": device_memory.baseline_mib},
    }


def model_label(folder) -> str:
    """The folder's name, with its parent's when the name alone says nothing ("onnx", "exported")."""
    path = Path(folder).resolve()
    generic = {"onnx", "exported", "export", "model", "out", "output"}
    return f"{path.parent.name}-{path.name}" if path.name.lower() in generic else path.name


# -- writing --------------------------------------------------------------------------------------

def result_stem(kind: str, machine: dict, provider: str, label: str, when: str | None = None) -> str:
    """`<kind>-<YYYYmmdd-HHMM>-<machine>-<label>`: date and machine in every result file's name."""
    when = when or datetime.datetime.now().strftime("%Y%m%d-%H%M")
    label = re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")
    return f"{kind}-{when}-{machine_tag(machine, provider)}-{label}"


def machine_line(machine: dict) -> str:
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in machine["gpus"]) or "no GPU"
    v = machine["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return (f"{machine['cpu']}, {machine['cpu_cores']} cores ({machine['cpu_cores_usable']} usable), "
            f"{machine['ram_gib']} GiB RAM, {gpus}; load average {machine['load_average_1m']:.2f} at start; {libs}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def provider_text(result: dict) -> str:
    """"provider cuda, UNet with IO binding", or "provider cuda (fell back to cpu)"; older results: the provider."""
    from sdrt.engines.providers import parse_provider

    s, used = result["settings"], result.get("provider_used")
    text = f"provider {s['provider']}"
    if used is not None and used != parse_provider(s["provider"]).kind:
        text += f" (fell back to {used})"
    io = [label for key, label in (("io_binding", "IO binding"), ("cuda_graph", "CUDA graph"))
          if result.get("unet_io", {}).get(key)]
    return text + (f", UNet with {' and '.join(io)}" if io else "")


def to_markdown(result: dict) -> str:
    s, cold, mem = result["settings"], result["cold_start"], result["memory"]
    lines = [
        f"# sdrt bench: {result['model']}",
        "",
        f"{result['date']} on {machine_line(result['machine'])}.",
        "",
        f"Settings: {provider_text(result)}, {s['width']}x{s['height']}, batch {s['batch']}, {s['steps']} steps "
        f"({s['unet_evaluations']} UNet evaluations) with {s['scheduler']}, guidance {s['guidance']} "
        f"({'CFG: one batched UNet call of 2 x batch' if s['cfg'] else 'no CFG'}), {s['runs']} measured runs after "
        f"{s['warmup']} warm-up.",
        "",
        "| stage | median ms | p10 ms | p90 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, label in STAGES.items():
        st = result["stages"][name]
        lines.append(f"| {label} | {_ms(st['median'])} | {_ms(st['p10'])} | {_ms(st['p90'])} |")
    lines += ["", f"Engine load in the benchmark process: {result['load_seconds']:.2f} s."]
    if cold:
        lines += [
            "",
            f"Cold start (fresh process): {cold['process_start_to_first_image_seconds']:.2f} s from process start to "
            f"first image = interpreter {cold['interpreter_start_seconds']:.2f} s + import {cold['import_seconds']:.2f} s"
            f" + load {cold['load_seconds']:.2f} s + first image {cold['first_image_seconds']:.2f} s; "
            f"peak RSS {cold['peak_rss_mib']:,.0f} MiB.",
        ]
    device = "n/a (CPU provider or no pynvml)" if mem["peak_device_memory_mib"] is None \
        else f"{mem['peak_device_memory_mib']:,} MiB in use on the GPU (all processes; {mem['device_memory_baseline_mib']:,} before)"
    lines += ["", f"Peak host RSS of the benchmark process: {mem['peak_host_rss_mib']:,.0f} MiB. Peak device memory: {device}.",
              "", f"Load average (1 min) after the runs: {result['load_average_1m_after']:.2f} on "
                  f"{result['machine']['cpu_cores']} cores; on a shared machine, read the ratios, not the absolute times.", ""]
    return "\n".join(lines)


def write_results(result: dict, out_dir, stem: str, markdown: str, chart: dict | None = None) -> list[Path]:
    """Write <stem>.json, <stem>.md and (with `chart`) <stem>.png atomically; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write_json(paths[0], result)
    atomic_write_bytes(paths[1], markdown.encode())
    if chart is not None:
        paths.append(out_dir / f"{stem}.png")
        plot_chart(paths[2], **chart)
    return paths


def bench_chart(result: dict) -> dict:
    """Chart rows for one `sdrt bench` result: per-image stage totals and the end-to-end spread."""
    st, evals = result["stages"], result["settings"]["unet_evaluations"]
    stages = {"text encoder": st["text_encoder"]["median"], "UNet": st["unet_step"]["median"] * evals,
              "scheduler + CFG": st["scheduler_and_guidance_step"]["median"] * evals,
              "VAE decode": st["vae_decoder"]["median"]}
    s = result["settings"]
    title = (f"sdrt bench: {result['model']}, {s['width']}x{s['height']}, {s['steps']} steps, "
             f"{'CFG' if s['cfg'] else 'no CFG'}, {result.get('provider_used', s['provider'])} "
             f"({result['machine']['cpu_cores']} cores)")
    return {"title": title, "rows": [{"label": "sdrt", "stages": stages, "end_to_end": st["end_to_end"]}]}


# -- the chart ------------------------------------------------------------------------------------

COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def plot_chart(path, title: str, rows: list[dict]) -> Path:
    """Two panels: each row's stage breakdown (stacked, seconds per image) and its end-to-end median
    with a p10-p90 whisker. rows: [{"label", "stages": {name: seconds}, "end_to_end": summary}].
    matplotlib when importable, else Pillow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(Path(path), title, rows)
    names = list(rows[0]["stages"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 2.2 + 1.2 * len(rows)), sharex=True)
    for y, row in enumerate(rows):
        left = 0.0
        for k, name in enumerate(names):
            v = row["stages"][name]
            ax1.barh(y, v, left=left, color=COLOURS[k % len(COLOURS)], label=name if y == 0 else None)
            left += v
        e = row["end_to_end"]
        ax2.barh(y, e["median"], color="#777777", xerr=[[e["median"] - e["p10"]], [e["p90"] - e["median"]]], capsize=4)
        ax2.text(e["p90"], y, f"  {e['median']:.2f} s", va="center")
    for ax, sub in ((ax1, "stage breakdown (median, per image)"), (ax2, "end to end (median, p10-p90)")):
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
        ax.invert_yaxis()
        ax.set_title(sub, fontsize=10)
    ax1.legend(ncol=len(names), fontsize=8, loc="lower right")
    ax2.set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _plot_pillow(path: Path, title: str, rows: list[dict]) -> Path:
    from PIL import Image, ImageDraw

    names = list(rows[0]["stages"])
    width, left, right, bar_h, gap = 1000, 130, 120, 30, 14
    panel_h = len(rows) * (bar_h + gap) + 40
    height = 60 + 2 * panel_h + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    d.text((20, 14), title, fill="black", font=font)
    vmax = max(max(sum(r["stages"].values()), r["end_to_end"]["p90"]) for r in rows) * 1.05
    scale = (width - left - right) / vmax

    def x(v: float) -> float:
        return left + v * scale

    for p, sub in enumerate(("stage breakdown (median, seconds per image)", "end to end (median, whisker p10-p90)")):
        top = 50 + p * panel_h
        d.text((left, top), sub, fill="#333333", font=small)
        for i, row in enumerate(rows):
            y0 = top + 22 + i * (bar_h + gap)
            d.text((20, y0 + bar_h / 2), row["label"], fill="black", font=font, anchor="lm")
            if p == 0:
                start = 0.0
                for k, name in enumerate(names):
                    v = row["stages"][name]
                    d.rectangle([x(start), y0, x(start + v), y0 + bar_h], fill=COLOURS[k % len(COLOURS)])
                    start += v
                d.text((x(start) + 6, y0 + bar_h / 2), f"{start:.2f} s", fill="black", font=small, anchor="lm")
            else:
                e = row["end_to_end"]
                d.rectangle([x(0), y0, x(e["median"]), y0 + bar_h], fill="#888888")
                ym = y0 + bar_h / 2
                d.line([x(e["p10"]), ym, x(e["p90"]), ym], fill="black", width=2)
                for v in (e["p10"], e["p90"]):
                    d.line([x(v), ym - 8, x(v), ym + 8], fill="black", width=2)
                d.text((x(e["p90"]) + 6, ym), f"{e['median']:.2f} s", fill="black", font=small, anchor="lm")
    # x axis with ticks, below both panels.
    axis_y = 50 + 2 * panel_h + 6
    d.line([x(0), axis_y, x(vmax), axis_y], fill="black")
    step = _tick_step(vmax)
    for k in range(int(vmax / step) + 1):
        v = k * step
        d.line([x(v), axis_y, x(v), axis_y + 5], fill="black")
        d.text((x(v), axis_y + 8), f"{v:g}", fill="black", font=small, anchor="mt")
    d.text((x(vmax), axis_y + 8), "s", fill="black", font=small, anchor="lt")
    # legend
    lx = left
    for k, name in enumerate(names):
        d.rectangle([lx, height - 24, lx + 14, height - 10], fill=COLOURS[k % len(COLOURS)])
        d.text((lx + 20, height - 17), name, fill="black", font=small, anchor="lm")
        lx += 40 + d.textlength(name, font=small)
    img.save(path)
    return path


def _tick_step(vmax: float) -> float:
    raw = vmax / 6
    magnitude = 10 ** np.floor(np.log10(raw))
    for m in (1, 2, 5, 10):
        if m * magnitude >= raw:
            return float(m * magnitude)
    return float(10 * magnitude)
