"""The Plan (everything precomputed for one sampling run) and the Solver record every solver family fills.

A solver family is a module that builds a `Plan` from a `SchedulerConfig` and steps with it:

    step(plan, i, model_output, sample, state, rng) -> (new_sample, new_state)

make_plan(config, steps, eta, first_evaluation, **schedule_options) also takes, as keywords, the options the
solver declares in `schedule_options` (flow-euler: diffusers' set_timesteps(sigmas=, mu=)).

`i` counts model evaluations (Heun: 2 per step). The per-evaluation coefficient table
(`plan.coefficients`) is a frozen dataclass of read-only arrays whose first axis is the evaluation;
`truncate` relies on that to cut a plan for img2img.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig

F32 = np.float32


@dataclass(frozen=True, eq=False)
class Plan:
    """Timesteps and every per-evaluation coefficient of one sampling run; immutable."""

    solver: str  # registry name of the scheduler that made it
    num_inference_steps: int  # steps actually run (after img2img truncation)
    timesteps: np.ndarray  # the timestep fed to the UNet at each evaluation
    init_noise_sigma: float  # initial latents = noise * init_noise_sigma
    input_divisors: np.ndarray  # float32; UNet input = sample / input_divisors[i]
    noise_coefficients: np.ndarray  # float32 (evaluations, 2); add_noise = c0 * x0 + c1 * noise
    prediction_type: str
    coefficients: Any  # the solver's per-evaluation table (frozen dataclass of arrays)

    @property
    def num_evaluations(self) -> int:
        return len(self.timesteps)


def sd_strength_start(num_inference_steps: int, strength: float) -> int:
    """Steps img2img skips, as StableDiffusionImg2ImgPipeline.get_timesteps: n - int(n * strength)."""
    n = num_inference_steps
    return max(n - min(int(n * strength), n), 0)


@dataclass(frozen=True)
class Solver:
    """One solver family, as the registry and `Scheduler` see it."""

    diffusers_class: str
    class_defaults: Mapping[str, Any]  # diffusers' __init__ defaults of that class: the options it reads
    make_plan: Callable[[SchedulerConfig, int, float, int], Plan]  # (config, steps, eta, first evaluation)
    step: Callable[..., tuple[np.ndarray, Any]]  # (plan, i, model_output, sample, state, rng)
    initial_state: Callable[[Plan], Any] = lambda plan: None
    # Narrows config.IMPLEMENTED_VALUES for this solver, e.g. {"prediction_type": ("epsilon", "v_prediction")}.
    implemented: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    evaluations_per_step: int = 1  # diffusers' `order`: model evaluations per step (Heun: 2)
    accepts_eta: bool = False  # DDIM's eta; other solvers refuse eta != 0
    # (config, steps, strength) -> the plan of a schedule built for img2img's strength, all steps run (diffusers'
    # set_timesteps(n, strength=), LCM's); None: the solver only cuts its schedule short (`truncate`).
    make_strength_plan: Callable[[SchedulerConfig, int, float], Plan] | None = None
    # (steps, strength) -> steps img2img skips; the flow pipelines (SD3, Flux) do not floor n * strength first.
    strength_start: Callable[[int, float], int] = sd_strength_start
    # Samples flow-matching models (velocity output; SD3, Flux) rather than noise-prediction ones.
    flow: bool = False
    # Arguments of diffusers' set_timesteps beyond the step count that make_plan takes as keywords ("sigmas", "mu").
    schedule_options: frozenset[str] = frozenset()


def frozen(array: np.ndarray) -> np.ndarray:
    """`array` made read-only, so a Plan cannot be changed after it is built."""
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def frozen_table(cls: type, **arrays: Any) -> Any:
    """Instantiate a coefficient dataclass with every ndarray argument made read-only."""
    return cls(**{k: frozen(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()})


def training_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t for every training timestep of `config` (float64 holding diffusers' float32 values)."""
    betas = schedule.make_betas(
        config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule, config.trained_betas
    )
    if config.rescale_betas_zero_snr:
        betas = schedule.rescale_zero_terminal_snr(betas)
    return schedule.alphas_cumprod_from_betas(betas)


def alpha_noise_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """add_noise coefficients sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) (DDPM eq. 4) per evaluation."""
    ac = alphas_cumprod.astype(F32)[np.asarray(timesteps, dtype=np.int64)]
    return np.stack([np.sqrt(ac), np.sqrt(F32(1.0) - ac)], axis=1)


def alpha_plan(config: SchedulerConfig, n: int, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
               coefficients: Any, start: int) -> Plan:
    """The plan of a solver working on alphas_cumprod (DDIM, DDPM, LCM): unscaled UNet input, unit initial noise."""
    plan = Plan(
        solver=config.class_name,
        num_inference_steps=n,
        timesteps=frozen(timesteps),
        init_noise_sigma=1.0,
        input_divisors=frozen(np.ones(len(timesteps), np.float32)),
        noise_coefficients=frozen(alpha_noise_coefficients(alphas_cumprod, timesteps)),
        prediction_type=config.prediction_type,
        coefficients=coefficients,
    )
    return truncate(plan, start)


def sigma_noise_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """add_noise coefficients (1, sigma) per evaluation for sigma-view solvers: x = x0 + sigma * noise."""
    sigmas = np.asarray(sigmas, dtype=F32)
    return np.stack([np.ones_like(sigmas), sigmas], axis=1)


def truncate(plan: Plan, start: int, stop: int | None = None) -> Plan:
    """The plan without its first `start` evaluations (img2img), and, given `stop`, without those from `stop` on
    (SDXL's denoising_end), slicing every per-evaluation array; the coefficients stay the full run's."""
    if start == 0 and stop is None:
        return plan
    table = plan.coefficients
    if table is not None:
        table = dataclasses.replace(
            table,
            **{
                f.name: frozen(getattr(table, f.name)[start:stop])
                for f in dataclasses.fields(table)
                if isinstance(getattr(table, f.name), np.ndarray)
            },
        )
    return dataclasses.replace(
        plan,
        timesteps=frozen(plan.timesteps[start:stop]),
        input_divisors=frozen(plan.input_divisors[start:stop]),
        noise_coefficients=frozen(plan.noise_coefficients[start:stop]),
        coefficients=table,
    )


def draw_noise(rng: Any, shape: tuple[int, ...], solver: str) -> np.ndarray:
    """Standard normal noise from the caller's generator, drawn as diffusers' `randn_tensor(shape)` does."""
    if rng is None:
        raise InvalidInputError(f"{solver} adds noise at each step: pass rng (an object with randn(shape, dtype))")
    return np.asarray(rng.randn(tuple(shape), dtype=F32), dtype=F32)
