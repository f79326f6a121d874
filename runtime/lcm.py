"""Text-to-image with a Latent Consistency Model (Luo et al. 2023): 1-8 steps, guidance baked into the UNet.

As diffusers' LatentConsistencyModelPipeline: an LCM-distilled UNet takes the guidance scale as an
input (`timestep_cond`, a sinusoidal embedding of w = guidance_scale - 1) instead of classifier-free
guidance, so every step is ONE UNet call on the prompts alone (no negative prompt, no CFG batch).
The folder's LCMScheduler samples; the last step returns the consistency function's denoised
estimate, which is what gets decoded.

LatentConsistencyImg2ImgPipeline is diffusers' LatentConsistencyModelImg2ImgPipeline: img2img's image
latents and draws (sdrt.runtime.img2img), with the schedule built for strength: all num_inference_steps
run over the first int(original_inference_steps * strength) distillation timesteps.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.pipeline import PipelineOutput, StableDiffusionBase
from sdrt.runtime.rng import make_generator

F32 = np.float32


def guidance_scale_embedding(w: np.ndarray, embedding_dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance weights w, shape (len(w), embedding_dim), float32.

    VDM's embedding (Kingma et al. 2021), as diffusers' get_guidance_scale_embedding computes it:
    [sin(1000 w f_k), cos(1000 w f_k)] with f_k = exp(-k log(10000) / (d/2 - 1)), zero-padded to odd d.
    """
    w = np.asarray(w, dtype=F32).reshape(-1) * F32(1000.0)
    half_dim = embedding_dim // 2
    exponent = np.log(F32(10000.0)) / F32(half_dim - 1)
    # exp in float64 rounded to float32 lands on torch's float32 exp (numpy's float32 exp is 1 ulp off at
    # times, which 1000 w magnifies: the angles reach thousands of radians).
    frequencies = np.exp((np.arange(half_dim, dtype=F32) * -exponent).astype(np.float64)).astype(F32)
    angles = w[:, None] * frequencies[None, :]
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(F32)


def time_cond_proj_dim(folder: ModelFolder) -> int:
    """The UNet's guidance-embedding width; ModelFolderError unless the UNet is LCM-distilled."""
    dim = folder.unet_config.get("time_cond_proj_dim")
    if dim is None:
        raise ModelFolderError(
            f"{folder.path}: its UNet has no time_cond_proj_dim (no timestep_cond input), so it is not a Latent "
            "Consistency Model; run it with StableDiffusionPipeline (sdrt generate picks it from the folder)"
        )
    return int(dim)


class LatentConsistencyBase:
    """What the LCM pipelines add to their Stable Diffusion base: the guidance embedding input (the UNet must
    take timestep_cond) and no negative prompt. Put it first among the bases."""

    uses_timestep_cond = True

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, **engine_options):
        self.embedding_dim = time_cond_proj_dim(folder)
        super().__init__(folder, provider=provider, scheduler=scheduler, **engine_options)

    @staticmethod
    def _refuse_negative_prompt(negative_prompt) -> None:
        if negative_prompt is not None:
            raise InvalidInputError(
                "a Latent Consistency Model takes no negative_prompt: its guidance is distilled into the UNet "
                "(guidance_scale is an embedding input, not classifier-free guidance); drop negative_prompt"
            )

    def _guidance_inputs(self, batch: int, guidance_scale: float) -> dict[str, np.ndarray]:
        """The UNet's extra input: the embedding of w = guidance_scale - 1 per sample (diffusers' convention)."""
        w = np.full((batch,), guidance_scale - 1.0, dtype=F32)
        return {"timestep_cond": guidance_scale_embedding(w, self.embedding_dim)}


class LatentConsistencyPipeline(LatentConsistencyBase, StableDiffusionBase):
    """LCM text-to-image over ONNX engines (needs a UNet exported with its timestep_cond input)."""

    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 4,
        guidance_scale: float = 8.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
        negative_prompt: str | Sequence[str] | None = None,
    ) -> PipelineOutput:
        """guidance_scale: the weight the UNet was distilled to follow (its embedding input), not CFG: it
        costs nothing per step. num_inference_steps: at most the scheduler's original_inference_steps.
        negative_prompt: refused; an LCM has no unconditional branch to steer away from."""
        self._refuse_negative_prompt(negative_prompt)
        height = self.folder.default_size if height is None else height
        width = self.folder.default_size if width is None else width
        self._check_size(height, width)
        self._check_arguments(num_inference_steps, guidance_scale, 0.0, 0.0, num_images_per_prompt, output_type)
        prompts, negatives = self._prompts(prompt, None)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}
        batch = len(prompts) * num_images_per_prompt

        # 1. Text embeddings of the prompts only (the guidance is the UNet's timestep_cond input).
        embeds = self._embeddings(prompts, negatives, num_images_per_prompt, False, timings)

        # 2. Initial noise, 3. denoise (guidance_scale 1 to _denoise: no CFG batch), 4. decode the last estimate.
        plan = self.scheduler.plan(num_inference_steps)
        vae = self.folder.vae
        shape = (batch, vae.latent_channels, height // vae.scale_factor, width // vae.scale_factor)
        latents = generator.randn(shape).astype(F32) * F32(plan.init_noise_sigma)
        latents = self._denoise(plan, latents, embeds, 1.0, 0.0, generator, callback, progress, timings,
                                unet_inputs=self._guidance_inputs(batch, guidance_scale))
        images = self._decode(latents, output_type, timings)

        parameters = self._parameters(prompts, negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)


class LatentConsistencyImg2ImgPipeline(LatentConsistencyBase, StableDiffusionImg2ImgPipeline):
    """LCM image-to-image over ONNX engines (needs the timestep_cond UNet and the folder's vae_encoder)."""

    strength_in_schedule = True

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        strength: float = 0.8,
        num_inference_steps: int = 4,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
        negative_prompt: str | Sequence[str] | None = None,
    ) -> PipelineOutput:
        """image: as StableDiffusionImg2ImgPipeline's. strength: in (0, 1]; the schedule starts that far up
        the distillation timesteps and all num_inference_steps run, so num_inference_steps can be at most
        int(original_inference_steps * strength). guidance_scale, negative_prompt: as LatentConsistencyPipeline's."""
        self._refuse_negative_prompt(negative_prompt)
        self._check_arguments(num_inference_steps, guidance_scale, 0.0, 0.0, num_images_per_prompt, output_type)
        prompts, negatives = self._prompts(prompt, None)
        pixels, plan = self._image_and_plan(image, strength, len(prompts), num_images_per_prompt, num_inference_steps,
                                            0.0)
        height, width = self._pixel_size(pixels)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}
        batch = len(prompts) * num_images_per_prompt

        # 1. Text embeddings of the prompts only, 2. the image latents noised to the plan's first timestep (two
        #    draws, as img2img's), 3. denoise, 4. decode the last estimate.
        embeds = self._embeddings(prompts, negatives, num_images_per_prompt, False, timings)
        latents = self._noised_image_latents(pixels, plan, batch, generator, timings)
        latents = self._denoise(plan, latents, embeds, 1.0, 0.0, generator, callback, progress, timings,
                                unet_inputs=self._guidance_inputs(batch, guidance_scale))
        images = self._decode(latents, output_type, timings)

        parameters = self._parameters(prompts, negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_strength=strength)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)
