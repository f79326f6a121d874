"""A tiny seeded random-weight inpainting pipeline, as diffusers' StableDiffusionInpaintPipeline fast tests build one.

The same text encoder, tokenizer, VAE and scheduler as `sdrt.export.fixtures.tiny_pipeline(flavour)`,
with a UNet of the same architecture that takes 9 input channels (noisy latents, the mask and the
masked image's latents, concatenated), saved with model_index `_class_name`
StableDiffusionInpaintPipeline as the real inpainting checkpoints are. `tiny_xl_inpaint_pipeline`: the
same for the tiny SDXL of `sdrt.export.fixtures_xl` (StableDiffusionXLInpaintPipeline).
"""

from __future__ import annotations

from pathlib import Path

from sdrt.export.fixtures import tiny_pipeline


def tiny_inpaint_pipeline(flavour: str = "sd1", seed: int = 0):
    """A StableDiffusionInpaintPipeline with tiny random weights (seeded) and a 9-channel UNet."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    base = tiny_pipeline(flavour, seed)
    latent_channels = base.vae.config.latent_channels
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 2 * latent_channels + 1})
    components = {**base.components, "unet": unet}
    return StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)


def save_tiny_inpaint_pipeline(path, flavour: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny inpainting pipeline and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_inpaint_pipeline(flavour, seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_xl_inpaint_pipeline(seed: int = 0):
    """A StableDiffusionXLInpaintPipeline with the tiny SDXL modules (sdrt.export.fixtures_xl) and a 9-channel UNet."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from sdrt.export.fixtures_xl import tiny_xl_components

    components = tiny_xl_components(seed)
    latent_channels = components["vae"].config.latent_channels
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 2 * latent_channels + 1})
    return StableDiffusionXLInpaintPipeline(**{**components, "unet": unet}, add_watermarker=False)


def save_tiny_xl_inpaint_pipeline(path, seed: int = 0) -> Path:
    """Build a tiny SDXL inpainting pipeline (9-channel UNet) and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_xl_inpaint_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
