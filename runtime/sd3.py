"""Stable Diffusion 3 / 3.5 text-to-image and image-to-image, as diffusers' StableDiffusion3Pipeline and
StableDiffusion3Img2ImgPipeline, with the same random draws in the same order.

Thin facades over the generation core: the stable-diffusion-3 family (sdrt.runtime.families.sd3: CLIP-L,
CLIP-G and T5 -> joint text states and pooled projections; the transformer fed by
sdrt.runtime.core.transformer) with the txt2img or img2img task, sampled by a flow-matching scheduler
(the folder's FlowMatchEulerDiscreteScheduler config by default).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.families.sd3 import FAMILY
from sdrt.runtime.tasks.img2img import ImageToImage
from sdrt.runtime.tasks.txt2img import TextToImage

__all__ = ["StableDiffusion3Img2ImgPipeline", "StableDiffusion3Pipeline"]


class StableDiffusion3Pipeline(Facade):
    """SD3 text-to-image over ONNX engines."""

    family = FAMILY
    task = TextToImage

    def __call__(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
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
        skip_guidance_layers: list[int] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        scheduler: str | None = None,
    ) -> PipelineOutput:
        """diffusers' arguments and defaults (28 steps, guidance 7.0, size from the transformer's sample_size:
        1024 px for SD3/3.5). prompt_2 goes to CLIP-G and prompt_3 to T5 (each defaults to prompt; the negatives'
        to negative_prompt); max_sequence_length: T5 tokens (256). skip_guidance_layers (SD3.5's skip-layer
        guidance) is refused: the exported transformer always runs every layer. seed/generator/rng, callback and
        progress as StableDiffusionPipeline's."""
        return self._generate(locals())


class StableDiffusion3Img2ImgPipeline(Facade):
    """SD3 image-to-image over ONNX engines (needs the folder's vae_encoder)."""

    family = FAMILY
    task = ImageToImage
    needs_encoder = True

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        strength: float = 0.6,
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        """As diffusers' StableDiffusion3Img2ImgPipeline: the picture is resized to height x width (default the
        model's size, as diffusers), encoded, and noised to the schedule cut by strength (0.6: int(n - n x strength)
        steps skipped). Other arguments as StableDiffusion3Pipeline's."""
        return self._generate(locals())
