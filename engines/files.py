"""File helpers shared by the exporter and the runtime: hashes and atomic writes."""

from __future__ import annotations

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


HASH_CACHE = "hashes.json"  # in the cache folder (engines.cache): path -> [size, mtime_ns, sha256]


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256_file, remembered per (path, size, mtime) in the cache folder, so that a full check of a folder costs
    once per file change. A cache that cannot be read or written is ignored (the hash is computed)."""
    from sdrt.engines.cache import default_cache_dir

    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    store = default_cache_dir() / HASH_CACHE
    try:
        table = json.loads(store.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp and isinstance(entry[2], str):
        return entry[2]
    digest = sha256_file(path)
    table[key] = [*stamp, digest]
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store, table)
    except OSError:
        pass
    return digest


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


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a model whose external data lies outside its folder (an absolute path, `..`, a symlink out):
    checked by sdrt before a session is made, whatever onnxruntime version checks it too."""
    from sdrt.engines.errors import EngineError

    path = Path(path)
    folder = path.resolve().parent
    for location in sorted(external_data_locations(path)):
        target = (folder / location).resolve()
        if Path(location).is_absolute() or ".." in Path(location).parts or folder not in target.parents:
            raise EngineError(f"{path} keeps its weights outside its folder ({location!r} -> {target}); refusing "
                              "to load it: re-export the model, or move the data file beside model.onnx")
