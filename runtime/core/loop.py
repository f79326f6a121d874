"""ONE denoise loop for every family and task.

For each evaluation of the plan: the scheduler's model input, the tasks' additions (extra channels, extra
denoiser inputs), the denoiser with the family's conditioning (both guidance halves, batched or one after
the other, or the conditional half alone outside the guidance interval), guidance, one solver step, the
tasks' after-step, then the callback. Nothing here branches on the family, the task or the solver.

`Denoising` is one run's loop as a sequence of steps whose UNet calls the caller makes: `calls()` gives the
feeds of the current evaluation, `advance(outputs)` does the rest. `denoise` drives one run with it; the
server (sdrt.serve.batcher) drives many, their feeds concatenated into one UNet call per step.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from sdrt.runtime.deepcache import step_cache
from sdrt.runtime.errors import CancelledError, GenerationError, InvalidInputError


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


class Denoising:
    """One run's denoise loop from `latents`, an evaluation at a time: `calls()` then `advance(outputs)` until
    `done`; `latents` is then the result.

    resident: the conditioning goes to the UNet's device once per generation (`Engine.device_resident`; a no-op
    for engines that take host arrays); False keeps host arrays in the feeds (a caller that concatenates them).
    """

    def __init__(self, run, latents: np.ndarray, resident: bool = True):
        models, plan = run.models, run.plan
        self.run, self.latents, self.i = run, latents, 0
        self.unet = unet = models.unet
        self.batch = len(latents)
        self.state = run.scheduler.initial_state(plan)
        models.stage_done(*(e for e in models.engines() if e is not unet))  # any stage left loaded
        # The session's dtype (optimum folders differ from the spec); with ControlNets taking turns the spec's
        # (sdrt's own export), so that the UNet is not loaded here only to leave for the first ControlNet call.
        self.cache = step_cache(models, getattr(models, "cache_interval", 1))  # step caching (DeepCache); None: off
        self.timestep_dtype = np.dtype(unet.spec.input("timestep").dtype) \
            if getattr(models, "alternate_controlnet", False) else \
            (unet if self.cache is None else self.cache.full).input_dtypes["timestep"]
        self.guided_calls, self.conditional_calls = _halves(run.conditioning, run.guidance.enabled,
                                                            run.cfg_mode == "sequential")
        self._resident = {}  # id of a conditioning part -> (batch, the part as fed), made once per generation
        self._on_device = resident
        self._parts(self.guided_calls)
        self.per_call = [task for task in run.tasks
                         if getattr(type(task), "call_inputs", None) is not _NO_CALL_INPUTS]
        if self.cache is not None and self.per_call:
            raise InvalidInputError("step caching (cache_interval > 1) does not combine with ControlNet, whose "
                                    "residuals change every step; use cache_interval=1")
        self.guided = False
        # The solver's own draws (SDE and ancestral steps) in the layout the family's pipeline draws them (Flux's
        # packed tokens); the generator as it is for every other family.
        self.step_generator = run.family.step_generator(run.generator)

    @property
    def done(self) -> bool:
        return self.i >= self.run.plan.num_evaluations

    def _parts(self, parts: list) -> list[tuple[int, dict, dict, tuple]]:
        for part, _ in parts:
            if id(part) not in self._resident:
                fed = self.unet.device_resident(part) if self._on_device else part
                self._resident[id(part)] = (len(part["encoder_hidden_states"]), fed)
        return [(*self._resident[id(part)], part, halves) for part, halves in parts]

    def calls(self) -> Iterator[dict]:
        """The UNet feeds of the current evaluation (one, or one per guidance half when they run one after the
        other), each made when the caller takes it: a ControlNet runs just before the call it feeds."""
        run, i, plan = self.run, self.i, self.run.plan
        t = plan.timesteps[i]
        model_input = scaled = run.scheduler.scale_model_input(plan, i, self.latents)
        step_inputs: dict[str, np.ndarray] = {}
        for task in run.tasks:
            model_input = task.model_input(run, i, model_input)
            step_inputs.update(task.step_inputs(run, i, model_input))
        self.guided = run.guidance.active(plan, i)
        parts = self._parts(self.guided_calls if self.guided else self.conditional_calls)

        def feeds():
            for n, call, host, halves in parts:
                repeat = n // self.batch
                extra = {}
                for task in self.per_call:  # inputs that differ per half (ControlNet residuals)
                    extra.update(task.call_inputs(run, i, np.concatenate([scaled] * repeat), host, halves))
                yield {
                    "sample": np.concatenate([model_input] * repeat),
                    "timestep": np.full((n,), t, dtype=self.timestep_dtype),
                    **{name: np.concatenate([value] * repeat) for name, value in step_inputs.items()},
                    **call,
                    **extra,
                }

        return feeds()

    def unet_output(self, k: int, feed: dict) -> np.ndarray:
        """out_sample for the k-th feed of `calls()`: the UNet, or with step caching the full graph or the shallow
        branch on the feature cached for this call (the k-th call of a guided or unguided step)."""
        if self.cache is None:
            return self.unet.run(feed)["out_sample"]
        return self.cache.run(self.i, (self.guided, k), feed)

    def advance(self, outputs: list[np.ndarray]) -> None:
        """The UNet's out_sample for each feed of `calls()`, in order -> guidance, one solver step, the tasks'
        after-step and the callback; then the next evaluation."""
        run, i, plan = self.run, self.i, self.run.plan
        noise_pred = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        if not np.isfinite(noise_pred).all():
            raise GenerationError(
                f"the UNet returned NaN/Inf at step {i + 1}/{plan.num_evaluations} (timestep {plan.timesteps[i]}); "
                "the model or its precision is broken for this input"
            )
        if self.guided:
            noise_pred = run.guidance.combine(noise_pred)
        self.latents, self.state = run.scheduler.step(plan, i, noise_pred, self.latents, self.state,
                                                      self.step_generator)
        for task in run.tasks:
            self.latents = task.after_step(run, i, self.latents)
        self.i += 1
        if run.request.callback is not None and run.request.callback(i, float(plan.timesteps[i]), self.latents) \
                is False:
            raise CancelledError(f"cancelled by the callback after step {i + 1}/{plan.num_evaluations}")

    def close(self) -> None:
        """The loop's engines leave in low-memory mode (the ControlNets with the UNet)."""
        models = self.run.models
        models.stage_done(self.unet, *models.controlnet_engines)
        if self.cache is not None:
            models.stage_done(*self.cache.engines())
            self.run.timings["unet_shallow_calls"] = self.cache.shallow_calls


def denoise(run, latents: np.ndarray) -> np.ndarray:
    """Run every evaluation of `run.plan` from `latents` (sdrt.runtime.core.generate.Run) and return the result.

    The conditioning goes to the UNet's device once per generation; each step sends the sample, the timestep and
    the tasks' per-step inputs, and reads out_sample back for the scheduler. With fixed input buffers (CUDA
    graphs) the two sequential halves take turns in one buffer, each copied in by its own call, so that every
    call reads the same addresses.
    """
    plan = run.plan
    loop = Denoising(run, latents)
    unet_seconds = 0.0
    steps = range(plan.num_evaluations)
    if run.request.progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    t_loop = time.perf_counter()
    for _ in steps:
        feeds = loop.calls()
        t_unet = time.perf_counter()
        outputs = [loop.unet_output(k, feed) for k, feed in enumerate(feeds)]
        unet_seconds += time.perf_counter() - t_unet
        loop.advance(outputs)
    loop.close()
    run.timings["unet"] = unet_seconds
    run.timings["scheduler_and_guidance"] = time.perf_counter() - t_loop - unet_seconds
    run.timings["steps"] = plan.num_inference_steps
    run.timings["unet_evaluations"] = plan.num_evaluations
    return loop.latents
