"""Models: the engines of one exported folder that a generation needs, and their lifetimes.

Engines load when first run. In low-memory mode (sdrt.runtime.memory) each is released when its stage
ends, so that one network is in memory at a time. The VAE decoder re-runs with the fp32 copy an fp16
folder keeps when it returns NaN/Inf (sdrt.engines.fallback), or, on a backend that computes it in bf16/f16
(OpenVINO), with the same file at fp32.
"""

from __future__ import annotations

from sdrt.engines import create_engine
from sdrt.engines.spec import is_t5
from sdrt.engines.fallback import FiniteOrFallback, fallback_file
from sdrt.runtime import memory
from sdrt.runtime.config import ModelFolder
from sdrt.runtime.control import ControlNetFolder
from sdrt.runtime.deepcache import check_interval, require_graphs
from sdrt.runtime.core import timestep, transformer
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.vae import require_encoder, select_vae

# Engine options for the network called every step (the UNet) only: fixed input buffers and a captured CUDA
# graph pay there; the text encoders and the VAE run once per image.
PER_STEP_OPTIONS = ("fixed_shapes", "cuda_graph")
TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def tokenizer_for(folder: ModelFolder, component: str, tokenizer: str):
    """The tokenizer of a text encoder: T5's (SentencePiece, tokenizer.json) for a T5 encoder, else CLIP's."""
    if is_t5(folder.configs[component]):
        from sdrt.runtime.tokenizer_t5 import T5Tokenizer

        return T5Tokenizer.from_folder(folder.path / tokenizer)
    return ClipTokenizer.from_folder(folder.path / tokenizer)


class Models:
    """Tokenizers and engines: text_encoder(_2) (None where the folder lacks one), unet, vae_decoder, vae_encoder
    (None unless `encoder`). Attributes may be replaced (recording or instrumented engines); stages read them."""

    def __init__(self, folder: ModelFolder, provider="cpu", low_memory: bool = False, vae: str = "full",
                 encoder: bool = False, controlnet=None, alternate_controlnet: bool = False, **engine_options):
        if not isinstance(provider, str):
            raise InvalidInputError(
                f"provider must be a string (cpu, cuda[:N], tensorrt-ep, tensorrt, or an onnxruntime provider name), "
                f"got {provider!r}"
            )
        folder.check_provider(provider)  # a folder the provider cannot run is refused before any engine is made
        if not isinstance(low_memory, bool):
            raise InvalidInputError(f"low_memory must be True or False, got {low_memory!r}")
        self.folder = folder
        self.provider = provider
        self.low_memory = low_memory
        self.cache_interval = check_interval(engine_options.pop("cache_interval", 1))  # sdrt.runtime.deepcache
        if self.cache_interval > 1:
            require_graphs(folder)
        if low_memory and "session_options" not in engine_options:
            engine_options = {**memory.LOW_MEMORY_SESSION, **engine_options}
        self.engine_options = engine_options
        self.vae_choice = select_vae(folder, vae)
        if encoder:
            require_encoder(folder, self.vae_choice)
        for component, tokenizer in TEXT_ENCODERS:
            present = component in folder.components
            setattr(self, tokenizer, tokenizer_for(folder, component, tokenizer) if present else None)
            setattr(self, component, self.engine(component) if present else None)
        # The denoiser, fed as the loop feeds a UNet: an optimum UNet takes a scalar timestep; a transformer (SD3,
        # Flux) other input names, and Flux packed latents (sdrt.runtime.core.transformer).
        denoiser = self.engine(folder.denoiser)
        self.unet = timestep.adapt(denoiser, folder) if folder.denoiser == "unet" else transformer.adapt(denoiser, folder)
        self.vae_decoder = self.nan_safe(self.vae_choice.decoder)
        self.vae_encoder = self.engine(self.vae_choice.encoder) if encoder else None
        # ControlNets (sdrt.runtime.control): (folder, engine) pairs, each checked against this base first.
        self.controlnets = []
        if not isinstance(alternate_controlnet, bool):
            raise InvalidInputError(f"alternate_controlnet must be True or False, got {alternate_controlnet!r}")
        if alternate_controlnet and not (low_memory and controlnet):
            raise InvalidInputError("alternate_controlnet (the ControlNets and the UNet take turns in memory every "
                                    "step) applies in low-memory mode with a ControlNet: give low_memory=True and "
                                    "controlnet=, or leave it out")
        self.alternate_controlnet = alternate_controlnet
        for path in [] if controlnet is None else controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]:
            net = ControlNetFolder.open(path)
            net.check_fits(folder)
            self.controlnets.append((net, create_engine(net.path / "model.onnx", net.spec, provider=self.provider,
                                                        **self.engine_options)))

    def _options(self, component: str) -> dict:
        if component == self.folder.denoiser:
            return self.engine_options
        return {k: v for k, v in self.engine_options.items() if k not in PER_STEP_OPTIONS}

    def engine(self, component: str):
        return create_engine(self.folder.onnx_path(component), self.folder.spec(component), provider=self.provider,
                             **self._options(component))

    def nan_safe(self, component: str):
        """The engine, re-run with the fp32 copy that an fp16 folder keeps (sdrt.json "fallbacks") on NaN/Inf."""
        engine, fp32 = self.engine(component), fallback_file(self.folder.path, self.folder.manifest, component)
        if fp32 is None:
            full = getattr(engine, "at_full_precision", lambda: None)()  # a backend computing in bf16/f16 (OpenVINO): the same file at fp32
            return engine if full is None else FiniteOrFallback(engine, lambda: full, name=component,
                                                                 reason=f"{engine.precision} overflow")
        return FiniteOrFallback(engine, lambda: create_engine(fp32, self.folder.spec(component), provider=self.provider,
                                                              **self._options(component)), name=component)

    @property
    def controlnet_engines(self) -> tuple:
        return tuple(engine for _, engine in self.controlnets)

    def engines(self) -> tuple:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.unet, self.vae_decoder,
                                 self.vae_encoder, *self.controlnet_engines) if e is not None)

    def stage_done(self, *engines) -> None:
        """In low-memory mode, unload engines once their stage has run (each reloads when next needed)."""
        if self.low_memory:
            for engine in engines:
                if engine is not None and engine.loaded:
                    memory.release(engine)

    def release(self) -> None:
        for engine in self.engines():
            engine.release()
        if getattr(self, "_step_cache", None) is not None:
            self._step_cache.release()
