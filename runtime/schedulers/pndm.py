"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): pseudo
Runge-Kutta warm-up steps (skipped with skip_prk_steps=True, as Stable Diffusion ships) and
pseudo linear multistep (PLMS) steps, mirroring diffusers' PNDMScheduler, quirks included: with
skip_prk_steps the second timestep is evaluated twice and the first step is redone with the
average of the two model outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.plan import (
    Plan,
    Solver,
    alpha_noise_coefficients,
    frozen,
    frozen_table,
    training_alphas_cumprod,
)

F32 = np.float32


@dataclass(frozen=True, eq=False)
class PNDMCoefficients:
    sqrt_alpha: np.ndarray  # sqrt(alpha_bar) at the step's source timestep (v -> epsilon)
    sqrt_beta: np.ndarray
    sample_coeff: np.ndarray  # eq. 11: sqrt(alpha_bar_prev / alpha_bar_t)
    model_coeff: np.ndarray  # alpha_bar_prev - alpha_bar_t
    model_denom: np.ndarray  # alpha_bar_t sqrt(1 - alpha_bar_prev) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_prev)
    num_prk_evaluations: int  # evaluations 0 .. num_prk_evaluations-1 are Runge-Kutta stages


@dataclass(frozen=True, eq=False)
class PNDMState:
    ets: tuple[np.ndarray, ...] = ()  # past model outputs, newest last (at most 4)
    cur_sample: np.ndarray | None = None  # sample at the start of the current RK step / first PLMS step
    cur_model_output: np.ndarray | int = 0  # Runge-Kutta weighted sum so far


def _pndm_timesteps(config: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(prk_timesteps, plms_timesteps) exactly as diffusers' PNDMScheduler.set_timesteps."""
    N = config.num_train_timesteps
    spaced = schedule.spaced_timesteps(N, n, config.timestep_spacing, config.steps_offset)
    ascending = np.round(spaced[::-1]).astype(np.int64)
    if config.skip_prk_steps:
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        return np.array([], np.int64), plms
    order = 4
    prk = np.array(ascending[-order:]).repeat(2) + np.tile(np.array([0, N // n // 2]), order)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return prk.astype(np.int64), ascending[:-3][::-1]


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    n, N = num_inference_steps, config.num_train_timesteps
    if not config.skip_prk_steps and n < 4:  # diffusers fails here with a broadcast error
        raise InvalidInputError(f"pndm's Runge-Kutta warm-up (skip_prk_steps=False) needs num_inference_steps >= 4, "
                                f"got {n}; use more steps, or a scheduler such as ddim or euler for {n}")
    ratio = N // n
    prk_timesteps, plms_timesteps = _pndm_timesteps(config, n)
    timesteps = np.concatenate([prk_timesteps, plms_timesteps]).astype(np.int64)[start:]
    if len(timesteps) == 0:
        raise InvalidInputError(f"pndm with skip_prk_steps=False needs num_inference_steps >= 2, got {n}")

    # Source and target timestep of each evaluation's update; the counter restarts at the plan's start.
    from_t, to_t = [], []
    for counter, t in enumerate(timesteps):
        if counter < len(prk_timesteps) and not config.skip_prk_steps:
            from_t.append(prk_timesteps[counter // 4 * 4])
            to_t.append(t - (0 if counter % 2 else ratio // 2))
        elif counter == 1:  # diffusers redoes the first step from its source with the averaged output
            from_t.append(t + ratio)
            to_t.append(t)
        else:
            from_t.append(t)
            to_t.append(t - ratio)
    from_t, to_t = np.array(from_t), np.array(to_t)

    alphas_cumprod = training_alphas_cumprod(config)
    ac = alphas_cumprod.astype(F32)
    final_alpha_cumprod = F32(1.0) if config.set_alpha_to_one else ac[0]
    alpha_prod_t = ac[from_t]
    alpha_prod_t_prev = np.where(to_t >= 0, ac[np.maximum(to_t, 0)], final_alpha_cumprod)
    beta_prod_t = F32(1.0) - alpha_prod_t
    beta_prod_t_prev = F32(1.0) - alpha_prod_t_prev
    coefficients = frozen_table(
        PNDMCoefficients,
        sqrt_alpha=np.sqrt(alpha_prod_t),
        sqrt_beta=np.sqrt(beta_prod_t),
        sample_coeff=np.sqrt(alpha_prod_t_prev / alpha_prod_t),
        model_coeff=alpha_prod_t_prev - alpha_prod_t,
        model_denom=alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev),
        num_prk_evaluations=0 if config.skip_prk_steps else len(prk_timesteps),
    )
    return Plan(
        solver=config.class_name,
        num_inference_steps=n,
        timesteps=frozen(timesteps),
        init_noise_sigma=1.0,
        input_divisors=frozen(np.ones(len(timesteps), F32)),
        noise_coefficients=frozen(alpha_noise_coefficients(alphas_cumprod, timesteps)),
        prediction_type=config.prediction_type,
        coefficients=coefficients,
    )


def _prev_sample(plan: Plan, i: int, sample: np.ndarray, model_output: np.ndarray) -> np.ndarray:
    """Transfer x_t -> x_prev along the DDIM-like pseudo numerical method, eq. 11 of the paper."""
    c = plan.coefficients
    if plan.prediction_type == "v_prediction":
        model_output = c.sqrt_alpha[i] * model_output + c.sqrt_beta[i] * sample
    return c.sample_coeff[i] * sample - c.model_coeff[i] * model_output / c.model_denom[i]


def step(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: PNDMState, rng
) -> tuple[np.ndarray, PNDMState]:
    if i < plan.coefficients.num_prk_evaluations:
        return _step_prk(plan, i, model_output, sample, state)
    return _step_plms(plan, i, model_output, sample, state)


def _step_prk(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: PNDMState
) -> tuple[np.ndarray, PNDMState]:
    """One stage of the 4-stage pseudo Runge-Kutta step (eq. 13); stage 0 also records the output for PLMS."""
    stage = i % 4
    if stage == 0:
        state = PNDMState(state.ets + (model_output,), sample, state.cur_model_output + 1 / 6 * model_output)
    elif stage in (1, 2):
        state = PNDMState(state.ets, state.cur_sample, state.cur_model_output + 1 / 3 * model_output)
    else:
        model_output = state.cur_model_output + 1 / 6 * model_output
        state = PNDMState(state.ets, state.cur_sample, 0)
    cur_sample = state.cur_sample if state.cur_sample is not None else sample
    return _prev_sample(plan, i, cur_sample, model_output), state


def _step_plms(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: PNDMState
) -> tuple[np.ndarray, PNDMState]:
    """Pseudo linear multistep (eq. 12): Adams-Bashforth combination of up to 4 past model outputs."""
    ets, cur_sample = state.ets, state.cur_sample
    if i != 1:
        ets = ets[-3:] + (model_output,)
    if len(ets) == 1 and i == 0:
        cur_sample = sample
    elif len(ets) == 1 and i == 1:
        model_output = (model_output + ets[-1]) / 2
        sample, cur_sample = cur_sample, None
    elif len(ets) == 2:
        model_output = (3 * ets[-1] - ets[-2]) / 2
    elif len(ets) == 3:
        model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    else:
        model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
    return _prev_sample(plan, i, sample, model_output), PNDMState(ets, cur_sample, state.cur_model_output)


PNDM = Solver(
    diffusers_class="PNDMScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "steps_offset": 0,
    },
    make_plan=make_plan,
    step=step,
    initial_state=lambda plan: PNDMState(),
    implemented={"prediction_type": ("epsilon", "v_prediction")},
)
