"""Random LoRAs for tests and benchmarks, in kohya and diffusers/PEFT naming, and their torch reference merge.

A LoRA here is {module path: {"down", "up", "alpha"}} (NumPy, torch layouts: down [r, in] or [r, in, kh, kw],
up [out, r] or [out, r, 1, 1]) over the modules of a diffusers UNet or transformers CLIP text encoder. `merge`
applies one to the torch modules the textbook way, W += scale * alpha / r * up @ down, which is the
reference every sdrt LoRA test compares against (and what diffusers' fuse_lora computes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

UNET_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def module_names(model, suffixes, convs: bool = False) -> list[str]:
    """The model's Linear (and 1x1 Conv) modules whose path ends with one of `suffixes`; with `convs`, also the
    resnets' 3x3 convolutions (LoCon)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(tuple(suffixes)):
            names.append(name)
        elif convs and isinstance(module, torch.nn.Conv2d) and name.endswith(("conv1", "conv2")) \
                and "resnets" in name:
            names.append(name)
    return names


def random_lora(model, names, rank: int = 4, alpha: float | None = 2.0, seed: int = 0, magnitude: float = 0.3):
    """Random down/up factors for `names` of `model` (alpha None: none recorded, i.e. alpha = rank)."""
    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules())
    lora = {}
    for name in names:
        weight = modules[name].weight
        out_dim, in_dim = weight.shape[:2]
        r = min(rank, out_dim, in_dim)
        kernel = tuple(weight.shape[2:])
        down = rng.standard_normal((r, in_dim, *kernel)).astype(np.float32) * magnitude
        up = rng.standard_normal((out_dim, r, *([1] * len(kernel)))).astype(np.float32) * magnitude
        lora[name] = {"down": down, "up": up, "alpha": alpha}
    return lora


def rounded(lora, dtype):
    """The LoRA with its factors rounded through `dtype` (what a file saved in that dtype holds)."""
    return {name: {**entry, "down": torch.from_numpy(entry["down"]).to(dtype).float().numpy(),
                   "up": torch.from_numpy(entry["up"]).to(dtype).float().numpy()} for name, entry in lora.items()}


def delta(entry, shape) -> np.ndarray:
    down, up = entry["down"].astype(np.float64), entry["up"].astype(np.float64)
    r = down.shape[0]
    if down.ndim == 4:
        d = np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    else:
        d = up @ down
    alpha = entry["alpha"] if entry["alpha"] is not None else r
    return (d * alpha / r).reshape(shape)


@torch.no_grad()
def merge(model, lora, scale: float = 1.0) -> None:
    """W += scale * alpha / r * up @ down, in float64, for every module of `lora` (in place)."""
    modules = dict(model.named_modules())
    for name, entry in lora.items():
        weight = modules[name].weight
        change = delta(entry, tuple(weight.shape)) * scale
        weight.copy_((weight.double() + torch.from_numpy(change)).to(weight.dtype))


def _text_model(name: str) -> str:
    """CLIP's module path under `text_model.` (transformers 5's CLIPTextModel lists its modules without it)."""
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_state_dict(lora, prefix: str = "lora_unet_", text_model: bool = False) -> dict[str, np.ndarray]:
    """kohya/A1111 keys: lora_unet_down_blocks_0_..._to_q.lora_down.weight, .lora_up.weight, .alpha
    (text encoders: lora_te_text_model_encoder_layers_0_self_attn_q_proj...)."""
    out = {}
    for name, entry in lora.items():
        stem = prefix + (_text_model(name) if text_model else name).replace(".", "_")
        out[f"{stem}.lora_down.weight"] = entry["down"]
        out[f"{stem}.lora_up.weight"] = entry["up"]
        if entry["alpha"] is not None:
            out[f"{stem}.alpha"] = np.array(entry["alpha"], dtype=np.float32)
    return out


def peft_state_dict(lora, prefix: str = "unet.", text_model: bool = False) -> dict[str, np.ndarray]:
    """diffusers/PEFT keys: unet.<module>.lora_A.weight / lora_B.weight (text_encoder.text_model.<module>...)."""
    out = {}
    for name, entry in lora.items():
        stem = prefix + (_text_model(name) if text_model else name)
        out[f"{stem}.lora_A.weight"] = entry["down"]
        out[f"{stem}.lora_B.weight"] = entry["up"]
        if entry["alpha"] is not None:
            out[f"{stem}.alpha"] = np.array(entry["alpha"], dtype=np.float32)
    return out


def save(path, state_dict: dict, metadata: dict | None = None, dtype=None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path
