"""Flow-matching Heun (Karras et al. 2022, Alg. 1, on the velocity of rectified flow), mirroring diffusers'
FlowMatchHeunDiscreteScheduler: two model evaluations per step, the last step a plain Euler step (2n - 1 in all).

The schedule is flow-euler's with a static shift (its config has only num_train_timesteps and shift; no sigmas=,
no mu, so no Flux dynamic shifting). As heun.py, each interior sigma and timestep appears twice: even evaluations
are Euler stages from sigma_j to sigma_{j+1}, odd ones evaluate the model at sigma_{j+1} and redo the step with
the average slope. The slope is (x - x0) / sigma with x0 = x - sigma v, in diffusers' float32 operation order.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.flow import flow_schedule, flow_strength_start, flow_x0
from sdrt.runtime.schedulers.heun import HeunCoefficients, HeunState
from sdrt.runtime.schedulers.plan import Plan, Solver, frozen, frozen_table, truncate

F32 = np.float32


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    timesteps, sigmas = flow_schedule(config, num_inference_steps)
    # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0] and [t0, t1, t1, ..., t_{n-1}, t_{n-1}], as set_timesteps.
    sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
    timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
    evaluations = np.arange(len(timesteps))
    is_predictor = evaluations % 2 == 0
    step_sigma = np.where(is_predictor, sigmas[evaluations], sigmas[evaluations - 1])
    step_sigma_next = np.where(is_predictor, sigmas[evaluations + 1], sigmas[evaluations])
    sigma = sigmas[:-1]  # noise level of the sample at each evaluation (scale_noise)
    plan = Plan(
        solver=config.class_name,
        num_inference_steps=num_inference_steps,
        timesteps=frozen(timesteps),
        init_noise_sigma=1.0,
        input_divisors=frozen(np.ones(len(timesteps), F32)),
        noise_coefficients=frozen(np.stack([F32(1.0) - sigma, sigma], axis=1)),
        prediction_type="flow_prediction",
        coefficients=frozen_table(
            HeunCoefficients,
            is_predictor=is_predictor,
            sigma_model=np.where(is_predictor, step_sigma, step_sigma_next),
            dt=step_sigma_next - step_sigma,
            clip_sample_range=None,
        ),
    )
    return truncate(plan, start)


def step(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: HeunState | None, rng
) -> tuple[np.ndarray, HeunState | None]:
    """Euler stage (even i) or Heun correction with the mean of both slopes (odd i)."""
    c = plan.coefficients
    derivative = (sample - flow_x0(model_output, sample, c.sigma_model[i])) / c.sigma_model[i]
    if c.is_predictor[i]:
        return sample + derivative * c.dt[i], HeunState(derivative, c.dt[i], sample)
    derivative = F32(0.5) * (state.derivative + derivative)
    return state.sample + derivative * state.dt, None


FLOW_HEUN = Solver(
    diffusers_class="FlowMatchHeunDiscreteScheduler",
    class_defaults={"num_train_timesteps": 1000, "shift": 1.0},
    make_plan=make_plan,
    step=step,
    evaluations_per_step=2,
    strength_start=flow_strength_start,
    flow=True,
)
