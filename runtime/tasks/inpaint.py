"""Inpainting: repaint the white part of a mask, keep the rest of the picture.

As diffusers' inpainting pipelines (SD and SDXL), with the same random draws in the same order:
1. the picture's latents, sampled from the VAE's Gaussian (only for a 4-channel UNet, or strength < 1,
   or when resuming at denoising_start);
2. the noise: the initial latents at strength 1 (times the scheduler's initial sigma), else the
   picture's latents noised to the plan's first timestep, as img2img; with denoising_start (the refiner
   hand-off) the picture's latents as they are, yet the noise is still drawn, for the blend;
3. the masked picture's latents (the picture with the repainted part set to grey), sampled too;
   drawn even for a 4-channel UNet, which does not use them, so that the stream stays diffusers'.
A dedicated inpainting UNet (9 input channels for SD) sees [latents, mask, masked-picture latents] at
every step. An ordinary UNet (4 channels) denoises the latents alone, and after each step the kept region
is replaced by the picture's latents noised to the next timestep.

The diffusion transformers (SD3, Flux: flow matching) inpaint the same way, as diffusers' StableDiffusion3-
and FluxInpaintPipeline: an ordinary transformer (16 latent channels; Flux's 64 are those packed 2x2) blends
after each step, the scheduler's noise coefficients at the next evaluation being diffusers' scale_noise at the
next timestep; the picture is always encoded (first draw), and the masked picture too (third draw, unused). Their
processing size defaults to the model's (the picture and mask are resized to it), as diffusers'.

Latents given as `image` (an NCHW float array, as output_type="latent" gives; the SDXL ensemble's base
output) are used without the VAE encoder (no first draw) and are not masked (no third draw; diffusers
cannot mask latents, so a 9-channel UNet, which needs the masked picture's latents, refuses them). They set
the size: height and width may be left out, or must be theirs, and the mask must be the one of the picture
they came from (its size rounded down to a multiple of the VAE's factor is theirs); it is resized to their size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sdrt.runtime import image as imageio
from sdrt.runtime import masks
from sdrt.runtime.core.generate import check_size
from sdrt.runtime.core.request import check_strength
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.tasks.base import Task
from sdrt.runtime.tasks.img2img import check_image_count, given_latents, image_latents, samples, strength_plan, tile


@dataclass(frozen=True)
class InpaintInputs:
    """The pictures and masks prepared for the loop: NCHW pixels in [-1, 1], N1HW masks of 0/1 (1 = repaint);
    or latents given as the image (`image_latents`; no pixels then, nor masked pixels)."""

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


def latent_input_channels(folder) -> int:
    """The denoiser's input channels for the latents alone: the VAE's latent channels (x 4 for Flux's transformer,
    which takes them packed 2x2)."""
    from sdrt.engines.spec import transformer_kind

    packed = folder.denoiser == "transformer" and transformer_kind(folder.unet_config) == "flux"
    return folder.vae.latent_channels * (4 if packed else 1)


def is_inpainting_unet(folder) -> bool:
    """True when the denoiser takes the mask and the masked picture's latents (9 channels for SD, 33 for SD3)."""
    return folder.unet_config.get("in_channels") != latent_input_channels(folder)


def mask_pictures(mask_image, num_images: int) -> list:
    """PIL masks, one for all `num_images` images or one per image."""
    if mask_image is None:
        raise InvalidInputError("mask_image is missing: give a mask, white where to repaint, black where to keep")
    mask_list = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    pictures = [masks.as_mask(item, index) for index, item in enumerate(mask_list)]
    if len(pictures) not in (1, num_images):
        raise InvalidInputError(f"got {len(pictures)} masks for {num_images} images; give one mask for all, or one "
                                "per image")
    return pictures


def pictures_and_masks(image, mask_image) -> tuple[list, list]:
    """RGB pictures and PIL masks, one mask for all pictures or one per picture, each of its picture's size."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise InvalidInputError("image is an empty list; give the picture to inpaint")
    pictures = [imageio.as_rgb(item, index) for index, item in enumerate(images)]
    masks_ = mask_pictures(mask_image, len(pictures))
    for index, picture in enumerate(pictures):
        mask = masks_[index if len(masks_) > 1 else 0]
        if mask.size != picture.size:
            raise InvalidInputError(
                f"mask is {mask.width}x{mask.height} but image {index} is {picture.width}x{picture.height}; "
                "a mask must have its image's size (resize it with the same crop as the image)"
            )
    return pictures, masks_


def crop_box(pad: int, pictures: list, masks_: list, height: int, width: int, output_type: str) -> tuple:
    if len(pictures) != 1 or len(masks_) != 1:
        raise InvalidInputError("padding_mask_crop takes one image and one mask (it crops around that mask)")
    if output_type not in ("pil", "uint8"):
        raise InvalidInputError(
            "padding_mask_crop pastes the result into the original picture: output_type must be 'pil' or "
            f"'uint8', got {output_type!r}"
        )
    return masks.crop_region(masks_[0], width, height, int(pad))


def picture_geometry(run) -> tuple:
    """(pictures, masks, height, width, crop, original), checked, no pixel converted: the processing size is the
    request's, or the picture's rounded down to a multiple of the VAE's factor (diffusers' default for SD and
    SDXL is the model's size: pass both to compare); for a family that resizes pictures (SD3, Flux) the model's,
    as diffusers."""
    request, folder = run.request, run.folder
    pictures, masks_ = pictures_and_masks(request.image, request.mask_image)
    factor = folder.vae.scale_factor
    default_height, default_width = (folder.default_size, folder.default_size) if run.family.resizes_pictures else \
        (pictures[0].height - pictures[0].height % factor, pictures[0].width - pictures[0].width % factor)
    height = default_height if request.height is None else request.height
    width = default_width if request.width is None else request.width
    check_size(run.folder, height, width)
    crop = original = None
    if request.padding_mask_crop is not None:
        crop = crop_box(request.padding_mask_crop, pictures, masks_, height, width, request.output_type)
        original = pictures[0]
        pictures = [masks.resize_and_fill(original.crop(crop), width, height)]
    return pictures, masks_, height, width, crop, original


def picture_inputs(run, geometry: tuple | None = None) -> InpaintInputs:
    """The pictures and masks at the processing size (picture_geometry's, made now unless given)."""
    pictures, masks_, height, width, crop, original = geometry or picture_geometry(run)
    pixels = imageio.from_pil(pictures, height=height, width=width, vae_scale_factor=run.folder.vae.scale_factor)
    mask = masks.preprocess(masks_, height, width, crop)
    masked_pixels = pixels * (mask < 0.5)  # the repainted part becomes 0 (grey), as diffusers
    return InpaintInputs(pixels, mask, masked_pixels, height, width, crop, original, masks_[0])


def latent_inputs(run, latents: np.ndarray) -> InpaintInputs:
    """For latents given as the image: the masks at their size (see the module's docstring)."""
    request, folder = run.request, run.folder
    if is_inpainting_unet(folder):
        raise InvalidInputError(
            f"{folder.path}'s UNet is an inpainting one ({folder.unet_config.get('in_channels')} input "
            "channels): it needs the masked picture's latents, which latents given as image cannot give "
            "(diffusers cannot mask latents either); pass the picture"
        )
    if request.padding_mask_crop is not None:
        raise InvalidInputError(
            "padding_mask_crop crops the picture around the mask, and latents given as image cannot be cropped; "
            "leave padding_mask_crop out"
        )
    factor = folder.vae.scale_factor
    size = (latents.shape[2] * factor, latents.shape[3] * factor)  # (height, width) in pixels
    for name, value, expected in (("height", request.height, size[0]), ("width", request.width, size[1])):
        if value is not None and value != expected:
            raise InvalidInputError(
                f"{name}={value}, but the latents given as image make {size[1]}x{size[0]} pictures (width x "
                f"height: their {latents.shape[3]}x{latents.shape[2]} cells x the VAE's factor {factor}), and "
                "latents are not resized; leave height and width out"
            )
    check_size(folder, *size, subject="image ")
    masks_ = mask_pictures(request.mask_image, len(latents))
    for index, mask in enumerate(masks_):
        if (mask.height - mask.height % factor, mask.width - mask.width % factor) != size:
            raise InvalidInputError(
                f"mask {index} is {mask.width}x{mask.height} but the latents given as image make "
                f"{size[1]}x{size[0]} pictures; give the mask of the picture the latents were made from (its "
                f"size rounded down to a multiple of {factor} px must be theirs)"
            )
    mask = masks.preprocess(masks_, *size)
    return InpaintInputs(None, mask, None, size[0], size[1], None, None, masks_[0], image_latents=latents)


class Inpaint(Task):
    takes_image = True

    def prepare(self, run) -> None:
        check_strength(run.request.strength)  # None too: the task needs one
        latents = given_latents(run.request.image, run.folder.vae.latent_channels)
        if latents is None:  # the pixels are made in start, after the memory check: a large picture takes GiB
            self.inputs, self.geometry = None, picture_geometry(run)
            count, run.height, run.width = len(self.geometry[0]), self.geometry[2], self.geometry[3]
        else:
            self.inputs = latent_inputs(run, latents)
            count, run.height, run.width = self.inputs.num_images, self.inputs.height, self.inputs.width
        check_image_count(count, len(run.request.prompt), run.request.num_images_per_prompt)
        run.parameters.update(width=run.width, height=run.height)
        self.extra_channels = self.blend = None

    def plan(self, run, plan):
        run.parameters.update(denoising_strength=run.request.strength, mask_padding=run.request.padding_mask_crop)
        return strength_plan(run)

    def start(self, run, latents):
        """The initial latents, and the mask's inputs to the loop, with diffusers' random draws in its order."""
        if self.inputs is None:
            self.inputs = picture_inputs(run, self.geometry)
        inputs, plan, generator, batch = self.inputs, run.plan, run.generator, run.batch
        full_noise = run.request.strength == 1.0 and not run.resume  # diffusers' is_strength_max
        inpainting_unet = is_inpainting_unet(run.folder)
        t0 = time.perf_counter()
        # The picture's latents (first draw; none for latents given as the image, and a 9-channel UNet at
        # strength 1 does not need them), the noise (second draw), and the initial latents, as prepare_latents.
        picture = None
        if inputs.image_latents is not None:
            picture = tile(inputs.image_latents, batch)
        elif not inpainting_unet or not full_noise:
            picture = tile(image_latents(run, inputs.pixels), batch)
        noise = generator.randn(run.latent_shape()).astype(np.float32)
        if run.resume:
            latents = picture
        elif full_noise:
            latents = noise * np.float32(plan.init_noise_sigma)
        else:
            latents = run.scheduler.add_noise(plan, picture, noise, 0)

        # The mask at latent size and the masked picture's latents (third draw; none for latents given as the
        # image, which diffusers does not mask), as prepare_mask_latents.
        latent_mask = tile(masks.to_latent_size(inputs.mask, run.folder.vae.scale_factor), batch)
        if inpainting_unet:
            masked_latents = tile(image_latents(run, inputs.masked_pixels), batch)
            self.extra_channels = np.concatenate([latent_mask, masked_latents], axis=1)
        else:
            if inputs.masked_pixels is not None:  # diffusers samples them, then leaves them unused
                generator.randn((samples(run, len(inputs.masked_pixels)), *run.latent_shape()[1:]))
            self.blend = (picture, noise, latent_mask)
        run.timings["vae_encoder"] = time.perf_counter() - t0
        return latents

    def model_input(self, run, i: int, model_input: np.ndarray) -> np.ndarray:
        if self.extra_channels is None:
            return model_input
        return np.concatenate([model_input, self.extra_channels], axis=1)

    def after_step(self, run, i: int, latents: np.ndarray) -> np.ndarray:
        """A 4-channel UNet: keep the picture outside the mask, at the noise level the next step expects."""
        if self.blend is None:
            return latents
        picture, noise, latent_mask = self.blend
        known = picture
        if i + 1 < run.plan.num_evaluations:
            known = run.scheduler.add_noise(run.plan, picture, noise, i + 1)
        return (1 - latent_mask) * known + latent_mask * latents

    def finish(self, run, images):
        """With padding_mask_crop, the repainted box pasted back into the original picture."""
        inputs = self.inputs
        if inputs.crop is None:
            return images
        run.parameters.update(width=inputs.original.width, height=inputs.original.height)
        output_type = run.request.output_type
        pictures = images if output_type == "pil" else imageio.to_pil(images)
        pasted = [masks.apply_overlay(inputs.mask_picture, inputs.original, p, inputs.crop) for p in pictures]
        return pasted if output_type == "pil" else np.stack([np.asarray(p) for p in pasted])
