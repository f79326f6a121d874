"""Task: how a run starts, what each step adds, and how it ends.

A generation runs a sequence of tasks: the first starts the latents (txt2img from noise, img2img from a
noised picture, inpaint from a picture and a mask); the others modify the run (the refiner hand-off cuts
the plan; ControlNet will add the control residuals as denoiser inputs each step). Each hook is called
for every task in order, and each gets the run (sdrt.runtime.core.generate.Run):

    prepare(run)                    check the task's inputs (before any engine runs); the first sets
                                    run.height / run.width
    plan(run, plan) -> plan         build the plan (the first task, from None) or cut it
    start(run, latents) -> latents  the initial latents (the first task, from None)
    model_input(run, i, x) -> x     the denoiser's sample at evaluation i (extra channels)
    step_inputs(run, i, x) -> dict  extra denoiser inputs at evaluation i, batched as the latents
    call_inputs(run, i, x, conditioning, halves) -> dict
                                    extra inputs of one denoiser call, batched as that call (the scheduler's
                                    sample repeated per half; `halves`: the call's halves in row order,
                                    loop.UNCOND / loop.COND): ControlNet residuals, which differ per half
    after_step(run, i, latents)     the latents after the solver step (inpainting's blend)
    finish(run, images) -> images   the decoded images (inpainting's paste-back)

To add a task: subclass Task in a new file of this package and override the hooks it needs; the facades
(or an application) put it in the list given to Generator.generate.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.core import loop
from sdrt.runtime.core.generate import check_size


class Task:
    takes_image = False  # the run starts from a picture (SDXL then conditions on the aesthetic score)

    def prepare(self, run) -> None:
        pass

    def plan(self, run, plan):
        return plan

    def start(self, run, latents):
        return latents

    def model_input(self, run, i: int, model_input: np.ndarray) -> np.ndarray:
        return model_input

    def step_inputs(self, run, i: int, model_input: np.ndarray) -> dict:
        return {}

    call_inputs = loop._no_call_inputs  # nothing: the loop then skips the hook (and the sample's copies)

    def after_step(self, run, i: int, latents: np.ndarray) -> np.ndarray:
        return latents

    def finish(self, run, images):
        return images


def default_size(run) -> None:
    """run.height / run.width: the request's, or the model's default; checked against the UNet's multiple."""
    request, folder = run.request, run.folder
    run.height = folder.default_size if request.height is None else request.height
    run.width = folder.default_size if request.width is None else request.width
    check_size(folder, run.height, run.width)
    run.parameters.update(width=run.width, height=run.height)
