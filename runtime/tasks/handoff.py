"""The refiner hand-off (SDXL's "ensemble of expert denoisers"): run only part of a schedule.

The base stops at `denoising_end` (output_type="latent") and a second model (the refiner) takes those
latents as the image and resumes at `denoising_start`, with diffusers' timestep arithmetic: the kept
evaluations keep the full run's coefficients, `denoising_start` replaces img2img's strength, and nothing
is noised on resuming (`run.resume`; the first task starts from the image's latents as they are). It
combines with every starting task: txt2img (the base), img2img and inpainting (base and refiner).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers.plan import Plan, truncate
from sdrt.runtime.schedulers.scheduler import Scheduler
from sdrt.runtime.tasks.base import Task


def discrete_timestep_cutoff(fraction: float, num_train_timesteps: int) -> int:
    """The training timestep at which `fraction` of the denoising is done (diffusers' discrete_timestep_cutoff)."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def resume(scheduler: Scheduler, full: Plan, num_inference_steps: int, eta: float, denoising_start: float) -> Plan:
    """The `full` run's plan from denoising_start on: the evaluations whose timestep is below its cutoff (one
    more for a 2nd-order solver when even, so that no step is split), made as img2img's strength cut makes it
    (Solver.make_plan: a multistep history starts empty there)."""
    cutoff = discrete_timestep_cutoff(denoising_start, scheduler.config.num_train_timesteps)
    kept = int(np.count_nonzero(full.timesteps < cutoff))
    if scheduler.evaluations_per_step == 2 and kept % 2 == 0:
        kept += 1
    start = full.num_evaluations - kept
    if start >= full.num_evaluations:
        raise InvalidInputError(
            f"denoising_start={denoising_start} starts after the last timestep ({full.timesteps[-1]}) of "
            f"{num_inference_steps} steps: no step would run; lower denoising_start or raise num_inference_steps"
        )
    plan = scheduler.solver.make_plan(scheduler.config, int(num_inference_steps), float(eta), start)
    return replace(plan, solver=scheduler.name, num_inference_steps=-(-kept // scheduler.evaluations_per_step))


def end(scheduler: Scheduler, plan: Plan, denoising_end: float) -> Plan:
    """The evaluations of `plan` whose timestep is at or above denoising_end's cutoff."""
    cutoff = discrete_timestep_cutoff(denoising_end, scheduler.config.num_train_timesteps)
    stop = int(np.count_nonzero(plan.timesteps >= cutoff))
    if stop == 0:
        raise InvalidInputError(
            f"denoising_end={denoising_end} ends before the first timestep ({plan.timesteps[0]}) of this "
            "run: no step would run; raise denoising_end or num_inference_steps"
        )
    return replace(truncate(plan, 0, stop), num_inference_steps=-(-stop // scheduler.evaluations_per_step))


class HandOff(Task):
    """Cuts the plan at denoising_start and/or denoising_end (the request's), after the first task built it."""

    def plan(self, run, plan):
        request, scheduler = run.request, run.scheduler
        if request.denoising_start is not None:
            plan = resume(scheduler, plan, request.num_inference_steps, request.eta, request.denoising_start)
            run.resume = True
            run.parameters["denoising_strength"] = None
        if request.denoising_end is not None:
            plan = end(scheduler, plan, request.denoising_end)
        run.parameters.update(denoising_start=request.denoising_start, denoising_end=request.denoising_end)
        return plan

