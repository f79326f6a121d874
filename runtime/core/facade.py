"""What the diffusers-named pipeline classes share: opening a folder for one (family, task) pair.

Each facade (StableDiffusionPipeline, StableDiffusionXLInpaintPipeline, ...) is a class attribute or two
(`family`: the family it runs; `task`: the task that starts its runs; `needs_encoder`) and a `__call__`
with diffusers' keyword signature that hands its arguments to `_generate`. No facade inherits from another.
"""

from __future__ import annotations

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.core.generate import Generator, PipelineOutput, check_size
from sdrt.runtime.core.request import Request
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.families import family_class, family_name
from sdrt.runtime.tasks.handoff import HandOff
from sdrt.runtime.tasks.inpaint import Inpaint, is_inpainting_unet

ENGINES = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3", "unet",
           "vae_decoder", "vae_encoder")
DIT_CLASSES = {"stable-diffusion-3": "sdrt.runtime.sd3's StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline "
                                     "(inpainting: sdrt.runtime.dit_inpaint's StableDiffusion3InpaintPipeline)",
               "flux": "sdrt.runtime.flux's FluxPipeline / FluxImg2ImgPipeline (inpainting: sdrt.runtime.dit_inpaint's "
                       "FluxInpaintPipeline)"}


def check_folder(folder: ModelFolder, family: str, task, facade: str):
    """The folder's `family` object; UnsupportedConfigError for a folder that another pipeline class runs, saying
    which one."""
    actual = family_name(folder)
    if family in DIT_CLASSES or actual in DIT_CLASSES:
        if actual != family:
            runs = DIT_CLASSES.get(actual, "the pipeline of its family")
            raise UnsupportedConfigError(
                f"{folder.path} is a {actual} model ({folder.pipeline}); {facade} runs {family} ones: run it with "
                f"{runs} (sdrt.runtime.families picks the class; sdrt generate too)")
        if task is Inpaint:
            if "vae_encoder" not in folder.components:
                raise ModelFolderError(f"{folder.path} lacks vae_encoder/model.onnx, which inpainting needs to read "
                                       "the picture; re-export the checkpoint with sdrt export")
            if is_inpainting_unet(folder):
                raise UnsupportedConfigError(
                    f"{folder.path}: the transformer takes {folder.unet_config.get('in_channels')} input channels, "
                    "the mask and masked picture beside the latents (an inpainting or Fill model); sdrt inpaints "
                    "with ordinary SD3 / Flux transformers only, blending the picture back after each step")
        return family_class(family)(folder)
    channels, latent_channels = folder.unet_config.get("in_channels"), folder.vae.latent_channels
    if task is Inpaint:
        if actual != family:
            raise UnsupportedConfigError(
                f"{folder.path} is a {folder.family} model ({folder.pipeline}, UNet time_cond_proj_dim="
                f"{folder.unet_config.get('time_cond_proj_dim')}); inpainting runs Stable Diffusion 1.x / 2.x "
                "folders (StableDiffusionInpaintPipeline) and SDXL ones (sdrt.runtime.sdxl_inpaint) only, and "
                f"{facade} the {family} ones: sdrt.runtime.families.inpaint_pipeline picks the class"
            )
        if "vae_encoder" not in folder.components:
            raise ModelFolderError(
                f"{folder.path} lacks vae_encoder/model.onnx, which inpainting needs to read the picture; "
                "re-export the checkpoint with sdrt export (its default components include vae_encoder)"
            )
        if channels not in (latent_channels, 2 * latent_channels + 1):
            raise UnsupportedConfigError(
                f"{folder.path}: the UNet takes {channels} input channels; inpainting runs UNets of "
                f"{latent_channels} (latents) or {2 * latent_channels + 1} (latents, mask, masked picture)"
            )
        return family_class(family)(folder)
    made = family_class(family)(folder)  # the family's own refusals first (an LCM facade on a plain UNet, ...)
    if channels != latent_channels:
        raise UnsupportedConfigError(
            f"{folder.path}: the UNet takes {channels} input channels, not the VAE's {latent_channels} latent "
            "channels: an inpainting model; run it with sdrt.runtime.families.inpaint_pipeline, which picks "
            "StableDiffusion(XL)InpaintPipeline (sdrt generate --image PICTURE --mask MASK)"
        )
    if actual == "latent-consistency" and family != actual:
        raise UnsupportedConfigError(
            f"{folder.path} is a Latent Consistency Model (its UNet takes a guidance embedding): run it with "
            "sdrt.runtime.lcm.LatentConsistencyPipeline / LatentConsistencyImg2ImgPipeline (sdrt generate picks it)"
        )
    if actual == "stable-diffusion-xl" and family != actual:
        raise UnsupportedConfigError(
            f"{folder.path} is an SDXL model (two text encoders): run it with sdrt.runtime.sdxl's "
            "StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline (sdrt.runtime.families picks the class)"
        )
    return made


class Facade:
    """A folder opened for one family and one starting task; engines are reachable as attributes (pipe.unet...)."""

    family = "stable-diffusion"  # the family this class runs (sdrt.runtime.families.FAMILIES)
    task = None  # the Task class that starts its runs
    needs_encoder = False  # the task reads pictures: the VAE encoder is opened too

    def __init__(self, folder: ModelFolder, provider="cpu", scheduler: str | None = None, low_memory: bool = False,
                 cfg_mode: str | None = None, vae_tiling=None, vae: str = "full", emphasis: str = "original",
                 controlnet=None, **engine_options):
        """low_memory: one network in memory at a time, guidance halves one after the other, lean sessions
        (sdrt.runtime.memory); same images. cfg_mode: "batched" (one UNet call of 2N) or "sequential" (two
        of N; the default in low-memory mode). vae_tiling: decode (and encode) in overlapping tiles
        (sdrt.runtime.tiling.Tiling); changes the image slightly. vae: "full", or "taesd" for the tiny VAE that
        `sdrt export-taesd` adds (sdrt.runtime.vae). emphasis: "original" reads prompts in A1111's syntax, of any
        length (sdrt.runtime.prompts: `(word:1.2)`, `[word]`, BREAK, chunks of 75 tokens); "none" takes them as
        literal text cut at 77 tokens, as diffusers. engine_options: create_engine's options (SessionOptions fields,
        allow_fallback, io_binding: on by default for onnxruntime on a GPU), to every engine; fixed_shapes and
        cuda_graph go to the UNet only."""
        if not isinstance(folder, ModelFolder):
            raise InvalidInputError(
                f"folder must be a ModelFolder; open a path with {type(self).__name__}.from_pretrained(path), got "
                f"{type(folder).__name__}"
            )
        family = check_folder(folder, self.family, self.task, type(self).__name__)
        object.__setattr__(self, "core", Generator(
            folder, family, provider=provider, scheduler=scheduler, low_memory=low_memory,
            cfg_mode=cfg_mode, vae_tiling=vae_tiling, vae=vae, encoder=self.needs_encoder, emphasis=emphasis,
            controlnet=controlnet, **engine_options))

    @classmethod
    def from_pretrained(cls, path, provider="cpu", scheduler: str | None = None, verify: str = "size",
                        **engine_options):
        return cls(ModelFolder.open(path, verify=verify), provider=provider, scheduler=scheduler, **engine_options)

    # -- the engines and settings, as attributes (replaceable: recording or instrumented engines) -------

    def __getattr__(self, name):
        core = self.__dict__.get("core")
        absent = (name == "vae_encoder" and not self.needs_encoder) or (
            name in ("text_encoder_2", "tokenizer_2") and not self.uses_text_encoder_2)
        if core is not None and not absent:
            if name in ENGINES or name in ("provider", "low_memory", "engine_options", "vae_choice"):
                return getattr(core.models, name)
            if name == "transformer" and core.folder.denoiser == "transformer":
                return core.models.unet
            if name in ("folder", "scheduler", "scheduler_name", "cfg_mode", "vae_tiling", "models", "emphasis"):
                return getattr(core, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        target = self.core.models if name in ENGINES else \
            self.core if name in ("scheduler", "cfg_mode", "vae_tiling", "emphasis") else None
        object.__setattr__(target if target is not None else self, name, value)

    @property
    def uses_text_encoder_2(self) -> bool:
        return self.family in ("stable-diffusion-xl", "stable-diffusion-3", "flux")

    @property
    def prompt_arguments(self) -> tuple[str, ...]:
        """The prompt arguments beyond prompt / negative_prompt that this pipeline takes."""
        return {"stable-diffusion-xl": ("prompt_2", "negative_prompt_2"),
                "flux": ("prompt_2", "negative_prompt_2"),
                "stable-diffusion-3": ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
                }.get(self.family, ())

    @property
    def is_inpainting_unet(self) -> bool:
        return is_inpainting_unet(self.folder)

    def release(self) -> None:
        self.core.models.release()

    # -- LoRA (sdrt.runtime.adapters), with diffusers' method names ------------------------------------

    def load_lora_weights(self, path, adapter_name: str | None = None) -> str:
        """Read a LoRA .safetensors file (kohya/A1111, diffusers/PEFT, LoHa/LoKr) and make it active at weight
        1.0 beside the active ones; every key is checked against this folder now. Returns the adapter name (the
        file's stem unless given). Nothing is re-exported: the next run uses the merged weights."""
        name = self.core.adapters.load(path, adapter_name)
        self.core.adapters.active[name] = 1.0
        return name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """The active adapters and their weights (a single weight applies to all); others are inactive."""
        self.core.adapters.set_active(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return list(self.core.adapters.active)

    def get_list_adapters(self) -> list[str]:
        return list(self.core.adapters.loaded)

    def delete_adapters(self, adapter_names) -> None:
        self.core.adapters.delete(adapter_names)

    def disable_lora(self) -> None:
        """Run without the active adapters (they stay loaded; enable_lora brings them back)."""
        self.core.adapters.disabled = True

    def enable_lora(self) -> None:
        self.core.adapters.disabled = False

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names=None) -> None:
        """Keep the active adapters (or `adapter_names`) applied at `lora_scale` x their weights until
        unfuse_lora, whatever set_adapters says meanwhile (diffusers' fuse_lora; weights are still computed from
        the folder's, so nothing accumulates)."""
        self.core.adapters.fuse(lora_scale, adapter_names)

    def unfuse_lora(self) -> None:
        self.core.adapters.fused.clear()

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (.safetensors: A1111's `emb_params`, diffusers' learned_embeds, SDXL's
        clip_l + clip_g) under `token` (default: the file's token, else its stem); use the token in prompts.
        Returns the tokens added."""
        return self.core.adapters.load_embedding(path, token)

    def unload_lora_weights(self) -> None:
        """Forget every adapter: the next run uses the folder's weights, bit for bit."""
        self.core.adapters.delete(list(self.core.adapters.loaded))

    def _engine(self, component: str):
        return self.core.models.engine(component)

    def _check_size(self, height: int, width: int, subject: str = "") -> None:
        check_size(self.folder, height, width, subject)

    @classmethod
    def call_arguments(cls, arguments: dict) -> dict:
        """The call's arguments with the defaults a facade fills itself (Flux's guidance_scale); the server builds
        its Requests through this too."""
        return arguments

    # -- one generation -------------------------------------------------------------------------------

    def _generate(self, arguments: dict) -> PipelineOutput:
        """A Request from the facade's call arguments (its `locals()`), run with the facade's task, and the
        refiner hand-off when denoising_start or denoising_end is given."""
        request = Request.from_arguments(arguments)
        tasks = [self.task()]
        if self.core.models.controlnets:
            from sdrt.runtime.tasks.control import Control

            tasks.append(Control())
        if request.denoising_start is not None or request.denoising_end is not None:
            tasks.append(HandOff())
        return self.core.generate(request, tasks)
