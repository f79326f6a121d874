"""What `sdrt info` shows: family, components, precision, I/O shapes, file sizes, validation figures."""

from __future__ import annotations

from pathlib import Path

from sdrt.runtime.config import ModelFolder


def describe(path, verify: str = "sha256") -> dict:
    folder = ModelFolder.open(path, verify=verify)
    manifest = folder.manifest or {}
    components = {}
    for c in folder.components:
        spec = folder.spec(c)
        files = sorted(f for f in (folder.path / c).iterdir() if f.is_file())
        report = manifest.get("validation", {}).get(c)
        components[c] = {
            "inputs": {t.name: [t.dtype, list(t.shape)] for t in spec.inputs},
            "outputs": {t.name: [t.dtype, list(t.shape)] for t in spec.outputs},
            "size_bytes": sum(f.stat().st_size for f in files),
            "max_abs_error": max((ch["max_abs"] for ch in report["checks"]), default=None) if report else None,
        }
    return {
        "path": str(folder.path),
        "family": folder.family,
        "tiny_vae": [c for c in folder.components if c.startswith("vae_tiny_")],
        "pipeline": folder.pipeline,
        "writer": "sdrt" if folder.manifest else "optimum (no sdrt.json)",
        "precision": folder.precision(),
        "opset": manifest.get("opset"),
        "scheduler": folder.scheduler_config.get("_class_name"),
        "prediction_type": "flow" if str(folder.scheduler_config.get("_class_name", "")).startswith("FlowMatch")
        else folder.scheduler_config.get("prediction_type", "epsilon"),
        "default_size": folder.default_size,
        "size_multiple": folder.pixel_multiple,
        "verified": "sha256" if (folder.manifest and verify == "sha256") else ("size" if folder.manifest else "none"),
        "edited_configs": folder.edited_configs(),  # editable JSON configs that differ from the export
        "versions": manifest.get("versions"),
        "components": components,
    }


def format_info(info: dict) -> str:
    lines = [
        f"{info['path']}",
        f"  family     {info['family']} ({info['pipeline']}), written by {info['writer']}",
        f"  tiny VAE   {', '.join(info['tiny_vae']) + ' (--vae taesd)' if info['tiny_vae'] else 'none'}",
        f"  precision  {info['precision']}, opset {info['opset']}",
        f"  scheduler  {info['scheduler']} ({info['prediction_type']})",
        f"  size       default {info['default_size']} px, multiples of {info['size_multiple']} px",
        f"  files      verified: {info['verified']}",
    ]
    if info.get("edited_configs"):
        lines.append(f"  edited     {', '.join(info['edited_configs'])} (differ from the export; in use)")
    for name, c in info["components"].items():
        err = f"max err vs torch {c['max_abs_error']:.2e}" if c["max_abs_error"] is not None else "not validated"
        lines.append(f"  {name:<13} {c['size_bytes'] / 1e6:8.1f} MB  {err}")
        for kind in ("inputs", "outputs"):
            for tname, (dtype, shape) in c[kind].items():
                arrow = "<-" if kind == "inputs" else "->"
                lines.append(f"      {arrow} {tname}: {dtype} {shape}")
    return "\n".join(lines)
