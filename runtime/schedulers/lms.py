"""Linear multistep (k-diffusion's `sample_lms`, Adams-Bashforth in sigma, up to order 4),
mirroring diffusers' LMSDiscreteScheduler. diffusers integrates the Lagrange basis polynomials
with scipy's `quad`; here Gauss-Legendre quadrature, exact for these polynomials of degree <= 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers import sigmas as sigma_plan
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.parameterization import sigma_x0
from sdrt.runtime.schedulers.plan import Plan, Solver, frozen, frozen_table, sigma_noise_coefficients, truncate

F32 = np.float32
MAX_ORDER = 4
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(MAX_ORDER)


@dataclass(frozen=True, eq=False)
class LMSCoefficients:
    sigma: np.ndarray  # noise level at evaluation i
    order: np.ndarray  # multistep order at evaluation i: min(i + 1, 4)
    lms_coeffs: np.ndarray  # float64 (evaluations, 4): weight of the j-th newest derivative; zeros past the order


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j}
    among the nodes sigma_i, ..., sigma_{i-order+1} (k-diffusion's `linear_multistep_coeff`)."""
    nodes = [float(sigmas[i - k]) for k in range(order) if k != j]
    node_j = float(sigmas[i - j])
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    taus = (b - a) / 2 * _GAUSS_NODES + (b + a) / 2
    basis = np.ones_like(taus)
    for node in nodes:
        basis *= (taus - node) / (node_j - node)
    return float((b - a) / 2 * np.dot(_GAUSS_WEIGHTS, basis))


def make_plan(config: SchedulerConfig, num_inference_steps: int, eta: float, start: int) -> Plan:
    timesteps, sigmas = sigma_plan.sigma_schedule(config, num_inference_steps)
    orders = np.minimum(np.arange(num_inference_steps) + 1, MAX_ORDER)  # by absolute index, also for img2img
    lms_coeffs = np.zeros((num_inference_steps, MAX_ORDER))
    for i, order in enumerate(orders):
        lms_coeffs[i, :order] = [lms_coefficient(sigmas, order, i, j) for j in range(order)]
    plan = Plan(
        solver=config.class_name,
        num_inference_steps=num_inference_steps,
        timesteps=frozen(timesteps),
        init_noise_sigma=sigma_plan.init_noise_sigma(config, sigmas),
        input_divisors=frozen(sigma_plan.input_divisors(sigmas[:-1])),
        noise_coefficients=frozen(sigma_noise_coefficients(sigmas[:-1])),
        prediction_type=config.prediction_type,
        coefficients=frozen_table(LMSCoefficients, sigma=sigmas[:-1], order=orders, lms_coeffs=lms_coeffs),
    )
    return truncate(plan, start)


def step(
    plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: tuple[np.ndarray, ...], rng
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """x_next = x + sum_j c_j d_{i-j}, with d the slopes (x - x0) / sigma of the last <= 4 evaluations."""
    c = plan.coefficients
    sigma = c.sigma[i]
    pred_x0 = sigma_x0(plan.prediction_type, model_output, sample, sigma)
    derivatives = (state + ((sample - pred_x0) / sigma,))[-MAX_ORDER:]
    # Python floats times float32 arrays, summed from the newest derivative, as diffusers does.
    update = sum(float(coeff) * d for coeff, d in zip(c.lms_coeffs[i, : c.order[i]], reversed(derivatives)))
    return sample + update, derivatives


LMS = Solver(
    diffusers_class="LMSDiscreteScheduler",
    class_defaults={
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
    },
    make_plan=make_plan,
    step=step,
    initial_state=lambda plan: (),
)
