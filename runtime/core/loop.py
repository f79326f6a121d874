"""ONE denoise loop for every family and task.

For each evaluation of the plan: the scheduler's model input, the tasks' additions (extra channels, extra
denoiser inputs), the denoiser with the family's conditioning (both guidance halves, batched or one after
the other, or the conditional half alone outside the guidance interval), guidance, one solver step, the
tasks' after-step, then the callback. Nothing here branches on the family, the task or the solver.
"""

from __future__ import annotations

import time

import numpy as np

from sdrt.runtime.errors import CancelledError, GenerationError


UNCOND, COND = "negative", "positive"  # the halves a UNet call holds, in row order


def _no_call_inputs(self, run, i, sample, conditioning, halves) -> dict:
    return {}


_NO_CALL_INPUTS = _no_call_inputs  # Task.call_inputs (sdrt.runtime.tasks.base), which adds nothing


def _halves(conditioning: dict, guided: bool, sequential: bool) -> tuple[list, list]:
    """(calls with guidance, calls of the conditional half alone): each a list of (UNet feed's conditioning part,
    the halves it holds in row order). With guidance the conditioning is batched negatives first; sequential
    mode runs each half on its own."""
    if not guided:
        return [(conditioning, (COND,))], [(conditioning, (COND,))]
    halves = [{name: np.split(value, 2)[half] for name, value in conditioning.items()} for half in (0, 1)]
    both = [(halves[0], (UNCOND,)), (halves[1], (COND,))] if sequential else [(conditioning, (UNCOND, COND))]
    return both, [(halves[1], (COND,))]


def denoise(run, latents: np.ndarray) -> np.ndarray:
    """Run every evaluation of `run.plan` from `latents` (sdrt.runtime.core.generate.Run) and return the result.

    The conditioning goes to the UNet's device once per generation (`Engine.device_resident`; a no-op for
    engines that take host arrays); each step sends the sample, the timestep and the tasks' per-step inputs,
    and reads out_sample back for the scheduler. With fixed input buffers (CUDA graphs) the two sequential
    halves take turns in one buffer, each copied in by its own call, so that every call reads the same addresses.
    """
    models, plan, scheduler, guidance = run.models, run.plan, run.scheduler, run.guidance
    unet = models.unet
    batch = len(latents)
    state = scheduler.initial_state(plan)
    models.stage_done(*(e for e in models.engines() if e is not unet))  # any stage left loaded
    # The session's dtype (optimum folders differ from the spec); with ControlNets taking turns the spec's (sdrt's
    # own export), so that the UNet is not loaded here only to leave for the first ControlNet call.
    timestep_dtype = np.dtype(unet.spec.input("timestep").dtype) if getattr(models, "alternate_controlnet", False) \
        else unet.input_dtypes["timestep"]
    guided_calls, conditional_calls = _halves(run.conditioning, guidance.enabled, run.cfg_mode == "sequential")
    resident = {}  # id of a conditioning part -> (batch, the device-resident part), made once per generation

    def calls(parts: list) -> list[tuple[int, dict, dict, tuple]]:
        for part, _ in parts:
            if id(part) not in resident:
                resident[id(part)] = (len(part["encoder_hidden_states"]), unet.device_resident(part))
        return [(*resident[id(part)], part, halves) for part, halves in parts]

    calls(guided_calls)
    per_call = [task for task in run.tasks if getattr(type(task), "call_inputs", None) is not _NO_CALL_INPUTS]
    unet_seconds = 0.0
    steps = range(plan.num_evaluations)
    if run.request.progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    t_loop = time.perf_counter()
    for i in steps:
        t = plan.timesteps[i]
        model_input = scaled = scheduler.scale_model_input(plan, i, latents)
        step_inputs: dict[str, np.ndarray] = {}
        for task in run.tasks:
            model_input = task.model_input(run, i, model_input)
            step_inputs.update(task.step_inputs(run, i, model_input))
        guided = guidance.active(plan, i)
        t_unet = time.perf_counter()
        noise_pred = []
        for n, call, host, halves in calls(guided_calls if guided else conditional_calls):
            repeat = n // batch
            extra = {}
            for task in per_call:  # inputs that differ per half (ControlNet residuals)
                extra.update(task.call_inputs(run, i, np.concatenate([scaled] * repeat), host, halves))
            noise_pred.append(unet.run({
                "sample": np.concatenate([model_input] * repeat),
                "timestep": np.full((n,), t, dtype=timestep_dtype),
                **{name: np.concatenate([value] * repeat) for name, value in step_inputs.items()},
                **call,
                **extra,
            })["out_sample"])
        noise_pred = noise_pred[0] if len(noise_pred) == 1 else np.concatenate(noise_pred)
        unet_seconds += time.perf_counter() - t_unet
        if not np.isfinite(noise_pred).all():
            raise GenerationError(
                f"the UNet returned NaN/Inf at step {i + 1}/{plan.num_evaluations} (timestep {t}); "
                "the model or its precision is broken for this input"
            )
        if guided:
            noise_pred = guidance.combine(noise_pred)
        latents, state = scheduler.step(plan, i, noise_pred, latents, state, run.generator)
        for task in run.tasks:
            latents = task.after_step(run, i, latents)
        if run.request.callback is not None and run.request.callback(i, float(t), latents) is False:
            raise CancelledError(f"cancelled by the callback after step {i + 1}/{plan.num_evaluations}")
    models.stage_done(unet, *models.controlnet_engines)  # low-memory mode: the ControlNets leave with the UNet
    run.timings["unet"] = unet_seconds
    run.timings["scheduler_and_guidance"] = time.perf_counter() - t_loop - unet_seconds
    run.timings["steps"] = plan.num_inference_steps
    run.timings["unet_evaluations"] = plan.num_evaluations
    return latents
