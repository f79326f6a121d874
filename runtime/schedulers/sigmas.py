"""Inference sigmas and timesteps for the sigma-view solvers (Euler, Euler ancestral, Heun, LMS).

Follows diffusers' `set_timesteps` of those classes: space the timesteps, interpolate the training
sigmas at them (or replace them by Karras / exponential sigmas and map those back to fractional
timesteps), then append the final sigma (zero, or sigma_min).
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.plan import training_alphas_cumprod

F32 = np.float32


def sigma_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t for the sigma view; with zero terminal SNR the last one becomes 2**-24 so sigma_max is finite."""
    alphas_cumprod = training_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def sigma_schedule(config: SchedulerConfig, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) as float32: n timesteps, n + 1 sigmas (the last is the final sigma)."""
    n = num_inference_steps
    alphas_cumprod = sigma_alphas_cumprod(config)
    train_sigmas = schedule.discrete_sigmas(alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    timesteps = schedule.spaced_timesteps(config.num_train_timesteps, n, config.timestep_spacing, config.steps_offset)
    timesteps = timesteps.astype(F32)

    if config.interpolation_type == "linear":
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    else:  # "log_linear": n + 1 sigmas evenly spaced in log sigma over the whole training range, as diffusers
        sigmas = np.exp(schedule.linspace_f32(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), n + 1))

    if config.use_karras_sigmas or config.use_exponential_sigmas:
        sigma_min = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
        sigma_max = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        make = schedule.karras_sigmas if config.use_karras_sigmas else schedule.exponential_sigmas
        sigmas = make(n, sigma_min, sigma_max)
        timesteps = schedule.sigma_to_t(sigmas, log_sigmas).astype(F32)

    final_sigma = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else F32(0.0)
    sigmas = np.concatenate([sigmas, [final_sigma]]).astype(F32)
    if config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
        timesteps = F32(0.25) * np.log(sigmas[:-1])  # continuous-time v models take c_noise = log(sigma) / 4
    return timesteps, sigmas


def init_noise_sigma(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    """Scale of the initial latents: sigma_max, or sqrt(sigma_max^2 + 1) with "leading" spacing (as diffusers)."""
    max_sigma = F32(np.max(sigmas))
    if config.timestep_spacing in ("linspace", "trailing"):
        return float(max_sigma)
    return float(np.sqrt(max_sigma * max_sigma + F32(1.0)))


def input_divisors(sigmas: np.ndarray) -> np.ndarray:
    """sqrt(sigma^2 + 1) per evaluation: the UNet sees x / sqrt(sigma^2 + 1) (Karras et al. 2022, c_in)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    return np.sqrt(sigmas * sigmas + F32(1.0))
