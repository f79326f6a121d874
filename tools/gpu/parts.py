"""Carry-sized parts of a big file, checked by sha256, and the kit's manifest and carry budget.

The `run` tool carries the working tree plus up to 8 ignored folders, 64 MiB in all per call, so
the onnxruntime-gpu wheel (~256 MB) travels as equal parts in folders .gpu1/ .gpu2/ ..., one per
call, and the small wheels in .gpu0/. Every carried folder holds a copy of the manifest, so the
device can check each part on arrival and tell which are still missing.

Standard library only: the device runs this before sdrt (or anything else) is installed there.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Iterable

MiB = 1 << 20
CARRY_LIMIT = 64 * MiB  # the working tree plus every carried path, per `run` call
PART_CAP = 57 * MiB  # the largest part: under 60 MB
MARGIN = 1 * MiB  # kept free under CARRY_LIMIT (the tree grows between prepare and the calls)
MANIFEST = "manifest.json"
KIT_VERSION = 1
SMALL_FOLDER = ".gpu0"  # the small wheels
CHUNK = 1 << 20


class KitError(Exception):
    """The GPU kit cannot go on; the message says what was wrong and what to do."""


def part_folder(index: int) -> str:
    """The carried folder of part `index` (1-based)."""
    return f".gpu{index}"


def sha256_file(path: str | os.PathLike) -> str:
    return sha256_stream([Path(path)])


def sha256_stream(paths: Iterable[Path]) -> str:
    """The sha256 of the files' concatenation, read in chunks (what `cat` of them would hash to)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def plan_parts(size: int, cap: int) -> tuple[int, int]:
    """(count, part size): the fewest parts of at most `cap` bytes, as equal as whole bytes allow."""
    if size <= 0:
        raise KitError(f"nothing to split: the file is {size} bytes")
    if cap <= 0:
        raise KitError(f"no room for a part: the part size cap is {cap} bytes (the working tree is too large; "
                       "see the carry budget printed by prepare.py)")
    count = math.ceil(size / cap)
    return count, math.ceil(size / count)


def part_cap(tree_bytes: int, small_bytes: int, cap: int = PART_CAP) -> int:
    """The largest part that still fits one call beside the working tree and the small wheels (.gpu0 travels
    with part 1)."""
    return min(cap, CARRY_LIMIT - MARGIN - tree_bytes - small_bytes)


def split_file(src: Path, root: Path, part_size: int) -> list[dict]:
    """Split `src` into .gpu1/, .gpu2/, ... under `root`; returns each part's record (folder, file, size, sha256)."""
    src, records = Path(src), []
    with open(src, "rb") as f:
        index = 0
        while block := f.read(part_size):
            index += 1
            folder = root / part_folder(index)
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.part*"):
                old.unlink()
            path = folder / f"{src.name}.part{index:02d}"
            path.write_bytes(block)
            records.append({"index": index, "folder": folder.name, "file": path.name, "size": len(block),
                            "sha256": hashlib.sha256(block).hexdigest()})
    return records


def join_parts(parts: list[Path], dest: Path, expected_sha256: str) -> Path:
    """`cat parts > dest`, through a temporary file that becomes `dest` only when its sha256 is the expected one."""
    dest = Path(dest)
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise KitError(f"cannot join {dest.name}: missing parts {missing}; carry their folders again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(CHUNK):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != expected_sha256:
            raise KitError(f"the joined {dest.name} has sha256 {h.hexdigest()}, not {expected_sha256}: a part is "
                           "damaged or from another kit; carry every part folder again")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KitError(f"{path} is not valid JSON ({e}); re-run tools/gpu/prepare.py and carry it again") from e
    if manifest.get("kit_version") != KIT_VERSION:
        raise KitError(f"{path} is kit version {manifest.get('kit_version')}, this code reads {KIT_VERSION}: "
                       "re-run tools/gpu/prepare.py with this checkout")
    return manifest


# -- what travels: the working tree's size -----------------------------------------------------------

def ignore_patterns(root: Path) -> list[str]:
    """The root .gitignore's and .git/info/exclude's patterns (negations are left out: see tree_bytes)."""
    lines = []
    for path in (root / ".gitignore", root / ".git" / "info" / "exclude"):
        if path.is_file():
            lines += path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]


def is_ignored(rel: str, is_dir: bool, patterns: list[str]) -> bool:
    """gitignore's matching for the common forms: name, *.glob, /anchored, dir/ (no negation, no **)."""
    name = rel.rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/") and not is_dir:
            continue
        body = pattern.rstrip("/")
        if "/" in body:
            if fnmatch.fnmatch(rel, body.lstrip("/")):
                return True
        elif fnmatch.fnmatch(name, body):
            return True
    return False


def tree_bytes(root: Path) -> int:
    """About what `run` sends besides the carried paths: every file that git does not ignore (tracked or not).

    An estimate without git: the root ignore files' common pattern forms, nested .gitignore files
    and negations not read; a force-added ignored file is missed."""
    root, patterns, total = Path(root), ignore_patterns(Path(root)), 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if d != ".git" and not is_ignored(rel_dir + d, True, patterns)]
        for name in filenames:
            if not is_ignored(rel_dir + name, False, patterns):
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def copy_package_sources(root: Path, dest: Path) -> Path:
    """pyproject.toml, the readme and the folders its package-dir maps, copied to `dest` for a clean build
    (building in the checkout would leave build/ behind, whose stale files setuptools puts in later wheels)."""
    root, dest = Path(root), Path(dest)
    config = tomllib.loads((root / "pyproject.toml").read_text())
    folders = {value.split("/")[0] for value in config["tool"]["setuptools"]["package-dir"].values()}
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["pyproject.toml", config["project"].get("readme", "README.md")]:
        shutil.copy2(root / name, dest / name)
    for folder in sorted(folders):
        shutil.copytree(root / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest
