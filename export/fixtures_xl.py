"""A tiny seeded random-weight SDXL pipeline, built the way diffusers' fast tests build theirs.

Two CLIP text encoders of different widths (so a swapped or mis-sliced concatenation cannot pass),
the second with a projection narrower than its hidden size (so `pooler_output` cannot stand in for
`text_embeds`) and the legacy `eos_token_id=2` of the real SDXL configs (pooling at the argmax id);
tokenizer_2 pads with "!" as SDXL's does. The UNet takes `text_embeds` and six `time_ids`; the VAE
has SDXL's scaling factor and `force_upcast`; the scheduler is SDXL's Euler ("leading" spacing).
Sizes behave as in the real model: 8x VAE, 16 px multiples here (the UNet has one downsampler).
The refiner (`tiny_xl_refiner`) has the second encoder only, and a UNet that attends to its states
and takes five time ids (an aesthetic score).
"""

from __future__ import annotations

from pathlib import Path

from sdrt.export.fixtures import clip_tokenizer, tiny_vae

HIDDEN, HIDDEN_2, PROJECTION_2, TIME_EMBED = 32, 48, 24, 8


def tiny_xl_components(seed: int = 0, aesthetics: bool = False, refiner: bool = False) -> dict:
    """The modules of a tiny StableDiffusionXLPipeline (seeded), as keyword arguments of its constructor.
    aesthetics: a UNet that takes 5 time ids (an aesthetic score instead of the target size), as the refiner's.
    refiner: no first text encoder or tokenizer (None), and a UNet attending to the second encoder's states only."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=(5 if aesthetics else 6) * TIME_EMBED + PROJECTION_2,
        cross_attention_dim=HIDDEN_2 if refiner else HIDDEN + HIDDEN_2,
        norm_num_groups=4,
    )
    vae = tiny_vae(seed, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=HIDDEN,
    ))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=HIDDEN_2, intermediate_size=2 * HIDDEN_2,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=PROJECTION_2,
    ))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear",
    )
    first = dict(text_encoder=None, tokenizer=None) if refiner else dict(
        text_encoder=text_encoder, tokenizer=clip_tokenizer("<|endoftext|>"))
    return dict(unet=unet, vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer("!"),
                scheduler=scheduler, **first)


def tiny_xl_pipeline(seed: int = 0, img2img: bool = False, **config):
    """A StableDiffusionXL(Img2Img)Pipeline with tiny random weights. config: force_zeros_for_empty_prompt,
    and for img2img requires_aesthetics_score (which also gives the UNet 5 time ids)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    components = tiny_xl_components(seed, aesthetics=config.get("requires_aesthetics_score", False))
    return cls(**components, add_watermarker=False, **config)


def save_tiny_xl_pipeline(path, seed: int = 0, img2img: bool = False, **config) -> Path:
    """Build a tiny SDXL pipeline and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_xl_pipeline(seed, img2img, **config).save_pretrained(path, safe_serialization=True)
    return path


def tiny_xl_refiner(seed: int = 0, **config):
    """A tiny SDXL refiner, as diffusers' refiner tests build it: a StableDiffusionXLImg2ImgPipeline without the
    first text encoder (text_encoder_2 and tokenizer_2 only), requires_aesthetics_score=True (5 time ids) and, as
    stabilityai/stable-diffusion-xl-refiner-1.0's index, force_zeros_for_empty_prompt=False. Its VAE is the base
    model's of the same seed, as the base + refiner ensemble shares one VAE. config: model_index overrides."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    config = {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False, **config}
    components = tiny_xl_components(seed, aesthetics=config["requires_aesthetics_score"], refiner=True)
    return StableDiffusionXLImg2ImgPipeline(**components, add_watermarker=False, **config)


def save_tiny_xl_refiner(path, seed: int = 0, **config) -> Path:
    """Build a tiny SDXL refiner and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    tiny_xl_refiner(seed, **config).save_pretrained(path, safe_serialization=True)
    return path
