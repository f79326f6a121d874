"""Text-to-image with an exported Stable Diffusion 1.x / 2.x folder, as diffusers' StableDiffusionPipeline.

A thin facade: diffusers' keyword signature -> a Request -> the generation core (sdrt.runtime.core) with the
stable-diffusion family (sdrt.runtime.families.sd) and the txt2img task (sdrt.runtime.tasks.txt2img).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.core.models import PER_STEP_OPTIONS
from sdrt.runtime.core.request import OUTPUT_TYPES
from sdrt.runtime.tasks.txt2img import TextToImage

StableDiffusionBase = Facade  # the former shared base class's name
__all__ = ["OUTPUT_TYPES", "PER_STEP_OPTIONS", "PipelineOutput", "StableDiffusionBase", "StableDiffusionPipeline"]


class StableDiffusionPipeline(Facade):
    """SD 1.x / 2.x text-to-image over ONNX engines."""

    task = TextToImage

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None, width: int | None = None,
        num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch",
        output_type: str = "pil", callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False, guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """height, width: default the model's size. guidance_interval: (lo, hi), apply classifier-free guidance
        only at the steps whose noise level sigma is in [lo, hi] (Kynkaanniemi et al. 2024); the others run
        the conditional half alone. callback(step, timestep, latents) runs after every step; returning False
        stops the run with sdrt.runtime.errors.CancelledError. seed (or generator, an sdrt.runtime.rng
        generator) makes the run reproducible; rng "torch" gives diffusers' CPU noise for a seed. clip_skip: SDXL
        folders only so far (refused here with a message)."""
        return self._generate(locals())
