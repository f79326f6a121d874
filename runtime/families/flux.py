"""Flux.1 (dev and schnell), as diffusers' FluxPipeline conditions it.

- CLIP-L's pooled output of `prompt` (77 tokens) as `pooled_projections`; T5-XXL's last hidden state of
  `prompt_2` (default the prompt) at max_sequence_length (512) tokens as `encoder_hidden_states`;
- latents packed 2x2 into tokens with their positions, and the timestep / 1000: the transformer's feed
  (sdrt.runtime.core.transformer), so that the loop keeps NCHW latents;
- "dev" (a transformer with guidance_embeds) takes `guidance_scale` as an input (distilled guidance, default 3.5);
  "schnell" has none, and refuses a guidance_scale given to it;
- no classifier-free guidance by default: "true CFG" runs when true_cfg_scale > 1 and a negative prompt is given,
  as diffusers (negatives first in one batch here, two calls there: the same arithmetic);
- the schedule: sigmas linspace(1, 1/n, n), shifted by mu from the image token count when the scheduler shifts
  dynamically (dev), as FluxPipeline.
"""

from __future__ import annotations

import time

import numpy as np

from sdrt.runtime.core.request import texts
from sdrt.runtime.core.transformer import unpack
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.families.dit import FlowFamily, check_sequence_length, t5_embeds

FAMILY = "flux"


class PackedDraws:
    """A generator whose draws of NCHW latents' shape come in Flux's packed layout: FluxPipeline's loop holds packed
    latents, so a solver's noise (SDE steps, stochastic sampling) is drawn (B, H/2 * W/2, 4C) there; drawn so and
    unpacked here, the same numbers land on the same latents. Other draws (and attributes) are the generator's."""

    def __init__(self, generator):
        self._generator = generator

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def randn(self, shape, *args, **kwargs):
        if len(shape) == 4 and shape[2] % 2 == 0 and shape[3] % 2 == 0:
            b, c, h, w = shape
            tokens = self._generator.randn((b, (h // 2) * (w // 2), 4 * c), *args, **kwargs)
            return unpack(np.asarray(tokens), h, w)
        return self._generator.randn(shape, *args, **kwargs)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale


class Flux(FlowFamily):
    name = FAMILY
    default_sequence_length = 512
    sigmas_from_pipeline = True

    def __init__(self, folder):
        super().__init__(folder)
        self.distilled_guidance = bool(folder.unet_config.get("guidance_embeds", False))

    @property
    def variant(self) -> str:
        return "dev" if self.distilled_guidance else "schnell"

    def image_tokens(self, height: int, width: int) -> int:
        f = self.folder.vae.scale_factor
        return (height // f // 2) * (width // f // 2)

    def step_generator(self, generator):
        return PackedDraws(generator)

    def guided(self, request) -> bool:
        return request.true_cfg_scale > 1.0 and request.negative_prompt is not None

    def cfg_scale(self, request) -> float:
        return request.true_cfg_scale

    def check(self, run) -> None:
        request = run.request
        self.check_flow_scheduler(run)
        check_sequence_length(request.max_sequence_length, "Flux")
        for name in ("prompt_2", "negative_prompt_2"):
            texts(name, getattr(request, name), len(request.prompt))
        if request.prompt_3 is not None or request.negative_prompt_3 is not None:
            raise InvalidInputError("Flux has two text encoders (CLIP: prompt, T5: prompt_2); prompt_3 and "
                                    "negative_prompt_3 are SD3's: leave them out")
        if not self.distilled_guidance and request.guidance_given:
            raise InvalidInputError(
                f"{self.folder.path} is a Flux schnell-type model: its transformer takes no guidance (no "
                "guidance_embeds), so guidance_scale would do nothing; leave it out (for classifier-free guidance give "
                "true_cfg_scale > 1 and a negative prompt)")
        if request.negative_prompt_2 is not None and request.negative_prompt is None:
            raise InvalidInputError("negative_prompt_2 needs negative_prompt (true CFG runs with a negative prompt)")
        if request.negative_prompt is not None and request.true_cfg_scale <= 1.0:
            raise InvalidInputError(
                "Flux takes a negative prompt only with true classifier-free guidance: give true_cfg_scale > 1 "
                f"(got {request.true_cfg_scale}), or leave negative_prompt out")
        for name, value in (("guidance_rescale", request.guidance_rescale), ("clip_skip", request.clip_skip)):
            if value:
                raise InvalidInputError(f"Flux has no {name} (diffusers' FluxPipeline has none); drop it")
        if request.micro_conditioning:
            raise InvalidInputError(f"unknown arguments {sorted(request.micro_conditioning)} for Flux")

    def conditioning(self, run) -> dict:
        t0 = time.perf_counter()
        request, models = run.request, run.models
        prompts, prompts_2 = self.encoder_texts(run, 2)
        pooled = models.text_encoder.run({"input_ids": models.tokenizer(prompts)})["pooler_output"]
        models.stage_done(models.text_encoder)
        embeds = t5_embeds(models, "text_encoder_2", "tokenizer_2", prompts_2, self.sequence_length(request))
        models.stage_done(models.text_encoder_2)
        repeat = request.num_images_per_prompt
        conditioning = {"encoder_hidden_states": np.repeat(embeds, repeat, axis=0),
                        "pooled_projections": np.repeat(pooled, repeat, axis=0)}
        if self.distilled_guidance:
            rows = len(conditioning["pooled_projections"])
            conditioning["guidance"] = np.full((rows,), request.guidance_scale, dtype=np.float32)
        run.timings["text_encoder"] = time.perf_counter() - t0
        return conditioning
