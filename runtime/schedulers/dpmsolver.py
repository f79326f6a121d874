"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
of Diffusion Probabilistic Models", Alg. 2; k-diffusion's `sample_dpmpp_2m` / `sample_dpmpp_2m_sde`),
mirroring diffusers' DPMSolverMultistepScheduler. Also the multistep timestep/sigma schedule UniPC shares.

With use_flow_sigmas and prediction_type "flow_prediction" (registry name flow-dpm++2m) it samples
flow-matching models (SD3, Flux): sigmas 1 -> 0 shifted by flow_shift (or exp(mu) with use_dynamic_shifting),
alpha_t = 1 - sigma, x0 = x - sigma v; the solver itself is unchanged.

The solver works in lambda = log(alpha_t / sigma_t) with data predictions D (x0); its history is the
previous step's x0 prediction, passed in and returned as the state (k-diffusion's `old_denoised`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import UnsupportedConfigError
from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.flow import check_flow_mu, flow_strength_start, flow_x0
from sdrt.runtime.schedulers.parameterization import alpha_x0
from sdrt.runtime.schedulers.plan import Plan, Solver, draw_noise, frozen, frozen_table, truncate
from sdrt.runtime.schedulers.sigmas import sigma_alphas_cumprod

F32 = np.float32


# --- schedule (shared with UniPC) ----------------------------------------------------------------


def log_f32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 log (torch's scalar float32 log); log(0) = -inf."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, dtype=np.float64)).astype(F32)


def exp_f32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 exp."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(F32)


def expm1_f32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 expm1 (e^x - 1)."""
    return np.expm1(np.asarray(x, dtype=np.float64)).astype(F32)


def multistep_schedule(
    config: SchedulerConfig, n: int, last_timestep: int, round_karras: bool, final_from_converted: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps, n + 1 float32 sigmas) as the multistep solvers' `set_timesteps` picks them.

    Unlike the sigma-view solvers, spacing divides the range into n + 1 points and drops the last.
    `last_timestep` is the end of the usable range (DPM clips it by lambda_min_clipped);
    `round_karras` rounds Karras timesteps; `final_from_converted` takes the sigma_min final sigma
    from the converted (Karras / exponential) sigmas rather than the training table (UniPC).
    """
    N = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1] + config.steps_offset
    elif config.timestep_spacing == "trailing":
        timesteps = np.arange(last_timestep, 0, -N / n).round() - 1
    else:
        raise AssertionError(f"timestep_spacing {config.timestep_spacing!r} should have been refused")

    train_sigmas = schedule.discrete_sigmas(sigma_alphas_cumprod(config))
    log_sigmas = np.log(train_sigmas)
    sigma_min = config.sigma_min if config.sigma_min is not None else float(train_sigmas[0])
    sigma_max = config.sigma_max if config.sigma_max is not None else float(train_sigmas[-1])
    converted = True
    if config.use_karras_sigmas:
        sigmas = schedule.karras_sigmas(n, sigma_min, sigma_max)
        timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
        if round_karras:
            timesteps = timesteps.round()
    elif config.use_lu_lambdas:  # evenly spaced in log sigma between the training extremes (Lu et al. 2022)
        lambda_min, lambda_max = float(log_sigmas[0]), float(log_sigmas[-1])
        sigmas = np.exp(lambda_max + np.linspace(0, 1, n) * (lambda_min - lambda_max))
        timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
        if round_karras:
            timesteps = timesteps.round()
    elif config.use_exponential_sigmas:
        sigmas = schedule.exponential_sigmas(n, sigma_min, sigma_max)
        timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
    else:
        timesteps = timesteps.astype(np.int64)
        if len(timesteps) != n:
            raise UnsupportedConfigError(
                f"lambda_min_clipped={config.lambda_min_clipped} with timestep_spacing={config.timestep_spacing!r} "
                f"leaves {len(timesteps)} timesteps for {n} steps; use timestep_spacing 'linspace' or 'leading'"
            )
        sigmas = train_sigmas[timesteps]
        converted = False

    if config.final_sigmas_type == "sigma_min":
        final_sigma = sigmas[-1] if converted and final_from_converted else train_sigmas[0]
    else:
        final_sigma = 0.0
    sigmas = np.concatenate([sigmas, [final_sigma]]).astype(F32)
    return timesteps.astype(np.int64), sigmas


def alpha_sigma_lambda(sigmas: np.ndarray, flow: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VP coefficients of each sigma-view noise level, float32 as diffusers:
    alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t, lambda_t = log alpha_t - log sigma_t;
    with flow sigmas (rectified flow) alpha_t = 1 - sigma, sigma_t = sigma."""
    if flow:
        alpha_t, sigma_t = F32(1.0) - sigmas, sigmas
    else:
        alpha_t = F32(1.0) / np.sqrt(sigmas * sigmas + F32(1.0))
        sigma_t = sigmas * alpha_t
    return alpha_t, sigma_t, log_f32(alpha_t) - log_f32(sigma_t)


def dpm_flow_schedule(config: SchedulerConfig, n: int, mu: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps, n + 1 float32 sigmas) of DPMSolverMultistepScheduler.set_timesteps(n, mu=) with
    use_flow_sigmas: 1 - linspace(1, 1/N, n + 1) shifted by flow_shift (exp(mu) when given), reversed, the 0 dropped;
    the final sigma is 0 or, with "sigma_min", the training table's smallest VP sigma, as diffusers."""
    check_flow_mu(config, mu)
    flow_shift = np.exp(mu) if mu is not None else config.flow_shift
    sigmas = 1.0 - np.linspace(1, 1 / config.num_train_timesteps, n + 1)
    sigmas = np.flip(flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas))[:-1]
    timesteps = (sigmas * config.num_train_timesteps).astype(np.int64)
    if config.final_sigmas_type == "sigma_min":
        final_sigma = float(schedule.discrete_sigmas(sigma_alphas_cumprod(config))[0])
    else:
        final_sigma = 0.0
    return timesteps, np.concatenate([sigmas, [final_sigma]]).astype(F32)


def clipped_last_timestep(config: SchedulerConfig) -> int:
    """End of the usable timestep range: timesteps whose lambda is below lambda_min_clipped are cut off
    (important for the cosine schedule, as diffusers)."""
    alphas_cumprod = sigma_alphas_cumprod(config).astype(F32)
    lambdas = log_f32(np.sqrt(alphas_cumprod)) - log_f32(np.sqrt(F32(1.0) - alphas_cumprod))
    clipped = int(np.searchsorted(lambdas[::-1], F32(config.lambda_min_clipped), side="left"))
    return config.num_train_timesteps - clipped


def multistep_plan(config: SchedulerConfig, timesteps: np.ndarray, sigmas: np.ndarray, coefficients) -> Plan:
    """A Plan of a multistep solver in the VP (or flow) view: unscaled model input, add_noise = alpha_t x0 +
    sigma_t noise."""
    alpha_t, sigma_t, _ = alpha_sigma_lambda(sigmas[:-1], config.use_flow_sigmas)
    return Plan(
        solver=config.class_name,
        num_inference_steps=len(timesteps),
        timesteps=frozen(timesteps),
        init_noise_sigma=1.0,
        input_divisors=frozen(np.ones(len(timesteps), F32)),
        noise_coefficients=frozen(np.stack([alpha_t, sigma_t], axis=1)),
        prediction_type=config.prediction_type,
        coefficients=coefficients,
    )


# --- DPM-Solver++ --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DPMCoefficients:
    alpha: np.ndarray  # alpha_s of this evaluation's noise level (model output -> x0)
    sigma: np.ndarray  # sigma_s
    sample_coef: np.ndarray  # x_t = sample_coef * x_s + d0_coef * D0 [+ d1_coef * D1] [+ noise_coef * z]
    d0_coef: np.ndarray
    d1_coef: np.ndarray  # second order only
    inv_r0: np.ndarray  # D1 = (1 / r0) * (D0 - D0_prev), r0 = h_prev / h; second order only
    noise_coef: np.ndarray  # SDE: sigma_t sqrt(1 - e^{-2h}); zeros for the ODE
    first_order: np.ndarray  # bool: a first-order step here whatever the history (lower_order_final, order 1)
    stochastic: bool


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int,
              mu: float | None = None) -> Plan:
    n = num_inference_steps
    if config.use_flow_sigmas:
        timesteps, sigmas = dpm_flow_schedule(config, n, mu)
    else:
        timesteps, sigmas = multistep_schedule(
            config,
            n,
            clipped_last_timestep(config),
            round_karras=config.beta_schedule != "squaredcos_cap_v2",
            final_from_converted=False,
        )
    alpha, sigma, lam = alpha_sigma_lambda(sigmas, config.use_flow_sigmas)
    alpha_s, sigma_s, lambda_s = alpha[:-1], sigma[:-1], lam[:-1]
    alpha_t, sigma_t, lambda_t = alpha[1:], sigma[1:], lam[1:]
    lambda_prev = np.concatenate([[F32(np.nan)], lambda_s[:-1]]).astype(F32)  # lambda at the previous evaluation
    stochastic = config.algorithm_type == "sde-dpmsolver++"
    heun = config.solver_type == "heun"  # diffusers runs "logrho", "bh1", "bh2" as midpoint
    with np.errstate(divide="ignore", invalid="ignore"):  # the final sigma may be 0: lambda_t = inf
        h = lambda_t - lambda_s
        r0 = (lambda_s - lambda_prev) / h
        inv_r0 = F32(1.0) / r0
        if stochastic:  # SDE-DPM-Solver++(2M): x_t = sigma_t/sigma_s e^-h x_s + alpha_t (1 - e^-2h) D + noise
            exp_2h = exp_f32(F32(-2.0) * h)
            sample_coef = sigma_t / sigma_s * exp_f32(-h)
            d0_coef = alpha_t * (F32(1.0) - exp_2h)
            if heun:
                d1_coef = alpha_t * ((F32(1.0) - exp_2h) / (F32(-2.0) * h) + F32(1.0))
            else:
                d1_coef = F32(0.5) * d0_coef
            noise_coef = sigma_t * np.sqrt(F32(1.0) - exp_2h)
        else:  # Alg. 2: x_t = sigma_t/sigma_s x_s - alpha_t (e^-h - 1) (D0 + D1 / 2)
            expm = exp_f32(-h) - F32(1.0)
            sample_coef = sigma_t / sigma_s
            d0_coef = -(alpha_t * expm)
            d1_coef = alpha_t * (expm / h + F32(1.0)) if heun else -(F32(0.5) * (alpha_t * expm))
            noise_coef = np.zeros_like(sample_coef)
    last = np.arange(n) == n - 1
    lower_order_final = last & (
        config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
    )
    first_order = lower_order_final | (config.solver_order == 1)
    coefficients = frozen_table(
        DPMCoefficients,
        alpha=alpha_s,
        sigma=sigma_s,
        sample_coef=sample_coef,
        d0_coef=d0_coef,
        d1_coef=d1_coef,
        inv_r0=inv_r0,
        noise_coef=noise_coef,
        first_order=first_order,
        stochastic=stochastic,
    )
    return truncate(multistep_plan(config, timesteps, sigmas, coefficients), start)


def step(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, old_denoised: np.ndarray | None, rng
) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver++(2M): first order (DDIM) without history, else the two-step data-prediction update.
    The state is the previous x0 prediction (None before the first step)."""
    c = plan.coefficients
    if plan.prediction_type == "flow_prediction":
        denoised = flow_x0(model_output, sample, c.sigma[i])
    else:
        denoised = alpha_x0(plan.prediction_type, model_output, sample, c.alpha[i], c.sigma[i])
    noise = draw_noise(rng, model_output.shape, plan.solver) if c.stochastic else None
    prev_sample = c.sample_coef[i] * sample + c.d0_coef[i] * denoised
    if old_denoised is not None and not c.first_order[i]:
        d1 = c.inv_r0[i] * (denoised - old_denoised)
        prev_sample = prev_sample + c.d1_coef[i] * d1
    if noise is not None:
        prev_sample = prev_sample + c.noise_coef[i] * noise
    return prev_sample, frozen(denoised)


DPM_SOLVER = Solver(
    diffusers_class="DPMSolverMultistepScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
        "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential",
    },
    make_plan=make_plan,
    step=step,
    implemented={
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_order": (1, 2),
        "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
        "variance_type": (None,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
    },
)

# Flow matching (SD3, Flux): DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True,
# prediction_type="flow_prediction", flow_shift=...); the registry maps a FlowMatch config's shift to flow_shift.
DPM_SOLVER_FLOW = dataclasses.replace(
    DPM_SOLVER,
    implemented={
        **DPM_SOLVER.implemented,
        "use_flow_sigmas": (True,),
        "prediction_type": ("flow_prediction",),
        "use_dynamic_shifting": (False, True),
        "time_shift_type": ("exponential",),  # diffusers asserts it when mu is given
        # diffusers would convert VP sigmas with the flow formulas: nonsense for either model
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_lu_lambdas": (False,),
    },
    strength_start=flow_strength_start,
    flow=True,
    schedule_options=frozenset({"mu"}),
)
