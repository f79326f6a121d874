"""Classifier-free guidance on a batched UNet output (unconditional half first, conditional second)."""

from __future__ import annotations

import numpy as np


def guide(noise_pred: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0) -> np.ndarray:
    """Split a 2N batch into (uncond, cond) and combine them (Ho & Salimans 2022, eq. 6)."""
    uncond, cond = np.split(noise_pred, 2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        guided = rescale(guided, cond, guidance_rescale)
    return guided


def rescale(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Match the guided prediction's std to the conditional one (Lin et al. 2023, sec. 3.4, eq. 15-16)."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return (guidance_rescale * rescaled + (1.0 - guidance_rescale) * noise_cfg).astype(noise_cfg.dtype)
