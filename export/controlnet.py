"""`sdrt export-controlnet`: a diffusers ControlNetModel folder -> an ONNX folder of its own, validated against torch.

The folder (model.onnx, config.json, sdrt.json with the validation report) is written atomically, like every
export. The network takes the UNet's inputs plus the control image and gives the residuals at conditioning
scale 1 (`engines.spec.controlnet_spec`); the runtime scales them (conditioning scale, guess mode's ramp, the
start/end window) in NumPy, so one export serves every setting. It is checked against a base folder when a
generation opens it (sdrt.runtime.control), so a ControlNet stays swappable without re-exporting the UNet: every
UNet sdrt exports takes the residuals as inputs.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Callable

import torch

from sdrt.engines.spec import controlnet_spec, latent_multiple
from sdrt.export.api import MIN_OPSET, _check_opset, _versions, require_export_extra
from sdrt.export.errors import ExportError
from sdrt.export.folder import staging, write_manifest

FORMAT = "sdrt-controlnet"


class ControlNetWrapper(torch.nn.Module):
    """ControlNetModel with the spec's positional inputs, giving the residuals as a flat tuple (scale 1)."""

    def __init__(self, controlnet, names):
        super().__init__()
        self.controlnet = controlnet
        self.names = list(names)

    def forward(self, *inputs):
        given = dict(zip(self.names, inputs))
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}
        down, mid = self.controlnet(given["sample"], given["timestep"], given["encoder_hidden_states"],
                                    controlnet_cond=given["controlnet_cond"], conditioning_scale=1.0,
                                    guess_mode=False, added_cond_kwargs=added or None, return_dict=False)
        return (*down, mid)


def load_controlnet(src: Path):
    from diffusers import ControlNetModel

    if not (src / "config.json").is_file():
        raise ExportError(f"{src} is not a diffusers ControlNetModel folder (no config.json); give the folder that "
                          "holds config.json and diffusion_pytorch_model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if config.get("_class_name") not in ("ControlNetModel", None):
        raise ExportError(f"{src}/config.json describes a {config.get('_class_name')}, not a ControlNetModel")
    if any(src.glob("*.bin")) and not any(src.glob("*.safetensors")):
        raise ExportError(f"{src} holds pickled .bin weights only; sdrt loads .safetensors (convert them first)")
    try:
        return ControlNetModel.from_pretrained(src, use_safetensors=True).float().eval(), config
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"could not load the ControlNet at {src}: {e}") from e


def export_controlnet(src, out, *, opset: int = MIN_OPSET, force: bool = False,
                      log: Callable[[str], None] | None = None) -> Path:
    """Export the ControlNetModel folder `src` to `out` (validated against torch at two shapes); nothing is
    written at `out` unless it validates."""
    require_export_extra()
    log = log or (lambda message: None)
    src, out = Path(src), Path(out)
    _check_opset(opset)
    load_controlnet(src)  # refused before any folder is staged
    with staging(out, force) as tmp:
        export_controlnet_into(src, tmp, opset, log)
    log(f"exported the ControlNet to {out}")
    return out


def export_controlnet_into(src: Path, folder: Path, opset: int, log: Callable[[str], None],
                           name: str = "controlnet") -> dict:
    """Export, validate and write the ControlNet at `src` into the (staged, empty or new) `folder`: model.onnx,
    config.json and its sdrt.json. Returns the manifest."""
    from sdrt.export.trace import export_onnx, sample_inputs
    from sdrt.export.validate import compare

    model, config = load_controlnet(src)
    spec = controlnet_spec(config)
    module = ControlNetWrapper(model, spec.input_names).eval()
    step = spec.vae_scale_factor * latent_multiple({"up_block_types": [None] * len(config["block_out_channels"])})
    base = max(step, min(int(config.get("sample_size") or 64) * spec.vae_scale_factor, 4 * step) // step * step)
    dims = [spec.dims(2, base, base), spec.dims(1, base, base + step)]
    manifest = {"format": FORMAT, "format_version": 1, "kind": "controlnet", "source": str(src.resolve()),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "opset": opset, "precision": "fp32", "versions": _versions(), "spec": spec.to_json()}
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{name}: exporting to ONNX (opset {opset})")
    export_onnx(module, spec, sample_inputs(spec, dims[0]), folder / "model.onnx", opset)
    log(f"{name}: validating against torch at 2 shapes")
    manifest["validation"] = compare(module, folder / "model.onnx", spec, dims)
    worst = max(c["max_abs"] for c in manifest["validation"]["checks"])
    log(f"{name}: ok, max |onnx - torch| = {worst:.2e}")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_manifest(folder, manifest)
    return manifest
