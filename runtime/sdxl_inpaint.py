"""SDXL inpainting over ONNX engines, as diffusers' StableDiffusionXLInpaintPipeline, with the same random
draws in the same order.

It is SD inpainting (`sdrt.runtime.inpaint`: masks, the three random draws, a 9-channel UNet's extra
channels or a 4-channel UNet's blend after each step) conditioned as SDXL (`sdrt.runtime.sdxl`: two
text encoders, text_embeds and time_ids; with requires_aesthetics_score, an aesthetic score in the
time ids as img2img's). diffusers' defaults differ from SD inpainting's: strength 0.9999, which is not
1, so the initial latents are the picture's noised to the first timestep, and int(0.9999 * steps)
steps are run; guidance_scale 7.5. denoising_start / denoising_end (base + refiner hand-over) are
not supported.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.inpaint import StableDiffusionInpaintPipeline, check_strength
from sdrt.runtime.pipeline import PipelineOutput
from sdrt.runtime.rng import make_generator
from sdrt.runtime.sdxl import FAMILY, StableDiffusionXLBase


class StableDiffusionXLInpaintPipeline(StableDiffusionXLBase, StableDiffusionInpaintPipeline):
    """SDXL inpainting, with an ordinary UNet (4 channels, blending) or an inpainting one (9)."""

    family = FAMILY

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        mask_image,
        strength: float = 0.9999,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """image, mask_image, height, width and padding_mask_crop as StableDiffusionInpaintPipeline's (the
        size defaults to the picture's; diffusers' to the model's: pass both to compare); the prompts and
        micro-conditioning as StableDiffusionXLImg2ImgPipeline's (sizes refer to the processing size).
        strength: in (0, 1], default 0.9999 as diffusers'; only exactly 1 starts from pure noise."""
        check_strength(strength)
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        texts = self._xl_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        inputs = self._inpaint_inputs(image, mask_image, height, width, padding_mask_crop, output_type)
        self._check_image_count(len(inputs.pixels), len(texts.prompts), num_images_per_prompt)
        time_ids = self._time_ids(inputs.height, inputs.width, self.requires_aesthetics_score, dict(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_target_size=negative_target_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score))
        plan = self.scheduler.plan(num_inference_steps, strength=float(strength), eta=eta)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings, pooled embeddings and time ids.
        embeds, unet_inputs = self._conditioning(texts, num_images_per_prompt, guidance_scale > 1.0, time_ids,
                                                 timings)

        # 2. The initial latents and the mask's inputs to the loop (three random draws, as diffusers').
        latents, extra_channels, after_step = self._inpaint_latents(
            inputs, plan, strength == 1.0, len(texts.prompts) * num_images_per_prompt, generator, timings)

        # 3. Denoise, 4. decode, pasted back with padding_mask_crop.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings, unet_inputs=unet_inputs, extra_channels=extra_channels,
                                after_step=after_step)
        images, height, width = self._inpaint_outputs(self._decode(latents, output_type, timings), inputs,
                                                      output_type)

        parameters = self._parameters(texts.prompts, texts.negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_strength=strength, mask_padding=padding_mask_crop)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)
