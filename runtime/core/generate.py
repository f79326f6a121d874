"""Generator: one folder's family, engines and scheduler, and the stages of every generation.

    request -> family.check, task.prepare (all checks, before any engine runs)
            -> plan (each task may build or cut it) -> family.conditioning (text encoders)
            -> task.start (initial latents) -> loop.denoise -> codec.decode -> task.finish -> PipelineOutput

A generation's state lives in a `Run`, made per call, so one Generator serves concurrent calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sdrt.engines.spec import zero_residuals as spec_zero_residuals
from sdrt.runtime import image as imageio
from sdrt.runtime import sdrt_version
from sdrt.runtime import memory
from sdrt.runtime.adapters import Adapters
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.core import budget, codec, loop
from sdrt.runtime.core.models import Models
from sdrt.runtime.core.request import Request
from sdrt.engines.errors import SdrtError
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.guidance import Guidance
from sdrt.runtime.prompts import check_emphasis
from sdrt.runtime.schedulers import load_scheduler
from sdrt.runtime.schedulers.plan import Plan
from sdrt.runtime.schedulers.scheduler import Scheduler
from sdrt.runtime.tiling import Tiling


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images (each with info["parameters"]), uint8 NHWC, float NHWC in [0, 1], or latents
    seed: int | None  # the first image's seed (the batch's, with one generator)
    parameters: list[str]  # A1111-style text, one per image
    timings: dict = field(default_factory=dict)  # seconds per stage; steps and UNet evaluations
    seeds: list = field(default_factory=list)  # each image's seed (all the same with one generator for the batch)


@dataclass
class Run:
    """The state of one generation, shared by the family, the tasks and the loop."""

    request: Request
    family: Any  # sdrt.runtime.families.base.Family
    tasks: Sequence  # sdrt.runtime.tasks.base.Task, the first one starts the latents
    models: Models
    scheduler: Scheduler
    guidance: Guidance
    cfg_mode: str
    vae_tiling: Tiling | None
    emphasis: str = "none"  # prompt syntax: "original" (A1111's, sdrt.runtime.prompts) or "none" (literal)
    generator: Any = None
    height: int | None = None  # the processing size, set by the first task's prepare
    width: int | None = None
    plan: Plan | None = None
    resume: bool = False  # start from the given latents as they are (denoising_start), nothing noised
    conditioning: dict = field(default_factory=dict)  # the denoiser's constant inputs, negatives first with CFG
    parameters: dict = field(default_factory=dict)  # A1111 infotext fields the tasks add
    timings: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.request.batch

    @property
    def folder(self) -> ModelFolder:
        return self.models.folder

    def latent_shape(self) -> tuple[int, int, int, int]:
        vae = self.folder.vae
        return (self.batch, vae.latent_channels, self.height // vae.scale_factor, self.width // vae.scale_factor)


def check_size(folder: ModelFolder, height, width, subject: str = "") -> None:
    """height and width are multiples of what the UNet needs; `subject` prefixes the names ("image ")."""
    m = folder.pixel_multiple
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < m or v % m:
            lower = max(m, (int(v) // m) * m) if isinstance(v, (int, np.integer)) else m
            raise InvalidInputError(
                f"{subject}{name}={v} is not a multiple of {m} px, which this model's "
                f"{'UNet' if folder.denoiser == 'unet' else 'transformer'} needs "
                f"({folder.latent_multiple} latent cells x {folder.vae.scale_factor} px); "
                f"nearest valid sizes: {lower} or {lower + m}"
            )


def zero_residuals(run: Run) -> dict:
    """Zeros for a UNet's ControlNet residual inputs when no task gives residuals (an exact no-op: x + 0 = x),
    batched as the conditioning; constant, so they go to the device once per generation with it."""
    if any(getattr(task, "gives_residuals", False) for task in run.tasks):
        return {}
    batch = len(run.conditioning["encoder_hidden_states"])
    return spec_zero_residuals(run.folder.spec(run.folder.denoiser), batch, run.height, run.width)


class Generator:
    """A folder opened for generation: its family, engines (Models) and scheduler."""

    def __init__(self, folder: ModelFolder, family, provider="cpu", scheduler: str | None = None,
                 low_memory: bool = False, cfg_mode: str | None = None, vae_tiling: Tiling | None = None,
                 vae: str = "full", encoder: bool = False, emphasis: str = "original", controlnet=None,
                 **engine_options):
        if scheduler is not None and not isinstance(scheduler, str):
            raise InvalidInputError(f"scheduler must be a name such as 'euler-a' or None, got {scheduler!r}")
        if cfg_mode is None:
            cfg_mode = "sequential" if low_memory else "batched"
        if cfg_mode not in memory.CFG_MODES:
            raise InvalidInputError(f"cfg_mode must be one of {memory.CFG_MODES}, got {cfg_mode!r}")
        if vae_tiling is not None:
            if not isinstance(vae_tiling, Tiling):
                raise InvalidInputError(f"vae_tiling must be a sdrt.runtime.tiling.Tiling or None, got {vae_tiling!r}")
            vae_tiling.check(folder.vae.scale_factor)
        self.emphasis = check_emphasis(emphasis)
        self.folder = folder
        self.family = family
        self.cfg_mode = cfg_mode
        self.vae_tiling = vae_tiling
        self.models = Models(folder, provider=provider, low_memory=low_memory, vae=vae, encoder=encoder,
                             controlnet=controlnet, **engine_options)
        self.scheduler = load_scheduler(folder.scheduler_config, name=scheduler)
        self.scheduler_name = scheduler
        self._schedulers: dict[str, Scheduler] = {}
        self.adapters = Adapters(self.models)

    def generate(self, request: Request, tasks: Sequence) -> PipelineOutput:
        run = self.prepare(request, tasks)
        loras = self.adapters.wanted(request.loras)  # LoRA files read and matched to the weights now
        run.parameters.update(self.adapters.describe(loras))

        with self.adapters.using(loras):
            latents = loop.denoise(run, self.start(run))
            return self.finish(run, latents)

    # The stages of `generate`, for a caller that runs many generations' denoise loops together (sdrt.serve).

    def prepare(self, request: Request, tasks: Sequence) -> Run:
        """1. A Run with every check done (before any engine runs), its plan and its generator."""
        guidance = Guidance(self.family.guided(request), self.family.cfg_scale(request), request.guidance_rescale,
                            request.guidance_interval)
        scheduler = self.scheduler if request.scheduler is None else self._scheduler(request.scheduler)
        run = Run(request, self.family, tuple(tasks), self.models, scheduler, guidance, self.cfg_mode,
                  self.vae_tiling, self.emphasis)
        self.family.check(run)
        for task in run.tasks:
            task.prepare(run)
        plan = None
        for task in run.tasks:
            plan = task.plan(run, plan)
        run.plan = plan
        budget.check(run)  # the estimated peak against the memory available, before anything is allocated
        run.generator = request.make_generator()
        return run

    def start(self, run: Run) -> np.ndarray:
        """2. Conditioning (text encoders) and 3. the initial latents."""
        run.conditioning = self.family.conditioning(run)
        run.conditioning.update(zero_residuals(run))
        latents = None
        for task in run.tasks:
            latents = task.start(run, latents)
        return latents

    def finish(self, run: Run, latents: np.ndarray) -> PipelineOutput:
        """5. Decode and finish the denoised latents."""
        images = codec.decode(self.models, latents, run.request.output_type, self.vae_tiling, run.timings)
        for task in run.tasks:
            images = task.finish(run, images)
        return self._output(run, images)

    def _scheduler(self, name: str) -> Scheduler:
        """A request's own scheduler, made from the folder's config once per name (schedulers are immutable)."""
        if name not in self._schedulers:
            self._schedulers[name] = load_scheduler(self.folder.scheduler_config, name=name)
        return self._schedulers[name]

    def _output(self, run: Run, images) -> PipelineOutput:
        """The images with their seeds and parameters (attached to PIL images, so that image.save keeps them)."""
        parameters = self._parameters(run)
        if run.request.output_type == "pil":
            for image, text in zip(images, parameters):
                imageio.attach_parameters(image, text)
        seeds = self._seeds(run)
        return PipelineOutput(images, seeds[0], parameters, run.timings, seeds)

    def model_hash(self) -> str:
        """A1111's `Model hash` for this folder (unet_hash), worked out once."""
        if getattr(self, "_model_hash", None) is None:
            self._model_hash = unet_hash(self.folder)
        return self._model_hash

    @staticmethod
    def _seeds(run: Run) -> list:
        """Each image's seed: its own generator's, or the batch's one."""
        seeds = getattr(run.generator, "seeds", None)
        return list(seeds) if seeds is not None else [getattr(run.generator, "seed", None)] * run.batch

    def _scheduler_options(self, run: Run) -> str | None:
        """The run's scheduler options that differ from the folder's scheduler_config.json read for the same name
        (set with --scheduler-option / --scheduler-config, or a scheduler given to the pipeline), as
        "key=value; key=value" (values in JSON unless a plain word), what --scheduler-option takes; None for none."""
        scheduler = run.scheduler
        try:
            reference = self._scheduler(scheduler.name).config
        except SdrtError:  # a scheduler the folder's config cannot make: record all it differs in from defaults
            reference = type(scheduler.config)(class_name=scheduler.config.class_name)
        differ = {f.name: getattr(scheduler.config, f.name) for f in dataclasses.fields(scheduler.config)
                  if getattr(scheduler.config, f.name) != getattr(reference, f.name)}
        return "; ".join(f"{key}={_option_value(value)}" for key, value in differ.items()) or None

    def _parameters(self, run: Run) -> list[str]:
        """A1111-style parameters text per image: enough to make it again (sdrt generate --from-png), with every
        option that changes the image and is not its default (and --low-memory, which does not)."""
        request = run.request
        negatives = request.negative_prompt or ("",) * len(request.prompt)
        fields = dict(steps=request.num_inference_steps, guidance_scale=request.guidance_scale, **run.parameters)
        options = {"RNG": getattr(run.generator, "kind", None), "scheduler_options": self._scheduler_options(run)}
        if request.guidance_interval is not None:
            options["guidance_interval"] = "{}-{}".format(*request.guidance_interval)
        if request.guidance_rescale:
            options["guidance_rescale"] = request.guidance_rescale
        if request.eta:
            options["eta"] = request.eta
        if request.clip_skip is not None:  # A1111 counts the last layer as 1: diffusers' clip_skip=1 is its 2
            options["clip_skip"] = request.clip_skip + 1
        if self.emphasis != "original":
            options["emphasis"] = self.emphasis.capitalize()
        for name in ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"):
            value = getattr(request, name)
            if value is not None:
                options[name] = value if isinstance(value, str) else json.dumps(list(value), ensure_ascii=False)
        if request.max_sequence_length is not None:
            options["max_sequence_length"] = request.max_sequence_length
        if run.family.cfg_scale(request) != request.guidance_scale:  # Flux: true CFG beside distilled guidance
            options["true_cfg_scale"] = request.true_cfg_scale
        if self.models.vae_choice.name != "full":
            options["VAE"] = self.models.vae_choice.name
        if self.vae_tiling is not None:
            options["VAE tiling"] = f"{self.vae_tiling.size}/{self.vae_tiling.overlap}"
        provider = self.models.provider  # the same math; other kernels (and OpenVINO's precision) change the bits
        if not (isinstance(provider, str) and provider.strip().lower() == "cpu"):
            options["provider"] = provider if isinstance(provider, str) else str(provider)
        options["precision"] = self.models.engine_options.get("precision")
        if getattr(self.models, "cache_interval", 1) != 1:  # step caching (sdrt.runtime.deepcache)
            options["cache_interval"] = self.models.cache_interval
        if self.models.low_memory:
            options["low_memory"] = True
        if getattr(self.models, "alternate_controlnet", False):
            options["alternate_controlnet"] = True
        options["version"] = f"sdrt {sdrt_version()}"
        seeds = self._seeds(run)
        images = [(p, n) for p, n in zip(request.prompt, negatives) for _ in range(request.num_images_per_prompt)]
        return [imageio.format_parameters(prompt=prompt, negative_prompt=negative, scheduler=run.scheduler.name,
                                          seed=seed, model=self.folder.path.name, model_hash=self.model_hash(),
                                          **fields, **options)
                for (prompt, negative), seed in zip(images, seeds)]


def _option_value(value) -> str:
    """A scheduler option's value as --scheduler-option reads it back: JSON, or a word as it is (trailing)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            if value.lower() not in ("true", "false", "none", "null") and ";" not in value:
                return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def unet_hash(folder: ModelFolder) -> str:
    """A1111's `Model hash` of a folder: the first 10 hex digits of its UNet's sha256 (of model.onnx, or of its
    files' hashes joined when it has external data, as engines.cache.onnx_sha256), read from sdrt.json when it
    records them, else computed once per file change (remembered in the cache folder)."""
    files = (folder.manifest or {}).get("files", {})
    denoiser = folder.denoiser
    records = [files.get(f"{denoiser}/{name}", {}).get("sha256") for name in ("model.onnx", "model.onnx_data")]
    onnx_data = (folder.path / denoiser / "model.onnx_data").is_file()
    if records[0] and (records[1] or not onnx_data):
        digest = records[0] if not onnx_data else hashlib.sha256("".join(records).encode()).hexdigest()
    else:
        from sdrt.engines.cache import onnx_sha256

        digest = onnx_sha256(folder.onnx_path(denoiser))
    return digest[:10]
