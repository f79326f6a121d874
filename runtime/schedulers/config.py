"""`scheduler_config.json` as a frozen dataclass with diffusers' field names.

`resolve_config(raw, solver_defaults)` reads a config dict the way diffusers'
`SomeScheduler.from_config(raw)` does: the options the target class reads take the file's value or
that class's default; options only other classes read are ignored (and listed in `ignored_keys`).
Unlike diffusers, an option set to a value sdrt does not implement is refused with
`UnsupportedConfigError`, and so is an option that describes the *model* (zero-SNR betas, flow
sigmas, continuous timesteps) when the chosen solver cannot honour it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError


@dataclass(frozen=True)
class SchedulerConfig:
    """Resolved scheduler options for one diffusers class; field names are diffusers' own."""

    class_name: str
    # The noise schedule the model was trained with.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    timestep_type: str = "discrete"
    # How inference timesteps and sigmas are chosen.
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    # Solver options (each read by some classes only).
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    skip_prk_steps: bool = False
    variance_type: str | None = "fixed_small"
    # Read by the multistep / consistency solvers (DPM-Solver++, UniPC, LCM); not used yet.
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    lambda_min_clipped: float = -math.inf
    predict_x0: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # Flow matching (FlowMatchEulerDiscreteScheduler): how the sigmas 1 -> 0 are shifted toward 1.
    shift: float = 1.0
    use_dynamic_shifting: bool = False  # shift by mu from the image size instead (Flux; flow.flux_mu)
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    stochastic_sampling: bool = False
    # Flow matching in the multistep solvers (DPMSolverMultistepScheduler, UniPCMultistepScheduler with
    # prediction_type "flow_prediction"): sigmas 1 -> 0 shifted by flow_shift, alpha_t = 1 - sigma.
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    # Keys present in the file that the chosen class does not read (diffusers ignores them too).
    ignored_keys: tuple[str, ...] = ()


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(SchedulerConfig)) - {"class_name", "ignored_keys"}

# Values sdrt implements, for every option whose values are a closed set. A solver may narrow
# these further (`Solver.implemented`). An option missing here takes any value of its type.
IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_type": ("discrete", "continuous"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "interpolation_type": ("linear", "log_linear"),
    "use_beta_sigmas": (False,),
    "final_sigmas_type": ("zero", "sigma_min"),
    "thresholding": (False,),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", None),  # None: DDPM's fixed_small, as diffusers
    "time_shift_type": ("exponential", "linear"),
}

# Options that describe the trained model rather than a solver. When the chosen class does not
# read one, it must hold this inert value; diffusers would silently ignore it and sample wrongly.
MODEL_OPTIONS_INERT: dict[str, Any] = {
    "rescale_betas_zero_snr": False,
    "timestep_type": "discrete",
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "invert_sigmas": False,
}

# Options of diffusers scheduler classes sdrt has no field for. They are ignored when the chosen
# class does not read them (as diffusers does), after the MODEL_OPTIONS_INERT check.
OTHER_CLASS_OPTIONS = frozenset({"sigma_data", "sigma_schedule", "rho"})


def resolve_config(
    raw: Mapping[str, Any],
    class_name: str,
    class_defaults: Mapping[str, Any],
    implemented: Mapping[str, tuple[Any, ...]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SchedulerConfig:
    """Read `raw` (a `scheduler_config.json` dict) for the diffusers class `class_name`.

    `class_defaults` are that class's `__init__` defaults: its keys are the options it reads.
    `implemented` narrows `IMPLEMENTED_VALUES` for this solver; `overrides` are applied last (a
    registry name such as "euler-karras" sets `use_karras_sigmas=True`).
    """
    # diffusers drops the keys its own loader filled with defaults (`_use_default_values`).
    used_defaults = set(raw.get("_use_default_values", ()))
    values: dict[str, Any] = dict(class_defaults)
    ignored = []
    for key, value in raw.items():
        if key.startswith("_") or key in used_defaults:
            continue  # metadata: _class_name, _diffusers_version, _name_or_path, ...
        if key not in OPTION_NAMES and key not in OTHER_CLASS_OPTIONS:
            raise UnsupportedConfigError(
                f"scheduler option {key}={value!r} is not known to sdrt; remove it from scheduler_config.json "
                "if it does not change the sampling math"
            )
        if key in class_defaults:
            values[key] = value
            continue
        if key in MODEL_OPTIONS_INERT and value != MODEL_OPTIONS_INERT[key]:
            raise UnsupportedConfigError(
                f"scheduler option {key}={value!r} describes the model, but {class_name} cannot honour it; "
                "choose a scheduler that supports it"
            )
        ignored.append(key)
    values.update(overrides or {})

    allowed = dict(IMPLEMENTED_VALUES)
    allowed.update(implemented or {})
    for key, value in values.items():
        if key in allowed and value not in allowed[key]:
            raise UnsupportedConfigError(
                f"scheduler option {key}={value!r} is not supported by sdrt's {class_name}; "
                f"supported: {', '.join(repr(v) for v in allowed[key])}"
            )
    _check_types(values)
    if values.get("trained_betas") is not None:
        values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
    if values.get("disable_corrector") is not None:
        values["disable_corrector"] = tuple(values["disable_corrector"])
    fields = {k: v for k, v in values.items() if k in OPTION_NAMES}
    return SchedulerConfig(class_name=class_name, ignored_keys=tuple(sorted(ignored)), **fields)


BOOL_OPTIONS = tuple(f.name for f in dataclasses.fields(SchedulerConfig) if f.type in (bool, "bool"))


def _check_types(values: Mapping[str, Any]) -> None:
    """Refuse values of the wrong kind with a message naming the option."""
    ints = ("num_train_timesteps", "steps_offset", "solver_order", "original_inference_steps", "base_image_seq_len",
            "max_image_seq_len")
    floats = ("beta_start", "beta_end", "clip_sample_range", "sigma_min", "sigma_max", "shift", "base_shift",
              "max_shift", "shift_terminal", "flow_shift")
    for key in ints:
        value = values.get(key)
        if key in values and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidInputError(f"scheduler option {key} must be an integer, got {value!r}")
    for key in floats:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidInputError(f"scheduler option {key} must be a number, got {value!r}")
    for key in BOOL_OPTIONS:  # "maybe" or 1 would read as true
        if values.get(key) is not None and not isinstance(values[key], bool):
            raise InvalidInputError(f"scheduler option {key} must be true or false, got {values[key]!r}")
    if values.get("steps_offset", 0) < 0:  # a negative timestep would index alphas_cumprod from its end
        raise InvalidInputError(f"scheduler option steps_offset must be >= 0, got {values['steps_offset']}")
    for key in floats:  # NaN/Inf never make a schedule
        value = values.get(key)
        if value is not None and not math.isfinite(value):
            raise InvalidInputError(f"scheduler option {key} must be finite, got {value!r}")
    start, end = values.get("beta_start", 0.0001), values.get("beta_end", 0.02)
    if not 0 <= start <= end < 1:  # a negative beta gives complex alphas (scaled_linear takes square roots)
        raise InvalidInputError(f"scheduler betas must satisfy 0 <= beta_start <= beta_end < 1, got beta_start "
                                f"{start!r}, beta_end {end!r}")
    if values.get("shift", 1.0) <= 0:  # the shifted sigmas would leave [0, 1]
        raise InvalidInputError(f"scheduler option shift must be > 0, got {values['shift']!r}")
    if values.get("flow_shift", 1.0) <= 0:
        raise InvalidInputError(f"scheduler option flow_shift must be > 0, got {values['flow_shift']!r}")
    terminal = values.get("shift_terminal")
    if terminal and not 0 < terminal < 1:  # diffusers stretches the sigmas to end at it (0/None: no stretch)
        raise InvalidInputError(f"scheduler option shift_terminal must be in (0, 1), got {terminal!r}")
    if values.get("num_train_timesteps", 1) < 1:
        raise InvalidInputError(f"num_train_timesteps must be >= 1, got {values['num_train_timesteps']}")
    betas = values.get("trained_betas")
    if betas is not None and len(betas) != values.get("num_train_timesteps", 1000):
        raise InvalidInputError(
            f"trained_betas has {len(betas)} values but num_train_timesteps is "
            f"{values.get('num_train_timesteps', 1000)}"
        )
