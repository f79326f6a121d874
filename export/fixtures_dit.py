"""Tiny seeded random-weight SD3 and Flux pipelines, built the way diffusers' fast tests build theirs.

SD3 (`tiny_sd3_pipeline`): an SD3Transformer2DModel (MMDiT, patch 2), two CLIP text encoders with
projections of different widths (CLIP-L- and CLIP-G-like; tokenizer_2 pads with "!" as SD3's does), a T5
encoder (gated GELU, as T5 v1.1) wider than both CLIPs side by side (the CLIP states are zero-padded to
its width), a 16-channel VAE with a shift factor and no quant convs, and SD3's FlowMatchEuler config
(shift 3.0).

Flux (`tiny_flux_pipeline`): a FluxTransformer2DModel over 2x2-packed latents (in_channels = 4 x the
VAE's latent channels) with RoPE axes summing to the head width, the guidance embedding for "dev" and
none for "schnell", a CLIP text encoder (pooled output only), a T5 encoder, and the two models' scheduler
configs (dev: dynamic shifting; schnell: static shift 1).

Both VAEs downsample 8x as the real ones; the T5 tokenizer is trained offline (sdrt.export.fixtures_t5).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sdrt.export.fixtures import clip_tokenizer

SD3_CLIP, SD3_CLIP_2, SD3_PROJ, SD3_PROJ_2, SD3_T5 = 32, 48, 32, 40, 96
FLUX_CLIP, FLUX_T5 = 32, 48
FLUX_VARIANTS = ("dev", "schnell")


def _dit_vae(seed: int, latent_channels: int, **config):
    """AutoencoderKL as SD3's and Flux's: no quant convs, a shift factor, 8x downsampling."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, use_quant_conv=False,
        use_post_quant_conv=False, **config,
    )


def _t5_tokenizer():
    """A T5TokenizerFast trained offline (sdrt.export.fixtures_t5), loaded as a pipeline holds it."""
    from transformers import T5TokenizerFast

    from sdrt.export.fixtures_t5 import save_tiny_t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_t5_tokenizer(Path(tmp) / "t5")
        return T5TokenizerFast.from_pretrained(Path(tmp) / "t5")


def _t5_encoder(seed: int, d_model: int, vocab_size: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def _clip_config(hidden: int, projection: int, layers: int, **config):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_hidden_layers=layers, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=projection, **config,
    )


def tiny_sd3_components(seed: int = 0, t5: bool = True) -> dict:
    """The modules of a tiny StableDiffusion3Pipeline (seeded); t5=False leaves text_encoder_3 and tokenizer_3
    out (None), as diffusers allows."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=SD3_T5, caption_projection_dim=32, pooled_projection_dim=SD3_PROJ + SD3_PROJ_2,
        out_channels=16, pos_embed_max_size=64,
    )
    vae = _dit_vae(seed, 16, scaling_factor=1.5305, shift_factor=0.0609)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(SD3_CLIP, SD3_PROJ, 3, pad_token_id=1))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(SD3_CLIP_2, SD3_PROJ_2, 2, pad_token_id=1))
    tokenizer_3 = _t5_tokenizer() if t5 else None
    text_encoder_3 = _t5_encoder(seed + 2, SD3_T5, len(tokenizer_3)) if t5 else None
    return dict(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder, tokenizer=clip_tokenizer("<|endoftext|>"),
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True, img2img: bool = False):
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    return cls(**tiny_sd3_components(seed, t5))


def save_tiny_sd3_pipeline(path, seed: int = 0, t5: bool = True) -> Path:
    """Build a tiny SD3 pipeline and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_sd3_pipeline(seed, t5).save_pretrained(path, safe_serialization=True)
    return path


def flux_scheduler(variant: str):
    """FLUX.1-dev's scheduler config (dynamic shifting) or FLUX.1-schnell's (static shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if variant == "schnell":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def tiny_flux_components(seed: int = 0, variant: str = "dev") -> dict:
    """The modules of a tiny FluxPipeline (seeded): "dev" takes the distilled guidance, "schnell" not."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    if variant not in FLUX_VARIANTS:
        raise ValueError(f"unknown Flux variant {variant!r}; choose one of {FLUX_VARIANTS}")
    latent_channels = 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=FLUX_T5, pooled_projection_dim=FLUX_CLIP,
        guidance_embeds=variant == "dev", axes_dims_rope=(4, 4, 8),
    )
    vae = _dit_vae(seed, latent_channels, scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(FLUX_CLIP, FLUX_CLIP, 3, pad_token_id=1))
    tokenizer_2 = _t5_tokenizer()
    return dict(
        transformer=transformer, vae=vae, scheduler=flux_scheduler(variant),
        text_encoder=text_encoder, tokenizer=clip_tokenizer("<|endoftext|>"),
        text_encoder_2=_t5_encoder(seed + 1, FLUX_T5, len(tokenizer_2)), tokenizer_2=tokenizer_2,
    )


def tiny_flux_pipeline(seed: int = 0, variant: str = "dev", img2img: bool = False):
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    return cls(**tiny_flux_components(seed, variant))


def save_tiny_flux_pipeline(path, seed: int = 0, variant: str = "dev") -> Path:
    """Build a tiny Flux pipeline and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_flux_pipeline(seed, variant).save_pretrained(path, safe_serialization=True)
    return path
