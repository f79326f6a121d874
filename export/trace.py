"""torch -> ONNX: wrap each diffusers/transformers module so its signature matches its network spec,
then export with torch's dynamo exporter and dynamic axes taken from the spec."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from sdrt.engines.spec import NetworkSpec

# ONNX files over 2 GB must keep their weights in a side file; optimum names it this way.
EXTERNAL_DATA_NAME = "model.onnx_data"
PROTOBUF_LIMIT = 2 * 1024**3


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class TextEncoderHiddenStatesWrapper(TextEncoderWrapper):
    """SDXL's encoders, with optimum's outputs: last hidden state, pooled output (`text_embeds` of the
    projection model) and every layer's hidden states, embeddings first (clip skip reads them)."""

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if "text_embeds" in out else out.pooler_output
        return (out.last_hidden_state, pooled, *out.hidden_states)


class TextEncoderNormedWrapper(TextEncoderWrapper):
    """SD 1.x/2.x encoders: also each earlier layer's hidden states through the final layer norm (clip skip reads
    `normed_hidden_states.{i}` = final_layer_norm(hidden_states[i]), as diffusers computes it)."""

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 nests it, 5 does not
        normed = tuple(model.final_layer_norm(h) for h in out.hidden_states[:-1])
        return (out.last_hidden_state, out.pooler_output, *normed)


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetTimeCondWrapper(UNetWrapper):
    """LCM-distilled UNets: a guidance-scale embedding (`timestep_cond`) joins the time embedding."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class UNetAddedCondWrapper(UNetWrapper):
    """SDXL UNets: pooled text embeddings and size/crop micro-conditioning (`time_ids`)."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class UNetAddedTimeCondWrapper(UNetWrapper):
    """LCM-distilled SDXL UNets: both of the above."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=added, return_dict=False)[0]


class UNetControlWrapper(UNetWrapper):
    """Any UNet taking ControlNet residuals: inputs by the spec's names (sample, timestep, encoder_hidden_states,
    then text_embeds / time_ids / timestep_cond where the UNet has them, then the residuals)."""

    def __init__(self, unet, names):
        super().__init__(unet)
        self.names = list(names)

    def forward(self, *inputs):
        given = dict(zip(self.names, inputs))
        down = [given[n] for n in self.names if n.startswith("down_block_additional_residual_")]
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}
        return self.unet(given["sample"], given["timestep"], given["encoder_hidden_states"],
                         timestep_cond=given.get("timestep_cond"), added_cond_kwargs=added or None,
                         down_block_additional_residuals=tuple(down),
                         mid_block_additional_residual=given["mid_block_additional_residual"], return_dict=False)[0]


# The UNet wrapper for each set of inputs beyond (sample, timestep, encoder_hidden_states), in spec order.
UNET_WRAPPERS = {
    (): UNetWrapper,
    ("timestep_cond",): UNetTimeCondWrapper,
    ("text_embeds", "time_ids"): UNetAddedCondWrapper,
    ("text_embeds", "time_ids", "timestep_cond"): UNetAddedTimeCondWrapper,
}


class T5EncoderWrapper(torch.nn.Module):
    """T5 encoder (SD3, Flux): token ids -> last hidden state (no attention mask: the pipelines pass none)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


def _cropped_pos_embed(self, height, width):
    """SD3's PatchEmbed.cropped_pos_embed, the same rows and columns taken by index: torch's exporter turns the
    slice [(m - w) // 2 : (m - w) // 2 + w] into one that is a column too wide when w is odd (a latent side of
    2 mod 4, e.g. 720 px), and the graph then fails to broadcast."""
    m, p = self.pos_embed_max_size, self.patch_size
    h, w = height // p, width // p
    grid = self.pos_embed.reshape(1, m, m, -1)
    rows = torch.arange(h, device=grid.device) + (m - h) // 2
    cols = torch.arange(w, device=grid.device) + (m - w) // 2
    grid = grid.index_select(1, rows).index_select(2, cols)
    return grid.reshape(1, -1, grid.shape[-1])


class TransformerWrapper(torch.nn.Module):
    """SD3's or Flux's transformer, inputs by the spec's names (engines.spec.transformer_spec)."""

    def __init__(self, transformer, names):
        super().__init__()
        import types

        self.transformer = transformer
        self.names = list(names)
        embed = getattr(transformer, "pos_embed", None)
        if getattr(embed, "pos_embed_max_size", None) and hasattr(embed, "cropped_pos_embed"):
            embed.cropped_pos_embed = types.MethodType(_cropped_pos_embed, embed)

    def forward(self, *inputs):
        return self.transformer(**dict(zip(self.names, inputs)), return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """Encoder plus quant_conv: the diagonal Gaussian's parameters (mean, log-variance) on channels."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


def wrap(component: str, module, spec: NetworkSpec | None = None) -> torch.nn.Module:
    """The torch module whose positional inputs are the spec's inputs, in order."""
    if component == "transformer":
        return TransformerWrapper(module, spec.input_names).eval()
    if component.startswith("text_encoder") and spec is not None and spec.output_names == ["last_hidden_state"]:
        return T5EncoderWrapper(module).eval()
    if component == "unet":
        extra = tuple(spec.input_names[3:]) if spec is not None else ()
        if "mid_block_additional_residual" in extra:
            return UNetControlWrapper(module, spec.input_names).eval()
        return UNET_WRAPPERS[extra](module).eval()
    if component.startswith("text_encoder") and spec is not None and \
            any(name.startswith("hidden_states.") for name in spec.output_names):
        return TextEncoderHiddenStatesWrapper(module).eval()
    if component == "text_encoder" and spec is not None and \
            any(name.startswith("normed_hidden_states.") for name in spec.output_names):
        return TextEncoderNormedWrapper(module).eval()
    wrappers = {
        "text_encoder": TextEncoderWrapper,
        "vae_decoder": VaeDecoderWrapper,
        "vae_encoder": VaeEncoderWrapper,
    }
    return wrappers[component](module).eval()


def sample_inputs(spec: NetworkSpec, dims: dict[str, int], seed: int = 0, vocab_size: int = 49408) -> tuple:
    """Seeded random inputs of the spec's shapes: token ids for int64 inputs, normals otherwise."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    flux = "img_ids" in spec.input_names  # Flux's transformer: positions, and t / 1000 and guidance it scales by 1000
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.dtype == "int64":
            inputs.append(torch.randint(0, vocab_size, shape, generator=g))
        elif t.name == "img_ids":  # each packed token's (0, row, column), as the pipeline makes them
            from sdrt.runtime.core.transformer import image_ids

            inputs.append(torch.from_numpy(image_ids(dims["latent_height"], dims["latent_width"])))
        elif t.name == "txt_ids":
            inputs.append(torch.zeros(shape))
        elif flux and t.name == "timestep":
            inputs.append(torch.rand(shape, generator=g))
        elif flux and t.name == "guidance":
            inputs.append(1 + 9 * torch.rand(shape, generator=g))
        elif t.name == "timestep":
            inputs.append(torch.randint(0, 1000, shape, generator=g).float())
        else:
            inputs.append(torch.randn(shape, generator=g))
    return tuple(inputs)


def export_onnx(module: torch.nn.Module, spec: NetworkSpec, example: tuple, path: Path, opset: int) -> None:
    """Export `module` to `path` with the spec's input/output names and dynamic axes."""
    dynamic_shapes = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis in t.dynamic_axes} for t in spec.inputs
    )
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic_shapes = (dynamic_shapes,)  # forward(*inputs): one structure holding them all
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, dynamo=True, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    _name_dynamic_axes(program.model, spec)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    if size > PROTOBUF_LIMIT * 0.9:
        # Streamed: onnx_ir writes one tensor at a time to the side file, then serialises a proto without
        # weights. (program.model_proto + onnx.save_model held a second full copy of the weights; and
        # program.save(external_data=True) is the same call but names the side file model.onnx.data.)
        import onnx_ir as ir

        ir.save(program.model, str(path), external_data=EXTERNAL_DATA_NAME, size_threshold_bytes=1024)
    else:
        program.save(str(path), external_data=False)


def _name_dynamic_axes(model, spec: NetworkSpec) -> None:
    """Give the graph's symbolic dims the spec's axis names (batch, height, ...) instead of s0, s1."""
    tensors = {t.name: t for t in spec.inputs + spec.outputs}
    renames = {}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        t = tensors.get(value.name)
        if t is None or value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if axis < len(t.shape) and isinstance(t.shape[axis], str) and not isinstance(dim, int):
                if dim.value is not None and dim.value not in renames:
                    renames[dim.value] = t.shape[axis]
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        import onnx_ir as ir

        value.shape = ir.Shape([
            ir.SymbolicDim(renames.get(d.value, d.value)) if not isinstance(d, int) else d for d in value.shape
        ])
