"""Inpainting with SD3 and Flux, as diffusers' StableDiffusion3InpaintPipeline and FluxInpaintPipeline, with the same
random draws in the same order: repaint the white part of a mask, keep the rest of the picture.

Thin facades over the generation core: the stable-diffusion-3 or flux family with the inpaint task
(sdrt.runtime.tasks.inpaint: the picture encoded, noised to the schedule cut by strength, and blended back outside
the mask after each step at the next step's noise level). The picture and mask are resized to height x width,
by default the model's size, as diffusers.

One difference from diffusers: its StableDiffusion3InpaintPipeline decodes `latents / scaling_factor` without
adding the VAE's shift_factor back (diffusers issue #13611, "Issue 1"), unlike its own encoder and every other SD3
pipeline; sdrt decodes as the others do, so the latents match diffusers' and the pixels match them decoded so.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.families import sd3
from sdrt.runtime.flux import _FluxFacade
from sdrt.runtime.tasks.inpaint import Inpaint

__all__ = ["FluxInpaintPipeline", "StableDiffusion3InpaintPipeline"]


class StableDiffusion3InpaintPipeline(Facade):
    """SD3 inpainting over ONNX engines (an ordinary 16-channel transformer, blending; needs the vae_encoder)."""

    family = sd3.FAMILY
    task = Inpaint
    needs_encoder = True

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        mask_image,
        strength: float = 0.6,
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
        scheduler: str | None = None,
    ) -> PipelineOutput:
        """diffusers' arguments and defaults (strength 0.6, 50 steps, guidance 7.0). image, mask_image and
        padding_mask_crop as StableDiffusionInpaintPipeline's, except the size: height x width defaults to the
        model's (the transformer's sample_size x 8), and the picture and mask are resized to it, as diffusers.
        strength 1 starts from pure noise; less, from the picture noised to the schedule cut by strength. Prompts
        and other arguments as StableDiffusion3Pipeline's."""
        return self._generate(locals())


class FluxInpaintPipeline(_FluxFacade):
    """Flux inpainting over ONNX engines (dev or schnell; an ordinary transformer, blending; needs the vae_encoder)."""

    default_guidance = 7.0  # FluxInpaintPipeline's
    task = Inpaint
    needs_encoder = True

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        mask_image,
        strength: float = 0.6,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
        max_sequence_length: int | None = None,
        scheduler: str | None = None,
    ) -> PipelineOutput:
        """As diffusers' FluxInpaintPipeline (strength 0.6, 28 steps, guidance_scale 7.0 for dev: that pipeline's
        default; schnell takes none). The picture and mask are resized to height x width (default the model's size;
        multiples of 16 px). image, mask_image and padding_mask_crop as StableDiffusion3InpaintPipeline's; other
        arguments as FluxPipeline's."""
        return self._generate(self.call_arguments(locals()))
