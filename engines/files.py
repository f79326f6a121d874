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
