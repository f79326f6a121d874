"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 1),
mirroring diffusers' LCMScheduler. Guidance embedding (`timestep_cond`) is the pipeline's business.

Each step maps x_t to the consistency function's x0 estimate (skip/out scalings of the boundary
condition) and, except at the last step, re-noises it to the next timestep with fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InvalidInputError
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
SIGMA_DATA = F32(0.5)


@dataclass(frozen=True, eq=False)
class LCMCoefficients:
    sqrt_alpha: np.ndarray  # sqrt(alpha_bar_t)
    sqrt_beta: np.ndarray  # sqrt(1 - alpha_bar_t)
    c_skip: np.ndarray  # denoised = c_out * x0 + c_skip * x_t (consistency boundary condition)
    c_out: np.ndarray
    sqrt_alpha_next: np.ndarray  # re-noising to the next timestep: sqrt(alpha_bar) denoised + sqrt(1 - alpha_bar) z
    sqrt_beta_next: np.ndarray
    renoises: np.ndarray  # bool: False at the last evaluation, which returns the denoised estimate
    clip_sample_range: float | None


def lcm_timesteps(num_train_timesteps: int, original_inference_steps: int, n: int,
                  strength: float = 1.0) -> np.ndarray:
    """n of the distillation schedule's first int(original_inference_steps * strength) timesteps (k - 1,
    2k - 1, ... with k = N // original), evenly spaced by index from the noisiest: diffusers'
    LCMScheduler.set_timesteps(n, strength=); strength < 1 (img2img) starts lower on the same grid."""
    if original_inference_steps > num_train_timesteps:
        raise InvalidInputError(
            f"original_inference_steps={original_inference_steps} exceeds num_train_timesteps={num_train_timesteps}"
        )
    if n > original_inference_steps:
        raise InvalidInputError(
            f"num_inference_steps={n} exceeds the LCM's original_inference_steps={original_inference_steps}"
        )
    kept = int(original_inference_steps * strength)
    if n > kept:
        raise InvalidInputError(
            f"num_inference_steps={n} exceeds the {kept} distillation timesteps that strength={strength} keeps "
            f"(int(original_inference_steps={original_inference_steps} x strength)); lower num_inference_steps "
            f"or raise strength to at least {n / original_inference_steps:g}"
        )
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, kept + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64)


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    timesteps = lcm_timesteps(config.num_train_timesteps, config.original_inference_steps, num_inference_steps)
    return plan_for(config, timesteps, start)


def make_strength_plan(config: SchedulerConfig, num_inference_steps: int, strength: float) -> Plan:
    """All n steps over the schedule built for `strength` (LatentConsistencyModelImg2ImgPipeline's)."""
    timesteps = lcm_timesteps(config.num_train_timesteps, config.original_inference_steps, num_inference_steps,
                              strength)
    return plan_for(config, timesteps, 0)


def plan_for(config: SchedulerConfig, timesteps: np.ndarray, start: int) -> Plan:
    """The plan sampling at `timesteps`, without its first `start` evaluations."""
    n = len(timesteps)
    alphas_cumprod = training_alphas_cumprod(config)
    ac = alphas_cumprod.astype(F32)
    next_timesteps = np.concatenate([timesteps[1:], timesteps[-1:]])  # the last step stays put (no re-noising)
    alpha_prod_t, alpha_prod_next = ac[timesteps], ac[next_timesteps]
    scaled = timesteps.astype(F32) * F32(config.timestep_scaling)
    coefficients = frozen_table(
        LCMCoefficients,
        sqrt_alpha=np.sqrt(alpha_prod_t),
        sqrt_beta=np.sqrt(F32(1.0) - alpha_prod_t),
        c_skip=SIGMA_DATA * SIGMA_DATA / (scaled * scaled + SIGMA_DATA * SIGMA_DATA),
        c_out=scaled / np.sqrt(scaled * scaled + SIGMA_DATA * SIGMA_DATA),
        sqrt_alpha_next=np.sqrt(alpha_prod_next),
        sqrt_beta_next=np.sqrt(F32(1.0) - alpha_prod_next),
        renoises=np.arange(n) != n - 1,
        clip_sample_range=float(config.clip_sample_range) if config.clip_sample else None,
    )
    return alpha_plan(config, n, timesteps, alphas_cumprod, coefficients, start)


def step(plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: None, rng) -> tuple[np.ndarray, None]:
    """denoised = c_out x0 + c_skip x_t; then x_next = sqrt(a_next) denoised + sqrt(1 - a_next) z."""
    c = plan.coefficients
    pred_x0 = alpha_x0(plan.prediction_type, model_output, sample, c.sqrt_alpha[i], c.sqrt_beta[i])
    if c.clip_sample_range is not None:
        pred_x0 = np.clip(pred_x0, -c.clip_sample_range, c.clip_sample_range)
    denoised = c.c_out[i] * pred_x0 + c.c_skip[i] * sample
    if not c.renoises[i]:
        return denoised, None
    noise = draw_noise(rng, model_output.shape, plan.solver)
    return c.sqrt_alpha_next[i] * denoised + c.sqrt_beta_next[i] * noise, None


LCM = Solver(
    diffusers_class="LCMScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
    make_plan=make_plan,
    step=step,
    make_strength_plan=make_strength_plan,
)
