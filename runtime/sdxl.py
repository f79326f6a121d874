"""SDXL text-to-image and image-to-image over ONNX engines, as diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline, with the same random draws in the same order.

What SDXL adds to the Stable Diffusion stages (`StableDiffusionBase`):
- two CLIP text encoders, each with its own tokenizer; the prompt embeddings are the penultimate
  hidden states of both, side by side (`prompt` goes to the first, `prompt_2`, by default the same
  text, to the second);
- two more UNet inputs, constant over the steps and batched as the embeddings are (negatives first):
  `text_embeds`, the second encoder's pooled projection, and `time_ids`, the micro-conditioning
  (original size, crop corner and target size; the refiner-style aesthetic score in img2img);
- `force_zeros_for_empty_prompt` (model_index.json): without a negative prompt, the unconditional
  embeddings are zeros rather than the encoding of "".

The refiner (stabilityai/stable-diffusion-xl-refiner-1.0) is an img2img model with the second text
encoder only: `prompt` and `negative_prompt` go to it (prompt_2 has no encoder to go to and is
refused), and its UNet takes the aesthetic score. The "ensemble of expert denoisers" splits one
schedule between two models: the base stops at `denoising_end` (output_type="latent") and the refiner
takes those latents as `image` and resumes at `denoising_start`, with diffusers' timestep arithmetic
(`denoising_plan`): no VAE encode and no noise added for latents, nothing noised when denoising_start
is set (a picture given with it is only encoded, as diffusers does).

Negative micro-conditioning: each `negative_*` defaults to its positive counterpart. diffusers differs in
corners only: its txt2img ignores a negative size unless both negative sizes are given (it then uses
`negative_crops_coords_top_left`, default (0, 0)), its img2img ignores `negative_crops_coords_top_left`
without an aesthetic score, and its txt2img pairs negative and positive time ids wrongly when they
differ and more than one image is made. The tests compare where both agree on the meaning.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.config import ModelFolder, read_json
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline, check_strength
from sdrt.runtime.pipeline import PipelineOutput, StableDiffusionBase
from sdrt.runtime.rng import make_generator
from sdrt.runtime.schedulers.plan import Plan, truncate
from sdrt.runtime.schedulers.scheduler import Scheduler
from sdrt.runtime.tokenizer import ClipTokenizer

FAMILY = "stable-diffusion-xl"


@dataclass(frozen=True)
class Prompts:
    """The texts for both encoders, one entry per prompt, and whether the negatives are zeros instead."""

    prompts: list[str]
    prompts_2: list[str]
    negatives: list[str]
    negatives_2: list[str]
    zero_negatives: bool


def _pair(name: str, value) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise InvalidInputError(
            f"{name} must be a pair of numbers >= 0 ((height, width) or (top, left)), got {value!r}"
        )
    return (value[0], value[1])


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    return float(value)


def micro_conditioning(height: int, width: int, aesthetics: bool = False, *, original_size=None,
                       crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                       negative_crops_coords_top_left=None, negative_target_size=None, aesthetic_score=6.0,
                       negative_aesthetic_score=2.5) -> tuple[np.ndarray, np.ndarray]:
    """SDXL's (positive, negative) `time_ids` rows, float32 (1, 6): original (height, width), crop
    (top, left), target (height, width); with `aesthetics`, (1, 5) with the aesthetic score last
    instead of the target size. Sizes default to the image's; each negative to its positive."""
    original = _pair("original_size", original_size) or (height, width)
    crops = _pair("crops_coords_top_left", crops_coords_top_left) or (0, 0)
    target = _pair("target_size", target_size) or (height, width)
    negative_original = _pair("negative_original_size", negative_original_size) or original
    negative_crops = _pair("negative_crops_coords_top_left", negative_crops_coords_top_left) or crops
    negative_target = _pair("negative_target_size", negative_target_size) or target
    if aesthetics:
        last = (_number("aesthetic_score", aesthetic_score),)
        negative_last = (_number("negative_aesthetic_score", negative_aesthetic_score),)
    else:
        last, negative_last = target, negative_target
    return (np.array([original + crops + last], dtype=np.float32),
            np.array([negative_original + negative_crops + negative_last], dtype=np.float32))


def denoising_fraction(name: str, value) -> float | None:
    """A denoising_start / denoising_end: None, or a number strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise InvalidInputError(
            f"{name} must be a number in (0, 1), the share of the schedule (e.g. 0.8 for the base and the refiner "
            f"of the SDXL ensemble), or None; got {value!r}"
        )
    return float(value)


def discrete_timestep_cutoff(fraction: float, num_train_timesteps: int) -> int:
    """The training timestep at which `fraction` of the denoising is done (diffusers' discrete_timestep_cutoff)."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def denoising_plan(scheduler: Scheduler, num_inference_steps: int, eta: float = 0.0, strength: float | None = None,
                   denoising_start: float | None = None, denoising_end: float | None = None) -> Plan:
    """The plan of num_inference_steps steps, cut as diffusers' SDXL pipelines cut it: at the start by strength
    (img2img) or, instead, at denoising_start (the evaluations whose timestep is below its cutoff run, one more
    for a 2nd-order solver when even, so that no step is split); then at denoising_end (the evaluations whose
    timestep is at or above its cutoff run). Every kept evaluation keeps the full run's coefficients."""
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise InvalidInputError(
            f"denoising_start={denoising_start} must be below denoising_end={denoising_end}: the run would be empty"
        )
    plan = scheduler.plan(num_inference_steps, eta=eta, strength=None if denoising_start is not None else strength)
    num_train_timesteps = scheduler.config.num_train_timesteps
    if denoising_start is not None:
        cutoff = discrete_timestep_cutoff(denoising_start, num_train_timesteps)
        kept = int(np.count_nonzero(plan.timesteps < cutoff))
        if scheduler.evaluations_per_step == 2 and kept % 2 == 0:
            kept += 1
        plan = _resume(scheduler, plan, num_inference_steps, eta, plan.num_evaluations - kept, denoising_start)
    if denoising_end is not None:
        cutoff = discrete_timestep_cutoff(denoising_end, num_train_timesteps)
        stop = int(np.count_nonzero(plan.timesteps >= cutoff))
        if stop == 0:
            raise InvalidInputError(
                f"denoising_end={denoising_end} ends before the first timestep ({plan.timesteps[0]}) of this "
                "run: no step would run; raise denoising_end or num_inference_steps"
            )
        plan = replace(truncate(plan, 0, stop), num_inference_steps=-(-stop // scheduler.evaluations_per_step))
    return plan


def _resume(scheduler: Scheduler, full: Plan, num_inference_steps: int, eta: float, start: int,
            denoising_start: float) -> Plan:
    """The `full` run's plan from evaluation `start` on, made as img2img's strength cut makes it (Solver.make_plan:
    a multistep history starts empty there)."""
    if start >= full.num_evaluations:
        raise InvalidInputError(
            f"denoising_start={denoising_start} starts after the last timestep ({full.timesteps[-1]}) of "
            f"{num_inference_steps} steps: no step would run; lower denoising_start or raise num_inference_steps"
        )
    plan = scheduler.solver.make_plan(scheduler.config, int(num_inference_steps), float(eta), start)
    kept = full.num_evaluations - start
    return replace(plan, solver=scheduler.name, num_inference_steps=-(-kept // scheduler.evaluations_per_step))


def _penultimate_output(folder: ModelFolder, component: str) -> str:
    """The name of the output holding the encoder's penultimate hidden states ("hidden_states.{N-1}")."""
    layers = sorted((name for name in folder.spec(component).output_names if name.startswith("hidden_states.")),
                    key=lambda name: int(name.split(".")[1]))
    if len(layers) < 2:
        raise ModelFolderError(
            f"{folder.path / component}: the text encoder gives no per-layer hidden states (its config.json lacks "
            "output_hidden_states: true), and SDXL reads the penultimate layer; re-export with sdrt export"
        )
    return layers[-2]


class StableDiffusionXLBase(StableDiffusionBase):
    """Engines and stages SDXL adds to StableDiffusionBase: the second text encoder and the added conditions."""

    uses_text_encoder_2 = True

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, **options):
        if "text_encoder_2" not in folder.components:
            raise UnsupportedConfigError(
                f"{folder.path} ({folder.pipeline}) has no second text encoder (text_encoder_2/), so it is not an "
                "SDXL model and takes no prompt_2; run it with StableDiffusionPipeline, or open it with "
                "sdrt.runtime.families.text_to_image_pipeline, which picks the class"
            )
        super().__init__(folder, provider=provider, scheduler=scheduler, **options)
        self.tokenizer_2 = ClipTokenizer.from_folder(folder.path / "tokenizer_2")
        self.text_encoder_2 = self._engine("text_encoder_2")
        # No first text encoder (self.text_encoder is None): the refiner, conditioned on the second's states only.
        self._hidden_outputs = (_penultimate_output(folder, "text_encoder") if self.text_encoder is not None else None,
                                _penultimate_output(folder, "text_encoder_2"))
        index = read_json(folder.path / "model_index.json")
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        self.requires_aesthetics_score = bool(index.get("requires_aesthetics_score", False))
        self._time_ids_size = folder.spec("unet").input("time_ids").shape[1]

    def _engines(self) -> tuple:
        return (*super()._engines(), self.text_encoder_2)

    def _xl_prompts(self, prompt, prompt_2, negative_prompt, negative_prompt_2) -> Prompts:
        """diffusers' rules: an empty or missing prompt_2 / negative_prompt_2 repeats the first; with
        force_zeros_for_empty_prompt and no negative_prompt, the negatives are zeros (negative_prompt_2 unused)."""
        prompts, negatives = self._prompts(prompt, negative_prompt)
        self._refuse_second_prompts_without_first_encoder(prompt_2, negative_prompt_2)
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise InvalidInputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
        prompt_2 = prompt_2 or prompt
        prompts_2 = [prompt_2] * len(prompts) if isinstance(prompt_2, str) else list(prompt_2)
        if len(prompts_2) != len(prompts):
            raise InvalidInputError(
                f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}; give one per prompt, or a "
                "single string for all"
            )
        _, negatives_2 = self._prompts(prompts_2, negative_prompt_2 or negative_prompt)
        zero = negative_prompt is None and self.force_zeros_for_empty_prompt
        return Prompts(prompts, prompts_2, negatives, negatives_2, zero)

    def _refuse_second_prompts_without_first_encoder(self, prompt_2, negative_prompt_2) -> None:
        """With the second encoder only, prompt and negative_prompt go to it (diffusers then ignores prompt_2)."""
        if self.text_encoder is None and (prompt_2 is not None or negative_prompt_2 is not None):
            raise InvalidInputError(
                f"{self.folder.path} has one text encoder (text_encoder_2/, as the SDXL refiner): prompt and "
                "negative_prompt go to it; leave prompt_2 and negative_prompt_2 out"
            )

    def _time_ids(self, height: int, width: int, aesthetics: bool, conditioning: dict) -> tuple[np.ndarray, ...]:
        rows = micro_conditioning(height, width, aesthetics, **conditioning)
        if rows[0].shape[1] != self._time_ids_size:
            raise UnsupportedConfigError(
                f"{self.folder.path}: the UNet takes {self._time_ids_size} time ids but this pipeline makes "
                f"{rows[0].shape[1]} ({'with' if aesthetics else 'without'} an aesthetic score); set "
                "requires_aesthetics_score in model_index.json to match the UNet (5 ids: with, 6: without)"
            )
        return rows

    def encode_prompt_xl(self, prompts: Sequence[str], prompts_2: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, sequence, hidden + hidden_2) penultimate hidden states of both encoders side by side (the second's
        alone without a first encoder), and the second encoder's (N, projection) pooled text_embeds."""
        second = self.text_encoder_2.run({"input_ids": self.tokenizer_2(list(prompts_2))})
        if self.text_encoder is None:
            return second[self._hidden_outputs[1]], second["text_embeds"]
        first = self.text_encoder.run({"input_ids": self.tokenizer(list(prompts))})[self._hidden_outputs[0]]
        return np.concatenate([first, second[self._hidden_outputs[1]]], axis=-1), second["text_embeds"]

    def _conditioning(self, texts: Prompts, num_images_per_prompt: int, do_cfg: bool,
                      time_ids: tuple[np.ndarray, np.ndarray], timings: dict) -> tuple[np.ndarray, dict]:
        """encoder_hidden_states and the UNet's added inputs, batched as _denoise takes them: negatives first
        with guidance (encoded in the same batch as the prompts, or zeros), each repeated per image."""
        t0 = time.perf_counter()
        encode_negatives = do_cfg and not texts.zero_negatives
        embeds, pooled = self.encode_prompt_xl(
            texts.negatives + texts.prompts if encode_negatives else texts.prompts,
            texts.negatives_2 + texts.prompts_2 if encode_negatives else texts.prompts_2,
        )
        self._stage_done(*(e for e in (self.text_encoder, self.text_encoder_2) if e is not None))
        if do_cfg and texts.zero_negatives:
            embeds = np.concatenate([np.zeros_like(embeds), embeds])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        embeds = np.repeat(embeds, num_images_per_prompt, axis=0)
        pooled = np.repeat(pooled, num_images_per_prompt, axis=0)
        positive, negative = time_ids
        batch = len(texts.prompts) * num_images_per_prompt
        ids = np.repeat(positive, batch, axis=0)
        if do_cfg:
            ids = np.concatenate([np.repeat(negative, batch, axis=0), ids])
        timings["text_encoder"] = time.perf_counter() - t0
        return embeds, {"text_embeds": pooled, "time_ids": ids}


class StableDiffusionXLPipeline(StableDiffusionXLBase):
    """SDXL text-to-image over ONNX engines."""

    def __call__(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Sizes are (height, width) and crops (top, left) in pixels, as diffusers takes them; see
        micro_conditioning for their defaults. denoising_end: in (0, 1), stop once that share of the schedule
        is done (diffusers' cutoff); with output_type="latent", for a refiner to finish from the same
        denoising_start (StableDiffusionXLImg2ImgPipeline, image=these latents)."""
        height = self.folder.default_size if height is None else height
        width = self.folder.default_size if width is None else width
        self._check_size(height, width)
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        texts = self._xl_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        denoising_end = denoising_fraction("denoising_end", denoising_end)
        time_ids = self._time_ids(height, width, False, dict(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_target_size=negative_target_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left))
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings, pooled embeddings and time ids.
        embeds, unet_inputs = self._conditioning(texts, num_images_per_prompt, guidance_scale > 1.0, time_ids,
                                                 timings)

        # 2. Initial noise, scaled to the scheduler's first noise level.
        plan = denoising_plan(self.scheduler, num_inference_steps, eta, denoising_end=denoising_end)
        vae = self.folder.vae
        shape = (len(texts.prompts) * num_images_per_prompt, vae.latent_channels,
                 height // vae.scale_factor, width // vae.scale_factor)
        latents = generator.randn(shape).astype(np.float32) * np.float32(plan.init_noise_sigma)

        # 3. Denoise, 4. decode.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings, unet_inputs=unet_inputs)
        images = self._decode(latents, output_type, timings)

        parameters = self._parameters(texts.prompts, texts.negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_end=denoising_end)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLBase, StableDiffusionImg2ImgPipeline):
    """SDXL image-to-image over ONNX engines (needs the folder's vae_encoder)."""

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        strength: float = 0.3,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """image and strength as StableDiffusionImg2ImgPipeline's (strength defaults to 0.3, as diffusers');
        image may be latents (an NCHW float array, as output_type="latent" gives), used without the VAE encoder.
        denoising_start: in (0, 1), resume the schedule there instead of cutting it by strength (ignored then),
        from the image as it is: nothing is noised (the refiner's half of the SDXL ensemble, on the base's
        latents stopped at the same denoising_end). denoising_end: as StableDiffusionXLPipeline's.
        The aesthetic scores are used when model_index.json sets requires_aesthetics_score (the refiner)."""
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        texts = self._xl_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        check_strength(strength)
        denoising_start = denoising_fraction("denoising_start", denoising_start)
        denoising_end = denoising_fraction("denoising_end", denoising_end)
        images = self._images(image, len(texts.prompts), num_images_per_prompt)
        plan = denoising_plan(self.scheduler, num_inference_steps, eta, float(strength), denoising_start,
                              denoising_end)
        height, width = self._pixel_size(images)
        time_ids = self._time_ids(height, width, self.requires_aesthetics_score, dict(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_target_size=negative_target_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score))
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings, pooled embeddings and time ids.
        embeds, unet_inputs = self._conditioning(texts, num_images_per_prompt, guidance_scale > 1.0, time_ids,
                                                 timings)

        # 2. Image latents (a draw for pictures), noised to the plan's first timestep (a second draw) unless the
        #    run resumes at denoising_start, as diffusers'.
        latents = self._noised_image_latents(images, plan, len(texts.prompts) * num_images_per_prompt, generator,
                                             timings, add_noise=denoising_start is None)

        # 3. Denoise, 4. decode.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings, unet_inputs=unet_inputs)
        images = self._decode(latents, output_type, timings)

        parameters = self._parameters(texts.prompts, texts.negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height, denoising_strength=None if denoising_start else strength,
                                      denoising_start=denoising_start, denoising_end=denoising_end)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)
