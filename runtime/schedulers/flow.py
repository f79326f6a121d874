"""Flow-matching Euler (rectified flow; Esser et al. 2024, SD3, and Flux), mirroring diffusers'
FlowMatchEulerDiscreteScheduler.

The model predicts the velocity v = noise - x0 of x_sigma = (1 - sigma) x0 + sigma noise, and a step
follows it: x_next = x + (sigma_next - sigma) v. The sigmas run from 1 toward 0, shifted toward 1 by
the config's `shift` (SD3: 3.0) or, with `use_dynamic_shifting`, by `mu` from the image's token count
(Flux: `flux_mu`). The UNet-style input scaling is the identity and the initial latents are the noise.
FluxPipeline passes mu even to a static-shift config (FLUX.1-schnell), where diffusers ignores it; sdrt
refuses a mu that would change nothing: pass it only when config.use_dynamic_shifting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.schedulers import schedule
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.plan import Plan, Solver, draw_noise, frozen, frozen_table, truncate

F32 = np.float32


@dataclass(frozen=True, eq=False)
class FlowCoefficients:
    sigma: np.ndarray  # noise level at evaluation i
    sigma_next: np.ndarray  # noise level after it
    dt: np.ndarray  # sigma_next - sigma
    stochastic: bool  # stochastic_sampling: re-noise the predicted x0 to sigma_next with fresh noise


def flux_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """mu of dynamic shifting, linear in the image's token count from (base_image_seq_len, base_shift) to
    (max_image_seq_len, max_shift): diffusers' `calculate_shift`, as the Flux and SD3 pipelines call it."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
        raise InvalidInputError(f"image_seq_len must be an integer >= 1 (latent tokens), got {image_seq_len!r}")
    if config.base_shift is None or config.max_shift is None:
        raise UnsupportedConfigError("dynamic shifting needs scheduler options base_shift and max_shift; "
                                     f"got base_shift={config.base_shift!r}, max_shift={config.max_shift!r}")
    if config.max_image_seq_len == config.base_image_seq_len:
        raise UnsupportedConfigError("scheduler options base_image_seq_len and max_image_seq_len must differ, "
                                     f"both are {config.base_image_seq_len}")
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """The sigmas FluxPipeline passes to set_timesteps: linspace(1, 1/n, n) before shifting."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def flow_strength_start(num_inference_steps: int, strength: float) -> int:
    """Steps img2img skips, as the SD3 and Flux img2img pipelines' get_timesteps: int(n - n * strength), the
    product unfloored (10 steps at strength 0.55 skip 4, where StableDiffusionImg2ImgPipeline skips 5)."""
    n = num_inference_steps
    return int(max(n - min(n * strength, n), 0))


def flow_x0(model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x0 from the velocity v = noise - x0 at x = (1 - sigma) x0 + sigma noise: x0 = x - sigma v (diffusers'
    prediction_type "flow_prediction" in the multistep solvers)."""
    return sample - sigma * model_output


def check_flow_mu(config: SchedulerConfig, mu: float | None) -> None:
    """mu is required with use_dynamic_shifting and refused without it (it would change nothing)."""
    if config.use_dynamic_shifting and mu is None:
        raise InvalidInputError("this scheduler config has use_dynamic_shifting: pass mu (flow.flux_mu(image_seq_len, "
                                "config) gives the value diffusers' pipelines compute from the image size)")
    if not config.use_dynamic_shifting and mu is not None:
        shift = config.flow_shift if config.use_flow_sigmas else config.shift
        raise InvalidInputError(f"mu={mu} applies only with use_dynamic_shifting; this config shifts by "
                                f"{'flow_shift' if config.use_flow_sigmas else 'shift'}={shift}: leave mu out")


def check_flow_sigmas(sigmas: np.ndarray | None) -> None:
    """Caller's flow sigmas must be noise levels in (0, 1]."""
    if sigmas is not None and not np.all((sigmas > 0) & (sigmas <= 1)):
        raise InvalidInputError(f"flow-matching sigmas must lie in (0, 1], got {list(sigmas)}")


def _training_sigma_range(config: SchedulerConfig) -> tuple[float, float]:
    """(sigma_max, sigma_min) of diffusers' __init__ table, float32 linspace(1, N, N) / N, shifted there
    already when the shift is static (set_timesteps then shifts again, as diffusers does)."""
    n_train = config.num_train_timesteps
    sigmas = np.array([n_train, 1], dtype=F32) / F32(n_train)
    if not config.use_dynamic_shifting:
        shift = F32(config.shift)
        sigmas = shift * sigmas / (F32(1.0) + F32(config.shift - 1) * sigmas)
    return float(sigmas[0]), float(sigmas[1])


def _time_shift(config: SchedulerConfig, mu: float, t: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift of Esser et al. 2024 (eq. 23 with exp(mu) for the exponential type)."""
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def flow_schedule(config: SchedulerConfig, num_inference_steps: int, sigmas: np.ndarray | None = None,
                  mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) as float32, as diffusers' set_timesteps(n, sigmas=, mu=): n timesteps (sigma * N)
    and n + 1 sigmas (the last is 0, or 1 with invert_sigmas)."""
    n, n_train = num_inference_steps, config.num_train_timesteps
    # 1. Unshifted sigmas: float64 from the training range, or the caller's, as float32.
    if sigmas is None:
        sigma_max, sigma_min = _training_sigma_range(config)
        s = np.linspace(sigma_max * n_train, sigma_min * n_train, n) / n_train
    else:
        s = np.asarray(sigmas).astype(F32)
    # 2. Shift toward 1: by mu (dynamic) or by the static shift.
    if config.use_dynamic_shifting:
        s = _time_shift(config, mu, s)
    else:
        s = config.shift * s / (1 + (config.shift - 1) * s)
    # 3. Stretch to end at shift_terminal (LTX-Video).
    if config.shift_terminal:
        one_minus_s = 1 - s
        s = 1 - one_minus_s / (one_minus_s[-1] / (1 - config.shift_terminal))
    # 4. Replace by Karras or exponential sigmas over the same range.
    if config.use_karras_sigmas:
        s = schedule.karras_sigmas(n, s[-1].item(), s[0].item())
    elif config.use_exponential_sigmas:
        s = schedule.exponential_sigmas(n, s[-1].item(), s[0].item())
    s = np.asarray(s).astype(F32)
    # 5. Timesteps and the terminal sigma.
    if config.invert_sigmas:  # Mochi: the model is trained on 1 - sigma
        s = F32(1.0) - s
        return s * F32(n_train), np.concatenate([s, [F32(1.0)]]).astype(F32)
    return s * F32(n_train), np.concatenate([s, [F32(0.0)]]).astype(F32)


def make_flow_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int,
                   sigmas: np.ndarray | None = None, mu: float | None = None) -> Plan:
    if config.use_karras_sigmas and config.use_exponential_sigmas:
        raise UnsupportedConfigError("scheduler options use_karras_sigmas and use_exponential_sigmas are both true; "
                                     "set at most one, as diffusers requires")
    if config.use_dynamic_shifting and mu is None:
        raise InvalidInputError("this scheduler config has use_dynamic_shifting: pass mu (flow.flux_mu(image_seq_len, "
                                "config) gives the value diffusers' pipelines compute from the image size)")
    if not config.use_dynamic_shifting and mu is not None:
        raise InvalidInputError(f"mu={mu} applies only with use_dynamic_shifting; this config shifts by "
                                f"shift={config.shift}: leave mu out")
    if sigmas is not None and not np.all((sigmas > 0) & (sigmas <= 1)):
        raise InvalidInputError(f"flow-matching sigmas must lie in (0, 1], got {list(sigmas)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        timesteps, sigma_table = flow_schedule(config, num_inference_steps, sigmas, mu)
    if not np.all(np.isfinite(sigma_table)):  # where diffusers' schedule is NaN
        raise InvalidInputError(
            f"this flow schedule is not finite: shift_terminal={config.shift_terminal} needs a last unshifted "
            f"sigma below 1 (2 steps or more), the linear time shift a positive mu (got mu={mu})")
    sigma, sigma_next = sigma_table[:-1], sigma_table[1:]
    plan = Plan(
        solver=config.class_name,
        num_inference_steps=num_inference_steps,
        timesteps=frozen(timesteps),
        init_noise_sigma=1.0,
        input_divisors=frozen(np.ones(len(timesteps), F32)),
        noise_coefficients=frozen(np.stack([F32(1.0) - sigma, sigma], axis=1)),  # scale_noise
        prediction_type="flow_prediction",
        coefficients=frozen_table(FlowCoefficients, sigma=sigma, sigma_next=sigma_next, dt=sigma_next - sigma,
                                  stochastic=config.stochastic_sampling),
    )
    return truncate(plan, start)


def step(plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: None, rng) -> tuple[np.ndarray, None]:
    """Euler along the velocity: x_next = x + (sigma_next - sigma) v; stochastic: x0 = x - sigma v re-noised."""
    c = plan.coefficients
    if c.stochastic:
        pred_x0 = sample - c.sigma[i] * model_output
        noise = draw_noise(rng, sample.shape, "flow-euler with stochastic_sampling")
        return (F32(1.0) - c.sigma_next[i]) * pred_x0 + c.sigma_next[i] * noise, None
    return sample + c.dt[i] * model_output, None


FLOW_EULER = Solver(
    diffusers_class="FlowMatchEulerDiscreteScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
    },
    make_plan=make_flow_plan,
    step=step,
    strength_start=flow_strength_start,
    flow=True,
    schedule_options=frozenset({"sigmas", "mu"}),
)
