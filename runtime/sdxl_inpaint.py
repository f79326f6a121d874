"""SDXL inpainting over ONNX engines, as diffusers' StableDiffusionXLInpaintPipeline, with the same random
draws in the same order.

It is SD inpainting (`sdrt.runtime.inpaint`: masks, the three random draws, a 9-channel UNet's extra
channels or a 4-channel UNet's blend after each step) conditioned as SDXL (`sdrt.runtime.sdxl`: two
text encoders, text_embeds and time_ids; with requires_aesthetics_score, an aesthetic score in the
time ids as img2img's). diffusers' defaults differ from SD inpainting's: strength 0.9999, which is not
1, so the initial latents are the picture's noised to the first timestep, and int(0.9999 * steps)
steps are run; guidance_scale 7.5.

The "ensemble of expert denoisers" inpaints too, as diffusers': the base stops at `denoising_end`
(output_type="latent") and a second model (the refiner) takes those latents as `image`, with the same mask,
and resumes at `denoising_start`, on the plan `sdrt.runtime.sdxl.denoising_plan` cuts (strength is then
ignored). With denoising_start nothing is noised: the initial latents are the image's (a picture is still
encoded, a draw, even by a 9-channel UNet at strength 1, where diffusers fails), yet the noise is still
drawn, and the 4-channel UNet's blend noises the kept region with it to each next timestep, as diffusers'.
Latents given as `image` are used without the VAE encoder (no first draw) and are not masked (no third draw;
diffusers cannot mask latents, so a 9-channel UNet, which needs the masked picture's latents, refuses them).
They set the size: height and width may be left out, or must be theirs (diffusers' default is the model's
size: pass the latents' to compare), and the mask must be the one of the picture they came from (its size
rounded down to a multiple of the VAE's factor is theirs); it is resized to their size.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime import masks
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.img2img import given_latents
from sdrt.runtime.inpaint import InpaintInputs, StableDiffusionInpaintPipeline, check_strength
from sdrt.runtime.pipeline import PipelineOutput
from sdrt.runtime.rng import make_generator
from sdrt.runtime.sdxl import FAMILY, StableDiffusionXLBase, denoising_fraction, denoising_plan


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
        denoising_start: float | None = None,
        denoising_end: float | None = None,
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
        image may also be latents (an NCHW float array with the VAE's latent channels, as output_type="latent"
        gives), used as they are, with a 4-channel UNet only: see the module's docstring for their size and mask.
        strength: in (0, 1], default 0.9999 as diffusers'; only exactly 1 starts from pure noise.
        denoising_start: in (0, 1), resume the schedule there instead of cutting it by strength (ignored then),
        from the image's latents as they are (the refiner's half of the ensemble, on the base's latents stopped
        at the same denoising_end). denoising_end: in (0, 1), stop once that share of the schedule is done."""
        check_strength(strength)
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        texts = self._xl_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        denoising_start = denoising_fraction("denoising_start", denoising_start)
        denoising_end = denoising_fraction("denoising_end", denoising_end)
        inputs = self._xl_inpaint_inputs(image, mask_image, height, width, padding_mask_crop, output_type)
        self._check_image_count(inputs.num_images, len(texts.prompts), num_images_per_prompt)
        time_ids = self._time_ids(inputs.height, inputs.width, self.requires_aesthetics_score, dict(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_target_size=negative_target_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score))
        plan = denoising_plan(self.scheduler, num_inference_steps, eta, float(strength), denoising_start,
                              denoising_end)
        resume = denoising_start is not None  # start from the image's latents, not noised (diffusers' add_noise)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings, pooled embeddings and time ids.
        embeds, unet_inputs = self._conditioning(texts, num_images_per_prompt, guidance_scale > 1.0, time_ids,
                                                 timings)

        # 2. The initial latents and the mask's inputs to the loop (three random draws, as diffusers'; fewer for
        #    latents given as the image).
        latents, extra_channels, after_step = self._inpaint_latents(
            inputs, plan, strength == 1.0 and not resume, len(texts.prompts) * num_images_per_prompt, generator,
            timings, add_noise=not resume)

        # 3. Denoise, 4. decode, pasted back with padding_mask_crop.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings, unet_inputs=unet_inputs, extra_channels=extra_channels,
                                after_step=after_step)
        images, height, width = self._inpaint_outputs(self._decode(latents, output_type, timings), inputs,
                                                      output_type)

        parameters = self._parameters(texts.prompts, texts.negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_strength=None if resume else strength,
                                      denoising_start=denoising_start, denoising_end=denoising_end,
                                      mask_padding=padding_mask_crop)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)

    def _xl_inpaint_inputs(self, image, mask_image, height, width, padding_mask_crop, output_type) -> InpaintInputs:
        """_inpaint_inputs for pictures; for latents given as the image (`given_latents`), the masks at their size."""
        latents = given_latents(image, self.folder.vae.latent_channels)
        if latents is None:
            return self._inpaint_inputs(image, mask_image, height, width, padding_mask_crop, output_type)
        if self.is_inpainting_unet:
            raise InvalidInputError(
                f"{self.folder.path}'s UNet is an inpainting one ({self.folder.unet_config.get('in_channels')} input "
                "channels): it needs the masked picture's latents, which latents given as image cannot give "
                "(diffusers cannot mask latents either); pass the picture"
            )
        if padding_mask_crop is not None:
            raise InvalidInputError(
                "padding_mask_crop crops the picture around the mask, and latents given as image cannot be cropped; "
                "leave padding_mask_crop out"
            )
        factor = self.folder.vae.scale_factor
        size = (latents.shape[2] * factor, latents.shape[3] * factor)  # (height, width) in pixels
        for name, value, expected in (("height", height, size[0]), ("width", width, size[1])):
            if value is not None and value != expected:
                raise InvalidInputError(
                    f"{name}={value}, but the latents given as image make {size[1]}x{size[0]} pictures (width x "
                    f"height: their {latents.shape[3]}x{latents.shape[2]} cells x the VAE's factor {factor}), and "
                    "latents are not resized; leave height and width out"
                )
        self._check_size(*size, subject="image ")
        mask_pictures = self._mask_pictures(mask_image, len(latents))
        for index, mask in enumerate(mask_pictures):
            if (mask.height - mask.height % factor, mask.width - mask.width % factor) != size:
                raise InvalidInputError(
                    f"mask {index} is {mask.width}x{mask.height} but the latents given as image make "
                    f"{size[1]}x{size[0]} pictures; give the mask of the picture the latents were made from (its "
                    f"size rounded down to a multiple of {factor} px must be theirs)"
                )
        mask = masks.preprocess(mask_pictures, *size)
        return InpaintInputs(None, mask, None, size[0], size[1], None, None, mask_pictures[0], image_latents=latents)
