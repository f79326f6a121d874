"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden states as the UNet's conditioning."""

from __future__ import annotations

import time

import numpy as np

from sdrt.runtime import prompts as weighted
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.families.base import Family


class StableDiffusion(Family):
    name = "stable-diffusion"

    def check(self, run) -> None:
        if run.request.clip_skip is not None:
            raise InvalidInputError(
                "clip_skip is not supported for SD 1.x / 2.x folders yet: it needs an earlier layer of the text "
                "encoder through its final layer norm, which sdrt export does not write yet (SDXL folders take it); "
                "leave clip_skip out"
            )

    def encode_prompt(self, models, prompts, emphasis: str = "none") -> np.ndarray:
        """The last hidden states (N, 77 x chunks, D): of the literal prompts cut at 77 tokens (emphasis "none", as
        diffusers), or of A1111's weighted chunks (sdrt.runtime.prompts)."""
        if emphasis == "none":
            ids = models.tokenizer(list(prompts))
            return models.text_encoder.run({"input_ids": ids})["last_hidden_state"]
        run = lambda ids: models.text_encoder.run({"input_ids": ids})  # noqa: E731
        return weighted.encode(models.tokenizer, run, list(prompts), ("last_hidden_state",))[0][0]

    def conditioning(self, run) -> dict:
        """Negatives and prompts in one text-encoder batch (negatives only with guidance), each repeated per image."""
        t0 = time.perf_counter()
        request, models = run.request, run.models
        prompts = list(request.prompt)
        embeds = self.encode_prompt(models, self.negatives(request) + prompts if run.guidance.enabled else prompts,
                                    run.emphasis)
        models.stage_done(models.text_encoder)
        embeds = np.repeat(embeds, request.num_images_per_prompt, axis=0)
        run.timings["text_encoder"] = time.perf_counter() - t0
        return {"encoder_hidden_states": embeds, **self.constant_inputs(run)}

    def constant_inputs(self, run) -> dict:
        """The UNet's other inputs, constant over the steps (none for SD; LCM's guidance embedding)."""
        return {}
