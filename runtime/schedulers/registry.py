"""Every scheduler by name, and `load_scheduler`, the one way to get one.

A registry name is a solver family plus option overrides ("euler-karras" = Euler with
use_karras_sigmas=True). To add a solver: write its module (see plan.py for the Solver record),
then add `_register(...)` lines below; SCHEDULER_NAMES and the class-name lookup follow.

Flow-matching models (SD3, Flux) ship a FlowMatchEulerDiscreteScheduler config. flow-heun reads it as
FlowMatchHeunDiscreteScheduler.from_config(config) does; the multistep flow solvers (flow-dpm++2m, flow-unipc)
read it as a diffusers user builds them, `DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True,
prediction_type="flow_prediction", flow_shift=config["shift"])`: see `_as_flow_multistep`.
"""

from __future__ import annotations

from typing import Any, Mapping

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.schedulers.config import resolve_config
from sdrt.runtime.schedulers.ddim import DDIM
from sdrt.runtime.schedulers.ddpm import DDPM
from sdrt.runtime.schedulers.dpmsolver import DPM_SOLVER, DPM_SOLVER_FLOW
from sdrt.runtime.schedulers.euler import EULER, EULER_ANCESTRAL
from sdrt.runtime.schedulers.flow import FLOW_EULER
from sdrt.runtime.schedulers.flow_heun import FLOW_HEUN
from sdrt.runtime.schedulers.heun import HEUN
from sdrt.runtime.schedulers.lcm import LCM
from sdrt.runtime.schedulers.lms import LMS
from sdrt.runtime.schedulers.plan import Solver
from sdrt.runtime.schedulers.pndm import PNDM
from sdrt.runtime.schedulers.scheduler import Scheduler
from sdrt.runtime.schedulers.unipc import UNIPC, UNIPC_FLOW

_SCHEDULERS: dict[str, tuple[Solver, dict[str, Any]]] = {}
_CLASS_TO_NAME: dict[str, str] = {}  # diffusers `_class_name` -> registry name, noise-prediction configs
_FLOW_CLASS_TO_NAME: dict[str, str] = {}  # the same for flow-matching configs (FlowMatch*, use_flow_sigmas)


def _register(name: str, solver: Solver, **overrides: Any) -> None:
    assert name == name.lower() and name not in _SCHEDULERS, name
    _SCHEDULERS[name] = (solver, overrides)
    if not overrides:
        (_FLOW_CLASS_TO_NAME if solver.flow else _CLASS_TO_NAME).setdefault(solver.diffusers_class, name)


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
_register("flow-heun", FLOW_HEUN)
# "flow-dpm++2m" honours the file's algorithm_type, as "dpm++2m" does.
_register("flow-dpm++2m", DPM_SOLVER_FLOW)
_register("flow-dpm++2m-sde", DPM_SOLVER_FLOW, algorithm_type="sde-dpmsolver++")
_register("flow-unipc", UNIPC_FLOW)

# The schedulers of noise-prediction models (the UNet families); `--scheduler` offers these.
SCHEDULER_NAMES: tuple[str, ...] = tuple(name for name, (solver, _) in _SCHEDULERS.items() if not solver.flow)
# The schedulers of flow-matching models (SD3, Flux).
FLOW_SCHEDULER_NAMES: tuple[str, ...] = tuple(name for name, (solver, _) in _SCHEDULERS.items() if solver.flow)
SUPPORTED_CLASS_NAMES: tuple[str, ...] = tuple(dict.fromkeys([*_CLASS_TO_NAME, *_FLOW_CLASS_TO_NAME]))

# Options of a FlowMatch config that the multistep solvers do not read but the pipelines' mu needs (flow.flux_mu):
# diffusers keeps them in the converted scheduler's config, where FluxPipeline reads them.
_MU_OPTIONS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def _flow_evidence(config: Mapping[str, Any]) -> str | None:
    """What marks `config` as made for a flow-matching model (diffusers names those classes FlowMatch*; DPM-Solver
    and UniPC sample them with use_flow_sigmas / prediction_type "flow_prediction"), or None."""
    if config.get("use_flow_sigmas") is True:
        return "use_flow_sigmas=True"
    if config.get("prediction_type") == "flow_prediction":
        return "prediction_type='flow_prediction'"
    class_name = config.get("_class_name")
    if isinstance(class_name, str) and class_name.startswith("FlowMatch"):
        return f"{class_name}'s"
    return None


def _as_flow_multistep(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, overrides) with which a multistep solver samples a flow-matching model, as a diffusers user writes
    `Class.from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)`.

    A FlowMatch config's `shift` becomes `flow_shift` (DPM-Solver and UniPC read no `shift`), unless the config
    has a flow_shift of its own (a DPM/UniPC config, where diffusers ignores a stray `shift`); use_dynamic_shifting
    and time_shift_type are read as they are; base_shift, max_shift, base_image_seq_len, max_image_seq_len are kept
    for flow.flux_mu. A config that says use_flow_sigmas=false is refused rather than overridden.
    """
    raw = dict(config)
    if raw.get("use_flow_sigmas") is False:
        raise UnsupportedConfigError(
            f"this {raw.get('_class_name', 'scheduler')} config has use_flow_sigmas=False: it samples with "
            "noise-prediction sigmas; for a flow-matching model set use_flow_sigmas true (or use the model's "
            "FlowMatch scheduler config)")
    shift = raw.pop("shift", 1.0)
    raw.setdefault("flow_shift", shift)
    overrides = {key: raw.pop(key) for key in _MU_OPTIONS if key in raw}
    return raw, {**overrides, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}


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
        classes = _FLOW_CLASS_TO_NAME if _flow_evidence(config) else _CLASS_TO_NAME
        if class_name not in classes:
            raise UnsupportedConfigError(
                f"scheduler class {class_name!r} is not supported by sdrt"
                f"{' for flow-matching models' if classes is _FLOW_CLASS_TO_NAME else ''}; supported classes: "
                f"{', '.join(classes)}; or pass name=, one of: "
                f"{', '.join(FLOW_SCHEDULER_NAMES if classes is _FLOW_CLASS_TO_NAME else SCHEDULER_NAMES)}"
            )
        name = classes[class_name]
    key = name.lower() if isinstance(name, str) else name
    if key not in _SCHEDULERS:
        raise InvalidInputError(f"unknown scheduler name {name!r}; known names: {', '.join(SCHEDULER_NAMES)}; "
                                f"for flow-matching models (SD3, Flux): {', '.join(FLOW_SCHEDULER_NAMES)}")
    solver, overrides = _SCHEDULERS[key]
    class_name = config.get("_class_name")
    evidence = _flow_evidence(config)
    if evidence is not None and not solver.flow and f"flow-{key}" in _SCHEDULERS:
        # A flow model's scheduler by the sampler's usual name ("euler" on SD3/Flux is flow-euler, as A1111 and
        # ComfyUI name it there).
        key = f"flow-{key}"
        solver, overrides = _SCHEDULERS[key]
    if (evidence is not None or isinstance(class_name, str)) and (evidence is not None) != solver.flow:
        kind, fits = ("flow-matching", FLOW_SCHEDULER_NAMES) if solver.flow else ("noise-prediction", SCHEDULER_NAMES)
        described = f"{class_name}'s" if evidence is None else evidence
        raise UnsupportedConfigError(
            f"the {key} scheduler samples {kind} models, but this scheduler config ({described}) is made for a "
            f"{'noise-prediction' if evidence is None else 'flow-matching'} model; use one of: "
            f"{', '.join(n for n in _SCHEDULERS if n not in fits)}"
        )
    if solver.flow and not solver.diffusers_class.startswith("FlowMatch"):
        config, flow_overrides = _as_flow_multistep(config)
        overrides = {**flow_overrides, **overrides}
    resolved = resolve_config(config, solver.diffusers_class, solver.class_defaults, solver.implemented, overrides)
    return Scheduler(name=key, config=resolved, solver=solver)
