"""Stable Diffusion 3 / 3.5 (MMDiT; Esser et al. 2024), as diffusers' StableDiffusion3Pipeline conditions it.

- three text encoders: CLIP-L (`prompt`) and CLIP-G (`prompt_2`, default the prompt) with projections, whose
  penultimate hidden states sit side by side and are zero-padded to T5's width, and T5-XXL (`prompt_3`, default
  the prompt) cut/padded at max_sequence_length (256) tokens; the transformer attends to the CLIP states then the
  T5 states (77 + 256 tokens). Without a T5 (text_encoder_3 left out of the export, as diffusers allows), its
  states are zeros;
- `pooled_projections`: both CLIPs' projected pooled outputs side by side;
- negatives: "" when not given (no zeroing), `negative_prompt_2/3` default to the negative prompt;
- classifier-free guidance batched (negatives first) as every family; clip_skip reads earlier CLIP layers for the
  prompts (not the negatives), as diffusers.

SD3.5's skip-layer guidance runs chosen transformer layers skipped on a third batch: the exported graph runs all
its layers, so `skip_guidance_layers` is refused by name.
"""

from __future__ import annotations

import time

import numpy as np

from sdrt.runtime.core.request import texts
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.families.dit import FlowFamily, check_sequence_length, t5_embeds
from sdrt.runtime.families.sdxl import hidden_state_outputs

FAMILY = "stable-diffusion-3"


class StableDiffusion3(FlowFamily):
    name = FAMILY
    default_sequence_length = 256

    def __init__(self, folder):
        super().__init__(folder)
        self.layers = tuple(hidden_state_outputs(folder, c) for c in ("text_encoder", "text_encoder_2"))
        for component in ("text_encoder", "text_encoder_2"):
            if "text_embeds" not in folder.spec(component).output_names:
                raise ModelFolderError(f"{folder.path / component}: SD3 reads the projected pooled output (text_embeds) "
                                       "of both CLIP encoders; this one gives pooler_output: re-export with sdrt export")
        self.has_t5 = "text_encoder_3" in folder.components
        config = folder.unet_config
        self.joint_dim = int(config["joint_attention_dim"])
        self.patch = int(config.get("patch_size", 2))

    def image_tokens(self, height: int, width: int) -> int:
        f = self.folder.vae.scale_factor
        return (height // f // self.patch) * (width // f // self.patch)

    def text_tokens(self, request) -> int:
        return 77 + self.sequence_length(request)

    def check(self, run) -> None:
        request = run.request
        self.check_flow_scheduler(run)
        check_sequence_length(request.max_sequence_length, "SD3")
        for name in ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3"):
            texts(name, getattr(request, name), len(request.prompt))
        if not self.has_t5 and (request.prompt_3 is not None or request.negative_prompt_3 is not None):
            raise InvalidInputError(f"{self.folder.path} has no T5 encoder (text_encoder_3/), so prompt_3 and "
                                    "negative_prompt_3 have no encoder to go to; leave them out")
        if request.guidance_rescale:
            raise InvalidInputError("SD3 has no guidance_rescale (diffusers' StableDiffusion3Pipeline has none); drop it")
        skip = request.micro_conditioning.get("skip_guidance_layers")
        if skip is not None:
            raise InvalidInputError(
                f"skip_guidance_layers={skip!r}: SD3.5's skip-layer guidance runs the transformer with layers left "
                "out, and the exported graph always runs all of them; leave skip_guidance_layers out")
        unknown = set(request.micro_conditioning) - {"skip_guidance_layers"}
        if unknown:
            raise InvalidInputError(f"unknown arguments {sorted(unknown)} for SD3")
        self.outputs(request.clip_skip)

    def outputs(self, clip_skip: int | None) -> tuple[str, str]:
        """The CLIP hidden states the embeddings come from: the penultimate layer, or clip_skip layers before it."""
        skip = 0 if clip_skip is None else clip_skip
        usable = min(len(layers) for layers in self.layers) - 2
        if skip > usable:
            raise InvalidInputError(f"clip_skip={clip_skip} goes past the text encoders' first layer: at most {usable}")
        return tuple(layers[-(skip + 2)] for layers in self.layers)

    def clip_embeds(self, models, prompts, prompts_2, clip_skip: int | None, skip_from: int):
        """(N, 77, hidden + hidden_2) CLIP states side by side, and (N, proj + proj_2) pooled."""
        usual, skipped = self.outputs(None), self.outputs(clip_skip)
        states, pooled = [], []
        for k, (tokenizer, encoder, encoder_texts) in enumerate(((models.tokenizer, models.text_encoder, prompts),
                                                                 (models.tokenizer_2, models.text_encoder_2, prompts_2))):
            result = encoder.run({"input_ids": tokenizer(list(encoder_texts))})
            states.append(np.concatenate([result[usual[k]][:skip_from], result[skipped[k]][skip_from:]]))
            pooled.append(result["text_embeds"])
        return np.concatenate(states, axis=-1), np.concatenate(pooled, axis=-1)

    def conditioning(self, run) -> dict:
        t0 = time.perf_counter()
        request, models = run.request, run.models
        all_1, all_2, all_3 = self.encoder_texts(run, 3)
        skip_from = len(request.prompt) if run.guidance.enabled else 0  # clip_skip applies to the prompts only
        clip, pooled = self.clip_embeds(models, all_1, all_2, request.clip_skip, skip_from)
        models.stage_done(models.text_encoder, models.text_encoder_2)
        length = self.sequence_length(request)
        if self.has_t5:
            t5 = t5_embeds(models, "text_encoder_3", "tokenizer_3", all_3, length)
            models.stage_done(models.text_encoder_3)
        else:
            t5 = np.zeros((len(all_3), length, self.joint_dim), dtype=np.float32)
        # Zero-padded to T5's width; cut to it where the CLIPs are wider (diffusers pads by a negative amount then,
        # which torch's pad turns into a cut: small test models have such widths).
        width = t5.shape[-1]
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1]))) if clip.shape[-1] <= width else \
            np.ascontiguousarray(clip[..., :width])
        embeds = np.concatenate([clip, t5.astype(clip.dtype)], axis=1)
        repeat = request.num_images_per_prompt
        run.timings["text_encoder"] = time.perf_counter() - t0
        return {"encoder_hidden_states": np.repeat(embeds, repeat, axis=0),
                "pooled_projections": np.repeat(pooled, repeat, axis=0)}
