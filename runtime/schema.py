"""The JSON files of a model folder checked against what the runtime reads from them, when the folder is opened:
a list where an object belongs, a string where a number does, a missing key the runtime needs, are a
ModelFolderError naming the file and the field, never an AttributeError/KeyError deep in a generation.

Only the fields sdrt reads are checked (diffusers and optimum write many more); a field that is absent is left
to the reader's default unless it is required.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from sdrt.runtime.errors import ModelFolderError


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _int(v) and v > 0


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _positive_ints(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_positive_int(x) for x in v)


def _int_or_ints(v) -> bool:
    return _positive_int(v) or _positive_ints(v)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive int": (_positive_int, "a positive integer"),
    "number": (_number, "a finite number"),
    "number or null": (lambda v: v is None or _number(v), "a finite number or null"),
    "ints": (_positive_ints, "a non-empty list of positive integers"),
    "int or ints": (_int_or_ints, "a positive integer or a list of them"),
    "int or ints or null": (lambda v: v is None or _int_or_ints(v), "a positive integer, a list of them, or null"),
    "strings": (_strings, "a list of strings"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}

UNET = {"block_out_channels": "ints", "sample_size": "int or ints", "in_channels": "positive int",
        "out_channels": "positive int", "cross_attention_dim": "int or ints", "layers_per_block": "int or ints",
        "attention_head_dim": "int or ints or null", "num_attention_heads": "int or ints or null",
        "down_block_types": "strings", "up_block_types": "strings", "time_cond_proj_dim": "int or ints or null",
        "projection_class_embeddings_input_dim": "int or ints or null", "addition_time_embed_dim":
        "int or ints or null"}
VAE = {"latent_channels": "positive int", "scaling_factor": "number", "shift_factor": "number or null",
       "block_out_channels": "ints", "in_channels": "positive int", "out_channels": "positive int"}
TEXT = {"hidden_size": "positive int", "num_hidden_layers": "positive int", "vocab_size": "positive int",
        "max_position_embeddings": "positive int", "projection_dim": "int or ints or null"}
TRANSFORMER = {"in_channels": "positive int", "out_channels": "int or ints or null", "patch_size": "positive int",
               "joint_attention_dim": "positive int", "pooled_projection_dim": "positive int",
               "sample_size": "int or ints", "guidance_embeds": "bool"}
T5 = {"d_model": "positive int", "vocab_size": "positive int"}
FIELDS = {"unet": (UNET, ("block_out_channels",)),
          "transformer": (TRANSFORMER, ("_class_name", "in_channels", "joint_attention_dim", "pooled_projection_dim")),
          "text_encoder_3": (T5, ()), "vae_decoder": (VAE, ("latent_channels",)),
          "vae_encoder": (VAE, ("latent_channels",)), "text_encoder": (TEXT, ()), "text_encoder_2": (TEXT, ()),
          "taesd_decoder": (VAE, ()), "taesd_encoder": (VAE, ())}


def check_object(value, file: Path, what: str = "the file") -> dict:
    if not isinstance(value, dict):
        raise ModelFolderError(f"{file}: {what} must be a JSON object, got {type(value).__name__}; re-export the "
                               "folder or restore the file")
    return value


def check_fields(config: dict, file: Path, fields: dict, required: tuple = ()) -> None:
    for name in required:
        if name not in config:
            raise ModelFolderError(f"{file} lacks {name!r}, which sdrt needs; re-export the folder or restore the "
                                   "file")
    for name, rule in fields.items():
        if name in config:
            ok, wanted = RULES[rule]
            if not ok(config[name]):
                raise ModelFolderError(f"{file}: {name!r} must be {wanted}, got {config[name]!r}")


def check_config(component: str, config, file: Path) -> dict:
    config = check_object(config, file)
    fields, required = FIELDS.get(component, ({}, ()))
    check_fields(config, file, fields, required)
    return config


def check_index(index, file: Path) -> dict:
    index = check_object(index, file)
    check_fields(index, file, {"_class_name": "string"}, ("_class_name",))
    return index


def check_manifest(manifest, file: Path) -> dict:
    manifest = check_object(manifest, file)
    check_fields(manifest, file, {"family": "string", "precision": "string"})
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ModelFolderError(f"{file}: 'files' must be an object of path -> {{size, sha256}}")
    for rel, record in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise ModelFolderError(f"{file}: 'files' names {rel!r}, a path outside the folder")
        if not isinstance(record, dict) or not _int(record.get("size")) or record["size"] < 0 \
                or not isinstance(record.get("sha256"), str):
            raise ModelFolderError(f"{file}: 'files' entry {rel!r} must hold an integer 'size' and a 'sha256' "
                                   f"string, got {record!r}")
    for key in ("components", "validation", "optimize"):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], dict):
            raise ModelFolderError(f"{file}: {key!r} must be an object, got {type(manifest[key]).__name__}")
    return manifest
