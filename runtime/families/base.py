"""Family: what a model family needs to turn a Request into the denoiser's conditioning.

To add a family (SD3, Flux, ...): subclass Family in a new file of this package, set `name` (the folder's
family, sdrt.runtime.config.PIPELINES) and implement `conditioning`; add one line to FAMILIES in
sdrt.runtime.families. Override `check` for the family's own arguments (checked before any engine runs),
`guided` for distilled guidance, and `latent_shape` for packed latents.
"""

from __future__ import annotations

from sdrt.runtime.config import ModelFolder


class Family:
    name = ""
    strength_in_schedule = False  # img2img builds the schedule for strength (LCM) instead of cutting it
    resizes_pictures = False  # img2img makes the picture height x width (default the model's size), as SD3 and Flux

    def __init__(self, folder: ModelFolder):
        self.folder = folder

    def check(self, run) -> None:
        """Refuse the request's family-specific arguments (InvalidInputError) before any engine runs."""

    def guided(self, request) -> bool:
        """Whether the run uses classifier-free guidance (two halves per step)."""
        return request.guidance_scale > 1.0

    def cfg_scale(self, request) -> float:
        """The classifier-free guidance scale (Flux: true_cfg_scale; its guidance_scale is distilled)."""
        return request.guidance_scale

    def schedule_options(self, run) -> dict:
        """Options for the scheduler's plan beyond the steps (the flow families' sigmas= and mu=)."""
        return {}

    def text_tokens(self, request) -> int:
        """Text tokens the denoiser attends to per image (the memory estimate)."""
        return 77

    def step_generator(self, generator):
        """The generator the solver's steps draw from (sdrt.runtime.families.flux draws them packed, as diffusers)."""
        return generator

    def conditioning(self, run) -> dict:
        """The denoiser's inputs that stay constant over the steps: encoder_hidden_states and any others, batched
        as the latents are (request.batch rows; with guidance, the negatives' rows first, then the prompts')."""
        raise NotImplementedError

    def negatives(self, request) -> list[str]:
        return list(request.negative_prompt or ("",) * len(request.prompt))
