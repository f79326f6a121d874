"""Heun's method (Karras et al. 2022, Alg. 1; k-diffusion's `sample_heun`), mirroring diffusers'
HeunDiscreteScheduler: two model evaluations per step, the last step a plain Euler step.

Evaluations alternate: even i is an Euler (predictor) stage from sigma_j to sigma_{j+1}; odd i
evaluates the model at sigma_{j+1} and corrects the step with the average of both slopes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers import sigmas as sigma_plan
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.parameterization import sigma_x0
from sdrt.runtime.schedulers.plan import Plan, Solver, frozen, frozen_table, sigma_noise_coefficients, truncate

F32 = np.float32


@dataclass(frozen=True, eq=False)
class HeunCoefficients:
    is_predictor: np.ndarray  # bool: Euler stage (even i) or correction stage (odd i)
    sigma_model: np.ndarray  # sigma the model was evaluated at; slope = (x - x0) / sigma_model
    dt: np.ndarray  # sigma_next - sigma of the step (predictor stages)
    clip_sample_range: float | None


@dataclass(frozen=True, eq=False)
class HeunState:
    derivative: np.ndarray  # slope at the start of the step
    dt: F32
    sample: np.ndarray  # sample at the start of the step


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    timesteps, sigmas = sigma_plan.sigma_schedule(config, num_inference_steps)
    # Each interior sigma and timestep appears twice: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0].
    sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
    timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
    evaluations = np.arange(len(timesteps))
    is_predictor = evaluations % 2 == 0
    step_sigma = np.where(is_predictor, sigmas[evaluations], sigmas[evaluations - 1])
    step_sigma_next = np.where(is_predictor, sigmas[evaluations + 1], sigmas[evaluations])
    sigma_model = np.where(is_predictor, step_sigma, step_sigma_next)
    coefficients = frozen_table(
        HeunCoefficients,
        is_predictor=is_predictor,
        sigma_model=sigma_model,
        dt=step_sigma_next - step_sigma,
        clip_sample_range=float(config.clip_sample_range) if config.clip_sample else None,
    )
    plan = Plan(
        solver=config.class_name,
        num_inference_steps=num_inference_steps,
        timesteps=frozen(timesteps),
        init_noise_sigma=sigma_plan.init_noise_sigma(config, sigmas),
        input_divisors=frozen(sigma_plan.input_divisors(sigmas[:-1])),
        noise_coefficients=frozen(sigma_noise_coefficients(sigmas[:-1])),
        prediction_type=config.prediction_type,
        coefficients=coefficients,
    )
    return truncate(plan, start)


def step(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: HeunState | None, rng
) -> tuple[np.ndarray, HeunState | None]:
    c = plan.coefficients
    pred_x0 = sigma_x0(plan.prediction_type, model_output, sample, c.sigma_model[i])
    if c.clip_sample_range is not None:
        pred_x0 = np.clip(pred_x0, -c.clip_sample_range, c.clip_sample_range)
    derivative = (sample - pred_x0) / c.sigma_model[i]
    if c.is_predictor[i]:
        return sample + derivative * c.dt[i], HeunState(derivative, c.dt[i], sample)
    derivative = (state.derivative + derivative) / 2
    return state.sample + derivative * state.dt, None


HEUN = Solver(
    diffusers_class="HeunDiscreteScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0,
    },
    make_plan=make_plan,
    step=step,
    evaluations_per_step=2,
)
