"""Tiny random ControlNets for tests, built from a tiny UNet the way diffusers' own tests build theirs."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_controlnet(unet, seed: int = 0, vae_scale_factor: int = 8, global_pool: bool = False):
    """A ControlNetModel shaped like `unet` (ControlNetModel.from_unet), its conditioning embedding downsampling by
    `vae_scale_factor`, every weight random: from_unet zero-initializes the residual convs, which would make any
    ControlNet a no-op and every test pass."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    levels = vae_scale_factor.bit_length()  # 8 -> 4 channel counts, 3 stride-2 convs
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16, 16)[:levels],
                                           load_weights_from_unet=False)
    if global_pool:
        controlnet.register_to_config(global_pool_conditions=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return controlnet.eval()


def save_tiny_controlnet(path, unet, seed: int = 0, **kwargs) -> Path:
    path = Path(path)
    tiny_controlnet(unet, seed, **kwargs).save_pretrained(path, safe_serialization=True)
    return path
