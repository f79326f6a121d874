"""Text-to-image with an exported Stable Diffusion folder: tokens -> embeddings -> denoise loop -> image.

The pipeline owns the loop and every engine call, and reads top to bottom; the scheduler only
supplies a precomputed plan and a pure step function, so nothing here branches on its type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.engines import create_engine
from sdrt.runtime import image as imageio
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import CancelledError, GenerationError, InvalidInputError
from sdrt.runtime.guidance import guide
from sdrt.runtime.rng import make_generator
from sdrt.runtime.schedulers import load_scheduler
from sdrt.runtime.tokenizer import ClipTokenizer

OUTPUT_TYPES = ("pil", "np", "uint8", "latent")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, uint8 NHWC, float NHWC in [0, 1], or latents
    seed: int | None
    parameters: list[str]  # A1111-style text, one per image
    timings: dict = field(default_factory=dict)  # seconds per stage


class StableDiffusionPipeline:
    """SD 1.x / 2.x text-to-image over ONNX engines."""

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, **engine_options):
        self.folder = folder
        self.provider = provider
        self.tokenizer = ClipTokenizer.from_folder(folder.path / "tokenizer")
        self.text_encoder = create_engine(folder.onnx_path("text_encoder"), folder.spec("text_encoder"),
                                          provider=provider, **engine_options)
        self.unet = create_engine(folder.onnx_path("unet"), folder.spec("unet"), provider=provider, **engine_options)
        self.vae_decoder = create_engine(folder.onnx_path("vae_decoder"), folder.spec("vae_decoder"),
                                         provider=provider, **engine_options)
        self.scheduler = load_scheduler(folder.scheduler_config, name=scheduler)
        self.scheduler_name = scheduler

    @classmethod
    def from_pretrained(cls, path, provider="cpu", scheduler: str | None = None, verify: str = "size",
                        **engine_options) -> "StableDiffusionPipeline":
        return cls(ModelFolder.open(path, verify=verify), provider=provider, scheduler=scheduler, **engine_options)

    def release(self) -> None:
        for engine in (self.text_encoder, self.unet, self.vae_decoder):
            engine.release()

    # -- checks -------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        m = self.folder.pixel_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v < m or v % m:
                lower = max(m, (int(v) // m) * m) if isinstance(v, (int, np.integer)) else m
                raise InvalidInputError(
                    f"{name}={v} is not a multiple of {m} px, which this model's UNet needs "
                    f"({self.folder.latent_multiple} latent cells x {self.folder.vae.scale_factor} px); "
                    f"nearest valid sizes: {lower} or {lower + m}"
                )

    @staticmethod
    def _prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise InvalidInputError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None:
            negative = [""] * len(prompt)
        elif isinstance(negative_prompt, str):
            negative = [negative_prompt] * len(prompt)
        else:
            negative = list(negative_prompt)
            if len(negative) != len(prompt):
                raise InvalidInputError(
                    f"negative_prompt has {len(negative)} entries but prompt has {len(prompt)}; give one "
                    "negative prompt per prompt, or a single string for all"
                )
        return list(prompt), negative

    # -- the pipeline ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts))
        return self.text_encoder.run({"input_ids": ids})["last_hidden_state"]

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = None,
        generator=None,
        rng: str = "torch",
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        height = self.folder.default_size if height is None else height
        width = self.folder.default_size if width is None else width
        self._check_size(height, width)
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if guidance_scale < 0:
            raise InvalidInputError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise InvalidInputError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if not 0.0 <= eta <= 1.0:
            raise InvalidInputError(f"eta must be in [0, 1], got {eta}")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise InvalidInputError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        prompts, negatives = self._prompts(prompt, negative_prompt)
        generator = generator if generator is not None else make_generator(seed, rng)
        do_cfg = guidance_scale > 1.0
        timings: dict[str, float] = {}

        # 1. Text embeddings: negatives and prompts in one text-encoder batch, each repeated per image.
        t0 = time.perf_counter()
        embeds = self.encode_prompt(negatives + prompts if do_cfg else prompts)
        embeds = np.repeat(embeds, num_images_per_prompt, axis=0)
        timings["text_encoder"] = time.perf_counter() - t0

        # 2. Initial noise, scaled to the scheduler's first noise level.
        plan = self.scheduler.plan(num_inference_steps, eta=eta)
        batch = len(prompts) * num_images_per_prompt
        vae = self.folder.vae
        shape = (batch, vae.latent_channels, height // vae.scale_factor, width // vae.scale_factor)
        latents = generator.randn(shape).astype(np.float32) * np.float32(plan.init_noise_sigma)
        state = self.scheduler.initial_state(plan)

        # 3. Denoise: one batched UNet call per evaluation (2N with guidance), then one solver step.
        timestep_dtype = self.unet.input_dtypes["timestep"]
        unet_batch = 2 * batch if do_cfg else batch
        unet_seconds = 0.0
        steps = range(plan.num_evaluations)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="denoising", unit="step")
        t_loop = time.perf_counter()
        for i in steps:
            t = plan.timesteps[i]
            model_input = self.scheduler.scale_model_input(plan, i, latents)
            if do_cfg:
                model_input = np.concatenate([model_input, model_input])
            t_unet = time.perf_counter()
            noise_pred = self.unet.run({
                "sample": model_input,
                "timestep": np.full((unet_batch,), t, dtype=timestep_dtype),
                "encoder_hidden_states": embeds,
            })["out_sample"]
            unet_seconds += time.perf_counter() - t_unet
            if not np.isfinite(noise_pred).all():
                raise GenerationError(
                    f"the UNet returned NaN/Inf at step {i + 1}/{plan.num_evaluations} (timestep {t}); "
                    "the model or its precision is broken for this input"
                )
            if do_cfg:
                noise_pred = guide(noise_pred, guidance_scale, guidance_rescale)
            latents, state = self.scheduler.step(plan, i, noise_pred, latents, state, generator)
            if callback is not None and callback(i, float(t), latents) is False:
                raise CancelledError(f"cancelled by the callback after step {i + 1}/{plan.num_evaluations}")
        timings["unet"] = unet_seconds
        timings["scheduler_and_guidance"] = time.perf_counter() - t_loop - unet_seconds
        timings["steps"] = plan.num_evaluations

        # 4. Decode latents to pixels, one image at a time (same result, less memory).
        t0 = time.perf_counter()
        if output_type == "latent":
            images = latents
        else:
            scaled = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor)
            decoded = np.concatenate([
                self.vae_decoder.run({"latent_sample": scaled[k:k + 1]})["sample"] for k in range(batch)
            ])
            if not np.isfinite(decoded).all():
                raise GenerationError("the VAE decoder returned NaN/Inf; the image would be black")
            if output_type == "np":
                images = imageio.to_unit(decoded)
            else:
                images = imageio.to_uint8(decoded)
                if output_type == "pil":
                    images = imageio.to_pil(images)
        timings["vae_decoder"] = time.perf_counter() - t0

        parameters = [
            imageio.format_parameters(
                prompt=p, negative_prompt=n, steps=num_inference_steps,
                scheduler=self.scheduler_name or self.folder.scheduler_config.get("_class_name", "?"),
                guidance_scale=guidance_scale, seed=getattr(generator, "seed", None), width=width,
                height=height, model=self.folder.path.name,
            )
            for p, n in zip(prompts, negatives) for _ in range(num_images_per_prompt)
        ]
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)
