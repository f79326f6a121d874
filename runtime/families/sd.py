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
        self.skipped_output(run.request.clip_skip)

    def skipped_output(self, clip_skip: int | None) -> str:
        """The encoder output the prompts' embeddings come from: the last hidden state, or with clip_skip=N the
        hidden states N layers earlier through the final layer norm (diffusers: hidden_states[-(N + 1)] + norm)."""
        if clip_skip is None:
            return "last_hidden_state"
        layers = sum(name.startswith("normed_hidden_states.") for name in self.folder.spec("text_encoder").output_names)
        if not layers:
            raise InvalidInputError(
                f"clip_skip needs a text encoder that gives its earlier layers through the final norm; "
                f"{self.folder.path} was exported without them (an older sdrt, or optimum): re-export the checkpoint "
                "with sdrt export, or leave clip_skip out")
        if clip_skip > layers:
            raise InvalidInputError(f"clip_skip={clip_skip} goes past the text encoder's first layer: at most {layers}")
        return f"normed_hidden_states.{layers - clip_skip}"

    def encode_prompt(self, models, prompts, emphasis: str = "none", clip_skip: int | None = None,
                      skip_from: int = 0) -> np.ndarray:
        """The last hidden states (N, 77 x chunks, D): of the literal prompts cut at 77 tokens (emphasis "none", as
        diffusers), or of A1111's weighted chunks (sdrt.runtime.prompts). clip_skip: rows from `skip_from` on
        (the prompts, after the negatives) read that many layers earlier, as diffusers' encode_prompt."""
        outputs = ("last_hidden_state", self.skipped_output(clip_skip)) if clip_skip else ("last_hidden_state",)
        if emphasis == "none":
            result = models.text_encoder.run({"input_ids": models.tokenizer(list(prompts))})
            encoded = [result[name] for name in outputs]
        else:
            run = lambda ids: models.text_encoder.run({"input_ids": ids})  # noqa: E731
            encoded = weighted.encode(models.tokenizer, run, list(prompts), outputs)[0]
        if not clip_skip:
            return encoded[0]
        return np.concatenate([encoded[0][:skip_from], encoded[1][skip_from:]])

    def conditioning(self, run) -> dict:
        """Negatives and prompts in one text-encoder batch (negatives only with guidance), each repeated per image."""
        t0 = time.perf_counter()
        request, models = run.request, run.models
        prompts = list(request.prompt)
        negatives = self.negatives(request) if run.guidance.enabled else []
        embeds = self.encode_prompt(models, negatives + prompts, run.emphasis, request.clip_skip, len(negatives))
        models.stage_done(models.text_encoder)
        embeds = np.repeat(embeds, request.num_images_per_prompt, axis=0)
        run.timings["text_encoder"] = time.perf_counter() - t0
        return {"encoder_hidden_states": embeds, **self.constant_inputs(run)}

    def constant_inputs(self, run) -> dict:
        """The UNet's other inputs, constant over the steps (none for SD; LCM's guidance embedding)."""
        return {}
