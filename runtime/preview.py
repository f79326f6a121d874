"""Live previews: a per-step callback that decodes the current latents with the tiny VAE (TAESD).

    preview = TaesdPreview(pipe, lambda step, images: show(images[0]), every=2)
    pipe(prompt, callback=preview)

TAESD decodes a 512 px image in a few milliseconds where the full VAE takes most of a second, so a
preview every step costs little. The latents of an unfinished run still hold noise, so early
previews look noisy; the last one is the final image as TAESD sees it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from sdrt.runtime import image as imageio
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.vae import select_vae


class TaesdPreview:
    """Callback(step, timestep, latents) for the pipelines' `callback=`: every `every` steps, calls
    `on_image(step, images)` with the latents decoded by the tiny VAE (uint8 NHWC). Returning False
    from on_image cancels the run, as a plain callback's False does."""

    def __init__(self, pipe, on_image: Callable[[int, np.ndarray], Any], every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInputError(f"every must be an integer >= 1, got {every!r}")
        choice = select_vae(pipe.folder, "taesd")  # ModelFolderError, naming export-taesd, when there is none
        self.config = choice.config
        self._owned = pipe.vae_choice.name != "taesd"
        self.engine = pipe._engine(choice.decoder) if self._owned else pipe.vae_decoder
        self.on_image = on_image
        self.every = every

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (as the UNet sees them) -> uint8 NHWC images, one decode per image."""
        scaled = latents / np.float32(self.config.scaling_factor) + np.float32(self.config.shift_factor)
        decoded = np.concatenate([self.engine.run({"latent_sample": scaled[k:k + 1]})["sample"]
                                  for k in range(len(scaled))])
        return imageio.to_uint8(np.nan_to_num(decoded))

    def __call__(self, step: int, timestep: float, latents: np.ndarray):
        if (step + 1) % self.every:
            return None
        return self.on_image(step, self.decode(latents))

    def release(self) -> None:
        """Unload the tiny decoder if this preview loaded it (not when the pipeline decodes with it too)."""
        if self._owned:
            self.engine.release()
