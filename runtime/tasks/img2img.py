"""Image-to-image: the run starts from a picture's latents, noised to the plan's first timestep.

As diffusers' img2img pipelines, with the same random draws in the same order: the VAE encoder's latent
distribution is sampled first (randn of the encoded images' shape), then the noise that `add_noise` mixes
in at the first timestep of the plan, truncated by `strength` (or, for a family that builds its schedule
for strength, LCM, spread over it). Latents given as the image (an NCHW float array, as output_type="latent"
gives) are used as the VAE encoder's output; with denoising_start (the refiner hand-off) nothing is noised.
"""

from __future__ import annotations

import time

import numpy as np

from sdrt.runtime import image as imageio
from sdrt.runtime.core import codec
from sdrt.runtime.core.generate import check_size
from sdrt.runtime.core.request import check_strength
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.rng import PerImageGenerator
from sdrt.runtime.tasks.base import Task


def given_latents(image, channels: int) -> np.ndarray | None:
    """`image` as float32 latents when it is an NCHW float array (a pipeline's output_type="latent", e.g. SDXL's
    base stopped at denoising_end), which must have the VAE's `channels`; None for pictures (image.from_pil)."""
    if not (isinstance(image, np.ndarray) and image.ndim == 4 and np.issubdtype(image.dtype, np.floating)):
        return None
    if image.shape[1] != channels:
        raise InvalidInputError(
            f"image is a float array of shape {image.shape}: latents must be NCHW with the VAE's {channels} "
            "channels (output_type='latent'); pass pictures as PIL images or HWC uint8 arrays"
        )
    if not np.isfinite(image).all():
        raise InvalidInputError("the latents given as image hold NaN/Inf")
    return np.ascontiguousarray(image, dtype=np.float32)


def check_image_count(num_images: int, num_prompts: int, num_images_per_prompt: int) -> None:
    """Images are tiled over the batch as diffusers does (outputs j takes image j % count); allow only
    the counts where that pairs every image with its prompt."""
    batch = num_prompts * num_images_per_prompt
    if num_images in (1, batch) or (num_prompts == 1 and batch % num_images == 0):
        return
    raise InvalidInputError(
        f"got {num_images} images for {num_prompts} prompts x {num_images_per_prompt} images per prompt; "
        f"pass one image for all, or one image per output ({batch}), or, with a single prompt, a number of "
        "images that divides num_images_per_prompt"
    )


def tile(array: np.ndarray, batch: int) -> np.ndarray:
    """Repeat a batch of 1 or k images over `batch` outputs (output j takes image j % k), as torch's repeat."""
    return np.tile(array, (batch // len(array), 1, 1, 1))


def strength_plan(run):
    """The plan cut by strength, or (denoising_start given) the full one, which the hand-off then cuts."""
    request = run.request
    strength = None if request.denoising_start is not None else request.strength
    return run.scheduler.plan(request.num_inference_steps, strength=strength, eta=request.eta,
                              strength_in_schedule=run.family.strength_in_schedule and strength is not None,
                              **run.family.schedule_options(run))


def samples(run, count: int) -> int:
    """How many latents a draw for `count` pictures makes: one per picture, or, with a generator per image
    (seed=[...]), one per output image, each from its image's generator (as diffusers' list of generators)."""
    return run.batch if isinstance(run.generator, PerImageGenerator) else count


def image_latents(run, pixels: np.ndarray) -> np.ndarray:
    """The pictures' latents (one draw), timed as the VAE encoder's stage."""
    t0 = time.perf_counter()
    latents = codec.encode(run.models, pixels, run.generator, run.vae_tiling, samples(run, len(pixels)))
    run.timings["vae_encoder"] = run.timings.get("vae_encoder", 0.0) + time.perf_counter() - t0
    return latents


class ImageToImage(Task):
    takes_image = True

    def prepare(self, run) -> None:
        """The images, checked for size and count: NCHW pixels in [-1, 1] from pictures, or the latents given."""
        request, folder = run.request, run.folder
        check_strength(request.strength)  # None too: the task needs one
        latents = given_latents(request.image, folder.vae.latent_channels)
        self.is_latents = latents is not None
        factor = folder.vae.scale_factor
        if self.is_latents:
            self.images = latents
            count, run.height, run.width = len(latents), latents.shape[2] * factor, latents.shape[3] * factor
        else:  # the pixels are made in start, after the memory check: a large picture takes GiB and seconds
            self.images = None
            size = {}
            if run.family.resizes_pictures:  # SD3, Flux: the picture is made height x width (default the model's)
                size = dict(height=request.height or folder.default_size, width=request.width or folder.default_size)
            self.size = size
            count, run.height, run.width = imageio.picture_size(request.image, vae_scale_factor=factor, **size)
        check_size(folder, run.height, run.width, subject="image ")
        check_image_count(count, len(request.prompt), request.num_images_per_prompt)
        run.parameters.update(width=run.width, height=run.height)

    def plan(self, run, plan):
        run.parameters["denoising_strength"] = run.request.strength
        return strength_plan(run)

    def start(self, run, latents):
        """The images' latents (first draw; none for latents given), tiled over the batch, noised to the plan's
        first timestep (second draw; none when resuming), as diffusers' prepare_latents."""
        if self.images is None:
            self.images = imageio.from_pil(run.request.image, vae_scale_factor=run.folder.vae.scale_factor,
                                           **self.size)
        latents = self.images if self.is_latents else image_latents(run, self.images)
        latents = tile(latents, run.batch)
        if run.resume:
            return latents
        noise = run.generator.randn(latents.shape).astype(np.float32)
        return run.scheduler.add_noise(run.plan, latents, noise, 0)
