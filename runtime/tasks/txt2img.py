"""Text-to-image: the run starts from pure noise, scaled to the scheduler's first noise level."""

from __future__ import annotations

import numpy as np

from sdrt.runtime.tasks.base import Task, default_size


class TextToImage(Task):
    def prepare(self, run) -> None:
        default_size(run)

    def plan(self, run, plan):
        return run.scheduler.plan(run.request.num_inference_steps, eta=run.request.eta,
                                  **run.family.schedule_options(run))

    def start(self, run, latents):
        return run.generator.randn(run.latent_shape()).astype(np.float32) * np.float32(run.plan.init_noise_sigma)
