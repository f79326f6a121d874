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


def save_tiny_controlnet_pipeline(path, seed: int = 0) -> Path:
    """A StableDiffusionControlNetPipeline folder in the shape of diffusers' own fast tests (a 2x VAE, one-group
    norms, a 2-level conditioning embedding; the ControlNet's zero convs made random as those tests do), saved with
    its controlnet/ subfolder: a layout and a ControlNet unlike `tiny_controlnet`'s."""
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrt.export.fixtures import clip_tokenizer

    path = Path(path)
    blocks = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                  norm_num_groups=1, block_out_channels=(4, 8), layers_per_block=2, in_channels=4)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, out_channels=4, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                **blocks)
    torch.manual_seed(seed)
    controlnet = ControlNetModel(conditioning_embedding_out_channels=(16, 32), **blocks)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in controlnet.controlnet_down_blocks:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
            conv.bias.fill_(1.0)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    pipe = StableDiffusionControlNetPipeline(
        unet=unet, controlnet=controlnet.eval(), scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tokenizer(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
