"""Tiled VAE: run the decoder (or encoder) on overlapping tiles and blend them, for big images in small memory.

The image is cut into square tiles on the latent grid (`Tiling.size` / `Tiling.overlap` are in image
pixels, multiples of the VAE's scale factor); each tile goes through the network alone and the
outputs are blended with weights that ramp linearly across each overlap, so neighbouring tiles fade
into each other instead of meeting at a seam. Tiles are not exact: the VAE's GroupNorm sees only one
tile's statistics and each tile's border lacks context, so a tiled decode differs from a whole one
(bench/low_memory.py and tests/test_tiling.py report the difference as PSNR). Memory falls with the
tile's area: the decoder's activations at 512 px are about 1.5 GB, at 256 px a quarter.

Pure NumPy over a run function (NCHW in, NCHW out), so that it serves every engine and network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sdrt.runtime.errors import InvalidInputError

RunFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tiling:
    """Square tiles of `size` image pixels overlapping by `overlap` pixels (both multiples of the VAE factor)."""

    size: int = 512
    overlap: int = 64

    def check(self, scale_factor: int) -> None:
        for name, v in (("tile size", self.size), ("tile overlap", self.overlap)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or v % scale_factor:
                raise InvalidInputError(
                    f"{name} must be a non-negative multiple of the VAE's factor {scale_factor} px, got {v!r}"
                )
        if self.size <= self.overlap:
            raise InvalidInputError(
                f"tile size {self.size} px must be larger than the tile overlap {self.overlap} px "
                f"({self.size // scale_factor} vs {self.overlap // scale_factor} latent cells), or tiles "
                f"would not advance; use e.g. size {max(2 * self.overlap, 4 * scale_factor)} or a smaller overlap"
            )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering `length`, stepping by tile - overlap; the last ends at length."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = -(-(length - overlap) // stride)  # ceil
    return sorted({min(k * stride, length - tile) for k in range(count)})


def _ramp(length: int, start: int, stop: int, total: int, overlap: int) -> np.ndarray:
    """1-D blending weight of a tile spanning [start, stop) of `total`: a linear ramp over `overlap` at each
    side that meets another tile (strictly positive), 1 elsewhere and at the image's own edges."""
    w = np.ones(length, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        n = min(overlap, length)
        if start > 0:
            w[:n] = np.minimum(w[:n], ramp[:n])
        if stop < total:
            w[length - n:] = np.minimum(w[length - n:], ramp[:n][::-1])
    return w


def tiled_map(run: RunFn, x: np.ndarray, tile: int, overlap: int, in_per_cell: int, out_per_cell: int) -> np.ndarray:
    """Apply `run` to overlapping tiles of NCHW `x` and blend the outputs.

    The grid is laid in cells (latent cells): `x` has `in_per_cell` pixels per cell (1 for latents, the
    VAE factor for images), `run`'s output `out_per_cell`. `tile` and `overlap` are in cells.
    """
    h_cells, w_cells = x.shape[2] // in_per_cell, x.shape[3] // in_per_cell
    out = weights = None
    for top in tile_starts(h_cells, tile, overlap):
        for left in tile_starts(w_cells, tile, overlap):
            bottom, right = min(top + tile, h_cells), min(left + tile, w_cells)
            y = run(x[:, :, top * in_per_cell:bottom * in_per_cell, left * in_per_cell:right * in_per_cell])
            if out is None:
                out = np.zeros((*y.shape[:2], h_cells * out_per_cell, w_cells * out_per_cell), dtype=np.float32)
                weights = np.zeros(out.shape[2:], dtype=np.float32)
            o = overlap * out_per_cell
            w = np.outer(_ramp(y.shape[2], top, bottom, h_cells, o), _ramp(y.shape[3], left, right, w_cells, o))
            rows = slice(top * out_per_cell, bottom * out_per_cell)
            cols = slice(left * out_per_cell, right * out_per_cell)
            out[:, :, rows, cols] += y * w
            weights[rows, cols] += w
    return out / weights


def decode(run: RunFn, latents: np.ndarray, tiling: Tiling | None, scale_factor: int) -> np.ndarray:
    """VAE decode of NCHW latents, whole (tiling None) or in tiles; `run` maps latents to pixels."""
    if tiling is None:
        return run(latents)
    tiling.check(scale_factor)
    return tiled_map(run, latents, tiling.size // scale_factor, tiling.overlap // scale_factor, 1, scale_factor)


def encode(run: RunFn, pixels: np.ndarray, tiling: Tiling | None, scale_factor: int) -> np.ndarray:
    """VAE encode of NCHW pixels, whole (tiling None) or in tiles; `run` maps pixels to latent parameters."""
    if tiling is None:
        return run(pixels)
    tiling.check(scale_factor)
    return tiled_map(run, pixels, tiling.size // scale_factor, tiling.overlap // scale_factor, scale_factor, 1)
