"""Single-file checkpoints (the A1111 / ComfyUI / civitai form): one `.safetensors` in the original Stable
Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` or
`conditioner.embedders.*`), read with diffusers' own single-file loader and written as a diffusers folder that
`sdrt export` then exports as any other.

Nothing is downloaded: the loader gets `config=` a folder of configs made here, from the configs this package
ships for each architecture (SD 1.x, SD 2.x, SDXL base, SDXL refiner, and their 9-channel inpainting variants)
or from a folder the user gives (`--config`: any diffusers folder of the same architecture, weights not needed),
with the CLIP vocabulary in export/assets/clip. Pickles (.ckpt, .pt, .pth, .bin) are refused: loading one runs
arbitrary code; convert them to safetensors first.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdrt.export.errors import CheckpointError, UnsupportedModelError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
ASSETS = Path(__file__).parent / "assets" / "clip"
PREDICTION_TYPES = ("epsilon", "v_prediction")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
XL_TEXT = "conditioner.embedders.0.transformer."  # CLIP ViT-L, Hugging Face layout
XL_TEXT_2 = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG
REFINER_TEXT = "conditioner.embedders.0.model."  # the refiner's only encoder: OpenCLIP ViT-bigG

# Key prefixes of files that are single-file checkpoints of families sdrt does not export (yet).
OTHER_FAMILIES = {
    "joint_blocks.": "SD3 (a transformer, not a UNet)",
    "double_blocks.": "Flux (a transformer, not a UNet)",
    "control_model.": "a ControlNet (not a whole model: export its diffusers folder with sdrt export-controlnet)",
}


# ---------------------------------------------------------------------------------------------------------------
# The configs the package ships (those of the reference checkpoints of each architecture on the Hugging Face hub)

_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading",
}
_XL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
    "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
_UNET_SD1 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_UNET_SD2 = {**_UNET_SD1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}
_UNET_XL = {
    **_UNET_SD1, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
_UNET_REFINER = {
    **_UNET_XL, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
_CLIP = {  # CLIP ViT-L/14's text model (SD 1.x; SDXL's first encoder)
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
    "vocab_size": 49408,
}
_OPEN_CLIP_H = {**_CLIP, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
_OPEN_CLIP_G = {**_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                "projection_dim": 1280}


@dataclass(frozen=True)
class Architecture:
    name: str  # what the messages call it
    pipeline: str  # the diffusers pipeline class
    unet: dict
    vae: dict
    scheduler: dict
    text_encoders: tuple  # ((folder, class, config, tokenizer pad token), ...)


_SD1_ENCODERS = (("text_encoder", "CLIPTextModel", _CLIP, "<|endoftext|>"),)
_SD2_ENCODERS = (("text_encoder", "CLIPTextModel", _OPEN_CLIP_H, "!"),)
_XL_ENCODERS = (("text_encoder", "CLIPTextModel", _CLIP, "<|endoftext|>"),
                ("text_encoder_2", "CLIPTextModelWithProjection", _OPEN_CLIP_G, "!"))
_REFINER_ENCODERS = (("text_encoder_2", "CLIPTextModelWithProjection", _OPEN_CLIP_G, "!"),)
_XL_VAE = {**_VAE, "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}

ARCHITECTURES = {
    "sd1": Architecture("SD 1.x", "StableDiffusionPipeline", _UNET_SD1, _VAE, _SCHEDULER, _SD1_ENCODERS),
    "sd1-inpaint": Architecture("SD 1.x inpainting", "StableDiffusionInpaintPipeline",
                                {**_UNET_SD1, "in_channels": 9}, _VAE, _SCHEDULER, _SD1_ENCODERS),
    # SD 2.x at 768 px predicts v (as diffusers assumes for a single file: --prediction-type epsilon for 2.x-base)
    "sd2": Architecture("SD 2.x", "StableDiffusionPipeline", _UNET_SD2, {**_VAE, "sample_size": 768},
                        {**_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
                        _SD2_ENCODERS),
    "sd2-inpaint": Architecture("SD 2.x inpainting", "StableDiffusionInpaintPipeline",
                                {**_UNET_SD2, "in_channels": 9, "sample_size": 64, "upcast_attention": False},
                                _VAE, {**_SCHEDULER, "_class_name": "DDIMScheduler"}, _SD2_ENCODERS),
    "sdxl": Architecture("SDXL base", "StableDiffusionXLPipeline", _UNET_XL, _XL_VAE, _XL_SCHEDULER, _XL_ENCODERS),
    "sdxl-inpaint": Architecture("SDXL inpainting", "StableDiffusionXLInpaintPipeline",
                                 {**_UNET_XL, "in_channels": 9}, _XL_VAE, _XL_SCHEDULER, _XL_ENCODERS),
    "sdxl-refiner": Architecture("SDXL refiner", "StableDiffusionXLImg2ImgPipeline", _UNET_REFINER, _XL_VAE,
                                 _XL_SCHEDULER, _REFINER_ENCODERS),
}


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def is_single_file(src) -> bool:
    """Whether `src` names a file (a single-file checkpoint, or a pickle to refuse) rather than a folder."""
    path = Path(src)
    return path.is_file() or (not path.exists() and path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES)


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a .safetensors file, from its JSON header (nothing else read).
    Refuses pickles, missing, truncated and non-safetensors files with what to do."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is a pickle ({path.suffix}): loading one can run arbitrary code, so sdrt does not. Convert "
            "it to .safetensors first (e.g. with the safetensors 'convert' space, or in Python: "
            "safetensors.torch.save_file(torch.load(f, weights_only=True)['state_dict'], 'model.safetensors'))"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; give a .safetensors checkpoint or a diffusers folder")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (no valid header); a single-file checkpoint "
                                  "must be a .safetensors file in the original Stable Diffusion layout")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: its safetensors header is not valid JSON ({e}); is the file damaged?") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its safetensors header is not a table of tensors; is the file damaged?")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
                              "download it again")
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def describe(tensors: dict) -> str:
    """What a file holds, for messages: its commonest key prefixes and a few shapes."""
    prefixes = Counter(".".join(k.split(".")[:2]) for k in tensors)
    shown = ", ".join(f"{p}.* ({c})" for p, c in prefixes.most_common(6))
    samples = ", ".join(f"{k} {list(s)}" for k, (_, s) in list(tensors.items())[:3])
    return f"{len(tensors)} tensors; key prefixes {shown}; e.g. {samples}"


def detect(tensors: dict, path: Path | str = "the file") -> str:
    """The architecture (a key of ARCHITECTURES) of a single-file checkpoint, from its keys and shapes."""
    keys = tensors.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    for prefix, what in OTHER_FAMILIES.items():
        if has(prefix) or has(UNET + prefix):
            raise UnsupportedModelError(f"{path} is {what}, which sdrt cannot export from a single file; "
                                        f"found {describe(tensors)}")
    conv_in = tensors.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or not has(VAE):
        raise CheckpointError(
            f"{path} is not a Stable Diffusion checkpoint in the original single-file layout (it needs "
            f"{UNET}* and {VAE}* tensors); found {describe(tensors)}. For a diffusers folder, pass the folder")
    in_channels = conv_in[1][1] if len(conv_in[1]) == 4 else None
    if in_channels not in (4, 9):
        raise UnsupportedModelError(
            f"{path}: the UNet takes {in_channels} input channels; sdrt exports text-to-image UNets (4) and inpainting "
            "UNets (9), not instruct-pix2pix (8) or upscalers (7)")
    inpaint = "-inpaint" if in_channels == 9 else ""
    if has(XL_TEXT) and has(XL_TEXT_2):
        return "sdxl" + inpaint
    if has(REFINER_TEXT) and not has(XL_TEXT):
        if inpaint:
            raise UnsupportedModelError(f"{path}: an SDXL refiner with an inpainting UNet is not supported")
        return "sdxl-refiner"
    if has(SD2_TEXT):
        return "sd2" + inpaint
    if has(SD1_TEXT):
        return "sd1" + inpaint
    raise CheckpointError(
        f"{path} has a UNet and a VAE but no text encoder sdrt recognizes (expected {SD1_TEXT}*, {SD2_TEXT}* or "
        f"conditioner.embedders.*); found {describe(tensors)}")


# ---------------------------------------------------------------------------------------------------------------
# The configs given to diffusers' loader


def _tokenizer(folder: Path, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(ASSETS / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "add_prefix_space": False,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token}, indent=2))


def shipped_config(arch: str, dst: Path) -> Path:
    """Write the diffusers configs of architecture `arch` (a pipeline folder without weights) at `dst`."""
    a = ARCHITECTURES[arch]
    dst.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": a.pipeline, "_diffusers_version": "0.30.0",
             "scheduler": ["diffusers", a.scheduler["_class_name"]], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if a.pipeline.startswith("StableDiffusionXL"):
        index.update(text_encoder=[None, None], tokenizer=[None, None], text_encoder_2=[None, None],
                     tokenizer_2=[None, None], force_zeros_for_empty_prompt=arch != "sdxl-refiner")
        if arch == "sdxl-refiner":
            index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    for folder, cls, config, pad in a.text_encoders:
        index[folder] = ["transformers", cls]
        index[folder.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        (dst / folder).mkdir(exist_ok=True)
        (dst / folder / "config.json").write_text(json.dumps(config, indent=2))
        _tokenizer(dst / folder.replace("text_encoder", "tokenizer"), pad)
    for folder, config in (("unet", a.unet), ("vae", a.vae)):
        (dst / folder).mkdir(exist_ok=True)
        (dst / folder / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "scheduler").mkdir(exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(a.scheduler, indent=2))
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def _given_config(config: Path, arch: str) -> Path:
    """Check a user's --config folder: a diffusers pipeline folder (its weights are not read) of the file's kind."""
    config = Path(config)
    index_path = config / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"--config {config} is not a diffusers pipeline folder (no model_index.json); give the "
                              "folder of a diffusers checkpoint of the same architecture (its weights are not read)")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path} is not valid JSON ({e})") from e
    cls = index.get("_class_name")
    wanted = ARCHITECTURES[arch].pipeline
    family = lambda name: "xl" if "XL" in str(name) else "sd"  # noqa: E731
    if family(cls) != family(wanted):
        raise CheckpointError(f"--config {config} is a {cls} folder but the checkpoint is {ARCHITECTURES[arch].name} "
                              f"({wanted}); give a config folder of the same architecture")
    for sub in ("unet", "vae"):
        if not (config / sub / "config.json").is_file():
            raise CheckpointError(f"--config {config} has no {sub}/config.json")
    return config


def set_scheduler_option(folder: Path, key: str, value) -> None:
    """Set one option in a diffusers folder's scheduler/scheduler_config.json."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config, indent=2))


@dataclass
class SingleFile:
    path: Path
    architecture: str
    tensors: dict


def inspect(path) -> SingleFile:
    """Read and recognize a single-file checkpoint (its header only); every refusal happens here."""
    path = Path(path)
    tensors = read_header(path)
    return SingleFile(path, detect(tensors, path.name), tensors)


def convert(source: SingleFile, dst: Path, *, config: Path | None = None, original_config: Path | None = None,
            prediction_type: str | None = None, log=print) -> Path:
    """Write `source` as a diffusers pipeline folder at `dst` (weights in fp32), with diffusers' single-file loader
    and the configs of `config` (a diffusers folder) or those this package ships; returns `dst`."""
    import torch
    import diffusers

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    arch = ARCHITECTURES[source.architecture]
    configs = dst.parent / (dst.name + ".configs")
    if configs.exists():
        shutil.rmtree(configs)
    if config is not None:
        shutil.copytree(_given_config(config, source.architecture), configs,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.ckpt", "*.pt", "*.pth"))
    else:
        shipped_config(source.architecture, configs)
    if prediction_type is None and "v_pred" in source.tensors:  # the marker A1111 and ComfyUI read (SDXL v-pred)
        prediction_type = "v_prediction"
        log(f"{source.path.name} holds the v_pred marker: prediction type v_prediction")
    if prediction_type is not None:
        set_scheduler_option(configs, "prediction_type", prediction_type)
    index = json.loads((configs / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index.get("_class_name") or arch.pipeline, None) or \
        getattr(diffusers, arch.pipeline)
    optional = {name: None for name in ("safety_checker", "feature_extractor", "image_encoder")
                if name in index or name in getattr(pipeline_class, "_optional_components", [])}
    if "requires_safety_checker" in index:
        optional["requires_safety_checker"] = False
    log(f"reading {source.path.name}: {arch.name} ({len(source.tensors)} tensors)"
        + (f", configs from {config}" if config is not None else ""))
    quiet = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        kwargs = dict(config=str(configs), local_files_only=True, torch_dtype=torch.float32, **optional)
        if original_config is not None:
            kwargs["original_config"] = str(original_config)
        pipe = pipeline_class.from_single_file(str(source.path), **kwargs)
        _check_loaded(pipe, source)
        pipe.save_pretrained(dst, safe_serialization=True)
    except CheckpointError:
        raise
    except Exception as e:  # diffusers raises ValueError, KeyError, RuntimeError (shape mismatches), ...
        raise CheckpointError(
            f"{source.path.name} looks like {arch.name} but does not load with "
            f"{'the configs of ' + str(config) if config is not None else 'the standard ' + arch.name + ' configs'} "
            f"({type(e).__name__}: {str(e)[:300]}). If it is a smaller or modified model, pass --config with a "
            f"diffusers folder of its architecture (weights are not read); found {describe(source.tensors)}"
        ) from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
        shutil.rmtree(configs, ignore_errors=True)
    if prediction_type is not None:
        set_scheduler_option(dst, "prediction_type", prediction_type)
    if "ztsnr" in source.tensors:  # trained with zero terminal SNR (ComfyUI's marker): as diffusers' option says
        set_scheduler_option(dst, "rescale_betas_zero_snr", True)
        log(f"{source.path.name} holds the ztsnr marker: rescale_betas_zero_snr")
    return dst


def _check_loaded(pipe, source: SingleFile) -> None:
    """Refuse a conversion that left any weight uninitialized (on the meta device) or not finite."""
    import torch

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if tensor.device.type == "meta":
                raise CheckpointError(f"{source.path.name}: {name}.{key} is not in the file; the checkpoint is "
                                      "incomplete or of another architecture")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{source.path.name}: {name}.{key} holds NaN or infinite values")


def describe_architectures() -> str:
    return ", ".join(a.name for a in ARCHITECTURES.values())
