"""The export's copy of a checkpoint's T5 tokenizer folder (SD3's tokenizer_3, Flux's tokenizer_2).

The runtime reads T5 tokenizers from tokenizer.json only (sdrt.runtime.tokenizer_t5). Checkpoints that ship
spiece.model alone get one written by transformers, which needs sentencepiece and protobuf to read
SentencePiece's file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sdrt.export.errors import ExportError, MissingExtraError

SENTENCEPIECE_HINT = "pip install sentencepiece protobuf"


def copy_t5_tokenizer(src_dir, dst_dir) -> Path:
    """Copy the T5 tokenizer folder src_dir to dst_dir, writing tokenizer.json there if src_dir lacks one.

    Nothing is written to dst_dir when src_dir's spiece.model cannot be converted."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise ExportError(f"T5 tokenizer folder {src} does not exist")
    converted = None
    if not (src / "tokenizer.json").is_file():
        if not (src / "spiece.model").is_file():
            raise ExportError(f"T5 tokenizer folder {src} has neither tokenizer.json nor spiece.model")
        converted = _convert_spiece_model(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    if converted is not None:
        converted.save_pretrained(str(dst))  # tokenizer.json, and the configs as transformers writes them
        if not (dst / "tokenizer.json").is_file():
            raise ExportError(f"transformers saved no tokenizer.json for {src}; {SENTENCEPIECE_HINT} and re-export")
    return dst


def _convert_spiece_model(src: Path):
    """transformers' T5TokenizerFast read from src's spiece.model (SentencePiece's file)."""
    try:
        from transformers import T5TokenizerFast
    except ImportError as error:
        raise MissingExtraError(
            f"{src} has spiece.model but no tokenizer.json; writing one needs transformers: pip install 'sdrt[export]'"
        ) from error
    missing = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
    if missing:
        raise ExportError(
            f"{src} has spiece.model but no tokenizer.json, and converting SentencePiece's file needs "
            f"{' and '.join(missing)} (not installed): {SENTENCEPIECE_HINT}"
        )
    try:
        return T5TokenizerFast.from_pretrained(str(src))
    except Exception as error:  # transformers raises many kinds when a converter's backend is missing
        raise ExportError(
            f"cannot convert {src / 'spiece.model'} to tokenizer.json with transformers ({error}); "
            f"it needs sentencepiece and protobuf: {SENTENCEPIECE_HINT}"
        ) from error


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
