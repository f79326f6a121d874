"""What the diffusion-transformer families (SD3, Flux) share: T5 embeddings, the flow schedule's options, and the
checks of their arguments.

Their prompts are taken literally, as diffusers takes them (A1111's emphasis syntax is a CLIP-UNet habit; the T5
encoders read the text as written), cut at 77 CLIP tokens and at max_sequence_length T5 tokens.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.core.request import texts
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.families.base import Family
from sdrt.runtime.schedulers.flow import flux_mu

MAX_SEQUENCE_LENGTH = 512  # T5's position buckets go further, but diffusers' SD3 and Flux pipelines refuse more


def check_sequence_length(value, family: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_SEQUENCE_LENGTH:
        raise InvalidInputError(f"max_sequence_length must be an integer in [1, {MAX_SEQUENCE_LENGTH}] (T5 tokens "
                                f"of the prompt {family} reads), got {value!r}")


def t5_embeds(models, encoder: str, tokenizer: str, prompts: list[str], max_length: int) -> np.ndarray:
    """(N, max_length, d_model): T5's last hidden state of the prompts, padded/cut to max_length tokens."""
    ids = getattr(models, tokenizer)(list(prompts), max_length)
    return getattr(models, encoder).run({"input_ids": ids})["last_hidden_state"]


class FlowFamily(Family):
    """A family sampled by a flow-matching scheduler, whose image token count sets the schedule's shift (mu)."""

    default_sequence_length = 256
    resizes_pictures = True  # SD3's and Flux's img2img resize the picture to height x width (default: the model's)
    sigmas_from_pipeline = False  # Flux passes sigmas linspace(1, 1/n, n) to set_timesteps; SD3 passes none

    def image_tokens(self, height: int, width: int) -> int:
        """The transformer's image token count at this size (the mu of dynamic shifting comes from it)."""
        raise NotImplementedError

    def sequence_length(self, request) -> int:
        return request.max_sequence_length or self.default_sequence_length

    def text_tokens(self, request) -> int:
        """Tokens of text the transformer attends to beside the image's (the memory estimate)."""
        return self.sequence_length(request)

    def schedule_options(self, run) -> dict:
        """sigmas= and mu= as the family's pipeline passes them to set_timesteps: mu (from the image token count)
        only when the scheduler shifts dynamically, sigmas (Flux) where the solver takes them and the config does
        not make its own flow sigmas."""
        config, solver = run.scheduler.config, run.scheduler.solver
        options = {}
        if self.sigmas_from_pipeline and "sigmas" in solver.schedule_options and \
                not getattr(config, "use_flow_sigmas", False):
            n = run.request.num_inference_steps
            options["sigmas"] = np.linspace(1.0, 1 / n, n)
        if getattr(config, "use_dynamic_shifting", False) and "mu" in solver.schedule_options:
            options["mu"] = flux_mu(self.image_tokens(run.height, run.width), config)
        return options

    def encoder_texts(self, run, encoders: int) -> list[list[str]]:
        """Each text encoder's texts, negatives first with CFG: encoder k > 1 reads prompt_k / negative_prompt_k,
        each defaulting to the first encoder's (diffusers' `prompt_2 = prompt_2 or prompt`)."""
        request = run.request
        n, prompts = len(request.prompt), list(request.prompt)
        negatives = self.negatives(request) if run.guidance.enabled else []

        def own(name: str, default: list[str]) -> list[str]:
            return list(texts(name, getattr(request, name), n) or default)

        return [negatives + prompts] + [
            (own(f"negative_prompt_{k}", negatives) if negatives else []) + own(f"prompt_{k}", prompts)
            for k in range(2, encoders + 1)]

    def check_flow_scheduler(self, run) -> None:
        if not run.scheduler.solver.flow:
            raise InvalidInputError(
                f"{run.scheduler.name} samples noise-prediction (UNet) models; {self.folder.path} is a flow-matching "
                "model: use a flow scheduler (sdrt.runtime.schedulers.FLOW_SCHEDULER_NAMES)")
