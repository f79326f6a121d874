"""Step caching (DeepCache, Ma et al. 2024): reuse the UNet's deep features for `cache_interval - 1` steps.

A full step runs the whole UNet (`unet/model_deepcache.onnx`, which also returns `deep_feature`: what enters the
last up block); the next `cache_interval - 1` steps run only the shallow branch (`unet/model_shallow.onnx`: time
embedding, conv_in, the first down block, the last up block on the cached feature), uniformly as DeepCache's
default schedule: full at steps 0, N, 2N, .... `sdrt deepcache FOLDER` (sdrt.export.deepcache) writes the two
graphs. The cache lives in the denoise loop, per UNet call layout (the guidance halves a call holds), so it works
with every engine and every guidance mode; a call whose layout has no fresh feature runs in full.
"""

from __future__ import annotations

import numpy as np

from sdrt.engines import create_engine
from sdrt.engines.spec import LATENT_HEIGHT, LATENT_WIDTH, BATCH, NetworkSpec, TensorSpec
from sdrt.runtime.errors import InvalidInputError, ModelFolderError

FEATURE = "deep_feature"
MANIFEST_KEY = "deepcache"


def check_interval(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"cache_interval must be an integer >= 1 (1: no step caching), got {value!r}")
    return int(value)


def specs(unet: NetworkSpec, channels: int) -> tuple[NetworkSpec, NetworkSpec]:
    """(the full graph's spec: the UNet's + the feature output, the shallow graph's: the UNet's inputs + the feature)."""
    feature = TensorSpec(FEATURE, "float32", (BATCH, channels, LATENT_HEIGHT, LATENT_WIDTH))
    full = NetworkSpec(unet.name, unet.inputs, unet.outputs + (feature,), unet.vae_scale_factor)
    shallow = NetworkSpec(unet.name, unet.inputs + (feature,), unet.outputs, unet.vae_scale_factor)
    return full, shallow


def require_graphs(folder) -> dict:
    """The folder's step-caching record; ModelFolderError saying how to write the graphs when it has none."""
    record = (folder.manifest or {}).get(MANIFEST_KEY)
    if not record:
        raise ModelFolderError(
            f"{folder.path} has no step-caching graphs; write them with `sdrt deepcache {folder.path}` (needs "
            "onnx, from sdrt[export] or sdrt[lora]), or run with cache_interval=1")
    return record


class StepCache:
    """The two engines and the cached feature of each call layout, for one model folder's UNet."""

    def __init__(self, models, interval: int):
        self.interval = check_interval(interval)
        folder = models.folder
        record = require_graphs(folder)
        paths = [folder.path / record["full"], folder.path / record["shallow"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ModelFolderError(f"sdrt.json records step-caching graphs that are missing: {missing}; run "
                                   f"`sdrt deepcache {folder.path}` again")
        full_spec, shallow_spec = specs(folder.spec("unet"), int(record["feature_channels"]))
        options = models.engine_options
        self.full = create_engine(paths[0], full_spec, provider=models.provider, **options)
        self.shallow = create_engine(paths[1], shallow_spec, provider=models.provider, **options)
        self.features: dict = {}  # call layout (the halves it holds) -> (step of the full call, feature)
        self.shallow_calls = self.full_calls = 0

    def reset(self) -> None:
        self.features.clear()
        self.shallow_calls = self.full_calls = 0

    def run(self, i: int, layout: tuple, feed: dict) -> np.ndarray:
        """out_sample of step i for this call: the full UNet on cache steps, else the shallow branch."""
        cached = self.features.get(layout)
        if i % self.interval == 0 or cached is None or cached.shape[0] != len(feed["sample"]):
            outputs = self.full.run(feed)
            self.features[layout] = outputs[FEATURE]
            self.full_calls += 1
            return outputs["out_sample"]
        self.shallow_calls += 1
        return self.shallow.run({**feed, FEATURE: cached})["out_sample"]

    def engines(self) -> tuple:
        return self.full, self.shallow

    def release(self) -> None:
        self.features.clear()
        for engine in self.engines():
            engine.release()


def step_cache(models, interval: int) -> StepCache | None:
    """The models' StepCache for this interval (made once, kept on the models), or None for interval 1."""
    interval = check_interval(interval)
    if interval == 1:
        return None
    cache = getattr(models, "_step_cache", None)
    if cache is None:
        cache = StepCache(models, interval)
        models._step_cache = cache
    cache.interval = interval
    cache.reset()
    return cache
