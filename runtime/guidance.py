"""Classifier-free guidance on a batched UNet output (unconditional half first, conditional second), its
rescale, and the guidance interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers.plan import Plan


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


def sigma(plan: Plan, i: int) -> float:
    """The noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of evaluation i: add_noise's noise coefficient
    over its signal coefficient, whichever view (sigma or variance-preserving) the solver works in."""
    signal, noise = (float(c) for c in plan.noise_coefficients[i])
    return noise / signal if signal > 0 else float("inf")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of one run: `enabled` (scale > 1 and a family that has no distilled guidance),
    the scale, the rescale, and the interval of noise levels where it applies (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval improves sample and distribution quality": steps whose sigma is
    outside [lo, hi] run the conditional half alone)."""

    enabled: bool
    scale: float
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def active(self, plan: Plan, i: int) -> bool:
        """Whether evaluation i runs both halves and combines them."""
        if not self.enabled:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo <= sigma(plan, i) <= hi

    def combine(self, noise_pred: np.ndarray) -> np.ndarray:
        return guide(noise_pred, self.scale, self.rescale)
