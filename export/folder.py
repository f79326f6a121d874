"""The exported folder: optimum's layout plus sdrt.json, built in a temporary folder and renamed into
place only when every component has passed validation."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

from sdrt.engines.files import MANIFEST, atomic_write_json, sha256_file
from sdrt.export.errors import ExportError, OutputExistsError

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


@contextlib.contextmanager
def staging(out: Path, force: bool):
    """Yield a temporary folder beside `out`; on success move it to `out`, on failure delete it."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a tokenizer folder, making sure vocab.json and merges.txt sit beside tokenizer.json
    (transformers 5 writes only tokenizer.json; transformers 4 and our runtime read the pair)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    if not (dst / "vocab.json").is_file() or not (dst / "merges.txt").is_file():
        fast = dst / "tokenizer.json"
        if not fast.is_file():
            raise ExportError(f"{src} has neither vocab.json/merges.txt nor tokenizer.json")
        model = json.loads(fast.read_text())["model"]
        if model.get("type") != "BPE":
            raise ExportError(f"{fast}: expected a BPE tokenizer, found {model.get('type')}")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (dst / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if not (dst / "special_tokens_map.json").is_file():
        config = json.loads((dst / "tokenizer_config.json").read_text()) if (dst / "tokenizer_config.json").is_file() else {}
        specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
        (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def file_table(root: Path) -> dict:
    """sha256 and size of every file under root (except the manifest itself)."""
    table = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            table[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    return table


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = dict(manifest, files=file_table(root))
    atomic_write_json(root / MANIFEST, manifest)


PROTOBUF_LIMIT = 2**31 - 2**26  # an .onnx file holds at most 2 GB; keep a margin for the graph itself
# Weights past this many bytes go to model.onnx_data even below protobuf's limit: onnxruntime then maps them
# from the file instead of parsing them into a buffer and copying them out (which, freed or not, stays in the
# process). The SD1.5 int8 UNet (887 MB): 957 MiB RSS after load against 1,466 MiB as one file, call peak
# 1,435 against 1,654 MiB (bench/results/external-data-2026-12-06.md).
EXTERNAL_DATA_BYTES = 64 * 2**20


def save_model(model, dst: Path) -> None:
    """Save an onnx.ModelProto at dst; past EXTERNAL_DATA_BYTES of weights (and always past protobuf's 2 GB),
    its weights go to dst + "_data" (optimum's model.onnx_data), as the export writes SD 1.5's UNet."""
    import onnx

    weights = sum(t.ByteSize() for t in model.graph.initializer)  # ModelProto.ByteSize fails past 2 GB
    if weights < min(PROTOBUF_LIMIT, EXTERNAL_DATA_BYTES):
        onnx.save_model(model, str(dst))
    else:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + "_data", size_threshold=1024)
