"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eta = 0 deterministic, eta > 0 stochastic.

Mirrors diffusers' DDIMScheduler; `eta` is a plan option (`scheduler.plan(n, eta=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.parameterization import alpha_epsilon, alpha_x0
from sdrt.runtime.schedulers.plan import (
    Plan,
    Solver,
    alpha_plan,
    draw_noise,
    frozen,
    frozen_table,
    training_alphas_cumprod,
)

F32 = np.float32


@dataclass(frozen=True, eq=False)
class DDIMCoefficients:
    sqrt_alpha: np.ndarray  # sqrt(alpha_bar_t)
    sqrt_beta: np.ndarray  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prev: np.ndarray  # sqrt(alpha_bar_{t_prev})
    direction: np.ndarray  # sqrt(1 - alpha_bar_prev - sigma_t^2): coefficient of eps ("direction pointing to x_t")
    noise_std: np.ndarray  # sigma_t = eta * sqrt(variance), eq. 16
    eta: float
    clip_sample_range: float | None


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    n, N = num_inference_steps, config.num_train_timesteps
    alphas_cumprod = training_alphas_cumprod(config)
    ac = alphas_cumprod.astype(F32)
    final_alpha_cumprod = F32(1.0) if config.set_alpha_to_one else ac[0]

    timesteps = np.round(schedule.spaced_timesteps(N, n, config.timestep_spacing, config.steps_offset)).astype(np.int64)
    prev_timesteps = timesteps - N // n  # diffusers steps back by N // n whatever the spacing
    alpha_prod_t = ac[timesteps]
    alpha_prod_t_prev = np.where(prev_timesteps >= 0, ac[np.maximum(prev_timesteps, 0)], final_alpha_cumprod)
    beta_prod_t = F32(1.0) - alpha_prod_t
    beta_prod_t_prev = F32(1.0) - alpha_prod_t_prev
    # eq. 16: sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    variance = (beta_prod_t_prev / beta_prod_t) * (F32(1.0) - alpha_prod_t / alpha_prod_t_prev)
    noise_std = F32(eta) * np.sqrt(variance)

    coefficients = frozen_table(
        DDIMCoefficients,
        sqrt_alpha=np.sqrt(alpha_prod_t),
        sqrt_beta=np.sqrt(beta_prod_t),
        sqrt_alpha_prev=np.sqrt(alpha_prod_t_prev),
        direction=np.sqrt(F32(1.0) - alpha_prod_t_prev - noise_std * noise_std),
        noise_std=noise_std,
        eta=float(eta),
        clip_sample_range=float(config.clip_sample_range) if config.clip_sample else None,
    )
    return alpha_plan(config, n, timesteps, alphas_cumprod, coefficients, start)


def step(plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: None, rng) -> tuple[np.ndarray, None]:
    """DDIM update, eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
    c = plan.coefficients
    pred_x0 = alpha_x0(plan.prediction_type, model_output, sample, c.sqrt_alpha[i], c.sqrt_beta[i])
    pred_epsilon = alpha_epsilon(plan.prediction_type, model_output, sample, pred_x0, c.sqrt_alpha[i], c.sqrt_beta[i])
    if c.clip_sample_range is not None:
        pred_x0 = np.clip(pred_x0, -c.clip_sample_range, c.clip_sample_range)
    prev_sample = c.sqrt_alpha_prev[i] * pred_x0 + c.direction[i] * pred_epsilon
    if c.eta > 0:
        prev_sample = prev_sample + c.noise_std[i] * draw_noise(rng, model_output.shape, "ddim with eta > 0")
    return prev_sample, None


DDIM = Solver(
    diffusers_class="DDIMScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    make_plan=make_plan,
    step=step,
    accepts_eta=True,
)
