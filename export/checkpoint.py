"""Open a diffusers checkpoint folder for export: detect its family, load each module, and refuse
any module whose weights do not all load (missing, unexpected, mismatched or newly initialized)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sdrt.export.errors import CheckpointError, UnsupportedModelError

# Buffers that older checkpoints store and newer library versions recompute; not weights.
BENIGN_KEYS = ("text_model.embeddings.position_ids",)

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionInpaintPipeline": "stable-diffusion",
    "LatentConsistencyModelPipeline": "latent-consistency",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "StableDiffusionXLImg2ImgPipeline": "stable-diffusion-xl",
    "StableDiffusionXLInpaintPipeline": "stable-diffusion-xl",
    # A ControlNet pipeline's folder: its base, and each controlnet*/ exported beside it (sdrt.export.controlnet)
    "StableDiffusionControlNetPipeline": "stable-diffusion",
    "StableDiffusionControlNetImg2ImgPipeline": "stable-diffusion",
    "StableDiffusionControlNetInpaintPipeline": "stable-diffusion",
    "StableDiffusionXLControlNetPipeline": "stable-diffusion-xl",
    "StableDiffusionXLControlNetImg2ImgPipeline": "stable-diffusion-xl",
    "StableDiffusionXLControlNetInpaintPipeline": "stable-diffusion-xl",
    # Diffusion transformers with flow matching (sdrt.runtime.families.dit)
    "StableDiffusion3Pipeline": "stable-diffusion-3",
    "StableDiffusion3Img2ImgPipeline": "stable-diffusion-3",
    "StableDiffusion3InpaintPipeline": "stable-diffusion-3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux",
}
DIT_FAMILIES = ("stable-diffusion-3", "flux")
FIRST_ENCODER_FOLDERS = ("text_encoder", "tokenizer")  # every checkpoint's but the SDXL refiner's
SDXL_FOLDERS = ("text_encoder_2", "tokenizer_2")  # what an SDXL checkpoint has beyond SD's folders
LATER = {
    "FluxControlNetPipeline": "Flux ControlNets are not supported yet",
    "StableDiffusion3ControlNetPipeline": "SD3 ControlNets are not supported yet",
    "FluxKontextPipeline": "Flux Kontext is not supported yet",
    "FluxFillPipeline": "Flux Fill is not supported yet",
}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _download(repo_id: str) -> Path:
    """Fetch a hub checkpoint (where the network allows) into the local Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated model, ...
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {e}); download it where the network allows and pass the folder"
        ) from e


@dataclass
class Checkpoint:
    """A diffusers pipeline folder: its index, family and the folders of its components."""

    path: Path
    index: dict
    family: str

    def config(self, subfolder: str) -> dict:
        return _read_json(self.path / subfolder / "config.json")

    @property
    def scheduler_config(self) -> dict:
        return _read_json(self.path / "scheduler" / "scheduler_config.json")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: is this a complete diffusers checkpoint folder?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _required_folders(family: str, index: dict) -> tuple[str, ...]:
    """The component folders a checkpoint of `family` must have. An SDXL checkpoint whose index names no first
    text encoder (text_encoder: [null, null], as the SDXL refiner's) has only the second encoder and tokenizer."""
    if family in DIT_FAMILIES:  # SD3 may lack its T5 (text_encoder_3: null), as diffusers allows
        return ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    folders = ("unet", "vae", "scheduler")
    if family != "stable-diffusion-xl":
        return folders + FIRST_ENCODER_FOLDERS
    if (index.get("text_encoder") or [None])[0]:
        folders += FIRST_ENCODER_FOLDERS
    return folders + SDXL_FOLDERS


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Check that `src` is a diffusers folder of a family we export."""
    path = Path(src)
    if not path.exists() and HUB_ID.fullmatch(str(src)):
        path = _download(str(src))
    if not path.exists():
        raise CheckpointError(f"source {path} does not exist; give a local diffusers pipeline folder")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise CheckpointError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); save one with "
            "pipeline.save_pretrained(folder)"
        )
    index = _read_json(path / "model_index.json")
    cls = index.get("_class_name", "?")
    if cls in LATER:
        raise UnsupportedModelError(f"{cls}: {LATER[cls]}")
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedModelError(
            f"pipeline {cls} is not supported; sdrt exports {', '.join(SUPPORTED_PIPELINES)}"
        )
    family = SUPPORTED_PIPELINES[cls]
    for sub in _required_folders(family, index):
        if not (path / sub).is_dir():
            raise CheckpointError(f"{path} has no {sub}/ folder; a {cls} needs one")
    return Checkpoint(path, index, family)


def controlnet_folders(checkpoint: Checkpoint) -> list[str]:
    """The ControlNetModel subfolders of a ControlNet pipeline's checkpoint (controlnet, or a MultiControlNet's
    controlnet, controlnet_1, ...), in order."""
    names = sorted((k for k in checkpoint.index if k == "controlnet" or re.fullmatch(r"controlnet_\d+", k)),
                   key=lambda k: int(k.rpartition("_")[2]) if k != "controlnet" else 0)
    return [k for k in names if (checkpoint.path / k / "config.json").is_file()]


def load_module(checkpoint: Checkpoint, subfolder: str):
    """Load one torch module in fp32, refusing it unless every weight loaded from the file."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, FluxTransformer2DModel, SD3Transformer2DModel, \
        UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    library, cls_name = checkpoint.index.get(subfolder, [None, None])
    classes = {
        "UNet2DConditionModel": UNet2DConditionModel,
        "AutoencoderKL": AutoencoderKL,
        "AutoencoderTiny": AutoencoderTiny,
        "CLIPTextModel": CLIPTextModel,
        "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
        "SD3Transformer2DModel": SD3Transformer2DModel,
        "FluxTransformer2DModel": FluxTransformer2DModel,
        "T5EncoderModel": T5EncoderModel,
    }
    if cls_name not in classes:
        raise UnsupportedModelError(f"{subfolder}: module class {cls_name} is not supported")
    folder = checkpoint.path / subfolder
    quiet = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        model, info = classes[cls_name].from_pretrained(folder, output_loading_info=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as e:
        raise CheckpointError(f"{subfolder}: the weights in {folder} could not be loaded: {e}") from e
    except Exception as e:  # safetensors raises its own error types for corrupted files
        raise CheckpointError(f"{subfolder}: the weights in {folder} could not be loaded: {e}") from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [str(k) for k in info.get(kind, []) if not str(k).endswith(BENIGN_KEYS)]
        if keys:
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    errors = [e for e in info.get("error_msgs", []) if e]
    if errors:
        problems.append("errors: " + "; ".join(map(str, errors[:3])))
    if problems:
        raise CheckpointError(
            f"{subfolder}: the checkpoint's weights do not all load ({'; '.join(problems)}). Exporting it "
            "would ship newly initialized (random) weights; fix or re-save the checkpoint."
        )
    return model.eval()
