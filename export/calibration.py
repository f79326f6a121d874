"""Real inputs for int8 quantization: the feeds the runtime pipeline gives its networks, recorded.

Static quantization needs the range of every activation, and validation of an int8 network means
little on random inputs (CLIP's hidden states have a few channels two orders of magnitude larger
than the rest; random normals have none). So both come from real pipeline runs of the folder
itself: `record_feeds` wraps the pipeline's engines in a `RecordingEngine` that keeps a copy of
each feed, and runs prompts through it (output_type="latent": the VAE is not needed). No torch.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from sdrt.engines.base import Engine
from sdrt.export.errors import ExportError

# Generic prompts for calibration when the caller gives none: varied subjects, colours and layouts.
DEFAULT_PROMPTS = (
    "a red circle in the top left on a blue background",
    "a photograph of an astronaut riding a horse",
    "a green square in the centre on a white background",
    "a watercolor painting of a lighthouse at sunset",
    "a yellow triangle in the bottom right on a black background",
    "a close-up portrait of an old man, studio lighting",
    "a blue circle in the bottom left on a yellow background",
    "a city street at night in the rain, neon signs",
    "a white square in the top right on a red background",
    "a bowl of fruit on a wooden table, oil painting",
    "a purple triangle in the centre on a green background",
    "a snowy mountain landscape under a clear sky",
    "an orange circle in the top right on a grey background",
    "a cat sleeping on a sofa, soft light",
    "a black square in the bottom left on an orange background",
    "a futuristic car, concept art, highly detailed",
)


class CalibrationError(ExportError):
    """No usable calibration data: zero prompts or samples, or feeds that do not fit the network."""


class RecordingEngine(Engine):
    """An engine that keeps a copy of every feed it runs, then runs it with the wrapped engine."""

    def __init__(self, engine: Engine, feeds: list):
        self.engine = engine
        self.spec = engine.spec
        self.feeds = feeds

    @property
    def loaded(self) -> bool:
        return self.engine.loaded

    @property
    def input_dtypes(self):
        return self.engine.input_dtypes

    @property
    def output_names(self):
        return self.engine.output_names

    def load(self) -> None:
        self.engine.load()

    def release(self) -> None:
        self.engine.release()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value, copy=True) for name, value in feed.items()})
        return self.engine.run(feed)


def record_feeds(folder, prompts: Sequence[str], components: Sequence[str] = ("text_encoder", "unet"),
                 steps: int = 4, guidance_scale: float = 7.5, first_seed: int = 0,
                 size: int | None = None) -> dict[str, list[dict]]:
    """Run each prompt (seed first_seed + k) through the folder's pipeline; return each component's feeds."""
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    prompts = list(prompts)
    if not prompts:
        raise CalibrationError("calibration needs at least one prompt (got zero); pass --calibration-prompts N >= 1")
    if steps < 1:
        raise CalibrationError(f"calibration needs at least one denoising step per prompt, got {steps}")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    records: dict[str, list[dict]] = {name: [] for name in components}
    try:
        for name in components:
            setattr(pipe, name, RecordingEngine(getattr(pipe, name), records[name]))
        for k, prompt in enumerate(prompts):
            pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, seed=first_seed + k,
                 height=size, width=size, output_type="latent")
    finally:
        pipe.release()
    return records


class FeedReader:
    """onnxruntime's CalibrationDataReader over recorded feeds (duck-typed: get_next and rewind)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]):
        if not feeds:
            raise CalibrationError("static quantization needs at least one calibration sample, got zero; "
                                   "record some with more calibration prompts, or use mode='dynamic'")
        missing = sorted(set(input_names) - set(feeds[0]))
        if missing:
            raise CalibrationError(f"calibration feeds lack the network's inputs {missing}")
        self.feeds = [{name: np.ascontiguousarray(feed[name]) for name in input_names} for feed in feeds]
        self._iter: Iterator = iter(self.feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)
