"""Model output -> denoised sample x0 (and epsilon) for the epsilon, v_prediction and sample parameterizations.

Two views of the same forward process x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps:
- alpha view (DDPM, DDIM, PNDM): the model sees x_t; coefficients sqrt(alpha_bar), sqrt(1 - alpha_bar).
- sigma view (Euler, Heun, LMS; Karras et al. 2022): the solver tracks x = x_t / sqrt(alpha_bar) with
  noise level sigma = sqrt((1 - alpha_bar) / alpha_bar), and the model sees x / sqrt(sigma^2 + 1).
Expressions keep diffusers' operation order, with float32 scalars, so results round identically.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def alpha_x0(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sqrt_alpha: F32, sqrt_beta: F32
) -> np.ndarray:
    """Predicted x0 from x_t (DDPM eq. 15 for epsilon; Salimans & Ho 2022 sec. 4 for v)."""
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_alpha
    if prediction_type == "v_prediction":
        return sqrt_alpha * sample - sqrt_beta * model_output
    if prediction_type == "sample":
        return model_output
    raise AssertionError(f"prediction_type {prediction_type!r} should have been refused by resolve_config")


def alpha_epsilon(
    prediction_type: str,
    model_output: np.ndarray,
    sample: np.ndarray,
    pred_x0: np.ndarray,
    sqrt_alpha: F32,
    sqrt_beta: F32,
) -> np.ndarray:
    """Predicted noise epsilon from x_t, given the model output and the x0 predicted from it."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return sqrt_alpha * model_output + sqrt_beta * sample
    if prediction_type == "sample":
        return (sample - sqrt_alpha * pred_x0) / sqrt_beta
    raise AssertionError(f"prediction_type {prediction_type!r} should have been refused by resolve_config")


def sigma_x0(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: F32) -> np.ndarray:
    """Denoised x0 in the sigma view (Karras et al. 2022, Table 1: c_skip, c_out)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        sigma_sq_plus_one = sigma * sigma + F32(1.0)
        return model_output * (-sigma / np.sqrt(sigma_sq_plus_one)) + (sample / sigma_sq_plus_one)
    if prediction_type == "sample":
        return model_output
    raise AssertionError(f"prediction_type {prediction_type!r} should have been refused by resolve_config")
