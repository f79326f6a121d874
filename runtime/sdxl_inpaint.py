"""SDXL inpainting, as diffusers' StableDiffusionXLInpaintPipeline, with the same random draws in the same order.

A thin facade over the generation core: the stable-diffusion-xl family (sdrt.runtime.families.sdxl) with the
inpaint task (sdrt.runtime.tasks.inpaint), and the refiner hand-off (sdrt.runtime.tasks.handoff) when
denoising_start / denoising_end is given. diffusers' defaults differ from SD inpainting's: strength 0.9999,
which is not 1, so the initial latents are the picture's noised to the first timestep, and
int(0.9999 * steps) steps are run; guidance_scale 7.5.

The "ensemble of expert denoisers" inpaints too, as diffusers': the base stops at `denoising_end`
(output_type="latent") and a second model (the refiner) takes those latents as `image`, with the same mask,
and resumes at `denoising_start` (strength is then ignored); see sdrt.runtime.tasks.inpaint for latents as
the image.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.families.sdxl import FAMILY
from sdrt.runtime.tasks.inpaint import Inpaint


class StableDiffusionXLInpaintPipeline(Facade):
    """SDXL inpainting, with an ordinary UNet (4 channels, blending) or an inpainting one (9)."""

    family = FAMILY
    task = Inpaint
    needs_encoder = True

    def __call__(
        self,
        prompt: str | Sequence[str], image, mask_image, strength: float = 0.9999,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        num_inference_steps: int = 50, denoising_start: float | None = None, denoising_end: float | None = None,
        guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
        height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
        original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
        num_images_per_prompt: int = 1, eta: float = 0.0, seed: int | None = None, generator=None,
        rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """image, mask_image, height, width and padding_mask_crop as StableDiffusionInpaintPipeline's (the
        size defaults to the picture's; diffusers' to the model's: pass both to compare); the prompts and
        micro-conditioning as StableDiffusionXLImg2ImgPipeline's (sizes refer to the processing size).
        image may also be latents (an NCHW float array with the VAE's latent channels, as output_type="latent"
        gives), used as they are, with a 4-channel UNet only.
        strength: in (0, 1], default 0.9999 as diffusers'; only exactly 1 starts from pure noise.
        denoising_start: in (0, 1), resume the schedule there instead of cutting it by strength (ignored then),
        from the image's latents as they are (the refiner's half of the ensemble, on the base's latents stopped
        at the same denoising_end). denoising_end: in (0, 1), stop once that share of the schedule is done."""
        return self._generate(locals())
