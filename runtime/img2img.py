"""Image-to-image with an exported Stable Diffusion folder: picture -> VAE latents -> noised -> denoise loop -> image.

As diffusers' StableDiffusionImg2ImgPipeline, with the same random draws in the same order: the VAE
encoder's latent distribution is sampled first (randn of the encoded images' shape), then the
noise that `add_noise` mixes in at the first timestep of the plan, truncated by `strength`; the
loop and the decoding are txt2img's (`StableDiffusionBase`).
"""

from __future__ import annotations

import numbers
import time
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime import image as imageio
from sdrt.runtime import tiling
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import GenerationError, InvalidInputError
from sdrt.runtime.pipeline import PipelineOutput, StableDiffusionBase
from sdrt.runtime.rng import make_generator
from sdrt.runtime.vae import require_encoder, select_vae

# DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")


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


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """SD 1.x / 2.x image-to-image over ONNX engines (needs the folder's vae_encoder)."""

    strength_in_schedule = False  # LCM's builds its schedule for strength instead of cutting it (Scheduler.plan)

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, **engine_options):
        require_encoder(folder, select_vae(folder, engine_options.get("vae", "full")))
        super().__init__(folder, provider=provider, scheduler=scheduler, **engine_options)
        self.vae_encoder = self._engine(self.vae_choice.encoder)

    def _engines(self) -> tuple:
        return (*super()._engines(), self.vae_encoder)

    def encode_image(self, pixels: np.ndarray, generator) -> np.ndarray:
        """NCHW pixels in [-1, 1] -> scaled latents, one sample of the VAE's diagonal Gaussian per image.

        diffusers' `scaling_factor * vae.encode(x).latent_dist.sample(generator)`: one randn of the
        latents' shape, drawn after every image is encoded. Images are encoded one at a time. The tiny
        VAE (vae="taesd") returns latents, not a distribution: nothing is drawn (diffusers' retrieve_latents).
        """
        choice = self.vae_choice
        encoded = np.concatenate([
            tiling.encode(lambda x: self.vae_encoder.run({"sample": x})[choice.encoder_output], pixels[k:k + 1],
                          self.vae_tiling, self.folder.vae.scale_factor) for k in range(len(pixels))
        ])
        self._stage_done(self.vae_encoder)
        if not np.isfinite(encoded).all():
            raise GenerationError("the VAE encoder returned NaN/Inf for this image")
        sample = encoded
        if choice.samples:
            mean, logvar = np.split(encoded, 2, axis=1)
            std = np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
            sample = mean + std * generator.randn(mean.shape).astype(np.float32)
        vae = choice.config
        return (sample - np.float32(vae.shift_factor)) * np.float32(vae.scaling_factor)

    def _images(self, image, num_prompts: int, num_images_per_prompt: int) -> np.ndarray:
        """The images, checked for size and count: NCHW pixels in [-1, 1] from pictures, or the latents given
        (`given_latents`), which are used as the VAE encoder's output, as diffusers does."""
        latents = given_latents(image, self.folder.vae.latent_channels)
        images = imageio.from_pil(image, vae_scale_factor=self.folder.vae.scale_factor) if latents is None else latents
        self._check_size(*self._pixel_size(images), subject="image ")
        self._check_image_count(len(images), num_prompts, num_images_per_prompt)
        return images

    def _is_latents(self, images: np.ndarray) -> bool:
        return images.shape[1] != 3  # pixels are RGB; latents have the VAE's latent channels (given_latents)

    def _pixel_size(self, images: np.ndarray) -> tuple[int, int]:
        """(height, width) in pixels of `_images`' pixels or latents."""
        factor = self.folder.vae.scale_factor if self._is_latents(images) else 1
        return images.shape[2] * factor, images.shape[3] * factor

    def _image_and_plan(self, image, strength, num_prompts: int, num_images_per_prompt: int,
                        num_inference_steps: int, eta: float) -> tuple:
        """Check strength and the images (`_images`), and the plan cut short by strength."""
        check_strength(strength)
        images = self._images(image, num_prompts, num_images_per_prompt)
        plan = self.scheduler.plan(num_inference_steps, strength=float(strength), eta=eta,
                                   strength_in_schedule=self.strength_in_schedule)
        return images, plan

    def _noised_image_latents(self, images: np.ndarray, plan, batch: int, generator, timings: dict,
                              add_noise: bool = True) -> np.ndarray:
        """The images' latents (first draw; none for latents given), tiled over the batch, noised to the plan's
        first timestep (second draw; none without add_noise), as diffusers' prepare_latents."""
        latents = images
        if not self._is_latents(images):
            t0 = time.perf_counter()
            latents = self.encode_image(images, generator)
            timings["vae_encoder"] = time.perf_counter() - t0
        latents = np.tile(latents, (batch // len(latents), 1, 1, 1))
        if not add_noise:
            return latents
        noise = generator.randn(latents.shape).astype(np.float32)
        return self.scheduler.add_noise(plan, latents, noise, 0)

    @staticmethod
    def _check_image_count(num_images: int, num_prompts: int, num_images_per_prompt: int) -> None:
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

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        strength: float = 0.8,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """image: a PIL RGB image, an HWC uint8 RGB array, or a list of them (see image.from_pil); the
        output has its size, rounded down to a multiple of the VAE's factor as diffusers does. Or latents
        (an NCHW float array, as output_type="latent" gives), used without the VAE encoder, as diffusers does.
        strength: in (0, 1]; the share of the steps that are run, from noise that much over the image
        (1 ignores the image's content). Runs int(num_inference_steps * strength) steps.
        guidance_rescale: as txt2img; diffusers' StableDiffusionImg2ImgPipeline has no such option
        (it ignores the argument), so only 0 is compared with it."""
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        prompts, negatives = self._prompts(prompt, negative_prompt)
        images, plan = self._image_and_plan(image, strength, len(prompts), num_images_per_prompt, num_inference_steps,
                                            eta)
        height, width = self._pixel_size(images)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings.
        embeds = self._embeddings(prompts, negatives, num_images_per_prompt, guidance_scale > 1.0, timings)

        # 2. Image latents (first random draw), tiled over the batch, noised to the plan's first timestep
        #    (second draw), as diffusers' prepare_latents.
        latents = self._noised_image_latents(images, plan, len(prompts) * num_images_per_prompt, generator, timings)

        # 3. Denoise, 4. decode: as txt2img.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings)
        images = self._decode(latents, output_type, timings)

        parameters = self._parameters(prompts, negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_strength=strength)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)
