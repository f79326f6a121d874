"""Euler and Euler ancestral samplers (Karras et al. 2022, Alg. 2 with no churn; k-diffusion's
`sample_euler` and `sample_euler_ancestral`), mirroring diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers import sigmas as sigma_plan
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.parameterization import sigma_x0
from sdrt.runtime.schedulers.plan import (
    Plan,
    Solver,
    draw_noise,
    frozen,
    frozen_table,
    sigma_noise_coefficients,
    truncate,
)

F32 = np.float32


@dataclass(frozen=True, eq=False)
class EulerCoefficients:
    sigma: np.ndarray  # noise level at evaluation i
    dt: np.ndarray  # sigma_next - sigma (Euler) or sigma_down - sigma (ancestral)
    sigma_up: np.ndarray  # std of the noise added after the step (ancestral; zeros for Euler)
    ancestral: bool


def _make_plan(config: SchedulerConfig, num_inference_steps: int, start: int, ancestral: bool) -> Plan:
    timesteps, sigmas = sigma_plan.sigma_schedule(config, num_inference_steps)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    if ancestral:  # split the step into a deterministic part to sigma_down and fresh noise of std sigma_up
        sigma_up = np.sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
        sigma_up = np.minimum(sigma_up, sigma_next)  # as k-diffusion; rounding could make sigma_down NaN
        sigma_down = np.sqrt(sigma_next * sigma_next - sigma_up * sigma_up)
        dt = sigma_down - sigma
    else:
        sigma_up = np.zeros_like(sigma)
        dt = sigma_next - sigma
    plan = Plan(
        solver=config.class_name,
        num_inference_steps=num_inference_steps,
        timesteps=frozen(timesteps),
        init_noise_sigma=sigma_plan.init_noise_sigma(config, sigmas),
        input_divisors=frozen(sigma_plan.input_divisors(sigma)),
        noise_coefficients=frozen(sigma_noise_coefficients(sigma)),
        prediction_type=config.prediction_type,
        coefficients=frozen_table(EulerCoefficients, sigma=sigma, dt=dt, sigma_up=sigma_up, ancestral=ancestral),
    )
    return truncate(plan, start)


def make_euler_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    return _make_plan(config, num_inference_steps, start, ancestral=False)


def make_euler_ancestral_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    return _make_plan(config, num_inference_steps, start, ancestral=True)


def step(plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: None, rng) -> tuple[np.ndarray, None]:
    """x_next = x + (x - x0) / sigma * dt, plus sigma_up * z for the ancestral variant."""
    c = plan.coefficients
    sigma = c.sigma[i]
    pred_x0 = sigma_x0(plan.prediction_type, model_output, sample, sigma)
    derivative = (sample - pred_x0) / sigma
    prev_sample = sample + derivative * c.dt[i]
    if c.ancestral:  # diffusers draws noise at every step, the last (sigma_up = 0) included
        prev_sample = prev_sample + draw_noise(rng, model_output.shape, "euler-a") * c.sigma_up[i]
    return prev_sample, None


_COMMON_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

EULER = Solver(
    diffusers_class="EulerDiscreteScheduler",
    class_defaults={
        **_COMMON_DEFAULTS, "interpolation_type": "linear", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete", "final_sigmas_type": "zero",
    },
    make_plan=make_euler_plan,
    step=step,
)

EULER_ANCESTRAL = Solver(
    diffusers_class="EulerAncestralDiscreteScheduler",
    class_defaults=_COMMON_DEFAULTS,
    make_plan=make_euler_ancestral_plan,
    step=step,
    implemented={"prediction_type": ("epsilon", "v_prediction")},
)
