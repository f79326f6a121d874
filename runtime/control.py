"""ControlNet folders (written by `sdrt export-controlnet`), their fit to a base folder, and control images.

A ControlNet runs beside the UNet each step and adds residuals to the UNet's down and mid blocks; every UNet
sdrt exports takes them as inputs (zeros without a ControlNet), so a ControlNet folder is swappable: it is
checked against the base when opened (cross-attention width, the residuals' channels and resolutions, the
added conditioning, the image scale) and refused with both sides named when it does not fit.

Control images are prepared as diffusers' control image processor does (any mode converted to RGB, resized to
the output size with Lanczos, pixels / 255 in [0, 1], not normalized). `canny` runs OpenCV's edge detector
(`pip install 'sdrt[control]'`), as controlnet_aux's CannyDetector does; depth maps, poses and segmentations
made elsewhere are passed as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.engines.files import MANIFEST
from sdrt.engines.spec import NetworkSpec, control_residuals, controlnet_spec
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError

RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class ControlNetFolder:
    path: Path
    config: dict
    spec: NetworkSpec

    @classmethod
    def open(cls, path) -> "ControlNetFolder":
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"controlnet must be a folder path (or a list of them), got {type(path).__name__}")
        path = Path(path)
        if not (path / "model.onnx").is_file():
            hint = " (a diffusers ControlNet checkpoint: export it first with sdrt export-controlnet)" \
                if (path / "diffusion_pytorch_model.safetensors").is_file() else ""
            raise ModelFolderError(f"{path} is not an exported ControlNet folder: no model.onnx{hint}")
        try:
            config = json.loads((path / "config.json").read_text())
            manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"{path}: config.json or {MANIFEST} is unreadable: {e}") from e
        if not isinstance(config, dict) or "block_out_channels" not in config:
            raise ModelFolderError(f"{path}/config.json is not a ControlNetModel config")
        recorded = (manifest.get("files") or {}).get("model.onnx", {}).get("size")
        if recorded is not None and recorded != (path / "model.onnx").stat().st_size:
            raise ModelFolderError(f"{path}/model.onnx is not the size {MANIFEST} records: truncated or replaced; "
                                   "export it again")
        return cls(path, config, controlnet_spec(config))

    def check_fits(self, folder) -> None:
        """Refuse a ControlNet made for another base, naming both."""
        unet = folder.unet_config
        names = folder.spec("unet").input_names
        if "mid_block_additional_residual" not in names:
            raise UnsupportedConfigError(
                f"{folder.path}'s UNet takes no ControlNet residuals (exported by an older sdrt, or by optimum); "
                "export the base checkpoint again with sdrt export, which gives every UNet these inputs")
        mine, theirs = self.config, unet
        problems = []
        if _cross(mine) != _cross(theirs):
            problems.append(f"cross-attention width {_cross(mine)} vs the base's {_cross(theirs)}")
        if control_residuals(mine) != control_residuals(theirs):
            problems.append(f"down-block residuals (channels, downscale) {control_residuals(mine)} vs the base's "
                            f"{control_residuals(theirs)}")
        if mine.get("addition_embed_type") != theirs.get("addition_embed_type"):
            problems.append(f"added conditioning {mine.get('addition_embed_type')!r} vs the base's "
                            f"{theirs.get('addition_embed_type')!r} (an SDXL ControlNet needs an SDXL base)")
        if mine.get("in_channels", 4) != folder.vae.latent_channels:
            problems.append(f"{mine.get('in_channels', 4)} latent channels vs the base VAE's {folder.vae.latent_channels}")
        if self.spec.vae_scale_factor != folder.vae.scale_factor:
            problems.append(f"control images {self.spec.vae_scale_factor}x the latents vs the base's "
                            f"{folder.vae.scale_factor}x")
        if problems:
            raise UnsupportedConfigError(f"the ControlNet {self.path} does not fit the base {folder.path}: "
                                         + "; ".join(problems))

    @property
    def global_pool(self) -> bool:
        return bool(self.config.get("global_pool_conditions"))


def _cross(config) -> int:
    dim = config.get("cross_attention_dim")
    return dim[0] if isinstance(dim, (list, tuple)) else dim


def as_control_picture(image, index: int) -> Image.Image:
    """A PIL RGB image from a PIL image (any mode: converted, as diffusers' do_convert_rgb) or an HWC array (uint8,
    or floats in [0, 1]; one channel or three)."""
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3):
            raise InvalidInputError(f"control image {index}: arrays must be HW or HWC with 1 or 3 channels, got shape "
                                    f"{image.shape}")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise InvalidInputError(f"control image {index}: float arrays must hold values in [0, 1]")
            array = np.round(array * 255).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise InvalidInputError(f"control image {index}: arrays must be uint8 or float in [0, 1], got "
                                    f"{array.dtype}")
        return Image.fromarray(np.repeat(array, 3, axis=2) if array.shape[-1] == 1 else array)
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"control image {index}: expected a PIL image or an array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare(images, height: int, width: int) -> np.ndarray:
    """Control image(s) -> NCHW float32 in [0, 1] at height x width, as diffusers' control image processor."""
    pictures = [as_control_picture(image, k) for k, image in enumerate(images)]
    pixels = np.stack([np.asarray(p.resize((width, height), resample=RESAMPLE), dtype=np.float32) / 255.0
                       for p in pictures])
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def canny(image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV's Canny edges of a picture as an RGB image (white edges on black), as controlnet_aux's detector."""
    try:
        import cv2
    except ImportError as e:
        raise UnsupportedConfigError("the canny preprocessor needs OpenCV: pip install 'sdrt[control]' "
                                     "(opencv-python-headless)") from e
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255 * 4:
            raise InvalidInputError(f"canny {name} threshold must be an integer in [0, 1020], got {value!r}")
    if low > high:
        raise InvalidInputError(f"canny thresholds: low {low} is above high {high}")
    edges = cv2.Canny(np.asarray(as_control_picture(image, 0)), int(low), int(high))
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))
