"""Write tests/golden/pipelines.npz: every case of tests/golden_cases.py run with the current runtime.

Run once, before a change that must not alter images (`.venv/bin/python tests/make_golden.py`); the tiny
folders are built as the test session builds them (conftest.TinyFolders).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TinyFolders  # noqa: E402
from golden_cases import CASES, machine, run_case  # noqa: E402


def main() -> None:
    from sdrt.export.api import export_pipeline
    from sdrt.export.fixtures import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exported = {f: export_pipeline(save_tiny_pipeline(root / "ckpt" / f, f), root / "exp" / f, log=lambda m: None)
                    for f in ("sd1", "sd2")}
        folders, outputs = TinyFolders(exported, root / "tiny"), {}
        for name in CASES:
            run_case(name, folders, outputs)
            print(f"{name}: {outputs[name].shape} {outputs[name].dtype}")
    out = Path(__file__).parent / "golden" / "pipelines.npz"
    np.savez_compressed(out, __machine__=np.array(machine()), **outputs)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
