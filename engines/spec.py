"""One frozen spec per network: input/output names, dtypes and shapes with named dynamic axes.

The exporter names ONNX inputs from these specs, engine builders make shape profiles from them and
the runtime builds feeds from them. Names follow optimum's ONNX export of diffusion pipelines, so
folders written by either tool run in the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

Dim = Union[int, str]

# Named dynamic axes. Pixel sizes are "height"/"width"; latent sizes are derived from them.
BATCH, SEQUENCE = "batch", "sequence"
HEIGHT, WIDTH = "height", "width"
LATENT_HEIGHT, LATENT_WIDTH = "latent_height", "latent_width"
DOWNSCALES = (2, 4, 8, 16, 32)  # "latent_height/2" ...: a UNet's down blocks' resolutions
LATENT_TOKENS = "latent_tokens"  # Flux's 2x2-packed latents: (latent_height / 2) * (latent_width / 2) tokens
# The diffusion transformers (DiT) a folder's transformer/config.json names, and their family.
SD3_TRANSFORMER, FLUX_TRANSFORMER = "SD3Transformer2DModel", "FluxTransformer2DModel"
CONTROL_RESIDUALS = "sdrt_control_residuals"  # unet config.json key: the UNet takes ControlNet residuals


def control_residuals(config: Mapping) -> list[tuple[int, int]]:
    """(channels, downscale) of each down-block residual a ControlNet adds to this UNet (diffusers' order: conv_in,
    then every layer of every down block and its downsampler); the mid-block residual is the last block's width at
    the last downscale. From a UNet's (or ControlNet's) config."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    out, scale = [(channels[0], 1)], 1
    for b, width in enumerate(channels):
        out += [(width, scale)] * layers[b]
        if b < len(channels) - 1:
            scale *= 2
            out.append((width, scale))
    return out


def residual_shape(channels: int, scale: int) -> tuple:
    if scale == 1:
        return (BATCH, channels, LATENT_HEIGHT, LATENT_WIDTH)
    return (BATCH, channels, f"{LATENT_HEIGHT}/{scale}", f"{LATENT_WIDTH}/{scale}")


def residual_inputs(config: Mapping) -> list[TensorSpec]:
    """A UNet's ControlNet residual inputs (optimum/diffusers names): down_block_additional_residual_{i}, then
    mid_block_additional_residual."""
    residuals = control_residuals(config)
    specs = [TensorSpec(f"down_block_additional_residual_{i}", "float32", residual_shape(c, s))
             for i, (c, s) in enumerate(residuals)]
    mid = config["block_out_channels"][-1], residuals[-1][1]
    return specs + [TensorSpec("mid_block_additional_residual", "float32", residual_shape(*mid))]


RESIDUAL_PREFIXES = ("down_block_additional_residual_", "mid_block_additional_residual")


def zero_residuals(spec: "NetworkSpec", batch: int, height: int, width: int) -> dict:
    """Zeros for each ControlNet residual input of a UNet spec (none for a UNet without them): what the UNet is fed
    without a ControlNet, an exact no-op (x + 0 = x). height/width in pixels."""
    import numpy as np

    dims = spec.dims(batch, height, width)
    return {t.name: np.zeros(t.resolve(dims), dtype=np.float32)
            for t in spec.inputs if t.name.startswith(RESIDUAL_PREFIXES)}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: a name, a NumPy dtype name and a shape of fixed ints and named axes."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape for the given values of the named axes."""
        missing = [d for d in self.shape if isinstance(d, str) and d not in dims]
        if missing:
            raise KeyError(f"{self.name}: no value for axes {missing}")
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class NetworkSpec:
    """A network's whole interface, plus the pixel-to-latent factor its spatial axes use."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vae_scale_factor: int = 8

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no input {name!r}; inputs: {self.input_names}")

    def dims(self, batch: int, height: int, width: int, sequence: int = 77) -> dict[str, int]:
        """Values of every named axis for a batch of images of height x width pixels."""
        f = self.vae_scale_factor
        dims = {
            BATCH: batch,
            SEQUENCE: sequence,
            HEIGHT: height,
            WIDTH: width,
            LATENT_HEIGHT: height // f,
            LATENT_WIDTH: width // f,
        }
        for k in DOWNSCALES:  # the UNet's lower resolutions (ControlNet residuals): stride-2 convs round up
            dims[f"{LATENT_HEIGHT}/{k}"] = -(-dims[LATENT_HEIGHT] // k)
            dims[f"{LATENT_WIDTH}/{k}"] = -(-dims[LATENT_WIDTH] // k)
        dims[LATENT_TOKENS] = (dims[LATENT_HEIGHT] // 2) * (dims[LATENT_WIDTH] // 2)
        return dims

    def input_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in self.inputs}

    def profile(
        self, min_dims: Mapping[str, int], opt_dims: Mapping[str, int], max_dims: Mapping[str, int]
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input: the optimization profile of an engine builder."""
        return {
            t.name: (t.resolve(min_dims), t.resolve(opt_dims), t.resolve(max_dims)) for t in self.inputs
        }

    def to_json(self) -> dict:
        def tensors(ts):
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]

        return {"inputs": tensors(self.inputs), "outputs": tensors(self.outputs)}


NORMED_HIDDEN_STATES = "sdrt_normed_hidden_states"  # config.json key: the encoder has normed_hidden_states outputs
TEXT_EMBEDS = "sdrt_text_embeds"  # config.json key: the encoder's pooled output is its projection (text_embeds)


def text_encoder_spec(name: str, hidden_size: int, *, projection_dim: int | None = None,
                      num_hidden_layers: int | None = None, normed_layers: int | None = None) -> NetworkSpec:
    """CLIP text encoder. With `num_hidden_layers`, every layer's hidden states are outputs too (SDXL). With
    `normed_layers` (SD 1.x/2.x), the hidden states 0..normed_layers-1 through the final layer norm are outputs
    `normed_hidden_states.{i}`: what diffusers' clip_skip feeds the UNet there (hidden_states[-(N+1)] + norm)."""
    outputs = [TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, hidden_size))]
    if projection_dim is not None:
        outputs.append(TensorSpec("text_embeds", "float32", (BATCH, projection_dim)))
    else:
        outputs.append(TensorSpec("pooler_output", "float32", (BATCH, hidden_size)))
    if num_hidden_layers is not None:
        outputs += [
            TensorSpec(f"hidden_states.{i}", "float32", (BATCH, SEQUENCE, hidden_size))
            for i in range(num_hidden_layers + 1)
        ]
    if normed_layers is not None:
        outputs += [TensorSpec(f"normed_hidden_states.{i}", "float32", (BATCH, SEQUENCE, hidden_size))
                    for i in range(normed_layers)]
    return NetworkSpec(name, (TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),), tuple(outputs))


def unet_spec(in_channels: int, out_channels: int, cross_attention_dim: int, *,
              vae_scale_factor: int = 8, time_cond_proj_dim: int | None = None,
              addition_embed_dim: int | None = None, time_ids_dim: int = 6,
              residuals: list | None = None) -> NetworkSpec:
    """UNet2DConditionModel: noisy latents, timestep per batch element, text embeddings -> prediction."""
    inputs = [
        TensorSpec("sample", "float32", (BATCH, in_channels, LATENT_HEIGHT, LATENT_WIDTH)),
        TensorSpec("timestep", "float32", (BATCH,)),
        TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cross_attention_dim)),
    ]
    if addition_embed_dim is not None:
        inputs.append(TensorSpec("text_embeds", "float32", (BATCH, addition_embed_dim)))
        inputs.append(TensorSpec("time_ids", "float32", (BATCH, time_ids_dim)))
    if time_cond_proj_dim is not None:
        inputs.append(TensorSpec("timestep_cond", "float32", (BATCH, time_cond_proj_dim)))
    inputs += residuals or []
    outputs = (TensorSpec("out_sample", "float32", (BATCH, out_channels, LATENT_HEIGHT, LATENT_WIDTH)),)
    return NetworkSpec("unet", tuple(inputs), outputs, vae_scale_factor)


def t5_encoder_spec(name: str, d_model: int) -> NetworkSpec:
    """T5 encoder (SD3's text_encoder_3, Flux's text_encoder_2): token ids -> last hidden state, as optimum names it."""
    return NetworkSpec(name, (TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),),
                       (TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, d_model)),))


def is_t5(config: Mapping) -> bool:
    """A T5 encoder's config.json (transformers' T5Config), not CLIP's."""
    return config.get("model_type") in ("t5", "umt5") or "d_model" in config


def transformer_kind(config: Mapping) -> str | None:
    """"sd3" or "flux" for a diffusion transformer's config.json, None for anything else."""
    return {SD3_TRANSFORMER: "sd3", FLUX_TRANSFORMER: "flux"}.get(config.get("_class_name"))


def transformer_spec(config: Mapping, *, vae_scale_factor: int = 8) -> NetworkSpec:
    """A diffusion transformer, with optimum's input names. SD3's MMDiT takes the latents as they are (it patchifies
    them itself) and the timestep as the scheduler gives it (sigma x 1000); Flux's takes them packed 2x2 into tokens
    with their positions (img_ids; txt_ids for the text, zeros), the timestep / 1000 and, when distilled ("dev"),
    the guidance scale. The runtime packs and scales (sdrt.runtime.families.dit)."""
    joint, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    text = [TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, joint)),
            TensorSpec("pooled_projections", "float32", (BATCH, pooled)),
            TensorSpec("timestep", "float32", (BATCH,))]
    if transformer_kind(config) == "sd3":
        channels, out = config["in_channels"], config.get("out_channels") or config["in_channels"]
        inputs = [TensorSpec("hidden_states", "float32", (BATCH, channels, LATENT_HEIGHT, LATENT_WIDTH)), *text]
        outputs = (TensorSpec("out_hidden_states", "float32", (BATCH, out, LATENT_HEIGHT, LATENT_WIDTH)),)
    else:
        channels, out = config["in_channels"], config.get("out_channels") or config["in_channels"]
        inputs = [TensorSpec("hidden_states", "float32", (BATCH, LATENT_TOKENS, channels)), *text,
                  TensorSpec("img_ids", "float32", (LATENT_TOKENS, 3)), TensorSpec("txt_ids", "float32", (SEQUENCE, 3))]
        if config.get("guidance_embeds"):
            inputs.append(TensorSpec("guidance", "float32", (BATCH,)))
        outputs = (TensorSpec("out_hidden_states", "float32", (BATCH, LATENT_TOKENS, out)),)
    return NetworkSpec("transformer", tuple(inputs), outputs, vae_scale_factor)


def controlnet_spec(config: Mapping) -> NetworkSpec:
    """diffusers' ControlNetModel: the UNet's inputs plus the control image (pixels in [0, 1]) -> the residuals
    for the UNet's down blocks and mid block (at conditioning scale 1; sdrt scales them in NumPy)."""
    channels = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    factor = 2 ** (len(channels) - 1)  # the conditioning embedding's stride-2 convs: the image is this much larger
    cross = _cross_attention_dim(config)
    inputs = [
        TensorSpec("sample", "float32", (BATCH, config.get("in_channels", 4), LATENT_HEIGHT, LATENT_WIDTH)),
        TensorSpec("timestep", "float32", (BATCH,)),
        TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cross)),
        TensorSpec("controlnet_cond", "float32", (BATCH, config.get("conditioning_channels", 3), HEIGHT, WIDTH)),
    ]
    if config.get("addition_embed_type") == "text_time":
        added, per_id = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
        pooled = added - 6 * per_id
        inputs += [TensorSpec("text_embeds", "float32", (BATCH, pooled)), TensorSpec("time_ids", "float32", (BATCH, 6))]
    residuals = control_residuals(config)
    outputs = [TensorSpec(f"down_block_res_sample_{i}", "float32", residual_shape(c, s))
               for i, (c, s) in enumerate(residuals)]
    outputs.append(TensorSpec("mid_block_res_sample", "float32",
                              residual_shape(config["block_out_channels"][-1], residuals[-1][1])))
    return NetworkSpec("controlnet", tuple(inputs), tuple(outputs), factor)


def vae_decoder_spec(latent_channels: int, out_channels: int, *, vae_scale_factor: int = 8,
                     name: str = "vae_decoder") -> NetworkSpec:
    """Latents (unscaled, as the VAE takes them) -> pixels in [-1, 1]; also the tiny VAE's decoder."""
    return NetworkSpec(
        name,
        (TensorSpec("latent_sample", "float32", (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        (TensorSpec("sample", "float32", (BATCH, out_channels, HEIGHT, WIDTH)),),
        vae_scale_factor,
    )


def vae_encoder_spec(in_channels: int, latent_channels: int, *, vae_scale_factor: int = 8) -> NetworkSpec:
    """VAE encoder up to the diagonal Gaussian: mean and log-variance stacked on the channel axis."""
    return NetworkSpec(
        "vae_encoder",
        (TensorSpec("sample", "float32", (BATCH, in_channels, HEIGHT, WIDTH)),),
        (TensorSpec("latent_parameters", "float32",
                    (BATCH, 2 * latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        vae_scale_factor,
    )


def vae_tiny_encoder_spec(in_channels: int, latent_channels: int, *, vae_scale_factor: int = 8) -> NetworkSpec:
    """diffusers' AutoencoderTiny encoder (TAESD): pixels in [-1, 1] -> latents, no distribution."""
    return NetworkSpec(
        "vae_tiny_encoder",
        (TensorSpec("sample", "float32", (BATCH, in_channels, HEIGHT, WIDTH)),),
        (TensorSpec("latents", "float32", (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        vae_scale_factor,
    )


def vae_scale_factor(vae_config: Mapping) -> int:
    """2^(number of down blocks - 1), as diffusers computes it."""
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def spec_for(component: str, config: Mapping, *, vae_config: Mapping | None = None) -> NetworkSpec:
    """The spec of a component folder from its diffusers/transformers config.json."""
    factor = vae_scale_factor(vae_config) if vae_config is not None else 8
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3") and is_t5(config):
        return t5_encoder_spec(component, config["d_model"])
    if component == "transformer":
        return transformer_spec(config, vae_scale_factor=factor)
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        # The pooled output: the projection's text_embeds (SDXL's second encoder, SD3's both), else pooler_output.
        with_projection = component == "text_encoder_2" or "CLIPTextModelWithProjection" in config.get(
            "architectures", ()) or config.get(TEXT_EMBEDS, False)
        projection = config.get("projection_dim") if with_projection else None
        # As optimum marks SDXL's encoders: every layer's hidden states are outputs (clip skip reads them).
        layers = config["num_hidden_layers"] if config.get("output_hidden_states") else None
        # sdrt's exports of SD 1.x/2.x encoders: the earlier layers through the final norm (clip skip).
        normed = config["num_hidden_layers"] if config.get(NORMED_HIDDEN_STATES) else None
        return text_encoder_spec(component, config["hidden_size"], projection_dim=projection, num_hidden_layers=layers,
                                 normed_layers=normed)
    if component == "unet":
        addition, time_ids = None, 6
        if config.get("addition_embed_type") == "text_time":
            # SDXL: 6 time ids (5 with an aesthetic score); exported configs name the pooled width as optimum does.
            added, per_id = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
            addition = config.get("text_encoder_projection_dim") or added - 6 * per_id
            time_ids = (added - addition) // per_id
        return unet_spec(
            config["in_channels"],
            config["out_channels"],
            _cross_attention_dim(config),
            vae_scale_factor=factor,
            time_cond_proj_dim=config.get("time_cond_proj_dim"),
            addition_embed_dim=addition,
            time_ids_dim=time_ids,
            residuals=residual_inputs(config) if config.get(CONTROL_RESIDUALS) else None,
        )
    if component == "vae_decoder":
        return vae_decoder_spec(config["latent_channels"], config["out_channels"], vae_scale_factor=factor)
    if component == "vae_encoder":
        return vae_encoder_spec(config["in_channels"], config["latent_channels"], vae_scale_factor=factor)
    if component == "vae_tiny_decoder":
        return vae_decoder_spec(config["latent_channels"], config["out_channels"],
                                vae_scale_factor=vae_scale_factor(config), name=component)
    if component == "vae_tiny_encoder":
        return vae_tiny_encoder_spec(config["in_channels"], config["latent_channels"],
                                     vae_scale_factor=vae_scale_factor(config))
    raise KeyError(f"no network spec for component {component!r}")


def _cross_attention_dim(config: Mapping) -> int:
    dim = config["cross_attention_dim"]
    return dim[0] if isinstance(dim, (list, tuple)) else dim


def latent_multiple(unet_config: Mapping) -> int:
    """Latent sizes must be multiples of this: 2^(number of upsampling blocks) in the UNet; a transformer's patch
    (SD3), or Flux's 2x2 packing."""
    kind = transformer_kind(unet_config)
    if kind == "sd3":
        return int(unet_config.get("patch_size", 2))
    if kind == "flux":
        return 2 * int(unet_config.get("patch_size", 1))
    return 2 ** (len(unet_config.get("up_block_types", ())) - 1)
