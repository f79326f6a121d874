"""Flux.1 (dev and schnell) text-to-image and image-to-image, as diffusers' FluxPipeline and FluxImg2ImgPipeline,
with the same random draws in the same order (the noise drawn in NCHW and packed after, as diffusers).

Thin facades over the generation core: the flux family (sdrt.runtime.families.flux: CLIP pooled + T5 states,
the distilled guidance input of dev, true CFG with a negative prompt; latents packed for the transformer by
sdrt.runtime.core.transformer) with the txt2img or img2img task, sampled by a flow-matching scheduler.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.families.flux import DEFAULT_GUIDANCE, FAMILY
from sdrt.runtime.tasks.img2img import ImageToImage
from sdrt.runtime.tasks.txt2img import TextToImage

__all__ = ["FluxImg2ImgPipeline", "FluxPipeline"]


class _FluxFacade(Facade):
    family = FAMILY
    default_guidance = DEFAULT_GUIDANCE

    @classmethod
    def call_arguments(cls, arguments: dict) -> dict:
        """guidance_scale's default filled in, noting whether it was given (schnell refuses a given one: its
        transformer takes none)."""
        given = arguments.get("guidance_scale") is not None
        return {**arguments, "guidance_scale": arguments["guidance_scale"] if given else cls.default_guidance,
                "guidance_given": given}


class FluxPipeline(_FluxFacade):
    """Flux text-to-image over ONNX engines."""

    task = TextToImage

    def __call__(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
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
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
    ) -> PipelineOutput:
        """diffusers' arguments and defaults (28 steps, 1024 px). guidance_scale: dev's distilled guidance (default
        3.5); a schnell-type model (no guidance embedding) refuses one. true_cfg_scale > 1 with a negative_prompt
        runs classifier-free guidance (two transformer evaluations per step). prompt_2 goes to T5 (default
        prompt); max_sequence_length: T5 tokens (512). Sizes must be multiples of 16 px (2x2 packing of 8x
        latents). prompt_3 / negative_prompt_3 (SD3's T5 texts) are refused with a message, not a TypeError.
        seed/generator/rng, callback and progress as StableDiffusionPipeline's."""
        return self._generate(self.call_arguments(locals()))


class FluxImg2ImgPipeline(_FluxFacade):
    """Flux image-to-image over ONNX engines (needs the folder's vae_encoder)."""

    default_guidance = 7.0  # FluxImg2ImgPipeline's
    task = ImageToImage
    needs_encoder = True

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        strength: float = 0.6,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
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
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
    ) -> PipelineOutput:
        """As diffusers' FluxImg2ImgPipeline: the picture resized to height x width (default the model's size),
        encoded, noised to the schedule cut by strength (0.6); guidance_scale defaults to 7.0 there, as diffusers'
        FluxImg2ImgPipeline. Other arguments as FluxPipeline's."""
        return self._generate(self.call_arguments(locals()))
