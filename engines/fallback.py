"""NaN-safe engines: re-run a call in fp32 when the fp16 network's output is not finite.

fp16 VAE decoders overflow on some models (SD 1.x/2.x/XL VAEs have activations past fp16's
65504) and return NaN/Inf, which becomes a black image. `FiniteOrFallback` runs the fast engine,
checks every output, and when one holds NaN/Inf it warns and re-runs that same call with a second
engine (the fp32 network, created on first need), never returning the bad output silently.

`sdrt optimize --precision fp16` keeps an fp32 decoder beside the fp16 one and records it in
sdrt.json under "fallbacks"; `fallback_file` finds it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from sdrt.engines.base import Engine

FALLBACKS_KEY = "fallbacks"  # sdrt.json: {component: {"path": "vae_decoder_fp32/model.onnx", "precision": "fp32"}}


class NonFiniteOutputWarning(RuntimeWarning):
    """An engine returned NaN/Inf and the call was re-run with the fallback engine."""


def fallback_file(folder: str | Path, manifest: Mapping | None, component: str) -> Path | None:
    """The fp32 ONNX file recorded for `component` in the folder's sdrt.json, if there is one."""
    record = ((manifest or {}).get(FALLBACKS_KEY) or {}).get(component)
    if not record:
        return None
    path = Path(folder) / record["path"]
    return path if path.is_file() else None


def all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in outputs.values() if np.issubdtype(np.asarray(a).dtype, np.floating))


class FiniteOrFallback(Engine):
    """`primary`, re-run with the engine `make_fallback()` returns whenever an output is not finite."""

    def __init__(self, primary: Engine, make_fallback: Callable[[], Engine], name: str = "engine",
                 reason: str = "fp16 overflow"):
        self.primary = primary
        self.spec = primary.spec
        self.name = name
        self.reason = reason
        self._make_fallback = make_fallback
        self.fallback: Engine | None = None
        self.fallback_runs = 0  # how many calls were re-run

    @property
    def loaded(self) -> bool:
        return self.primary.loaded

    @property
    def input_dtypes(self):
        return self.primary.input_dtypes

    @property
    def output_names(self):
        return self.primary.output_names

    @property
    def provider_name(self) -> str:
        return self.primary.provider_name

    def load(self) -> None:
        self.primary.load()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.primary.run(feed)
        if all_finite(outputs):
            return outputs
        warnings.warn(f"{self.name} returned NaN/Inf (likely {self.reason}); re-running this call with the fp32 "
                      "network", NonFiniteOutputWarning, stacklevel=2)
        if self.fallback is None:
            self.fallback = self._make_fallback()
        self.fallback_runs += 1
        return self.fallback.run(feed)

    def release(self) -> None:
        self.primary.release()
        if self.fallback is not None:
            self.fallback.release()
