"""Session fixtures: tiny random-weight diffusers checkpoints, and their exports (made once per run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Blocks heavy frameworks in a subprocess: proves the runtime and engines never need them.
NO_TORCH_PRELUDE = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "diffusers", "transformers", "onnxscript", "accelerate"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
""")


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH_PRELUDE + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def sd_checkpoints(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    from sdrt.export.fixtures import save_tiny_pipeline

    root = tmp_path_factory.mktemp("checkpoints")
    return {flavour: save_tiny_pipeline(root / flavour, flavour) for flavour in ("sd1", "sd2")}


@pytest.fixture(scope="session")
def sd_exported(sd_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from sdrt.export.api import export_pipeline

    root = tmp_path_factory.mktemp("exported")
    return {name: export_pipeline(src, root / name, log=lambda m: None) for name, src in sd_checkpoints.items()}


# The names the tests use; a module may define its own `checkpoints` / `exported` without breaking `tiny`.
@pytest.fixture(scope="session")
def checkpoints(sd_checkpoints) -> dict[str, Path]:
    return sd_checkpoints


@pytest.fixture(scope="session")
def exported(sd_exported) -> dict[str, Path]:
    return sd_exported


class TinyFolders:
    """Exported tiny folders of every family and task, each built on first use and shared by the whole run:
    "sd1", "sd2" (the `exported` fixture's), "sd1-inpaint" (9-channel UNet), "lcm", "xl-base", "xl-refiner",
    "xl-inpaint" (9-channel SDXL UNet), "sd3" (with T5), "flux-dev", "flux-schnell" (export/fixtures_dit.py)."""

    def __init__(self, exported: dict, root: Path):
        self._folders = dict(exported)
        self._root = root

    def __getitem__(self, name: str) -> Path:
        if name not in self._folders:
            from sdrt.export.api import export_pipeline
            from sdrt.export.fixtures_family import save_tiny_lcm_pipeline
            from sdrt.export.fixtures_inpaint import save_tiny_inpaint_pipeline, save_tiny_xl_inpaint_pipeline
            from sdrt.export.fixtures_dit import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
            from sdrt.export.fixtures_xl import save_tiny_xl_pipeline, save_tiny_xl_refiner

            makers = {
                "sd1-inpaint": lambda path: save_tiny_inpaint_pipeline(path, "sd1"),
                "lcm": save_tiny_lcm_pipeline,
                "xl-base": save_tiny_xl_pipeline,
                "xl-refiner": save_tiny_xl_refiner,
                "xl-inpaint": save_tiny_xl_inpaint_pipeline,
                "sd3": save_tiny_sd3_pipeline,
                "flux-dev": lambda path: save_tiny_flux_pipeline(path, variant="dev"),
                "flux-schnell": lambda path: save_tiny_flux_pipeline(path, variant="schnell"),
            }
            checkpoint = makers[name](self._root / "checkpoints" / name)
            self._folders[name] = export_pipeline(checkpoint, self._root / "exported" / name, log=lambda m: None)
        return self._folders[name]

    def checkpoint(self, name: str) -> Path:
        """The diffusers checkpoint a folder was exported from (not for "sd1"/"sd2": see the checkpoints fixture)."""
        self[name]
        return self._root / "checkpoints" / name


@pytest.fixture(scope="session")
def tiny(sd_exported, tmp_path_factory) -> TinyFolders:
    return TinyFolders(sd_exported, tmp_path_factory.mktemp("tiny"))
