"""Text-to-image with an exported Stable Diffusion folder: tokens -> embeddings -> denoise loop -> image.

`StableDiffusionBase` holds the engines and the stages every Stable Diffusion pipeline shares
(prompt encoding, the denoise loop, decoding); `StableDiffusionPipeline` starts that loop from pure
noise, `sdrt.runtime.img2img.StableDiffusionImg2ImgPipeline` from a noised picture. The pipeline
owns the loop and every engine call, and reads top to bottom; the scheduler only supplies a
precomputed plan and a pure step function, so nothing here branches on its type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.engines import create_engine
from sdrt.engines.fallback import FiniteOrFallback, fallback_file
from sdrt.runtime import image as imageio
from sdrt.runtime import memory, tiling
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.errors import CancelledError, GenerationError, InvalidInputError, UnsupportedConfigError
from sdrt.runtime.guidance import guide
from sdrt.runtime.rng import make_generator
from sdrt.runtime.schedulers import load_scheduler
from sdrt.runtime.schedulers.plan import Plan
from sdrt.runtime.tiling import Tiling
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.vae import select_vae

OUTPUT_TYPES = ("pil", "np", "uint8", "latent")
# Engine options for the network called every step (the UNet) only: fixed input buffers and a captured CUDA
# graph pay there; the text encoder and the VAE run once per image.
PER_STEP_OPTIONS = ("fixed_shapes", "cuda_graph")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, uint8 NHWC, float NHWC in [0, 1], or latents
    seed: int | None
    parameters: list[str]  # A1111-style text, one per image
    timings: dict = field(default_factory=dict)  # seconds per stage


class StableDiffusionBase:
    """Engines and shared stages of the SD 1.x / 2.x pipelines; subclasses define __call__."""

    uses_text_encoder_2 = False  # SDXL's pipelines (sdrt.runtime.sdxl) feed a second text encoder
    uses_timestep_cond = False  # LCM's pipeline (sdrt.runtime.lcm) feeds the guidance embedding

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, low_memory: bool = False,
                 cfg_mode: str | None = None, vae_tiling: Tiling | None = None, vae: str = "full", **engine_options):
        """low_memory: one network in memory at a time, guidance halves one after the other, lean sessions
        (sdrt.runtime.memory); same images. cfg_mode: "batched" (one UNet call of 2N) or "sequential" (two
        of N; the default in low-memory mode). vae_tiling: decode (and encode) in overlapping tiles
        (sdrt.runtime.tiling.Tiling); changes the image slightly. vae: "full", or "taesd" for the tiny VAE that
        `sdrt export-taesd` adds (sdrt.runtime.vae). engine_options: create_engine's options (SessionOptions fields,
        allow_fallback, io_binding: on by default for onnxruntime on a GPU), to every engine; fixed_shapes and
        cuda_graph go to the UNet only."""
        if cfg_mode is None:
            cfg_mode = "sequential" if low_memory else "batched"
        if cfg_mode not in memory.CFG_MODES:
            raise InvalidInputError(f"cfg_mode must be one of {memory.CFG_MODES}, got {cfg_mode!r}")
        if vae_tiling is not None:
            vae_tiling.check(folder.vae.scale_factor)
        self._check_unet_channels(folder)
        folder.check_provider(provider)
        if folder.unet_config.get("time_cond_proj_dim") is not None and not self.uses_timestep_cond:
            raise UnsupportedConfigError(
                f"{folder.path} is a Latent Consistency Model (its UNet takes a guidance embedding): run it with "
                "sdrt.runtime.lcm.LatentConsistencyPipeline / LatentConsistencyImg2ImgPipeline (sdrt generate picks it)"
            )
        if "text_encoder_2" in folder.components and not self.uses_text_encoder_2:
            raise UnsupportedConfigError(
                f"{folder.path} is an SDXL model (two text encoders): run it with sdrt.runtime.sdxl's "
                "StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline (sdrt.runtime.families picks the class)"
            )
        self.folder = folder
        self.provider = provider
        self.low_memory = low_memory
        self.cfg_mode = cfg_mode
        self.vae_tiling = vae_tiling
        if low_memory and "session_options" not in engine_options:
            engine_options = {**memory.LOW_MEMORY_SESSION, **engine_options}
        self.engine_options = engine_options
        # None in a folder without the first text encoder (the SDXL refiner: sdrt.runtime.sdxl uses the second only).
        first_encoder = "text_encoder" in folder.components
        self.tokenizer = ClipTokenizer.from_folder(folder.path / "tokenizer") if first_encoder else None
        self.text_encoder = self._engine("text_encoder") if first_encoder else None
        self.unet = self._engine("unet")
        self.vae_choice = select_vae(folder, vae)
        self.vae_decoder = self._nan_safe(self.vae_choice.decoder)
        self.scheduler = load_scheduler(folder.scheduler_config, name=scheduler)
        self.scheduler_name = scheduler

    @classmethod
    def from_pretrained(cls, path, provider="cpu", scheduler: str | None = None, verify: str = "size",
                        **engine_options):
        return cls(ModelFolder.open(path, verify=verify), provider=provider, scheduler=scheduler, **engine_options)

    def _engine_options(self, component: str) -> dict:
        if component == "unet":
            return self.engine_options
        return {k: v for k, v in self.engine_options.items() if k not in PER_STEP_OPTIONS}

    def _engine(self, component: str):
        return create_engine(self.folder.onnx_path(component), self.folder.spec(component), provider=self.provider,
                             **self._engine_options(component))

    def _nan_safe(self, component: str):
        """The engine, re-run with the fp32 copy that an fp16 folder keeps (sdrt.json "fallbacks") on NaN/Inf."""
        engine, fp32 = self._engine(component), fallback_file(self.folder.path, self.folder.manifest, component)
        if fp32 is None:
            return engine
        return FiniteOrFallback(engine, lambda: create_engine(fp32, self.folder.spec(component), provider=self.provider,
                                                              **self._engine_options(component)), name=component)

    def _stage_done(self, *engines) -> None:
        """In low-memory mode, unload engines once their stage has run (each reloads when next needed)."""
        if self.low_memory:
            for engine in engines:
                if engine.loaded:
                    memory.release(engine)

    def _engines(self) -> tuple:
        return tuple(e for e in (self.text_encoder, self.unet, self.vae_decoder) if e is not None)

    def release(self) -> None:
        for engine in self._engines():
            engine.release()

    # -- checks -------------------------------------------------------------------------------

    def _check_unet_channels(self, folder: ModelFolder) -> None:
        """The UNet takes the latents alone (an inpainting UNet, which takes more, needs the inpainting pipeline)."""
        in_channels = folder.unet_config.get("in_channels")
        if in_channels != folder.vae.latent_channels:
            raise UnsupportedConfigError(
                f"{folder.path}: the UNet takes {in_channels} input channels, not the VAE's "
                f"{folder.vae.latent_channels} latent channels: an inpainting model; run it with "
                "sdrt.runtime.families.inpaint_pipeline, which picks StableDiffusion(XL)InpaintPipeline (sdrt "
                "generate --image PICTURE --mask MASK)"
            )

    def _check_size(self, height: int, width: int, subject: str = "") -> None:
        """height and width are multiples of what the UNet needs; `subject` prefixes the names ("image ")."""
        m = self.folder.pixel_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v < m or v % m:
                lower = max(m, (int(v) // m) * m) if isinstance(v, (int, np.integer)) else m
                raise InvalidInputError(
                    f"{subject}{name}={v} is not a multiple of {m} px, which this model's UNet needs "
                    f"({self.folder.latent_multiple} latent cells x {self.folder.vae.scale_factor} px); "
                    f"nearest valid sizes: {lower} or {lower + m}"
                )

    @staticmethod
    def _check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                         output_type) -> None:
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

    # -- the shared stages ----------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts))
        return self.text_encoder.run({"input_ids": ids})["last_hidden_state"]

    def _embeddings(self, prompts: list[str], negatives: list[str], num_images_per_prompt: int, do_cfg: bool,
                    timings: dict) -> np.ndarray:
        """Negatives and prompts in one text-encoder batch (negatives only with guidance), each repeated per image."""
        t0 = time.perf_counter()
        embeds = self.encode_prompt(negatives + prompts if do_cfg else prompts)
        self._stage_done(self.text_encoder)
        embeds = np.repeat(embeds, num_images_per_prompt, axis=0)
        timings["text_encoder"] = time.perf_counter() - t0
        return embeds

    def _denoise(self, plan: Plan, latents: np.ndarray, embeds: np.ndarray, guidance_scale: float,
                 guidance_rescale: float, generator, callback, progress: bool, timings: dict,
                 unet_inputs: dict[str, np.ndarray] | None = None, extra_channels: np.ndarray | None = None,
                 after_step: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Run every evaluation of `plan` from `latents`: the UNet (with guidance one call of 2N, or two of N when
        cfg_mode is "sequential"), then one solver step.

        `unet_inputs`: the UNet's inputs beyond sample/timestep/encoder_hidden_states (SDXL's
        text_embeds and time_ids, LCM's timestep_cond), constant over the steps and batched as
        `embeds` is (negatives first with guidance). This conditioning goes to the UNet's device once
        per generation (`Engine.device_resident`; a no-op for engines that take host arrays); each step
        sends the sample and timestep and reads out_sample back for the scheduler.
        `extra_channels`: constant channels appended to the scaled latents of every UNet input, batched
        as `latents` (an inpainting UNet's mask and masked-image latents).
        `after_step(i, latents) -> latents`: applied after each solver step, before the callback
        (inpainting's blend of the known region into the latents).
        """
        do_cfg = guidance_scale > 1.0
        batch = len(latents)
        state = self.scheduler.initial_state(plan)
        self._stage_done(*(e for e in self._engines() if e is not self.unet))  # any a subclass's stage left loaded
        timestep_dtype = self.unet.input_dtypes["timestep"]
        # The conditioning of each UNet call per step: all of it at once, or the negative then the positive half.
        conditioning = {"encoder_hidden_states": embeds, **(unet_inputs or {})}
        if do_cfg and self.cfg_mode == "sequential":
            calls = [{name: np.split(value, 2)[half] for name, value in conditioning.items()} for half in (0, 1)]
        else:
            calls = [conditioning]
        # Once per generation, not per step. With fixed input buffers (CUDA graphs) the two sequential halves take
        # turns in one buffer, each copied in by its own call, so that every call reads the same addresses.
        calls = [(len(call["encoder_hidden_states"]), self.unet.device_resident(call)) for call in calls]
        unet_seconds = 0.0
        steps = range(plan.num_evaluations)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="denoising", unit="step")
        t_loop = time.perf_counter()
        for i in steps:
            t = plan.timesteps[i]
            model_input = self.scheduler.scale_model_input(plan, i, latents)
            if extra_channels is not None:
                model_input = np.concatenate([model_input, extra_channels], axis=1)
            t_unet = time.perf_counter()
            noise_pred = []
            for n, call in calls:
                noise_pred.append(self.unet.run({
                    "sample": np.concatenate([model_input] * (n // batch)),
                    "timestep": np.full((n,), t, dtype=timestep_dtype),
                    **call,
                })["out_sample"])
            noise_pred = noise_pred[0] if len(noise_pred) == 1 else np.concatenate(noise_pred)
            unet_seconds += time.perf_counter() - t_unet
            if not np.isfinite(noise_pred).all():
                raise GenerationError(
                    f"the UNet returned NaN/Inf at step {i + 1}/{plan.num_evaluations} (timestep {t}); "
                    "the model or its precision is broken for this input"
                )
            if do_cfg:
                noise_pred = guide(noise_pred, guidance_scale, guidance_rescale)
            latents, state = self.scheduler.step(plan, i, noise_pred, latents, state, generator)
            if after_step is not None:
                latents = after_step(i, latents)
            if callback is not None and callback(i, float(t), latents) is False:
                raise CancelledError(f"cancelled by the callback after step {i + 1}/{plan.num_evaluations}")
        self._stage_done(self.unet)
        timings["unet"] = unet_seconds
        timings["scheduler_and_guidance"] = time.perf_counter() - t_loop - unet_seconds
        timings["steps"] = plan.num_evaluations
        return latents

    def _decode(self, latents: np.ndarray, output_type: str, timings: dict):
        """Latents -> images of output_type, one VAE decode per image (same result, less memory)."""
        t0 = time.perf_counter()
        if output_type == "latent":
            images = latents
        else:
            vae = self.vae_choice.config
            scaled = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor)
            decoded = np.concatenate([
                tiling.decode(lambda z: self.vae_decoder.run({"latent_sample": z})["sample"], scaled[k:k + 1],
                              self.vae_tiling, vae.scale_factor) for k in range(len(latents))
            ])
            self._stage_done(self.vae_decoder)
            if not np.isfinite(decoded).all():
                raise GenerationError(
                    "the VAE decoder returned NaN/Inf; the image would be black. An fp16 folder needs its fp32 "
                    "decoder (vae_decoder_fp32/, which `sdrt optimize --precision fp16` writes): re-run that, or use "
                    "the fp32 export; if the folder has it, the model is broken for this input")
            if output_type == "np":
                images = imageio.to_unit(decoded)
            else:
                images = imageio.to_uint8(decoded)
                if output_type == "pil":
                    images = imageio.to_pil(images)
        timings["vae_decoder"] = time.perf_counter() - t0
        return images

    def _parameters(self, prompts: list[str], negatives: list[str], num_images_per_prompt: int, generator,
                    **fields) -> list[str]:
        """A1111-style parameters text per image; `fields` are format_parameters' other arguments."""
        scheduler = self.scheduler_name or self.folder.scheduler_config.get("_class_name", "?")
        return [
            imageio.format_parameters(prompt=p, negative_prompt=n, scheduler=scheduler,
                                      seed=getattr(generator, "seed", None), model=self.folder.path.name, **fields)
            for p, n in zip(prompts, negatives) for _ in range(num_images_per_prompt)
        ]


class StableDiffusionPipeline(StableDiffusionBase):
    """SD 1.x / 2.x text-to-image over ONNX engines."""

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
        self._check_arguments(num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt,
                              output_type)
        prompts, negatives = self._prompts(prompt, negative_prompt)
        generator = generator if generator is not None else make_generator(seed, rng)
        timings: dict[str, float] = {}

        # 1. Text embeddings.
        embeds = self._embeddings(prompts, negatives, num_images_per_prompt, guidance_scale > 1.0, timings)

        # 2. Initial noise, scaled to the scheduler's first noise level.
        plan = self.scheduler.plan(num_inference_steps, eta=eta)
        vae = self.folder.vae
        shape = (len(prompts) * num_images_per_prompt, vae.latent_channels,
                 height // vae.scale_factor, width // vae.scale_factor)
        latents = generator.randn(shape).astype(np.float32) * np.float32(plan.init_noise_sigma)

        # 3. Denoise, 4. decode.
        latents = self._denoise(plan, latents, embeds, guidance_scale, guidance_rescale, generator, callback,
                                progress, timings)
        images = self._decode(latents, output_type, timings)

        parameters = self._parameters(prompts, negatives, num_images_per_prompt, generator,
                                      steps=num_inference_steps, guidance_scale=guidance_scale, width=width,
                                      height=height)
        return PipelineOutput(images, getattr(generator, "seed", None), parameters, timings)
