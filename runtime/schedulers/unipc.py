"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", Alg. 2 with B(h) variants bh1 / bh2), data prediction, order <= 2, mirroring
diffusers' UniPCMultistepScheduler.

Each step first corrects the sample the previous step predicted (UniC, using the new model
output), then predicts the next one (UniP). The state carries what that needs: the sample before
the last prediction, the last two x0 predictions and the order the last prediction used.

With use_flow_sigmas and prediction_type "flow_prediction" (registry name flow-unipc) it samples
flow-matching models (SD3, Flux, Wan): sigmas linspace(1, 1/N, n) (or the caller's), shifted by flow_shift or,
with use_dynamic_shifting, by mu as flow-euler; alpha_t = 1 - sigma, x0 = x - sigma v.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.dpmsolver import alpha_sigma_lambda, expm1_f32, multistep_plan, multistep_schedule
from sdrt.runtime.schedulers.flow import _time_shift, check_flow_mu, check_flow_sigmas, flow_strength_start, flow_x0
from sdrt.runtime.schedulers.parameterization import alpha_x0
from sdrt.runtime.schedulers.plan import Plan, Solver, frozen, frozen_table, truncate

F32 = np.float32


@dataclass(frozen=True, eq=False)
class UniPCCoefficients:
    """Row k describes the step from noise level k to k + 1; the corrector at evaluation k + 1 reuses it."""

    alpha: np.ndarray  # alpha_s at evaluation k (model output -> x0)
    sigma: np.ndarray  # sigma_s
    sample_coef: np.ndarray  # x_t = sample_coef * x_s - m0_coef * m0 - residual_coef * (residual)
    m0_coef: np.ndarray  # alpha_t (e^{-h} - 1)
    residual_coef: np.ndarray  # alpha_t B(h)
    rk: np.ndarray  # r_1 = (lambda_{k-1} - lambda_k) / h: relative position of the older model output
    rhos_c: np.ndarray  # (evaluations, 2): second-order corrector weights, solved from R rho = b (eq. 8)
    max_order: np.ndarray  # predictor order cap at k (lower_order_final lowers it near the end)
    corrects: np.ndarray  # bool: run the corrector at k (k > 0 and k - 1 not in disable_corrector)


@dataclass(frozen=True, eq=False)
class UniPCState:
    last_sample: np.ndarray  # the sample the last predictor started from
    model_outputs: tuple[np.ndarray, ...]  # x0 predictions, oldest first, at most solver_order of them
    order: int  # order the last predictor used (the corrector's order)


def solve_2x2_f32(rk: np.float32, b1: np.float32, b2: np.float32) -> tuple[np.float32, np.float32]:
    """Solve [[1, 1], [rk, 1]] x = [b1, b2] in float32 as LAPACK's sgesv does in torch (partial
    pivoting, multiplying by reciprocals), so the weights round as diffusers' torch.linalg.solve."""
    a11, a12, a21, a22 = F32(1.0), F32(1.0), rk, F32(1.0)
    if abs(a21) > abs(a11):
        a11, a12, a21, a22, b1, b2 = a21, a22, a11, a12, b2, b1
    lower = a21 * (F32(1.0) / a11)
    u22 = a22 - lower * a12
    x2 = (b2 - lower * b1) * (F32(1.0) / u22)
    x1 = (b1 - a12 * x2) * (F32(1.0) / a11)
    return x1, x2


def unipc_flow_schedule(config: SchedulerConfig, n: int, sigmas: np.ndarray | None,
                        mu: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps, n + 1 float32 sigmas) of UniPCMultistepScheduler.set_timesteps(n, sigmas=, mu=) with
    use_flow_sigmas: linspace(1, 1/N, n + 1)[:-1] (or the caller's), shifted by mu (use_dynamic_shifting) or
    flow_shift, stretched to shift_terminal, a first sigma of 1 lowered by 1e-6 (log(alpha) stays finite)."""
    check_flow_mu(config, mu)
    check_flow_sigmas(sigmas)
    N = config.num_train_timesteps
    s = np.linspace(1, 1 / N, n + 1)[:-1] if sigmas is None else np.array(sigmas, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if config.use_dynamic_shifting:
            s = _time_shift(config, mu, s)
        else:
            s = config.flow_shift * s / (1 + (config.flow_shift - 1) * s)
        if config.shift_terminal:  # stretch to end at shift_terminal (LTX-Video), as flow-euler
            one_minus_s = 1 - s
            s = 1 - one_minus_s / (one_minus_s[-1] / (1 - config.shift_terminal))
    s = np.array(s, dtype=np.float64)
    if not np.all(np.isfinite(s)):  # where diffusers' schedule is NaN
        raise InvalidInputError(
            f"this flow schedule is not finite: shift_terminal={config.shift_terminal} needs a last unshifted "
            f"sigma below 1 (2 steps or more), the linear time shift a positive mu (got mu={mu})")
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    timesteps = (s * N).astype(np.int64)
    final_sigma = s[-1] if config.final_sigmas_type == "sigma_min" else 0.0
    return timesteps, np.concatenate([s, [final_sigma]]).astype(F32)


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int,
              sigmas: np.ndarray | None = None, mu: float | None = None) -> Plan:
    n = num_inference_steps
    if config.use_flow_sigmas:
        timesteps, sigmas = unipc_flow_schedule(config, n, sigmas, mu)
    else:
        timesteps, sigmas = multistep_schedule(
            config, n, config.num_train_timesteps, round_karras=True, final_from_converted=True
        )
    alpha, sigma, lam = alpha_sigma_lambda(sigmas, config.use_flow_sigmas)
    alpha_t, lambda_s, lambda_t = alpha[1:], lam[:-1], lam[1:]
    lambda_prev = np.concatenate([[F32(np.nan)], lambda_s[:-1]]).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):  # the final sigma may be 0: lambda_t = inf
        h = lambda_t - lambda_s
        hh = -h  # data prediction integrates in -h
        h_phi_1 = expm1_f32(hh)  # h phi_1(h) = e^h - 1
        b_h = hh if config.solver_type == "bh1" else h_phi_1  # diffusers runs midpoint/heun/logrho as bh2
        rk = (lambda_prev - lambda_s) / h
        # b_i = h phi_{i+1}(h) i! / B(h) for i = 1, 2 (eq. 8), for the second-order corrector
        h_phi_k = h_phi_1 / hh - F32(1.0)
        b1 = h_phi_k * F32(1.0) / b_h
        h_phi_k = h_phi_k / hh - F32(0.5)
        b2 = h_phi_k * F32(2.0) / b_h
        rhos_c = np.array([solve_2x2_f32(*row) for row in zip(rk, b1, b2)], dtype=F32).reshape(n, 2)
        sample_coef = sigma[1:] / sigma[:-1]
        m0_coef = alpha_t * h_phi_1
        residual_coef = alpha_t * b_h
    k = np.arange(n)
    max_order = np.minimum(config.solver_order, n - k) if config.lower_order_final else np.full(n, config.solver_order)
    corrects = (k > 0) & ~np.isin(k - 1, np.asarray(config.disable_corrector, dtype=np.int64))
    coefficients = frozen_table(
        UniPCCoefficients,
        alpha=alpha[:-1],
        sigma=sigma[:-1],
        sample_coef=sample_coef,
        m0_coef=m0_coef,
        residual_coef=residual_coef,
        rk=rk,
        rhos_c=rhos_c,
        max_order=max_order,
        corrects=corrects,
    )
    return truncate(multistep_plan(config, timesteps, sigmas, coefficients), start)


def step(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: UniPCState | None, rng
) -> tuple[np.ndarray, UniPCState]:
    """UniC on the last prediction (when there is one), then UniP to the next noise level."""
    c = plan.coefficients
    if plan.prediction_type == "flow_prediction":
        m = flow_x0(model_output, sample, c.sigma[i])
    else:
        m = alpha_x0(plan.prediction_type, model_output, sample, c.alpha[i], c.sigma[i])
    history: tuple[np.ndarray, ...] = ()
    if state is not None:
        history = state.model_outputs
        if c.corrects[i]:
            sample = _correct(c, i - 1, m, state)
    outputs = (*history, frozen(m))[-2:]
    order = int(min(c.max_order[i], len(outputs)))

    prev_sample = c.sample_coef[i] * sample - c.m0_coef[i] * m  # UniP-1 (DDIM in lambda)
    if order == 2:
        d1 = (outputs[0] - m) / c.rk[i]
        prev_sample = prev_sample - c.residual_coef[i] * (F32(0.5) * d1)  # UniP-2: rho_1 = 1/2
    return prev_sample, UniPCState(last_sample=frozen(sample), model_outputs=outputs, order=order)


def _correct(c: UniPCCoefficients, j: int, model_t: np.ndarray, state: UniPCState) -> np.ndarray:
    """UniC-p: redo step j (from state.last_sample) using its end point's x0 prediction `model_t`."""
    m0 = state.model_outputs[-1]
    corrected = c.sample_coef[j] * state.last_sample - c.m0_coef[j] * m0
    d1_t = model_t - m0
    if state.order == 2:
        d1 = (state.model_outputs[-2] - m0) / c.rk[j]
        residual = c.rhos_c[j, 0] * d1 + c.rhos_c[j, 1] * d1_t
    else:
        residual = F32(0.5) * d1_t
    return corrected - c.residual_coef[j] * residual


UNIPC = Solver(
    diffusers_class="UniPCMultistepScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential",
        "sigma_min": None, "sigma_max": None, "shift_terminal": None,
    },
    make_plan=make_plan,
    step=step,
    implemented={
        "solver_order": (1, 2),
        "predict_x0": (True,),
        "solver_type": ("bh1", "bh2", "midpoint", "heun", "logrho"),
        "solver_p": (None,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
        "shift_terminal": (None,),
    },
)

# Flow matching (SD3, Flux, Wan): UniPCMultistepScheduler.from_config(config, use_flow_sigmas=True,
# prediction_type="flow_prediction", flow_shift=...); the registry maps a FlowMatch config's shift to flow_shift.
UNIPC_FLOW = dataclasses.replace(
    UNIPC,
    implemented={
        **{k: v for k, v in UNIPC.implemented.items() if k != "shift_terminal"},
        "use_flow_sigmas": (True,),
        "prediction_type": ("flow_prediction",),
        "use_dynamic_shifting": (False, True),
        # Karras / exponential flow sigmas are not implemented in sdrt yet
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
    },
    strength_start=flow_strength_start,
    flow=True,
    schedule_options=frozenset({"sigmas", "mu"}),
)
