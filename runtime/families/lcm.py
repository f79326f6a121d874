"""Latent Consistency Models (Luo et al. 2023): an SD UNet distilled to take the guidance scale as an input.

As diffusers' LatentConsistencyModelPipeline: the UNet takes `timestep_cond`, a sinusoidal embedding of
w = guidance_scale - 1, instead of classifier-free guidance, so every step is ONE UNet call on the prompts
alone (no negative prompt, no CFG batch). Its img2img builds the schedule for strength (LCMScheduler).
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.families.sd import StableDiffusion

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


class LatentConsistency(StableDiffusion):
    name = "latent-consistency"
    strength_in_schedule = True

    def __init__(self, folder: ModelFolder):
        super().__init__(folder)
        self.embedding_dim = time_cond_proj_dim(folder)

    def check(self, run) -> None:
        super().check(run)
        if run.request.guidance_interval is not None:
            raise InvalidInputError(
                "a Latent Consistency Model has no classifier-free guidance to limit to an interval (its guidance is "
                "distilled into the UNet); drop guidance_interval"
            )
        if run.request.negative_prompt is not None:
            raise InvalidInputError(
                "a Latent Consistency Model takes no negative_prompt: its guidance is distilled into the UNet "
                "(guidance_scale is an embedding input, not classifier-free guidance); drop negative_prompt"
            )

    def guided(self, request) -> bool:
        return False

    def constant_inputs(self, run) -> dict:
        """The embedding of w = guidance_scale - 1 per sample (diffusers' convention)."""
        w = np.full((run.batch,), run.request.guidance_scale - 1.0, dtype=F32)
        return {"timestep_cond": guidance_scale_embedding(w, self.embedding_dim)}
