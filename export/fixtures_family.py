"""Tiny seeded random-weight checkpoints of the few-step families: LCM, SD-Turbo-style and TAESD.

Built from the "sd1" fixture of `sdrt.export.fixtures` (same text encoder, tokenizer and VAE), the
way diffusers' fast tests build theirs:

- `tiny_lcm_pipeline`: a LatentConsistencyModelPipeline whose UNet has `time_cond_proj_dim` (the
  guidance-scale embedding input, `timestep_cond`) and an LCMScheduler.
- `tiny_turbo_pipeline`: the sd1 pipeline with SD-Turbo's scheduler config (Euler, "trailing"
  timestep spacing), which it samples in 1-4 steps at guidance_scale 0.
- `tiny_taesd`: an AutoencoderTiny with 8x downsampling, to replace the full VAE.
"""

from __future__ import annotations

from pathlib import Path

from sdrt.export.fixtures import SD15_SCHEDULER, tiny_pipeline

TIME_COND_PROJ_DIM = 32


def tiny_lcm_pipeline(seed: int = 0):
    """A LatentConsistencyModelPipeline: the sd1 fixture with a time-conditioned UNet and an LCMScheduler."""
    import torch
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    base = tiny_pipeline("sd1", seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}  # init arguments only
    unet = UNet2DConditionModel(**{**config, "time_cond_proj_dim": TIME_COND_PROJ_DIM})
    scheduler = LCMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"}, clip_sample=False)
    return LatentConsistencyModelPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_turbo_pipeline(seed: int = 0):
    """The sd1 fixture with SD-Turbo's scheduler: EulerDiscreteScheduler, timestep_spacing="trailing"."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline("sd1", seed)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def tiny_taesd(seed: int = 0):
    """An AutoencoderTiny (TAESD) with 8x downsampling and 4 latent channels, like madebyollin/taesd."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4,
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def save_tiny_lcm_pipeline(path, seed: int = 0) -> Path:
    path = Path(path)
    tiny_lcm_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_turbo_pipeline(path, seed: int = 0) -> Path:
    path = Path(path)
    tiny_turbo_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_taesd(path, seed: int = 0) -> Path:
    """An AutoencoderTiny folder in diffusers' save_pretrained layout (config.json + safetensors)."""
    path = Path(path)
    tiny_taesd(seed).save_pretrained(path, safe_serialization=True)
    return path
