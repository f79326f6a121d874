"""Schedulers in NumPy, at numerical parity with diffusers.

    from sdrt.runtime.schedulers import load_scheduler, SCHEDULER_NAMES
    sched = load_scheduler(scheduler_config_dict, name=None)

See scheduler.py for the sampling loop, registry.py for the names, plan.py for adding a solver.
SCHEDULER_NAMES sample noise-prediction models (the UNet families); FLOW_SCHEDULER_NAMES sample flow-matching
models (SD3, Flux): "flow-euler" (FlowMatchEulerDiscreteScheduler, flow.py), "flow-heun" (FlowMatchHeunDiscrete-
Scheduler, flow_heun.py), "flow-dpm++2m", "flow-dpm++2m-sde" and "flow-unipc" (DPMSolverMultistepScheduler and
UniPCMultistepScheduler with use_flow_sigmas, dpmsolver.py, unipc.py). Their plans take diffusers' `mu=`
(`flow.flux_mu`) where the class's set_timesteps does, and `sigmas=` (flow-euler, flow-unipc):
`sched.plan(n, sigmas=..., mu=...)`.
"""

from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.plan import Plan, Solver
from sdrt.runtime.schedulers.registry import (
    FLOW_SCHEDULER_NAMES,
    SCHEDULER_NAMES,
    SUPPORTED_CLASS_NAMES,
    load_scheduler,
)
from sdrt.runtime.schedulers.scheduler import Scheduler

__all__ = [
    "FLOW_SCHEDULER_NAMES",
    "SCHEDULER_NAMES",
    "SUPPORTED_CLASS_NAMES",
    "Plan",
    "Scheduler",
    "SchedulerConfig",
    "Solver",
    "load_scheduler",
]
