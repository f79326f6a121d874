"""Tiny seeded random-weight Stable Diffusion pipelines, built the way diffusers' fast tests build theirs.

They take seconds to make and to export, so tests and smoke benchmarks can run the whole chain
(export -> ONNX -> runtime) against diffusers on the same weights. Two flavours:

- "sd1": SD 1.x-style: epsilon prediction, SD1.5's PNDM scheduler config (steps_offset=1,
  scaled_linear betas, skip_prk_steps), CLIP tokenizer padding with <|endoftext|>.
- "sd2": SD 2.x-style: v_prediction, use_linear_projection, per-block attention_head_dim, a
  different cross_attention_dim, DDIM scheduler, tokenizer padding with "!".

Both use the real 49408-token CLIP vocabulary (export/assets/clip) and a VAE with 8x downsampling,
so image sizes behave as in the real models (64 px multiples; the UNet has one downsampler).
"""

from __future__ import annotations

from pathlib import Path

CLIP_ASSETS = Path(__file__).parent / "assets" / "clip"
FLAVOURS = ("sd1", "sd2")

SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer over the bundled real CLIP vocabulary."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_ASSETS / "vocab.json"), str(CLIP_ASSETS / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def tiny_vae(seed: int, **config):
    """The tiny fixtures' AutoencoderKL (8x downsampling, 4 latent channels), seeded; `config` adds to it."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=4, sample_size=64, **config,
    )


def tiny_pipeline(flavour: str = "sd1", seed: int = 0):
    """A StableDiffusionPipeline with tiny random weights (seeded)."""
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown fixture flavour {flavour!r}; choose one of {FLAVOURS}")
    sd2 = flavour == "sd2"
    hidden = 64 if sd2 else 32

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=4,
    )
    vae = tiny_vae(seed, scaling_factor=0.13025 if sd2 else 0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407,
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=hidden,
    ))
    if sd2:
        scheduler = DDIMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"},
                                  clip_sample=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**SD15_SCHEDULER)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(path, flavour: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_pipeline(flavour, seed).save_pretrained(path, safe_serialization=True)
    return path


def sd15_pipeline(seed: int = 0):
    """The real SD 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M) with random
    weights: honest speed and memory figures, since latency does not depend on weight values."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd15_pipeline(path, seed: int = 0) -> Path:
    path = Path(path)
    sd15_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
