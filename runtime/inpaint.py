"""Inpainting with an exported Stable Diffusion folder: repaint the white part of a mask, keep the rest of the picture.

As diffusers' StableDiffusionInpaintPipeline, with the same random draws in the same order:
1. the picture's latents, sampled from the VAE's Gaussian (only for a 4-channel UNet, or strength < 1);
2. the noise: the initial latents at strength 1 (times the scheduler's initial sigma), else the
   picture's latents noised to the plan's first timestep, as img2img;
3. the masked picture's latents (the picture with the repainted part set to grey), sampled too;
   drawn even for a 4-channel UNet, which does not use them, so that the stream stays diffusers'.
A dedicated inpainting UNet (9 input channels) sees [latents, mask, masked-picture latents] at every
step. An ordinary UNet (4 channels) denoises the latents alone, and after each step the kept region is
replaced by the picture's latents noised to the next timestep. The loop is txt2img's
(`StableDiffusionBase._denoise`) with those two hooks. The stages (`_inpaint_inputs`, `_inpaint_latents`,
`_inpaint_outputs`) serve SDXL's inpainting too (`sdrt.runtime.sdxl_inpaint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime import image as imageio
from sdrt.runtime import masks
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline, check_strength
from sdrt.runtime.pipeline import PipelineOutput
from sdrt.runtime.rng import make_generator


@dataclass(frozen=True)
class InpaintInputs:
    """The pictures and masks prepared for the loop: NCHW pixels in [-1, 1], N1HW masks of 0/1 (1 = repaint).
    SDXL's inpainting also takes latents as the image (`image_latents`; no pixels then, nor masked pixels)."""

    pixels: np.ndarray | None
    mask: np.ndarray
    masked_pixels: np.ndarray | None  # the pixels with the repainted part set to 0 (grey)
    height: int  # the processing size
    width: int
    crop: tuple | None  # padding_mask_crop's box (x1, y1, x2, y2) in the original picture
    original: object  # the original PIL picture, with crop
    mask_picture: object  # the first PIL mask, as given
    image_latents: np.ndarray | None = None  # latents given as the image, used without the VAE encoder

    @property
    def num_images(self) -> int:
        return len(self.pixels if self.pixels is not None else self.image_latents)


class StableDiffusionInpaintPipeline(StableDiffusionImg2ImgPipeline):
    """SD 1.x / 2.x inpainting over ONNX engines, with an inpainting UNet (9 channels) or an ordinary one (4)."""

    family = "stable-diffusion"  # the folders this class inpaints with

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, **options):
        if folder.family != self.family or folder.unet_config.get("time_cond_proj_dim") is not None:
            raise UnsupportedConfigError(
                f"{folder.path} is a {folder.family} model ({folder.pipeline}, UNet time_cond_proj_dim="
                f"{folder.unet_config.get('time_cond_proj_dim')}); inpainting runs Stable Diffusion 1.x / 2.x "
                "folders (StableDiffusionInpaintPipeline) and SDXL ones (sdrt.runtime.sdxl_inpaint) only, and "
                f"{type(self).__name__} the {self.family} ones: sdrt.runtime.families.inpaint_pipeline picks the class"
            )
        if "vae_encoder" not in folder.components:
            raise ModelFolderError(
                f"{folder.path} lacks vae_encoder/model.onnx, which inpainting needs to read the picture; "
                "re-export the checkpoint with sdrt export (its default components include vae_encoder)"
            )
        super().__init__(folder, provider=provider, scheduler=scheduler, **options)

    def _check_unet_channels(self, folder: ModelFolder) -> None:
        """Either the latents alone (blending) or latents + mask + masked-picture latents (an inpainting UNet)."""
        latent_channels = folder.vae.latent_channels
        in_channels = folder.unet_config.get("in_channels")
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise UnsupportedConfigError(
                f"{folder.path}: the UNet takes {in_channels} input channels; inpainting runs UNets of "
                f"{latent_channels} (latents) or {2 * latent_channels + 1} (latents, mask, masked picture)"
            )

    @property
    def is_inpainting_unet(self) -> bool:
        """True when the UNet takes the mask and the masked picture's latents (9 channels for SD)."""
        return self.folder.unet_config.get("in_channels") != self.folder.vae.latent_channels

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        mask_image,
        strength: float = 1.0,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
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
        guidance_rescale: as txt2img; diffusers' inpainting pipeline has no such option."""
        check_strength(strength)
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        prompts, negatives = self._prompts(prompt, negative_prompt)
        inputs = self._inpaint_inputs(image, mask_image, height, width, padding_mask_crop, output_type)
        self._check_image_count(len(inputs.pixels), len(prompts), num_images_per_prompt)
        plan = self.scheduler.plan(num_inference_steps, strength=float(strength), eta=eta)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings.
        embeds = self._embeddings(prompts, negatives, num_images_per_prompt, guidance_scale > 1.0, timings)

        # 2. The initial latents and the mask's inputs to the loop (three random draws, as diffusers').
        latents, extra_channels, after_step = self._inpaint_latents(
            inputs, plan, strength == 1.0, len(prompts) * num_images_per_prompt, generator, timings)

        # 3. Denoise, 4. decode: as txt2img.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings, extra_channels=extra_channels, after_step=after_step)
        images, height, width = self._inpaint_outputs(self._decode(latents, output_type, timings), inputs,
                                                      output_type)

        parameters = self._parameters(prompts, negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_strength=strength, mask_padding=padding_mask_crop)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)

    # -- stages shared with SDXL's inpainting (sdrt.runtime.sdxl_inpaint) --------------------------

    def _inpaint_inputs(self, image, mask_image, height, width, padding_mask_crop, output_type) -> InpaintInputs:
        """Check and prepare the pictures and masks at the processing size (see __call__ for the arguments)."""
        pictures, mask_pictures = self._pictures_and_masks(image, mask_image)
        vae = self.folder.vae
        if height is None:  # the picture's size rounded down to a multiple of the VAE's factor
            height = pictures[0].height - pictures[0].height % vae.scale_factor
        if width is None:
            width = pictures[0].width - pictures[0].width % vae.scale_factor
        self._check_size(height, width)
        crop = original = None
        if padding_mask_crop is not None:
            crop = self._crop_box(padding_mask_crop, pictures, mask_pictures, height, width, output_type)
            original = pictures[0]
            pictures = [masks.resize_and_fill(original.crop(crop), width, height)]
        pixels = imageio.from_pil(pictures, height=height, width=width, vae_scale_factor=vae.scale_factor)
        mask = masks.preprocess(mask_pictures, height, width, crop)
        masked_pixels = pixels * (mask < 0.5)  # the repainted part becomes 0 (grey), as diffusers
        return InpaintInputs(pixels, mask, masked_pixels, height, width, crop, original, mask_pictures[0])

    def _inpaint_latents(self, inputs: InpaintInputs, plan, full_noise: bool, batch: int, generator,
                         timings: dict, add_noise: bool = True) -> tuple:
        """(initial latents, extra_channels, after_step) for _denoise, with diffusers' random draws in its order.
        full_noise: strength is exactly 1 (diffusers' is_strength_max). add_noise: False to start from the
        image's latents as they are (SDXL's denoising_start; full_noise False then); the noise is drawn still,
        for the blend, as diffusers' prepare_latents."""
        vae = self.folder.vae
        # The picture's latents (first draw; none for latents given as the image, and a 9-channel UNet at
        # strength 1 does not need them), the noise (second draw), and the initial latents, as prepare_latents.
        t0 = time.perf_counter()
        inpainting_unet = self.is_inpainting_unet
        shape = (batch, vae.latent_channels, inputs.height // vae.scale_factor, inputs.width // vae.scale_factor)
        image_latents = None
        if inputs.image_latents is not None:
            image_latents = _tile(inputs.image_latents, batch)
        elif not inpainting_unet or not full_noise:
            image_latents = _tile(self.encode_image(inputs.pixels, generator), batch)
        noise = generator.randn(shape).astype(np.float32)
        if not add_noise:
            assert image_latents is not None, "add_noise=False starts from the image's latents: full_noise is False"
            latents = image_latents
        elif full_noise:
            latents = noise * np.float32(plan.init_noise_sigma)
        else:
            latents = self.scheduler.add_noise(plan, image_latents, noise, 0)

        # The mask at latent size and the masked picture's latents (third draw; none for latents given as the
        # image, which diffusers does not mask), as prepare_mask_latents.
        latent_mask = _tile(masks.to_latent_size(inputs.mask, vae.scale_factor), batch)
        if inpainting_unet:
            assert inputs.masked_pixels is not None, "a 9-channel UNet needs the masked picture"
            masked_latents = _tile(self.encode_image(inputs.masked_pixels, generator), batch)
            extra_channels, after_step = np.concatenate([latent_mask, masked_latents], axis=1), None
        else:
            if inputs.masked_pixels is not None:  # diffusers samples them, then leaves them unused
                generator.randn((len(inputs.masked_pixels), *shape[1:]))
            extra_channels = None

            def after_step(i: int, latents: np.ndarray) -> np.ndarray:
                """Keep the picture outside the mask, at the noise level the next step expects."""
                known = image_latents
                if i + 1 < plan.num_evaluations:
                    known = self.scheduler.add_noise(plan, image_latents, noise, i + 1)
                return (1 - latent_mask) * known + latent_mask * latents
        timings["vae_encoder"] = time.perf_counter() - t0
        return latents, extra_channels, after_step

    def _inpaint_outputs(self, images, inputs: InpaintInputs, output_type: str) -> tuple:
        """(images, height, width): with padding_mask_crop, the repainted box pasted back into the original."""
        if inputs.crop is None:
            return images, inputs.height, inputs.width
        images = self._paste_back(images, inputs.mask_picture, inputs.original, inputs.crop, output_type)
        return images, inputs.original.height, inputs.original.width

    # -- inputs ---------------------------------------------------------------------------------

    @staticmethod
    def _pictures_and_masks(image, mask_image) -> tuple[list, list]:
        """RGB pictures and PIL masks, one mask for all pictures or one per picture, each of its picture's size."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise InvalidInputError("image is an empty list; give the picture to inpaint")
        pictures = [imageio.as_rgb(item, index) for index, item in enumerate(images)]
        mask_pictures = StableDiffusionInpaintPipeline._mask_pictures(mask_image, len(pictures))
        for index, picture in enumerate(pictures):
            mask = mask_pictures[index if len(mask_pictures) > 1 else 0]
            if mask.size != picture.size:
                raise InvalidInputError(
                    f"mask is {mask.width}x{mask.height} but image {index} is {picture.width}x{picture.height}; "
                    "a mask must have its image's size (resize it with the same crop as the image)"
                )
        return pictures, mask_pictures

    @staticmethod
    def _mask_pictures(mask_image, num_images: int) -> list:
        """PIL masks, one for all `num_images` images or one per image."""
        if mask_image is None:
            raise InvalidInputError("mask_image is missing: give a mask, white where to repaint, black where to keep")
        mask_list = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
        mask_pictures = [masks.as_mask(item, index) for index, item in enumerate(mask_list)]
        if len(mask_pictures) not in (1, num_images):
            raise InvalidInputError(
                f"got {len(mask_pictures)} masks for {num_images} images; give one mask for all, or one per image"
            )
        return mask_pictures

    @staticmethod
    def _crop_box(pad, pictures: list, mask_pictures: list, height: int, width: int, output_type: str) -> tuple:
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
            raise InvalidInputError(f"padding_mask_crop must be an integer >= 0 (pixels), got {pad!r}")
        if len(pictures) != 1 or len(mask_pictures) != 1:
            raise InvalidInputError("padding_mask_crop takes one image and one mask (it crops around that mask)")
        if output_type not in ("pil", "uint8"):
            raise InvalidInputError(
                "padding_mask_crop pastes the result into the original picture: output_type must be 'pil' or "
                f"'uint8', got {output_type!r}"
            )
        return masks.crop_region(mask_pictures[0], width, height, int(pad))

    @staticmethod
    def _paste_back(images, mask, original, crop: tuple, output_type: str):
        pictures = images if output_type == "pil" else imageio.to_pil(images)
        pasted = [masks.apply_overlay(mask, original, picture, crop) for picture in pictures]
        return pasted if output_type == "pil" else np.stack([np.asarray(p) for p in pasted])


def _tile(array: np.ndarray, batch: int) -> np.ndarray:
    """Repeat a batch of 1 or k images over `batch` outputs (output j takes image j % k), as torch's repeat."""
    return np.tile(array, (batch // len(array), 1, 1, 1))
