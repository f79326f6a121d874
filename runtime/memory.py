"""Low-memory mode: engine settings and lifetimes that keep peak RSS small, without changing the image.

A pipeline in low-memory mode (`low_memory=True`, `sdrt generate --low-memory`):
- holds one network at a time: each engine is loaded when its stage first runs and released when
  the stage ends (text encoder -> VAE encoder -> UNet -> VAE decoder), and the freed heap is handed
  back to the system (glibc `malloc_trim`), so the UNet's weights never share memory with the others';
- runs classifier-free guidance as two UNet calls of N instead of one of 2N ("sequential"), which
  halves the UNet's activations (at 512 px, SD1.5's self-attention scores are 8 x 4096 x 4096 floats
  per image);
- opens sessions without onnxruntime's memory arena and memory pattern (`LOW_MEMORY_SESSION`), which
  otherwise keep the largest activations' blocks reserved between calls.
Every one of these leaves the numbers unchanged: tests/test_low_memory.py checks the image is the
normal mode's, bench/low_memory.py measures what each saves on SD1.5.

With the attention fused (`sdrt optimize --optimize cpu`: no score maps) the same settings stay the
defaults, by measurement (SD1.5 architecture, 512 px, bench/results/low-memory-sd15-2026-11-25.md):
keeping the UNet's arena and memory pattern made a step 3-7% faster for 1% (fp32) to 17% (int8) more
peak RSS, and batched guidance 9% faster for 16% (fp32) to 56% (int8) more; low-memory mode is then
no slower than the normal mode.

The folder's storage matters as much: a network whose weights sit in model.onnx_data is mapped by
onnxruntime, where one read from a single .onnx file is held about twice (the parsed file and the copies).
`sdrt optimize` and `sdrt quantize` write weights over 64 MiB that way (sdrt.export.folder.save_model):
SD1.5 int8 in low-memory mode with tiled VAE peaks at 1.48 GB instead of 1.82 GB
(bench/results/external-data-2026-12-06.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from sdrt.engines import Engine

CFG_MODES = ("batched", "sequential")

# SessionOptions fields for low-memory mode.
LOW_MEMORY_SESSION = {"enable_mem_arena": False, "enable_mem_pattern": False}

_libc = None


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc only; elsewhere a no-op)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def release(engine: Engine) -> None:
    """Unload an engine and return its memory to the system."""
    engine.release()
    trim_heap()
