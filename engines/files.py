"""File helpers shared by the exporter and the runtime: hashes and atomic writes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

MANIFEST = "sdrt.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


HASH_CACHE = "hashes.json"  # in the cache folder (engines.cache): path -> {stamp, sha256}


def memo_sha256(path: str | os.PathLike, files: list | None = None, cache_dir: str | os.PathLike | None = None,
                compute=None) -> str:
    """A file's sha256 (or `compute(files)` over several), remembered under `path` with every file's (size,
    mtime) in the cache folder, so that checking it again costs nothing until a file changes. A cache that
    cannot be read or written only costs a re-hash."""
    from sdrt.engines.cache import default_cache_dir

    path = Path(path).resolve()
    files = files or [path]
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    store = Path(cache_dir or default_cache_dir()) / HASH_CACHE
    try:
        memo = json.loads(store.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = compute(files) if compute is not None else sha256_file(files[0])
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store, memo)
    except OSError:
        pass
    return digest


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256_file of one file, remembered per (path, size, mtime) (memo_sha256)."""
    return memo_sha256(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# An ONNX tensor's external data names its file as a StringStringEntryProto {key: "location", value: PATH}:
# field 1 (tag 0x0a) "location" (8 bytes), then field 2 (tag 0x12), a varint length and the path.
_LOCATION = b"\x0a\x08location\x12"


def external_data_locations(path: str | os.PathLike) -> set[str]:
    """The external-data file names an .onnx file refers to, read from its bytes without parsing the model
    (the runtime has no onnx dependency); weights stored inside the file are skipped over by the search."""
    import mmap

    found = set()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(_LOCATION)
            while at >= 0:
                i, length, shift = at + len(_LOCATION), 0, 0
                while i < len(data) and shift < 35:  # the varint length of the path
                    byte = data[i]
                    length |= (byte & 0x7F) << shift
                    i, shift = i + 1, shift + 7
                    if not byte & 0x80:
                        break
                if 0 < length <= 4096 and i + length <= len(data):
                    found.add(bytes(data[i:i + length]).decode("utf-8", "replace"))
                at = data.find(_LOCATION, at + 1)
    return found


@functools.lru_cache(maxsize=64)
def _locations(path: str, size: int, mtime_ns: int) -> frozenset:
    return frozenset(external_data_locations(path))


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a model whose external data lies outside its folder (an absolute path, `..`, a symlink out):
    checked by sdrt before a session is made, whatever onnxruntime version checks it too. The file is scanned
    once per (path, size, mtime) in a process (low-memory mode reloads sessions every generation); the targets
    are resolved every time (a symlink may change)."""
    from sdrt.engines.errors import EngineError

    path = Path(path)
    folder = path.resolve().parent
    st = path.stat()
    for location in sorted(_locations(str(path.resolve()), st.st_size, st.st_mtime_ns)):
        target = (folder / location).resolve()
        if Path(location).is_absolute() or ".." in Path(location).parts or folder not in target.parents:
            raise EngineError(f"{path} keeps its weights outside its folder ({location!r} -> {target}); refusing "
                              "to load it: re-export the model, or move the data file beside model.onnx")
