"""Generator: one folder's family, engines and scheduler, and the stages of every generation.

    request -> family.check, task.prepare (all checks, before any engine runs)
            -> plan (each task may build or cut it) -> family.conditioning (text encoders)
            -> task.start (initial latents) -> loop.denoise -> codec.decode -> task.finish -> PipelineOutput

A generation's state lives in a `Run`, made per call, so one Generator serves concurrent calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sdrt.engines.spec import zero_residuals as spec_zero_residuals
from sdrt.runtime import image as imageio
from sdrt.runtime import memory
from sdrt.runtime.adapters import Adapters
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.core import budget, codec, loop
from sdrt.runtime.core.models import Models
from sdrt.runtime.core.request import Request
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.guidance import Guidance
from sdrt.runtime.prompts import check_emphasis
from sdrt.runtime.schedulers import load_scheduler
from sdrt.runtime.schedulers.plan import Plan
from sdrt.runtime.schedulers.scheduler import Scheduler
from sdrt.runtime.tiling import Tiling


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, uint8 NHWC, float NHWC in [0, 1], or latents
    seed: int | None
    parameters: list[str]  # A1111-style text, one per image
    timings: dict = field(default_factory=dict)  # seconds per stage; steps and UNet evaluations


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
                f"{subject}{name}={v} is not a multiple of {m} px, which this model's UNet needs "
                f"({folder.latent_multiple} latent cells x {folder.vae.scale_factor} px); "
                f"nearest valid sizes: {lower} or {lower + m}"
            )


def zero_residuals(run: Run) -> dict:
    """Zeros for a UNet's ControlNet residual inputs when no task gives residuals (an exact no-op: x + 0 = x),
    batched as the conditioning; constant, so they go to the device once per generation with it."""
    if any(getattr(task, "gives_residuals", False) for task in run.tasks):
        return {}
    batch = len(run.conditioning["encoder_hidden_states"])
    return spec_zero_residuals(run.folder.spec("unet"), batch, run.height, run.width)


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
        guidance = Guidance(self.family.guided(request), request.guidance_scale, request.guidance_rescale,
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
        return PipelineOutput(images, getattr(run.generator, "seed", None), self._parameters(run), run.timings)

    def _scheduler(self, name: str) -> Scheduler:
        """A request's own scheduler, made from the folder's config once per name (schedulers are immutable)."""
        if name not in self._schedulers:
            self._schedulers[name] = load_scheduler(self.folder.scheduler_config, name=name)
        return self._schedulers[name]

    def _parameters(self, run: Run) -> list[str]:
        """A1111-style parameters text per image."""
        request = run.request
        scheduler = request.scheduler or self.scheduler_name or self.folder.scheduler_config.get("_class_name", "?")
        negatives = request.negative_prompt or ("",) * len(request.prompt)
        fields = dict(steps=request.num_inference_steps, guidance_scale=request.guidance_scale, **run.parameters)
        if request.guidance_interval is not None:
            fields["guidance_interval"] = "{}-{}".format(*request.guidance_interval)
        return [
            imageio.format_parameters(prompt=p, negative_prompt=n, scheduler=scheduler,
                                      seed=getattr(run.generator, "seed", None), model=self.folder.path.name, **fields)
            for p, n in zip(request.prompt, negatives) for _ in range(request.num_images_per_prompt)
        ]
