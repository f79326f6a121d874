"""SDXL text-to-image and image-to-image, as diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline, with the same random draws in the same order.

Thin facades over the generation core: the stable-diffusion-xl family (sdrt.runtime.families.sdxl: two
text encoders, pooled text_embeds, micro-conditioning time_ids, the refiner's second-encoder-only case)
with the txt2img or img2img task, and the refiner hand-off (sdrt.runtime.tasks.handoff) when
denoising_start / denoising_end is given: the base stops at `denoising_end` (output_type="latent") and
the refiner takes those latents as `image` and resumes at `denoising_start`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.core.request import check_strength, fraction as denoising_fraction
from sdrt.runtime.families.sdxl import FAMILY, Prompts, micro_conditioning
from sdrt.runtime.tasks.handoff import discrete_timestep_cutoff
from sdrt.runtime.tasks.img2img import ImageToImage
from sdrt.runtime.tasks.txt2img import TextToImage

__all__ = ["FAMILY", "Prompts", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline", "check_strength",
           "denoising_fraction", "discrete_timestep_cutoff", "micro_conditioning"]


class StableDiffusionXLPipeline(Facade):
    """SDXL text-to-image over ONNX engines."""

    family = FAMILY
    task = TextToImage

    def __call__(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """Sizes are (height, width) and crops (top, left) in pixels, as diffusers takes them; see
        micro_conditioning for their defaults. denoising_end: in (0, 1), stop once that share of the schedule
        is done (diffusers' cutoff); with output_type="latent", for a refiner to finish from the same
        denoising_start (StableDiffusionXLImg2ImgPipeline, image=these latents). clip_skip: the prompt's embeddings
        from that many layers before the penultimate one (diffusers' meaning: the negatives keep the penultimate;
        the pooled embedding stays the last layer's). Others as StableDiffusionPipeline's."""
        return self._generate(locals())


class StableDiffusionXLImg2ImgPipeline(Facade):
    """SDXL image-to-image over ONNX engines (needs the folder's vae_encoder); also the refiner."""

    family = FAMILY
    task = ImageToImage
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, strength: float = 0.3,
        prompt_2: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None, num_inference_steps: int = 50,
        denoising_start: float | None = None, denoising_end: float | None = None, guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0, original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5, num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """image and strength as StableDiffusionImg2ImgPipeline's (strength defaults to 0.3, as diffusers');
        image may be latents (an NCHW float array, as output_type="latent" gives), used without the VAE encoder.
        denoising_start: in (0, 1), resume the schedule there instead of cutting it by strength (ignored then),
        from the image as it is: nothing is noised (the refiner's half of the SDXL ensemble, on the base's
        latents stopped at the same denoising_end). denoising_end: as StableDiffusionXLPipeline's.
        The aesthetic scores are used when model_index.json sets requires_aesthetics_score (the refiner)."""
        return self._generate(locals())
