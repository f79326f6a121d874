"""SDXL (base and refiner), as diffusers' StableDiffusionXL*Pipeline condition it.

- two CLIP text encoders, each with its own tokenizer; the prompt embeddings are the penultimate hidden
  states of both, side by side (`prompt` goes to the first, `prompt_2`, by default the same text, to the
  second);
- two more UNet inputs, constant over the steps and batched as the embeddings are (negatives first):
  `text_embeds`, the second encoder's pooled projection, and `time_ids`, the micro-conditioning
  (original size, crop corner and target size; an aesthetic score instead of the target size for a
  model that requires it, when the task starts from an image);
- `force_zeros_for_empty_prompt` (model_index.json): without a negative prompt, the unconditional
  embeddings are zeros rather than the encoding of "".

The refiner has the second text encoder only: `prompt` and `negative_prompt` go to it (prompt_2 has no
encoder to go to and is refused), and its UNet takes the aesthetic score.

Negative micro-conditioning: each `negative_*` defaults to its positive counterpart. diffusers differs in
corners only: its txt2img ignores a negative size unless both negative sizes are given (it then uses
`negative_crops_coords_top_left`, default (0, 0)), its img2img ignores `negative_crops_coords_top_left`
without an aesthetic score, and its txt2img pairs negative and positive time ids wrongly when they
differ and more than one image is made. The tests compare where both agree on the meaning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sdrt.runtime import prompts as weighted
from sdrt.runtime.config import ModelFolder, read_json
from sdrt.runtime.core.request import pair, real, texts
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.families.base import Family

FAMILY = "stable-diffusion-xl"
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                      "negative_aesthetic_score")


@dataclass(frozen=True)
class Prompts:
    """The texts for both encoders, one entry per prompt, and whether the negatives are zeros instead."""

    prompts: list[str]
    prompts_2: list[str]
    negatives: list[str]
    negatives_2: list[str]
    zero_negatives: bool


def micro_conditioning(height: int, width: int, aesthetics: bool = False, *, original_size=None,
                       crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                       negative_crops_coords_top_left=None, negative_target_size=None, aesthetic_score=6.0,
                       negative_aesthetic_score=2.5) -> tuple[np.ndarray, np.ndarray]:
    """SDXL's (positive, negative) `time_ids` rows, float32 (1, 6): original (height, width), crop
    (top, left), target (height, width); with `aesthetics`, (1, 5) with the aesthetic score last
    instead of the target size. Sizes default to the image's; each negative to its positive."""
    original = pair("original_size", original_size) or (height, width)
    crops = pair("crops_coords_top_left", crops_coords_top_left) or (0, 0)
    target = pair("target_size", target_size) or (height, width)
    negative_original = pair("negative_original_size", negative_original_size) or original
    negative_crops = pair("negative_crops_coords_top_left", negative_crops_coords_top_left) or crops
    negative_target = pair("negative_target_size", negative_target_size) or target
    score = real("aesthetic_score", aesthetic_score)
    negative_score = real("negative_aesthetic_score", negative_aesthetic_score)
    last, negative_last = ((score,), (negative_score,)) if aesthetics else (target, negative_target)
    return (np.array([original + crops + last], dtype=np.float32),
            np.array([negative_original + negative_crops + negative_last], dtype=np.float32))


def hidden_state_outputs(folder: ModelFolder, component: str) -> list[str]:
    """The names of the encoder's per-layer hidden states, embeddings first ("hidden_states.0" ... ".N")."""
    layers = sorted((name for name in folder.spec(component).output_names if name.startswith("hidden_states.")),
                    key=lambda name: int(name.split(".")[1]))
    if len(layers) < 2:
        raise ModelFolderError(
            f"{folder.path / component}: the text encoder gives no per-layer hidden states (its config.json lacks "
            "output_hidden_states: true), and SDXL reads the penultimate layer; re-export with sdrt export"
        )
    return layers


def penultimate_output(folder: ModelFolder, component: str) -> str:
    """The name of the output holding the encoder's penultimate hidden states ("hidden_states.{N-1}")."""
    return hidden_state_outputs(folder, component)[-2]


class StableDiffusionXL(Family):
    name = FAMILY

    def __init__(self, folder: ModelFolder):
        if "text_encoder_2" not in folder.components:
            raise UnsupportedConfigError(
                f"{folder.path} ({folder.pipeline}) has no second text encoder (text_encoder_2/), so it is not an "
                "SDXL model and takes no prompt_2; run it with StableDiffusionPipeline, or open it with "
                "sdrt.runtime.families.text_to_image_pipeline, which picks the class"
            )
        super().__init__(folder)
        self.has_first_encoder = "text_encoder" in folder.components  # False: the refiner
        self.layers = (hidden_state_outputs(folder, "text_encoder") if self.has_first_encoder else None,
                       hidden_state_outputs(folder, "text_encoder_2"))
        self.hidden_outputs = tuple(layers[-2] if layers else None for layers in self.layers)
        index = read_json(folder.path / "model_index.json")
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        self.requires_aesthetics_score = bool(index.get("requires_aesthetics_score", False))
        self.time_ids_size = folder.spec("unet").input("time_ids").shape[1]

    # -- checks ------------------------------------------------------------------------------------

    def check(self, run) -> None:
        self.prompts(run.request)
        self.outputs(run.request.clip_skip)
        unknown = set(run.request.micro_conditioning) - set(MICRO_CONDITIONING)
        if unknown:
            raise InvalidInputError(f"unknown arguments {sorted(unknown)}; SDXL takes {MICRO_CONDITIONING}")
        self.time_ids(run, run.request.height or 8, run.request.width or 8)  # checks the values and the UNet's width

    def prompts(self, request) -> Prompts:
        """diffusers' rules: an empty or missing prompt_2 / negative_prompt_2 repeats the first; with
        force_zeros_for_empty_prompt and no negative_prompt, the negatives are zeros (negative_prompt_2 unused)."""
        if not self.has_first_encoder and (request.prompt_2 is not None or request.negative_prompt_2 is not None):
            raise InvalidInputError(
                f"{self.folder.path} has one text encoder (text_encoder_2/, as the SDXL refiner): prompt and "
                "negative_prompt go to it; leave prompt_2 and negative_prompt_2 out"
            )
        prompts, negatives = list(request.prompt), self.negatives(request)
        prompts_2 = list(texts("prompt_2", request.prompt_2 or request.prompt, len(prompts)))
        negatives_2 = list(texts("negative_prompt_2", request.negative_prompt_2, len(prompts))
                           if request.negative_prompt_2 else negatives)
        zero = request.negative_prompt is None and self.force_zeros_for_empty_prompt
        return Prompts(prompts, prompts_2, negatives, negatives_2, zero)

    def outputs(self, clip_skip: int | None) -> tuple[str | None, str]:
        """The hidden states each encoder's embeddings come from: the penultimate layer, or clip_skip layers
        before it (diffusers' hidden_states[-(clip_skip + 2)]; the pooled embedding stays the last layer's)."""
        if clip_skip is None:
            return self.hidden_outputs
        usable = min(len(layers) for layers in self.layers if layers) - 2
        if clip_skip > usable:
            raise InvalidInputError(f"clip_skip={clip_skip} goes past the text encoders' first layer: at most {usable}")
        return tuple(layers[-(clip_skip + 2)] if layers else None for layers in self.layers)

    def time_ids(self, run, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        aesthetics = self.requires_aesthetics_score and any(task.takes_image for task in run.tasks)
        rows = micro_conditioning(height, width, aesthetics, **run.request.micro_conditioning)
        if rows[0].shape[1] != self.time_ids_size:
            raise UnsupportedConfigError(
                f"{self.folder.path}: the UNet takes {self.time_ids_size} time ids but this pipeline makes "
                f"{rows[0].shape[1]} ({'with' if aesthetics else 'without'} an aesthetic score); set "
                "requires_aesthetics_score in model_index.json to match the UNet (5 ids: with, 6: without)"
            )
        return rows

    # -- conditioning --------------------------------------------------------------------------------

    def encode_prompt(self, models, prompts, prompts_2, emphasis: str = "none", clip_skip: int | None = None,
                      skip_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(N, sequence, hidden + hidden_2) penultimate hidden states of both encoders side by side (the second's
        alone without a first encoder), and the second encoder's (N, projection) pooled text_embeds. With emphasis
        "original", of A1111's weighted chunks (sdrt.runtime.prompts), both encoders with the same chunk count,
        pooled from the first chunk. clip_skip: rows from `skip_from` on read that many layers earlier (diffusers
        skips for the prompts, not for the negatives)."""
        skipped = self.outputs(clip_skip)
        if emphasis != "none":  # both encoders padded to the same chunk count, so that their states sit side by side
            count = max(weighted.chunk_count(t, x) for t, x in ((models.tokenizer_2, prompts_2),
                                                                (models.tokenizer, prompts)) if t is not None)
        states = []
        for k, (tokenizer, encoder, encoder_texts) in enumerate(((models.tokenizer, models.text_encoder, prompts),
                                                                 (models.tokenizer_2, models.text_encoder_2, prompts_2))):
            if encoder is None:
                continue
            names = (self.hidden_outputs[k], skipped[k], "text_embeds")[:3 if k else 2]
            run = lambda ids, encoder=encoder: encoder.run({"input_ids": ids})  # noqa: E731
            if emphasis == "none":
                result = run(tokenizer(list(encoder_texts)))
                values = [result[name] for name in names]
            else:
                values = weighted.encode(tokenizer, run, list(encoder_texts), names, count)[0]
            states.append(np.concatenate([values[0][:skip_from], values[1][skip_from:]]))
            pooled = values[2] if k else None
        return (states[0] if len(states) == 1 else np.concatenate(states, axis=-1)), pooled

    def conditioning(self, run) -> dict:
        """encoder_hidden_states, text_embeds and time_ids: negatives first with guidance (encoded in the same
        batch as the prompts, or zeros), each repeated per image."""
        t0 = time.perf_counter()
        request, models, do_cfg = run.request, run.models, run.guidance.enabled
        texts_ = self.prompts(request)
        encode_negatives = do_cfg and not texts_.zero_negatives
        embeds, pooled = self.encode_prompt(
            models,
            texts_.negatives + texts_.prompts if encode_negatives else texts_.prompts,
            texts_.negatives_2 + texts_.prompts_2 if encode_negatives else texts_.prompts_2,
            run.emphasis, request.clip_skip, len(texts_.negatives) if encode_negatives else 0,
        )
        models.stage_done(models.text_encoder, models.text_encoder_2)
        if do_cfg and texts_.zero_negatives:
            embeds = np.concatenate([np.zeros_like(embeds), embeds])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        embeds = np.repeat(embeds, request.num_images_per_prompt, axis=0)
        pooled = np.repeat(pooled, request.num_images_per_prompt, axis=0)
        positive, negative = self.time_ids(run, run.height, run.width)
        ids = np.repeat(positive, run.batch, axis=0)
        if do_cfg:
            ids = np.concatenate([np.repeat(negative, run.batch, axis=0), ids])
        run.timings["text_encoder"] = time.perf_counter() - t0
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": ids}
