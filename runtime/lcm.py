"""Latent Consistency Models (Luo et al. 2023), as diffusers' LatentConsistencyModelPipeline and
LatentConsistencyModelImg2ImgPipeline: 1-8 steps, guidance baked into the UNet.

Thin facades over the generation core: the latent-consistency family (sdrt.runtime.families.lcm: the
guidance embedding, no negative prompt, no CFG batch) with the txt2img or img2img task. The folder's
LCMScheduler samples; the last step returns the consistency function's denoised estimate, which is what
gets decoded. Img2img builds the schedule for strength: all num_inference_steps run over the first
int(original_inference_steps * strength) distillation timesteps.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.families.lcm import guidance_scale_embedding, time_cond_proj_dim
from sdrt.runtime.tasks.img2img import ImageToImage
from sdrt.runtime.tasks.txt2img import TextToImage

__all__ = ["LatentConsistencyImg2ImgPipeline", "LatentConsistencyPipeline", "guidance_scale_embedding",
           "time_cond_proj_dim"]


class LatentConsistencyPipeline(Facade):
    """LCM text-to-image over ONNX engines (needs a UNet exported with its timestep_cond input)."""

    family = "latent-consistency"
    task = TextToImage

    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 4,
        guidance_scale: float = 8.5,
        height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
        seed: int | None = None, generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        negative_prompt: str | Sequence[str] | None = None, guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """guidance_scale: the weight the UNet was distilled to follow (its embedding input), not CFG: it
        costs nothing per step. num_inference_steps: at most the scheduler's original_inference_steps.
        negative_prompt, guidance_interval: refused; an LCM has no unconditional branch to steer away from."""
        return self._generate(locals())


class LatentConsistencyImg2ImgPipeline(Facade):
    """LCM image-to-image over ONNX engines (needs the timestep_cond UNet and the folder's vae_encoder)."""

    family = "latent-consistency"
    task = ImageToImage
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, strength: float = 0.8, num_inference_steps: int = 4,
        guidance_scale: float = 8.5, num_images_per_prompt: int = 1, seed: int | None = None, generator=None,
        rng: str = "torch", output_type: str = "pil", callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False, negative_prompt: str | Sequence[str] | None = None,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """image: as StableDiffusionImg2ImgPipeline's. strength: in (0, 1]; the schedule starts that far up
        the distillation timesteps and all num_inference_steps run, so num_inference_steps can be at most
        int(original_inference_steps * strength). guidance_scale, negative_prompt: as LatentConsistencyPipeline's."""
        return self._generate(locals())
