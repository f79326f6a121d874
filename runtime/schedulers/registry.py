"""Every scheduler by name, and `load_scheduler`, the one way to get one.

A registry name is a solver family plus option overrides ("euler-karras" = Euler with
use_karras_sigmas=True). To add a solver: write its module (see plan.py for the Solver record),
then add `_register(...)` lines below; SCHEDULER_NAMES and the class-name lookup follow.
"""

from __future__ import annotations

from typing import Any, Mapping

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.schedulers.config import resolve_config
from sdrt.runtime.schedulers.ddim import DDIM
from sdrt.runtime.schedulers.ddpm import DDPM
from sdrt.runtime.schedulers.dpmsolver import DPM_SOLVER
from sdrt.runtime.schedulers.euler import EULER, EULER_ANCESTRAL
from sdrt.runtime.schedulers.flow import FLOW_EULER
from sdrt.runtime.schedulers.heun import HEUN
from sdrt.runtime.schedulers.lcm import LCM
from sdrt.runtime.schedulers.lms import LMS
from sdrt.runtime.schedulers.plan import Solver
from sdrt.runtime.schedulers.pndm import PNDM
from sdrt.runtime.schedulers.scheduler import Scheduler
from sdrt.runtime.schedulers.unipc import UNIPC

_SCHEDULERS: dict[str, tuple[Solver, dict[str, Any]]] = {}
_CLASS_TO_NAME: dict[str, str] = {}  # diffusers `_class_name` -> registry name


def _register(name: str, solver: Solver, **overrides: Any) -> None:
    assert name == name.lower() and name not in _SCHEDULERS, name
    _SCHEDULERS[name] = (solver, overrides)
    if not overrides:
        _CLASS_TO_NAME.setdefault(solver.diffusers_class, name)


_register("ddim", DDIM)
_register("pndm", PNDM)
_register("ddpm", DDPM)
_register("euler", EULER)
_register("euler-karras", EULER, use_karras_sigmas=True)
_register("euler-a", EULER_ANCESTRAL)
_register("heun", HEUN)
_register("heun-karras", HEUN, use_karras_sigmas=True)
_register("lms", LMS)
_register("lms-karras", LMS, use_karras_sigmas=True)
# "dpm++2m" is DPMSolverMultistepScheduler.from_config(config): the file's algorithm_type is honoured.
_register("dpm++2m", DPM_SOLVER)
_register("dpm++2m-karras", DPM_SOLVER, use_karras_sigmas=True, algorithm_type="dpmsolver++")
_register("dpm++2m-sde", DPM_SOLVER, algorithm_type="sde-dpmsolver++")
_register("dpm++2m-sde-karras", DPM_SOLVER, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")
_register("unipc", UNIPC)
_register("unipc-karras", UNIPC, use_karras_sigmas=True)
_register("lcm", LCM)
# Flow matching (SD3, Flux): velocity-predicting models; no pipeline runs them yet.
_register("flow-euler", FLOW_EULER)

# The schedulers of noise-prediction models (the UNet families); `--scheduler` offers these.
SCHEDULER_NAMES: tuple[str, ...] = tuple(name for name, (solver, _) in _SCHEDULERS.items() if not solver.flow)
# The schedulers of flow-matching models (SD3, Flux).
FLOW_SCHEDULER_NAMES: tuple[str, ...] = tuple(name for name, (solver, _) in _SCHEDULERS.items() if solver.flow)
SUPPORTED_CLASS_NAMES: tuple[str, ...] = tuple(_CLASS_TO_NAME)


def _is_flow_class(class_name: str) -> bool:
    """diffusers names every flow-matching scheduler class FlowMatch*."""
    return class_name.startswith("FlowMatch")


def load_scheduler(config: Mapping[str, Any], name: str | None = None) -> Scheduler:
    """A scheduler from a `scheduler_config.json` dict; `name` picks another solver (as diffusers'
    `OtherScheduler.from_config(config)`), else the file's `_class_name` decides."""
    if not isinstance(config, Mapping):
        raise InvalidInputError(
            f"scheduler config must be a dict (parsed scheduler_config.json), got {type(config).__name__}"
        )
    if name is None:
        class_name = config.get("_class_name")
        if class_name is None:
            raise InvalidInputError(
                f"scheduler config has no _class_name; pass name=, one of: {', '.join(SCHEDULER_NAMES)}"
            )
        if class_name not in _CLASS_TO_NAME:
            raise UnsupportedConfigError(
                f"scheduler class {class_name!r} is not supported by sdrt; supported classes: "
                f"{', '.join(SUPPORTED_CLASS_NAMES)}; or pass name=, one of: {', '.join(SCHEDULER_NAMES)}"
            )
        name = _CLASS_TO_NAME[class_name]
    key = name.lower() if isinstance(name, str) else name
    if key not in _SCHEDULERS:
        raise InvalidInputError(f"unknown scheduler name {name!r}; known names: {', '.join(SCHEDULER_NAMES)}; "
                                f"for flow-matching models (SD3, Flux): {', '.join(FLOW_SCHEDULER_NAMES)}")
    solver, overrides = _SCHEDULERS[key]
    class_name = config.get("_class_name")
    if isinstance(class_name, str) and _is_flow_class(class_name) != solver.flow:
        kind, fits = ("flow-matching", FLOW_SCHEDULER_NAMES) if solver.flow else ("noise-prediction", SCHEDULER_NAMES)
        raise UnsupportedConfigError(
            f"the {key} scheduler samples {kind} models, but this scheduler config is {class_name}'s, made for a "
            f"{'flow-matching' if _is_flow_class(class_name) else 'noise-prediction'} model; use one of: "
            f"{', '.join(n for n in _SCHEDULERS if n not in fits)}"
        )
    resolved = resolve_config(config, solver.diffusers_class, solver.class_defaults, solver.implemented, overrides)
    return Scheduler(name=key, config=resolved, solver=solver)
