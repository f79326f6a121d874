"""Latents <-> pixels: the chosen autoencoder (full VAE or TAESD, sdrt.runtime.vae), whole or in tiles
(sdrt.runtime.tiling), one image at a time (the same result as a batch, in less memory)."""

from __future__ import annotations

import time

import numpy as np

from sdrt.runtime import image as imageio
from sdrt.runtime import tiling
from sdrt.runtime.core.models import Models
from sdrt.runtime.errors import GenerationError
from sdrt.runtime.tiling import Tiling

# DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def decode(models: Models, latents: np.ndarray, output_type: str, vae_tiling: Tiling | None, timings: dict):
    """Latents -> images of output_type ("latent" returns them as they are)."""
    t0 = time.perf_counter()
    if output_type == "latent":
        images = latents
    else:
        vae = models.vae_choice.config
        scaled = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor)
        decoded = np.concatenate([
            tiling.decode(lambda z: models.vae_decoder.run({"latent_sample": z})["sample"], scaled[k:k + 1],
                          vae_tiling, vae.scale_factor) for k in range(len(latents))
        ])
        models.stage_done(models.vae_decoder)
        if not np.isfinite(decoded).all():
            raise GenerationError(
                "the VAE decoder returned NaN/Inf; the image would be black. An fp16 folder needs its fp32 "
                "decoder (vae_decoder_fp32/, which `sdrt optimize --precision fp16` writes): re-run that, or use "
                "the fp32 export; if the folder has it, the model is broken for this input")
        if output_type == "np":
            images = imageio.to_unit(decoded)
        else:
            images = imageio.to_uint8(decoded)
            if output_type == "pil":
                images = imageio.to_pil(images)
    timings["vae_decoder"] = time.perf_counter() - t0
    return images


def encode(models: Models, pixels: np.ndarray, generator, vae_tiling: Tiling | None,
           samples: int | None = None) -> np.ndarray:
    """NCHW pixels in [-1, 1] -> scaled latents, one sample of the VAE's diagonal Gaussian per image.

    diffusers' `scaling_factor * vae.encode(x).latent_dist.sample(generator)`: one randn of the
    latents' shape, drawn after every image is encoded. The tiny VAE (vae="taesd") returns latents,
    not a distribution: nothing is drawn (diffusers' retrieve_latents). samples: draw this many (a multiple of
    the pictures, repeated as the tasks' tile), for a generator per output image.
    """
    choice = models.vae_choice
    encoded = np.concatenate([
        tiling.encode(lambda x: models.vae_encoder.run({"sample": x})[choice.encoder_output], pixels[k:k + 1],
                      vae_tiling, models.folder.vae.scale_factor) for k in range(len(pixels))
    ])
    models.stage_done(models.vae_encoder)
    if not np.isfinite(encoded).all():
        raise GenerationError("the VAE encoder returned NaN/Inf for this image")
    if samples is not None and samples != len(encoded):
        encoded = np.tile(encoded, (samples // len(encoded), 1, 1, 1))
    sample = encoded
    if choice.samples:
        mean, logvar = np.split(encoded, 2, axis=1)
        std = np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
        sample = mean + std * generator.randn(mean.shape).astype(np.float32)
    vae = choice.config
    return (sample - np.float32(vae.shift_factor)) * np.float32(vae.scaling_factor)
