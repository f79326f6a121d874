"""`export_taesd`: add a tiny autoencoder (TAESD, diffusers' AutoencoderTiny) to an exported folder.

TAESD decodes latents in a fraction of the full VAE's time (previews, CPUs) at some loss of detail.
Its two networks become the components `vae_tiny_decoder/` and `vae_tiny_encoder/` beside the full
VAE; both pass the same validation gate as `export_pipeline` before anything in the folder changes,
then the component folders are renamed into place and sdrt.json (file table, validation report,
`tiny_vae` record) is rewritten atomically.

Latent convention (diffusers' autoencoder_tiny.py): the decoder takes latents divided by its
config's `scaling_factor` (1.0 for TAESD, whose latents are already in the UNet's scale) and
returns pixels in [-1, 1]; the encoder returns latents directly, with no distribution to sample.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from sdrt.engines.files import MANIFEST, atomic_write_json
from sdrt.engines.spec import spec_for, vae_scale_factor
from sdrt.export.api import MIN_OPSET, _check_opset, require_export_extra, validation_dims
from sdrt.export.checkpoint import HUB_ID, Checkpoint, _download, _read_json, load_module
from sdrt.export.errors import CheckpointError, OutputExistsError, UnsupportedModelError
from sdrt.export.folder import file_table

TINY_COMPONENTS = ("vae_tiny_decoder", "vae_tiny_encoder")
TINY_CLASS = "AutoencoderTiny"


def _tiny_wrappers():
    import torch

    class TinyDecoderWrapper(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class TinyEncoderWrapper(TinyDecoderWrapper):
        def forward(self, sample):
            return self.vae.encode(sample, return_dict=False)[0]

    return {"vae_tiny_decoder": TinyDecoderWrapper, "vae_tiny_encoder": TinyEncoderWrapper}


def find_taesd(src: str | Path) -> Path:
    """The AutoencoderTiny folder at `src`: the folder itself, or its vae/ (a pipeline folder); a hub id
    is downloaded where the network allows."""
    path = Path(src)
    if not path.exists() and HUB_ID.fullmatch(str(src)):
        path = _download(str(src))
    for candidate in (path, path / "vae"):
        config = candidate / "config.json"
        if config.is_file() and _read_json(config).get("_class_name") == TINY_CLASS:
            return candidate
    if not path.is_dir():
        raise CheckpointError(f"tiny VAE source {path} does not exist; give an AutoencoderTiny folder "
                              "(e.g. a download of madebyollin/taesd)")
    raise UnsupportedModelError(
        f"{path} holds no {TINY_CLASS} (config.json with _class_name {TINY_CLASS!r}, here or in vae/); "
        "export_taesd takes a TAESD checkpoint such as madebyollin/taesd saved by diffusers"
    )


def _check_compatible(tiny: dict, folder: Path) -> None:
    """The tiny VAE must make latents of the folder's shape: same channels, same pixels per latent cell."""
    vae = _read_json(folder / "vae_decoder" / "config.json")
    if int(tiny["latent_channels"]) != int(vae["latent_channels"]):
        raise UnsupportedModelError(
            f"the tiny VAE has {tiny['latent_channels']} latent channels but {folder}'s VAE has "
            f"{vae['latent_channels']}; use the TAESD made for this model family (taesd for SD 1.x/2.x, "
            "taesdxl for SDXL, taesd3 for SD3)"
        )
    counts = {len(tiny["encoder_block_out_channels"]), len(tiny["decoder_block_out_channels"])}
    if counts != {len(tiny["block_out_channels"])} or tiny.get("upsampling_scaling_factor", 2) != 2 \
            or vae_scale_factor(tiny) != vae_scale_factor(vae):
        raise UnsupportedModelError(
            f"the tiny VAE scales by {2 ** (max(counts) - 1)} px per latent cell (encoder/decoder blocks "
            f"{sorted(counts)}) but {folder}'s VAE by {vae_scale_factor(vae)}; it cannot decode these latents"
        )


def export_taesd(src: str | Path, folder: str | Path, *, opset: int = MIN_OPSET, force: bool = False,
                 encoder: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Export the AutoencoderTiny at `src` into the exported folder `folder`, validating each network.

    encoder=False exports the decoder only (enough for txt2img and previews). Existing tiny
    components are replaced only with force=True. Nothing in `folder` changes unless every network
    exports and validates.
    """
    require_export_extra()
    from sdrt.export.trace import export_onnx, sample_inputs
    from sdrt.export.validate import compare

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _check_opset(opset)
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "vae_decoder" / "config.json").is_file():
        raise CheckpointError(f"{folder} is not an exported sdrt/optimum folder (no model_index.json or "
                              "vae_decoder/); run sdrt export first")
    selected = TINY_COMPONENTS if encoder else TINY_COMPONENTS[:1]
    present = [c for c in TINY_COMPONENTS if (folder / c).exists()]
    if present and not force:
        raise OutputExistsError(f"{folder} already has {', '.join(present)}; pass --force to replace it")
    path = find_taesd(src)
    module = load_module(Checkpoint(path.parent, {path.name: ["diffusers", TINY_CLASS]}, "taesd"), path.name)
    config = json.loads(module.to_json_string())  # includes block_out_channels, which diffusers adds at load
    _check_compatible(config, folder)
    unet_config = _read_json(folder / "unet" / "config.json")

    wrappers = _tiny_wrappers()
    reports, specs = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix=".vae_tiny.", suffix=".partial", dir=folder))
    try:
        for i, name in enumerate(selected, 1):
            spec = spec_for(name, config)
            dims = validation_dims(spec, unet_config, spec.vae_scale_factor)
            wrapped = wrappers[name](module).eval()
            log(f"[{i}/{len(selected)}] {name}: exporting to ONNX (opset {opset})")
            export_onnx(wrapped, spec, sample_inputs(spec, dims[0]), tmp / name / "model.onnx", opset)
            log(f"[{i}/{len(selected)}] {name}: validating against torch at {len(dims)} shapes")
            reports[name] = compare(wrapped, tmp / name / "model.onnx", spec, dims)
            worst = max(c["max_abs"] for c in reports[name]["checks"])
            log(f"[{i}/{len(selected)}] {name}: ok, max |onnx - torch| = {worst:.2e}")
            atomic_write_json(tmp / name / "config.json", config)
            specs[name] = spec
        _install(tmp, folder, selected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if (folder / MANIFEST).is_file():
        _update_manifest(folder, path, opset, specs, reports)
    log(f"added {', '.join(selected)} to {folder}")
    return folder


def _install(tmp: Path, folder: Path, selected: tuple[str, ...]) -> None:
    """Rename the validated component folders into place, replacing (then deleting) any old tiny VAE."""
    trash = []
    for name in TINY_COMPONENTS:
        if (folder / name).exists():
            old = folder / f".{name}.old-{uuid.uuid4().hex[:8]}"
            (folder / name).rename(old)
            trash.append(old)
    for name in selected:
        (tmp / name).rename(folder / name)
    for old in trash:
        shutil.rmtree(old, ignore_errors=True)


def _update_manifest(folder: Path, source: Path, opset: int, specs: dict, reports: dict) -> None:
    """sdrt.json with the tiny components' files, validation reports and a `tiny_vae` record."""
    manifest = _read_json(folder / MANIFEST)
    stale = tuple(f"{c}/" for c in TINY_COMPONENTS)
    files = {rel: rec for rel, rec in manifest.get("files", {}).items() if not rel.startswith(stale)}
    validation = {c: r for c, r in manifest.get("validation", {}).items() if c not in TINY_COMPONENTS}
    for name in specs:
        files.update({f"{name}/{rel}": rec for rel, rec in file_table(folder / name).items()})
        validation[name] = reports[name]
    manifest.update(files=files, validation=validation, tiny_vae={
        "source": str(source.resolve()), "opset": opset,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "components": {name: {"spec": spec.to_json()} for name, spec in specs.items()},
    })
    atomic_write_json(folder / MANIFEST, manifest)
