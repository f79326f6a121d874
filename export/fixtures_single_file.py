"""Test fixtures: a diffusers SD 1.x pipeline written as a single-file checkpoint in the original Stable Diffusion
layout (the inverse of diffusers' single-file loader, as diffusers' scripts/convert_diffusers_to_original_stable_
diffusion.py does it), for any UNet and VAE size, so that the tests can export tiny single files."""

from __future__ import annotations

from pathlib import Path

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _swap(name: str, table: dict) -> str:
    for new, old in table.items():
        name = name.replace(f".{new}.", f".{old}.") if f".{new}." in name else name
    return name


def unet_to_original(state: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict in the original layout (keys without the model prefix)."""
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    prefixes = {}  # diffusers prefix -> original prefix
    for i in range(levels):
        for j in range(per_block):
            n = (per_block + 1) * i + j + 1
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."
        for j in range(per_block + 1):
            n = (per_block + 1) * i + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
        if i < levels - 1:
            prefixes[f"up_blocks.{i}.upsamplers.0."] = \
                f"output_blocks.{(per_block + 1) * i + per_block}.{2 if up_has_attention[i] else 1}."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        prefixes[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    prefixes["add_embedding.linear_1."] = "label_emb.0.0."
    prefixes["add_embedding.linear_2."] = "label_emb.0.2."
    out = {}
    for name, value in state.items():
        new = name
        for fixed, old in _UNET_FIXED.items():
            if name.startswith(fixed + "."):
                new = old + name[len(fixed):]
        for prefix, old in prefixes.items():
            if name.startswith(prefix):
                rest = name[len(prefix):]
                if ".resnets." in prefix:
                    rest = _swap("." + rest, _RESNET)[1:]
                new = old + rest
                break
        out[new] = value
    return out


def vae_to_original(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in the original layout (attention as 1x1 convolutions)."""
    levels = len(config["block_out_channels"])
    out = {}
    for name, value in state.items():
        new = name.replace("conv_norm_out", "norm_out").replace("mid_block.attentions.0.", "mid.attn_1.")
        for j in range(2):
            new = new.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
        for i in range(levels):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv.")
        new = _swap(new, _VAE_RESNET)
        if ".attn_1." in new:
            new = _swap(new, _VAE_ATTENTION)
            if new.endswith(".weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def _hf_clip(state: dict) -> dict:
    """A transformers CLIP text model's state dict with the text_model. prefix (transformers 5 drops it)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def open_clip_to_original(state: dict) -> dict:
    """A transformers CLIPTextModel(WithProjection) state dict in OpenCLIP's layout (SD 2.x, SDXL's second encoder):
    one in_proj per attention, text_projection as a (hidden, projection) matrix."""
    import torch

    state = _hf_clip(state)
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def save_single_file(pipe, path: str | Path, flavour: str = "sd1") -> Path:
    """Write a diffusers pipeline as one original-layout .safetensors: flavour "sd1" (CLIP ViT-L in Hugging Face's
    layout under cond_stage_model.transformer), "sd2" (OpenCLIP layout under cond_stage_model.model), "sdxl" (both
    under conditioner.embedders.0/1), "sdxl-refiner" (OpenCLIP under conditioner.embedders.0). Inpainting UNets
    (9 channels) go as they are."""
    from safetensors.torch import save_file

    state = {}
    for name, value in unet_to_original(pipe.unet.state_dict(), pipe.unet.config).items():
        state["model.diffusion_model." + name] = value
    for name, value in vae_to_original(pipe.vae.state_dict(), pipe.vae.config).items():
        state["first_stage_model." + name] = value
    encoders = {
        "sd1": [("text_encoder", "cond_stage_model.transformer.", _hf_clip)],
        "sd2": [("text_encoder", "cond_stage_model.model.", open_clip_to_original)],
        "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", _hf_clip),
                 ("text_encoder_2", "conditioner.embedders.1.model.", open_clip_to_original)],
        "sdxl-refiner": [("text_encoder_2", "conditioner.embedders.0.model.", open_clip_to_original)],
    }[flavour]
    for component, prefix, convert in encoders:
        for name, value in convert(getattr(pipe, component).state_dict()).items():
            state[prefix + name] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return path
