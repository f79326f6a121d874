"""Noise schedules as pure functions: betas, alphas_cumprod, timestep spacing, sigmas.

Tables are float64 arrays. Where diffusers builds a table in float32 torch (betas,
alphas_cumprod, the discrete sigmas) the function rounds through float32 at the same points, so
the float64 values are exactly diffusers' float32 values; that is what keeps whole sampling loops
within 1e-5 of diffusers. Solvers build their per-step coefficients from these tables.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` value for value.

    torch's CPU kernel computes `start + step * i` for the first half and `end - step * (n-1-i)`
    for the second, each as one fused multiply-add rounded to float32; float64 emulates the fma.
    """
    start32, end32 = F32(start), F32(end)
    step = (end32 - start32) / F32(steps - 1) if steps > 1 else F32(0.0)
    i = np.arange(steps)
    from_start = (np.float64(start32) + np.float64(step) * i).astype(F32)
    from_end = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(F32)
    return np.where(i < steps // 2, from_start, from_end)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas discretizing the cosine alpha_bar of Nichol & Dhariwal 2021 ("squaredcos_cap_v2")."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=F32).astype(np.float64)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The training betas, float64 holding diffusers' float32 values."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=F32)
    elif beta_schedule == "linear":
        betas = linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    else:
        raise AssertionError(f"beta_schedule {beta_schedule!r} should have been refused by resolve_config")
    return betas.astype(np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules ...", Alg. 1)."""
    alphas = F32(1.0) - betas.astype(F32)
    alphas_bar_sqrt = np.sqrt(cumprod_f32(alphas))
    sqrt_0, sqrt_T = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - sqrt_T) * (sqrt_0 / (sqrt_0 - sqrt_T))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1.0) - alphas).astype(np.float64)


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 tensor on CPU: accumulated in float64, stored as float32."""
    return np.cumprod(values.astype(np.float64)).astype(F32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020), as diffusers' float32 table."""
    return cumprod_f32(F32(1.0) - betas.astype(F32)).astype(np.float64)


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Descending inference timesteps (float64) for "linspace", "leading" or "trailing" spacing.

    See Lin et al. 2023, Table 2. "linspace" values are fractional: integer-timestep solvers round
    them (DDIM, DDPM, PNDM), sigma-based solvers cast them to float32 (Euler, Heun, LMS).
    """
    n, N = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, N - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (N // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(N, 0, -N / n)) - 1
    raise AssertionError(f"timestep_spacing {spacing!r} should have been refused by resolve_config")


def discrete_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep, in float32 like diffusers."""
    ac = alphas_cumprod.astype(F32)
    return np.sqrt((F32(1.0) - ac) / ac)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. 2022 (EDM), eq. 5; n values from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n noise levels evenly spaced in log sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of `sigma`, interpolating linearly in log sigma (as diffusers)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)
