"""Which autoencoder a pipeline decodes (and encodes) with: the folder's full VAE, or the tiny one (TAESD).

The tiny VAE (`sdrt export-taesd`, components vae_tiny_decoder/ and vae_tiny_encoder/) decodes the
same latents many times faster at some loss of detail: previews, CPUs. Its encoder returns latents
directly, where the full VAE's returns a diagonal Gaussian that img2img samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrt.runtime.config import ModelFolder, VaeConfig
from sdrt.runtime.errors import InvalidInputError, ModelFolderError

VAE_CHOICES = ("full", "taesd")


@dataclass(frozen=True)
class VaeChoice:
    name: str  # "full" or "taesd"
    decoder: str  # component names in the folder
    encoder: str
    encoder_output: str  # the encoder's output: distribution parameters or latents
    samples: bool  # True: the encoder output is (mean, log-variance) to sample from
    config: VaeConfig  # scaling_factor, shift_factor, ... of the chosen autoencoder


def select_vae(folder: ModelFolder, vae: str = "full") -> VaeChoice:
    """The autoencoder named `vae` ("full" or "taesd"); ModelFolderError when the folder lacks it."""
    if vae not in VAE_CHOICES:
        raise InvalidInputError(f"vae must be one of {VAE_CHOICES}, got {vae!r}")
    if vae == "full":
        return VaeChoice("full", "vae_decoder", "vae_encoder", "latent_parameters", True, folder.vae)
    if "vae_tiny_decoder" not in folder.components:
        raise ModelFolderError(
            f"{folder.path} has no tiny VAE (vae_tiny_decoder/model.onnx); add one with "
            f"`sdrt export-taesd TAESD_FOLDER {folder.path}` (e.g. a download of madebyollin/taesd), "
            "or use the full VAE"
        )
    config = VaeConfig.from_dict(folder.configs["vae_tiny_decoder"])
    return VaeChoice("taesd", "vae_tiny_decoder", "vae_tiny_encoder", "latents", False, config)


def require_encoder(folder: ModelFolder, choice: VaeChoice) -> None:
    """img2img needs the chosen autoencoder's encoder too."""
    if choice.encoder not in folder.components:
        how = ("re-export the checkpoint with sdrt export (its default components include vae_encoder)"
               if choice.name == "full" else
               f"re-run `sdrt export-taesd TAESD_FOLDER {folder.path} --force` without --decoder-only")
        raise ModelFolderError(f"{folder.path} lacks {choice.encoder}/model.onnx, which img2img needs; {how}")
