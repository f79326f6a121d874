"""Memory checked before it is spent: a generation's peak estimated from the folder's configs and file sizes, and
compared with the memory available, before any engine runs.

What dominates, and is counted:
- the weights of the networks loaded together (every network in normal mode; one stage at a time in low-memory
  mode), from their file sizes;
- the UNet's attention score maps where the graph computes them unfused (an `sdrt export`: MatMul -> Softmax
  on a (rows, heads, T, T) tensor; `sdrt optimize` fuses them away): T is the token count of the highest
  resolution with attention, so they grow with the fourth power of the image side. Rows are the images of one
  UNet call (twice the batch with batched guidance, the batch in sequential mode);
- the feature maps of the largest stage (the UNet's first level, the VAE decoder's full-resolution blocks per
  image or per tile; its mid-block attention at latent resolution), onnxruntime's prepacked copies of the
  decoder's weights, and, outside low-memory mode, what the UNet's arena still holds while the decoder runs.

The factors were checked against measured peak RSS (bench/memory_estimate.py: the SD1.5 architecture at 256-768
px, normal and low-memory mode; tests/test_budget.py: the demo model). The estimate is a guard against
runs that cannot fit (an image far past the trained size, a huge batch), not a prediction to the megabyte.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from sdrt.runtime.errors import InsufficientMemoryError

# An unfused attention holds the scores and their softmax at once, and onnxruntime's arena (grown by doubling,
# kept between calls) holds more: measured on the demo UNet at 128-256 px, 2-2.5 maps without the arena
# (low-memory sessions), up to 5.3 with it.
SCORE_COPIES = {True: 5.5, False: 3.0}  # arena on -> copies (SD1.5 low-memory 512-768 px: 2.7-2.9)
FEATURE_COPIES = 6  # a block's input, output, its norm and activation and the skip tensors alive together
DECODER_COPIES = 8  # the VAE decoder's full-resolution blocks (measured: SD1.5's at 256-768 px)
PREPACKED = 2  # onnxruntime's reordered (NCHWc, prepacked) copies of a decoder's conv weights, per byte of file
UNET_RETAINED = 0.7  # of the UNet's activations, what its arena still holds when the decoder runs (arena on)
FLOAT = 4  # bytes (fp32 activations; fp16 folders keep fp32 IO and mostly fp16 inside: counted as fp32)
BASE_BYTES = 300 * 2**20  # the interpreter, NumPy, onnxruntime and the tokenizers
REFUSE_ABOVE = 1.25  # refuse when the estimate exceeds the memory available by this much; warn in between
MEMORY_ENV = "SDRT_AVAILABLE_MEMORY"  # bytes: overrides what the machine reports (tests, containers)


@dataclass(frozen=True)
class Estimate:
    total: int
    parts: dict  # stage -> bytes at its peak (weights of what is loaded then + its activations)
    weights: dict  # network -> bytes of its files

    def describe(self) -> str:
        return ", ".join(f"{name} {gib(size)}" for name, size in self.parts.items())


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_bytes() -> int | None:
    """Memory this process may still use: $SDRT_AVAILABLE_MEMORY, else the smaller of the kernel's MemAvailable
    and the cgroup's limit less its usage; None where neither is known."""
    if os.environ.get(MEMORY_ENV):
        try:
            return int(float(os.environ[MEMORY_ENV]))
        except ValueError:
            raise InsufficientMemoryError(f"${MEMORY_ENV} must be a number of bytes, got "
                                          f"{os.environ[MEMORY_ENV]!r}") from None
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _file_bytes(path) -> int:
    """A network's weights: model.onnx and its external data beside it."""
    folder = path.parent
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


def _heads(config: dict, level: int) -> int:
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8  # diffusers' legacy name
    if isinstance(heads, (list, tuple)):
        heads = heads[min(level, len(heads) - 1)]
    return int(heads)


def unet_activations(config: dict, rows: int, latent_h: int, latent_w: int, fused: bool, arena: bool = True) -> int:
    channels = list(config.get("block_out_channels") or [320])
    kinds = list(config.get("down_block_types") or ["CrossAttnDownBlock2D"] * len(channels))
    features, scores = 0, 0
    for level, width in enumerate(channels):
        tokens = -(-latent_h // 2**level) * -(-latent_w // 2**level)
        features = max(features, FEATURE_COPIES * rows * width * tokens * FLOAT)
        attends = "Attn" in str(kinds[level]) if level < len(kinds) else False
        if level == len(channels) - 1:
            attends = attends or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
        if attends and not fused:
            scores = max(scores, SCORE_COPIES[arena] * rows * _heads(config, level) * tokens * tokens * FLOAT)
    return int(features + scores)


def transformer_activations(config: dict, rows: int, latent_h: int, latent_w: int, text_tokens: int, fused: bool,
                            arena: bool = True) -> int:
    """A diffusion transformer (SD3, Flux): its joint attention over image and text tokens, scores unfused, and
    the token features of a block (hidden width = heads x head width; the MLP 4x wider)."""
    patch = 2 if config.get("_class_name") == "FluxTransformer2DModel" else int(config.get("patch_size", 2))
    tokens = -(-latent_h // patch) * -(-latent_w // patch) + text_tokens
    heads = int(config.get("num_attention_heads") or 24)
    width = heads * int(config.get("attention_head_dim") or 64)
    features = FEATURE_COPIES * rows * tokens * 4 * width * FLOAT
    scores = 0 if fused else SCORE_COPIES[arena] * rows * heads * tokens * tokens * FLOAT
    return int(features + scores)


def decoder_activations(config: dict, height: int, width: int, scale: int, fused: bool, arena: bool = True) -> int:
    """One image (or tile) through the VAE decoder: its widest feature map, and its mid-block attention (one
    head, at latent resolution) where unfused."""
    channels = list(config.get("block_out_channels") or [128])
    features = max(DECODER_COPIES * c * -(-height // 2**level) * -(-width // 2**level) * FLOAT
                   for level, c in enumerate(channels))
    tokens = -(-height // scale) * -(-width // scale)
    attention = 0 if fused or config.get("mid_block_add_attention") is False else \
        SCORE_COPIES[arena] * tokens ** 2 * FLOAT
    return int(features + attention)


def estimate(run, height: int | None = None, width: int | None = None) -> Estimate:
    """The peak of the generation `run` (sdrt.runtime.core.generate.Run, after the tasks' prepare), or of the same
    run at another size."""
    models, folder = run.models, run.folder
    height, width = height or run.height, width or run.width
    fused = bool((folder.manifest or {}).get("optimize"))
    scale = folder.vae.scale_factor
    latent_h, latent_w = -(-height // scale), -(-width // scale)
    rows = run.batch * (2 if run.guidance.enabled and run.cfg_mode != "sequential" else 1)
    denoiser = folder.denoiser
    loaded = [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(models, c, None) is not None]
    loaded.append(denoiser)
    loaded.append(models.vae_choice.decoder)
    if models.vae_encoder is not None:
        loaded.append(models.vae_choice.encoder)
    weights = {name: _file_bytes(folder.onnx_path(name)) for name in loaded if folder.onnx_path(name).is_file()}
    for k, (net, _) in enumerate(models.controlnets):
        weights[f"controlnet {k}"] = _file_bytes(net.path / "model.onnx")
    tile = run.vae_tiling.size if run.vae_tiling is not None else None
    dh, dw = (min(tile, height), min(tile, width)) if tile else (height, width)
    arena = not models.low_memory  # low-memory sessions run without onnxruntime's arena
    if denoiser == "transformer":
        unet = transformer_activations(folder.unet_config, rows, latent_h, latent_w, run.family.text_tokens(run.request),
                                       fused, arena)
    else:
        unet = unet_activations(folder.unet_config, rows, latent_h, latent_w, fused, arena)
    unet += sum(unet_activations(net.config, rows, latent_h, latent_w, False, arena) for net, _ in models.controlnets)
    decoder = decoder_activations(folder.configs.get("vae_decoder", {}), dh, dw, scale, fused, arena)
    decoder += PREPACKED * weights.get(models.vae_choice.decoder, 0)
    latents = 2 * rows * folder.vae.latent_channels * latent_h * latent_w * FLOAT
    images = run.batch * 3 * height * width * (FLOAT + 1)  # the decoded batch, float and uint8
    if models.low_memory:
        parts = {"encoding": max((weights.get(c, 0) for c in loaded if c.startswith("text_encoder")), default=0),
                 "denoising": weights.get(denoiser, 0) + sum(v for k, v in weights.items() if k.startswith("control"))
                 + unet + latents,
                 "decoding": weights.get(models.vae_choice.decoder, 0) + decoder + images}
    else:
        everything = sum(weights.values())
        parts = {"denoising": everything + unet + latents,
                 "decoding": everything + int(UNET_RETAINED * unet) + decoder + images}
    parts = {k: v + BASE_BYTES for k, v in parts.items()}
    return Estimate(max(parts.values()), parts, weights)


def check(run) -> Estimate | None:
    """Refuse a generation whose estimated peak exceeds the memory available, naming the estimate, the memory
    and what would fit; warn when the size is far past the model's trained size. Before any engine runs."""
    folder = run.folder
    trained = folder.default_size
    if max(run.height, run.width) > 2 * trained:
        warnings.warn(f"{run.width}x{run.height} is far past the size this model was trained at ({trained}x{trained}):"
                      " expect repeated or broken content, and much more time and memory", RuntimeWarning,
                      stacklevel=3)
    available = available_bytes()
    if available is None:
        return None
    found = estimate(run)
    if found.total <= available:
        return found
    if found.total <= REFUSE_ABOVE * available:  # the estimate errs high: a close call runs, with a warning
        warnings.warn(f"{run.width}x{run.height} x {run.batch} may not fit in memory: about {gib(found.total)} "
                      f"estimated, {gib(available)} available (--low-memory, or sdrt optimize, lowers it)",
                      RuntimeWarning, stacklevel=3)
        return found
    hints = []
    if not run.models.low_memory or (run.guidance.enabled and run.cfg_mode != "sequential"):
        hints.append("--low-memory (low_memory=True: one network at a time, guidance halves in turn)")
    if not (folder.manifest or {}).get("optimize"):
        hints.append("`sdrt optimize` (fused attention: no score maps)")
    if found.parts.get("decoding", 0) > found.parts.get("denoising", 0) and run.vae_tiling is None:
        hints.append("--tile-size 256 (a tiled VAE decode)")
    if run.batch > 1:
        hints.append("fewer images per call")
    step, fits = folder.pixel_multiple, None
    side = min(max(run.height, run.width), 1 << 16) // step * step
    while side >= step and fits is None:
        if estimate(run, side, side).total <= available:
            fits = side
        side = side - step if side <= 4096 else side // 2 // step * step
    size = f"at most {fits}x{fits} here" if fits else "none fits as it is"
    hints.append(f"a smaller size ({size}; the model's own is {trained}x{trained})")
    raise InsufficientMemoryError(
        f"{run.width}x{run.height} x {run.batch} image{'s' if run.batch > 1 else ''} needs about "
        f"{gib(found.total)} ({found.describe()}), and {gib(available)} is available; try "
        + "; ".join(hints))
