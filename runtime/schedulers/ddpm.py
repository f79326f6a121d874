"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), mirroring
diffusers' DDPMScheduler over the spaced inference timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.parameterization import alpha_x0
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
class DDPMCoefficients:
    sqrt_alpha: np.ndarray  # sqrt(alpha_bar_t)
    sqrt_beta: np.ndarray  # sqrt(1 - alpha_bar_t)
    x0_coeff: np.ndarray  # eq. 7: sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t)
    sample_coeff: np.ndarray  # eq. 7: sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    noise_std: np.ndarray  # std of the posterior noise; unused where adds_noise is False
    adds_noise: np.ndarray  # bool: diffusers adds noise when t > 0
    clip_sample_range: float | None


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    n, N = num_inference_steps, config.num_train_timesteps
    alphas_cumprod = training_alphas_cumprod(config)
    ac = alphas_cumprod.astype(F32)
    timesteps = np.round(schedule.spaced_timesteps(N, n, config.timestep_spacing, config.steps_offset)).astype(np.int64)
    prev_timesteps = np.append(timesteps[1:], -1)  # the next inference timestep, -1 after the last

    alpha_prod_t = ac[timesteps]
    alpha_prod_t_prev = np.where(prev_timesteps >= 0, ac[np.maximum(prev_timesteps, 0)], F32(1.0))
    beta_prod_t = F32(1.0) - alpha_prod_t
    beta_prod_t_prev = F32(1.0) - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = F32(1.0) - current_alpha_t
    # eq. 7: posterior variance beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    variance = np.maximum((beta_prod_t_prev / beta_prod_t) * current_beta_t, F32(1e-20))
    if config.variance_type in ("fixed_small", None):  # diffusers' _get_variance leaves None at fixed_small
        noise_std = np.sqrt(variance)
    elif config.variance_type == "fixed_small_log":
        noise_std = np.exp(F32(0.5) * np.log(variance))
    else:  # "fixed_large": beta_t, the upper bound of Ho et al. sec. 3.2
        noise_std = np.sqrt(current_beta_t)

    coefficients = frozen_table(
        DDPMCoefficients,
        sqrt_alpha=np.sqrt(alpha_prod_t),
        sqrt_beta=np.sqrt(beta_prod_t),
        x0_coeff=(np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t,
        sample_coeff=np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t,
        noise_std=noise_std,
        adds_noise=timesteps > 0,
        clip_sample_range=float(config.clip_sample_range) if config.clip_sample else None,
    )
    return alpha_plan(config, n, timesteps, alphas_cumprod, coefficients, start)


def step(plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: None, rng) -> tuple[np.ndarray, None]:
    """Sample x_prev from the posterior q(x_prev | x_t, x0) with the predicted x0 (eq. 6-7)."""
    c = plan.coefficients
    pred_x0 = alpha_x0(plan.prediction_type, model_output, sample, c.sqrt_alpha[i], c.sqrt_beta[i])
    if c.clip_sample_range is not None:
        pred_x0 = np.clip(pred_x0, -c.clip_sample_range, c.clip_sample_range)
    prev_sample = c.x0_coeff[i] * pred_x0 + c.sample_coeff[i] * sample
    if c.adds_noise[i]:
        prev_sample = prev_sample + c.noise_std[i] * draw_noise(rng, model_output.shape, "ddpm")
    return prev_sample, None


DDPM = Solver(
    diffusers_class="DDPMScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
        "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    make_plan=make_plan,
    step=step,
)
