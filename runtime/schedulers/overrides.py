"""Scheduler options given on the command line (`--scheduler-config FILE.json`, `--scheduler-option KEY=VALUE`),
merged over a folder's scheduler_config.json the way diffusers users edit that file or pass
`Scheduler.from_config(config, key=value)`; checked as the folder's own config is."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers.config import OPTION_NAMES, OTHER_CLASS_OPTIONS

# The keys a scheduler_config.json may hold: sdrt's options under diffusers' names, and other classes' options.
KNOWN_KEYS = frozenset(OPTION_NAMES) | OTHER_CLASS_OPTIONS | {"_class_name", "_diffusers_version"}
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE -> (key, value): VALUE as JSON (numbers, true/false/null, lists, "quoted"), True/False/None as
    Python writes them, anything else as a string (trailing, karras...)."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidInputError(f"--scheduler-option takes KEY=VALUE (e.g. timestep_spacing=trailing), got {text!r}")
    if key not in KNOWN_KEYS:
        close = sorted(k for k in KNOWN_KEYS if key.lower().replace("-", "_") in k or k in key.lower())[:5]
        raise InvalidInputError(
            f"--scheduler-option {key}: not a scheduler option sdrt knows"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; known: {', '.join(sorted(OPTION_NAMES))}")
    raw = raw.strip()
    if raw.lower() in _WORDS:
        return key, _WORDS[raw.lower()]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(f"--scheduler-option {key}={raw}: the value must be finite")
    return key, value


def read_config_file(path) -> dict:
    """A scheduler_config.json given with --scheduler-config: a JSON object, refused with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"--scheduler-config {path}: no such file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"--scheduler-config {path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise InvalidInputError(f"--scheduler-config {path} must hold a JSON object (a scheduler_config.json)")
    return config


def merged(base: Mapping[str, Any], config_file=None, options: Iterable[str] = ()) -> dict:
    """The folder's config `base`, replaced by `config_file`'s (when given), then each KEY=VALUE option over it."""
    config = dict(read_config_file(config_file) if config_file is not None else base)
    for text in options:
        key, value = parse_option(text)
        config[key] = value
    return config
