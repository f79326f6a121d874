"""Image-to-image with an exported Stable Diffusion 1.x / 2.x folder, as diffusers' StableDiffusionImg2ImgPipeline.

A thin facade over the generation core: the stable-diffusion family and the img2img task
(sdrt.runtime.tasks.img2img, which documents the random draws).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.codec import LOGVAR_RANGE
from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.core.request import check_strength
from sdrt.runtime.tasks.img2img import ImageToImage, given_latents

__all__ = ["LOGVAR_RANGE", "StableDiffusionImg2ImgPipeline", "check_strength", "given_latents"]


class StableDiffusionImg2ImgPipeline(Facade):
    """SD 1.x / 2.x image-to-image over ONNX engines (needs the folder's vae_encoder)."""

    task = ImageToImage
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, strength: float = 0.8,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """image: a PIL RGB image, an HWC uint8 RGB array, or a list of them (see image.from_pil); the
        output has its size, rounded down to a multiple of the VAE's factor as diffusers does. Or latents
        (an NCHW float array, as output_type="latent" gives), used without the VAE encoder, as diffusers does.
        strength: in (0, 1]; the share of the steps that are run, from noise that much over the image
        (1 ignores the image's content). Runs int(num_inference_steps * strength) steps.
        guidance_rescale: as txt2img; diffusers' StableDiffusionImg2ImgPipeline has no such option
        (it ignores the argument), so only 0 is compared with it. Others as StableDiffusionPipeline's."""
        return self._generate(locals())
