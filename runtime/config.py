"""An exported model folder, read into frozen configs: which components it has, their specs and
every model constant the pipeline needs (scaling factor, latent channels, sizes)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.engines.files import MANIFEST, cached_sha256, sha256_file
from sdrt.engines.spec import NetworkSpec, latent_multiple, spec_for, vae_scale_factor
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime import schema

# vae_tiny_*: an optional tiny autoencoder (TAESD) beside the full VAE, added by `sdrt export-taesd`.
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder",
              "vae_tiny_decoder", "vae_tiny_encoder")
REQUIRED = ("vae_decoder",)
# The diffusion-transformer families (their denoiser is transformer/, not unet/).
DIT_FAMILIES = ("stable-diffusion-3", "flux")
# Beyond REQUIRED and the denoiser; an SDXL folder may lack the first text encoder (the SDXL refiner has only the
# second); an SD3 folder may lack its T5 (text_encoder_3), as diffusers allows.
FAMILY_REQUIRED = {"stable-diffusion-xl": ("text_encoder_2",), "stable-diffusion-3": ("text_encoder", "text_encoder_2"),
                   "flux": ("text_encoder", "text_encoder_2")}
FAMILY_REQUIRED_DEFAULT = ("text_encoder",)
PIPELINES = {"StableDiffusionPipeline": "stable-diffusion", "ORTStableDiffusionPipeline": "stable-diffusion"}
PIPELINES["LatentConsistencyModelPipeline"] = PIPELINES["ORTLatentConsistencyModelPipeline"] = "latent-consistency"
PIPELINES["StableDiffusionInpaintPipeline"] = PIPELINES["ORTStableDiffusionInpaintPipeline"] = "stable-diffusion"
for _name in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"):
    PIPELINES[_name] = PIPELINES["ORT" + _name] = "stable-diffusion-xl"
# A ControlNet pipeline's export: its base (the ControlNets in folders of their own, passed with controlnet=).
for _task in ("", "Img2Img", "Inpaint"):
    PIPELINES[f"StableDiffusionControlNet{_task}Pipeline"] = "stable-diffusion"
    PIPELINES[f"StableDiffusionXLControlNet{_task}Pipeline"] = "stable-diffusion-xl"
for _task in ("", "Img2Img", "Inpaint"):
    PIPELINES[f"StableDiffusion3{_task}Pipeline"] = PIPELINES[f"ORTStableDiffusion3{_task}Pipeline"] = "stable-diffusion-3"
    PIPELINES[f"Flux{_task}Pipeline"] = PIPELINES[f"ORTFlux{_task}Pipeline"] = "flux"


VERIFY_MODES = ("none", "size", "sha256")

# onnxruntime providers with kernels for the gpu optimize profile's ops (TensorRT's provider hands them to CUDA).
GPU_PROFILE_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing; is {path.parent.parent} an exported sdrt/optimum folder?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class VaeConfig:
    scaling_factor: float
    shift_factor: float
    latent_channels: int
    scale_factor: int  # pixels per latent cell

    @classmethod
    def from_dict(cls, d: dict) -> "VaeConfig":
        return cls(
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=float(d.get("shift_factor") or 0.0),
            latent_channels=int(d["latent_channels"]),
            scale_factor=vae_scale_factor(d),
        )


def is_editable(rel: str) -> bool:
    """Whether a folder file (path relative to the folder) is a JSON config users may edit, as diffusers users do
    (scheduler options, default size, ...): model_index.json, scheduler/*.json, COMPONENT/config.json."""
    parts = rel.split("/")
    return rel == "model_index.json" or (len(parts) == 2 and parts[0] == "scheduler" and rel.endswith(".json")) or \
        (len(parts) == 2 and parts[1] == "config.json" and parts[0] in COMPONENTS)


@dataclass(frozen=True)
class ModelFolder:
    """A validated view of an exported folder (written by sdrt, or by optimum without sdrt.json)."""

    path: Path
    family: str
    pipeline: str
    components: tuple[str, ...]
    configs: dict = field(repr=False)
    manifest: dict | None = field(repr=False, default=None)

    @classmethod
    def open(cls, path, verify: str = "size") -> "ModelFolder":
        """Read and check a folder. verify: "none", "size" (files present, sizes as recorded) or "sha256"."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"path must be a folder path (str or pathlib.Path), got {path!r}")
        if verify not in VERIFY_MODES:
            raise InvalidInputError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"{path} is not a folder; give the output folder of `sdrt export`")
        index = schema.check_index(read_json(path / "model_index.json"), path / "model_index.json")
        cls_name = index["_class_name"]
        if cls_name not in PIPELINES:
            raise UnsupportedConfigError(
                f"{path}: pipeline {cls_name} is not supported by this runtime (supported: {', '.join(PIPELINES)})"
            )
        components = tuple(c for c in COMPONENTS if (path / c / "model.onnx").is_file())
        family = PIPELINES[cls_name]
        denoiser = ("transformer",) if family in DIT_FAMILIES else ("unet",)
        missing = [c for c in denoiser + REQUIRED + FAMILY_REQUIRED.get(family, FAMILY_REQUIRED_DEFAULT)
                   if c not in components]
        if missing:
            raise ModelFolderError(f"{path} lacks {', '.join(c + '/model.onnx' for c in missing)}; re-run sdrt export")
        configs = {c: schema.check_config(c, read_json(path / c / "config.json"), path / c / "config.json")
                   for c in components}
        configs["scheduler"] = schema.check_object(read_json(path / "scheduler" / "scheduler_config.json"),
                                                   path / "scheduler" / "scheduler_config.json")
        entry = index.get("scheduler")
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) and entry[1]:
            # diffusers makes the class model_index.json names, from the options in scheduler_config.json
            configs["scheduler"] = {**configs["scheduler"], "_class_name": entry[1]}
        manifest = schema.check_manifest(read_json(path / MANIFEST), path / MANIFEST) \
            if (path / MANIFEST).is_file() else None
        folder = cls(path, PIPELINES[cls_name], cls_name, components, configs, manifest)
        if verify != "none":
            folder.verify(full=(verify == "sha256"))
        return folder

    def verify(self, full: bool = False) -> None:
        """Check the files recorded in sdrt.json: present, same size, and (full) same sha256. The JSON configs
        (model_index.json, scheduler/, each component's config.json) are editable, as in diffusers folders: they
        are checked by schema when read, not against the export (`edited_configs` says which differ)."""
        if self.manifest is None:
            return
        for rel, rec in self.manifest.get("files", {}).items():
            if is_editable(rel):
                continue
            f = self.path / rel
            if not f.is_file():
                raise ModelFolderError(f"{f} is missing (listed in {MANIFEST}); re-export the folder")
            size = f.stat().st_size
            if size != rec["size"]:
                raise ModelFolderError(
                    f"{f} is {size} bytes but {MANIFEST} records {rec['size']}: truncated or replaced; re-export"
                )
            if full and cached_sha256(f) != rec["sha256"]:
                raise ModelFolderError(f"{f} does not match its sha256 in {MANIFEST}: corrupted or modified; re-export")

    def edited_configs(self) -> list[str]:
        """The editable JSON configs that differ from the export (sdrt.json's sha256), or were added or removed."""
        if self.manifest is None:
            return []
        recorded = {rel: rec for rel, rec in self.manifest.get("files", {}).items() if is_editable(rel)}
        present = {f.relative_to(self.path).as_posix() for f in self.path.rglob("*.json") if f.is_file()}
        present = {rel for rel in present if is_editable(rel)}
        changed = [rel for rel in sorted(recorded.keys() | present)
                   if rel not in recorded or rel not in present or sha256_file(self.path / rel) != recorded[rel]["sha256"]]
        return changed

    @property
    def vae(self) -> VaeConfig:
        return VaeConfig.from_dict(self.configs["vae_decoder"])

    @property
    def denoiser(self) -> str:
        """The component that denoises: "transformer" (SD3, Flux) or "unet"."""
        return "transformer" if self.family in DIT_FAMILIES else "unet"

    @property
    def unet_config(self) -> dict:
        """The denoiser's config.json (the UNet's, or the transformer's)."""
        return self.configs[self.denoiser]

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    @property
    def latent_multiple(self) -> int:
        """Latent height/width must be multiples of this."""
        return latent_multiple(self.unet_config)

    @property
    def pixel_multiple(self) -> int:
        return self.latent_multiple * self.vae.scale_factor

    @property
    def default_size(self) -> int:
        # FluxPipeline's default_sample_size is 128 (its transformer's config has no sample_size)
        default = 128 if self.family == "flux" else 64
        return int(self.unet_config.get("sample_size", default)) * self.vae.scale_factor

    def spec(self, component: str) -> NetworkSpec:
        return spec_for(component, self.configs[component], vae_config=self.configs["vae_decoder"])

    def onnx_path(self, component: str) -> Path:
        return self.path / component / "model.onnx"

    def precision(self) -> str:
        return (self.manifest or {}).get("precision", "fp32")

    def check_provider(self, provider) -> None:
        """Refuse a provider that cannot run this folder's files, before any engine is made: an `sdrt optimize`
        folder holds onnxruntime's com.microsoft ops, which TensorRT's ONNX parser does not know, and the gpu
        profile's (GroupNorm, NhwcConv, packed attention…) have no kernels outside the GPU providers."""
        profile = ((self.manifest or {}).get("optimize") or {}).get("profile")
        if profile is None:
            return
        from sdrt.engines.providers import parse_provider

        choice = parse_provider(provider)
        if choice.backend == "tensorrt":
            raise UnsupportedConfigError(
                f"{self.path} was optimized for onnxruntime (`sdrt optimize --optimize {profile}`): its files hold "
                "onnxruntime's com.microsoft ops, which TensorRT's ONNX parser does not know. Give the native "
                "TensorRT backend the plain `sdrt export` folder (TensorRT makes its own fusions and fp16), or run "
                "this folder with --provider cuda.")
        if choice.kind == "tensorrt-ep":
            warnings.warn(f"{self.path} was optimized for onnxruntime (`sdrt optimize --optimize {profile}`): "
                          "TensorRT cannot take its com.microsoft ops, so onnxruntime splits each network between "
                          "TensorRT and CUDA. Give tensorrt-ep the plain `sdrt export` folder (TensorRT makes its "
                          "own fusions and fp16).", stacklevel=3)
        names = {entry if isinstance(entry, str) else entry[0] for entry in choice.providers}
        if profile == "gpu" and not names & GPU_PROFILE_PROVIDERS:
            raise UnsupportedConfigError(
                f"{self.path} was optimized for the CUDA provider (`sdrt optimize --optimize gpu`: GroupNorm, "
                f"NhwcConv, packed attention… have no {choice.kind} kernels). Run it with --provider cuda, or "
                "make a folder for the CPU from the export: sdrt optimize EXPORT OUT --optimize cpu")
