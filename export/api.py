"""`export_pipeline`: a diffusers checkpoint folder -> a validated ONNX folder (see DESIGN.md)."""

from __future__ import annotations

import datetime
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from sdrt.engines.spec import CONTROL_RESIDUALS, NORMED_HIDDEN_STATES, TEXT_EMBEDS, latent_multiple, spec_for, \
    vae_scale_factor
from sdrt.export.checkpoint import DIT_FAMILIES, controlnet_folders, load_module, open_checkpoint
from sdrt.export.errors import ExportError, MissingExtraError, OutputExistsError, UnsupportedModelError
from sdrt.export.folder import copy_tokenizer, staging, write_manifest
from sdrt.export import single_file

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")
SOURCE_FOLDER = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
                 "unet": "unet", "transformer": "transformer", "vae_decoder": "vae", "vae_encoder": "vae"}
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
MIN_OPSET = 18  # torch's dynamo exporter writes an invalid UNet at opset 17
FORMAT_VERSION = 1


def _versions() -> dict:
    names = ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy")
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    out["python"] = platform.python_version()
    return out


def require_export_extra() -> None:
    """Fail early, naming the extra, when torch / diffusers / transformers / onnx are missing."""
    import importlib

    for name in ("torch", "diffusers", "transformers", "onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingExtraError(
                f"sdrt export needs {name}, which is not installed: pip install torch==2.13.0 "
                "&& pip install 'sdrt[export]'"
            ) from e


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise UnsupportedModelError(
            f"opset {opset} cannot be produced: sdrt exports opsets {MIN_OPSET}..{newest} "
            f"(below {MIN_OPSET} torch's dynamo exporter writes an invalid UNet; above {newest} this onnx "
            "package does not know the opset)"
        )


def exported_config(name: str, ckpt) -> dict:
    """The component's config.json as exported: SDXL's are marked as optimum marks them (text encoders
    give every layer's hidden states; the UNet names the pooled width and whether it takes an aesthetic score)."""
    config = ckpt.config(SOURCE_FOLDER[name])
    if ckpt.family in DIT_FAMILIES:
        if ckpt.family == "stable-diffusion-3" and name in ("text_encoder", "text_encoder_2"):
            # SD3 reads the penultimate layer (or earlier: clip_skip) and the projection's text_embeds
            return dict(config, output_hidden_states=True, **{TEXT_EMBEDS: True})
        return config
    if name == "unet":  # every UNet takes ControlNet residuals (zeros without one): engines.spec.residual_inputs
        config = dict(config, **{CONTROL_RESIDUALS: True})
    if ckpt.family != "stable-diffusion-xl":
        if name == "text_encoder":  # clip skip: earlier layers through the final norm (engines.spec)
            return dict(config, **{NORMED_HIDDEN_STATES: True})
        return config
    if name.startswith("text_encoder"):
        return dict(config, output_hidden_states=True)
    if name == "unet":
        return dict(config, text_encoder_projection_dim=ckpt.config("text_encoder_2")["projection_dim"],
                    requires_aesthetics_score=bool(ckpt.index.get("requires_aesthetics_score", False)))
    return config


def is_t5_tokenizer(folder: Path) -> bool:
    """A SentencePiece (T5) tokenizer folder, not a CLIP BPE one."""
    if (folder / "spiece.model").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and "T5" in str(json.loads(config.read_text()).get("tokenizer_class", ""))


def validation_dims(spec, unet_config: dict, factor: int) -> list[dict]:
    """The export shape and a second one it never saw (batch 1, non-square, shorter text)."""
    if spec.name.startswith("text_encoder"):
        return [spec.dims(2, 0, 0, sequence=77), spec.dims(1, 0, 0, sequence=32)]
    step = factor * latent_multiple(unet_config)
    base = min(unet_config.get("sample_size", 64) * factor, 4 * step)
    base = max(step, base - base % step)
    return [spec.dims(2, base, base), spec.dims(1, base, base + step)]


def export_pipeline(src: str | Path, out: str | Path, *, opset: int = MIN_OPSET,
                    components: Iterable[str] | None = None, force: bool = False,
                    log: Callable[[str], None] | None = None, config: str | Path | None = None,
                    original_config: str | Path | None = None, prediction_type: str | None = None) -> Path:
    """Export every network of the checkpoint at `src` to `out`, validating each against torch.

    `src` is a diffusers pipeline folder (or hub id) or a single-file `.safetensors` checkpoint in the original
    Stable Diffusion layout (sdrt.export.single_file; `config` = a diffusers folder of its architecture whose configs
    to use instead of the shipped ones, `original_config` = its LDM yaml). `prediction_type` overrides the
    scheduler's (SD 2.x single files are taken as v-prediction, as diffusers does). Nothing is written at `out`
    unless all components export and validate; an existing `out` is replaced only with `force=True`.
    """
    require_export_extra()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    _check_opset(opset)
    unknown = [c for c in (components or ()) if c not in COMPONENTS]
    if unknown:  # before a single file is converted
        raise ExportError(f"unknown components {unknown}; choose from {', '.join(COMPONENTS)}")
    if prediction_type is not None and prediction_type not in single_file.PREDICTION_TYPES:
        raise ExportError(f"prediction_type must be one of {', '.join(single_file.PREDICTION_TYPES)}, "
                          f"got {prediction_type!r}")
    if not single_file.is_single_file(src):
        if config is not None or original_config is not None:
            raise ExportError("--config and --original-config apply to single-file checkpoints; "
                              f"{src} is a folder, whose own configs are used")
        return _export_folder(src, out, opset=opset, components=components, force=force, log=log,
                              prediction_type=prediction_type)
    source = single_file.inspect(src)  # every refusal (pickle, truncated, unknown layout) before any work
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".single-file", dir=out.parent))
    try:
        folder = single_file.convert(source, work / "diffusers", config=config, original_config=original_config,
                                     prediction_type=prediction_type, log=log)
        return _export_folder(folder, out, opset=opset, components=components, force=force, log=log,
                              source=source)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export_folder(src: str | Path, out: Path, *, opset: int, components: Iterable[str] | None, force: bool,
                   log: Callable[[str], None], prediction_type: str | None = None, source=None) -> Path:
    from sdrt.export.trace import export_onnx, sample_inputs, wrap
    from sdrt.export.validate import compare

    ckpt = open_checkpoint(src)
    available = [c for c in COMPONENTS if (ckpt.path / SOURCE_FOLDER[c]).is_dir()]
    selected = list(components) if components else available
    unknown = [c for c in selected if c not in COMPONENTS]
    if unknown:
        raise ExportError(f"unknown components {unknown}; choose from {', '.join(COMPONENTS)}")
    absent = [c for c in selected if c not in available]
    if absent:
        raise ExportError(f"the checkpoint has no {', '.join(absent)} ({ckpt.path} has {', '.join(available)})")
    needed = [c for c in available if c not in ("vae_encoder",)]
    if any(c not in selected for c in needed):
        log(f"note: a folder without {', '.join(needed)} cannot generate images")
    unet_config = ckpt.config("transformer" if ckpt.family in DIT_FAMILIES else "unet")
    vae_config = ckpt.config("vae")
    factor = vae_scale_factor(vae_config)

    manifest = {
        "format": "sdrt-onnx", "format_version": FORMAT_VERSION,
        "family": ckpt.family, "pipeline": ckpt.index["_class_name"],
        "precision": "fp32", "opset": opset,
        "source": str(Path(source.path if source is not None else src).resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "components": {}, "validation": {},
    }
    if source is not None:  # A1111's "Model hash" is the first 10 hex digits of the file's sha256
        from sdrt.engines.files import sha256_file

        log(f"hashing {source.path.name}")
        manifest["single_file"] = {"architecture": source.architecture, "file": source.path.name,
                                   "sha256": sha256_file(source.path)}
    with staging(out, force) as tmp:
        shutil.copy2(ckpt.path / "model_index.json", tmp / "model_index.json")
        (tmp / "scheduler").mkdir()
        shutil.copy2(ckpt.path / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
        if prediction_type is not None:
            single_file.set_scheduler_option(tmp, "prediction_type", prediction_type)
        for tokenizer in TOKENIZERS:
            if (ckpt.path / tokenizer).is_dir():
                if is_t5_tokenizer(ckpt.path / tokenizer):
                    from sdrt.export.t5_assets import copy_t5_tokenizer

                    copy_t5_tokenizer(ckpt.path / tokenizer, tmp / tokenizer)
                else:
                    copy_tokenizer(ckpt.path / tokenizer, tmp / tokenizer)
        for i, name in enumerate(selected, 1):
            config = exported_config(name, ckpt)
            spec = spec_for(name, config, vae_config=vae_config)
            vocab_size = config.get("vocab_size", 49408)
            dims = validation_dims(spec, unet_config, factor)
            t0 = time.perf_counter()
            log(f"[{i}/{len(selected)}] {name}: loading {SOURCE_FOLDER[name]}/")
            module = wrap(name, load_module(ckpt, SOURCE_FOLDER[name]), spec)
            log(f"[{i}/{len(selected)}] {name}: exporting to ONNX (opset {opset})")
            path = tmp / name / "model.onnx"
            export_onnx(module, spec, sample_inputs(spec, dims[0], vocab_size=vocab_size), path, opset)
            t1 = time.perf_counter()
            log(f"[{i}/{len(selected)}] {name}: validating against torch at {len(dims)} shapes")
            report = compare(module, path, spec, dims, vocab_size=vocab_size)
            worst = max(c["max_abs"] for c in report["checks"])
            log(f"[{i}/{len(selected)}] {name}: ok, max |onnx - torch| = {worst:.2e} "
                f"(export {t1 - t0:.1f} s, validation {time.perf_counter() - t1:.1f} s)")
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
            manifest["components"][name] = {"spec": spec.to_json(), "export_seconds": round(t1 - t0, 2)}
            manifest["validation"][name] = report
            del module
            gc.collect()
        nets = controlnet_folders(ckpt) if components is None else []
        if nets:  # a ControlNet pipeline's folder: each ControlNet in a folder of its own, beside the base
            from sdrt.export.controlnet import export_controlnet_into

            for name in nets:
                export_controlnet_into(ckpt.path / name, tmp / name, opset, log, name=name)
            manifest["controlnets"] = nets
        write_manifest(tmp, manifest)
    log(f"exported {len(selected)} components to {out}")
    for name in nets:
        log(f"the checkpoint's ControlNet is in {out / name}: sdrt generate {out} PROMPT --controlnet {out / name} "
            "--control-image PICTURE")
    return out
