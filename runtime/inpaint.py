"""Inpainting with an exported Stable Diffusion 1.x / 2.x folder, as diffusers' StableDiffusionInpaintPipeline:
repaint the white part of a mask, keep the rest of the picture.

A thin facade over the generation core: the stable-diffusion family and the inpaint task
(sdrt.runtime.tasks.inpaint, which documents the random draws, the 9-channel UNet and the 4-channel blend).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.core.request import check_strength
from sdrt.runtime.tasks.inpaint import Inpaint, InpaintInputs

__all__ = ["InpaintInputs", "StableDiffusionInpaintPipeline", "check_strength"]


class StableDiffusionInpaintPipeline(Facade):
    """SD 1.x / 2.x inpainting over ONNX engines, with an inpainting UNet (9 channels) or an ordinary one (4)."""

    task = Inpaint
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, mask_image, strength: float = 1.0,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None, width: int | None = None,
        padding_mask_crop: int | None = None,
        num_images_per_prompt: int = 1, eta: float = 0.0, seed: int | None = None,
        generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """image: a PIL RGB image, an HWC uint8 RGB array, or a list of them (see image.from_pil).
        mask_image: a PIL image (1, L or RGB) or a uint8 array of the picture's size, or a list of one
        per image: white (>= 128 after resizing) is repainted, black kept; grey levels are rounded so.
        strength: in (0, 1]; 1 starts from pure noise in the repainted region (the default), less
        starts from the picture noised that much and runs int(num_inference_steps * strength) steps.
        height, width: the size the picture and mask are resized to; by default the picture's size
        rounded down to a multiple of the VAE's factor (diffusers' default is the model's size:
        pass both to compare).
        padding_mask_crop: repaint only a box around the mask (grown by this many pixels and to the
        height:width ratio) at full resolution, then paste it back into the original picture; one
        image and one mask, output_type "pil" or "uint8".
        guidance_rescale: as txt2img; diffusers' inpainting pipeline has no such option. Others as
        StableDiffusionPipeline's."""
        return self._generate(locals())
