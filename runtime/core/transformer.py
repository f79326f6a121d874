"""A diffusion transformer (SD3's MMDiT, Flux's) fed as the denoise loop feeds a UNet.

The loop (sdrt.runtime.core.loop) keeps latents as NCHW arrays and feeds `sample`, `timestep` (the scheduler's,
sigma x 1000) and the family's conditioning, and reads `out_sample`. `TransformerFeed` wraps the transformer's
engine so that it takes exactly that:

- SD3: the inputs renamed to optimum's (hidden_states, encoder_hidden_states, pooled_projections, timestep), the
  output out_hidden_states -> out_sample; the timestep as it is (SD3's pipeline passes t).
- Flux: the latents packed 2x2 into tokens (B, H/2 * W/2, 4C) as FluxPipeline._pack_latents, their positions
  img_ids (row, column) and the text's txt_ids (zeros), the timestep / 1000 (FluxPipeline passes t / 1000), the
  guidance input as the family gives it; the output unpacked back to NCHW.

Packing is a permutation, and every solver step works element by element, so the loop's NCHW latents follow the
same arithmetic as diffusers' packed ones (the same noise, drawn in diffusers' NCHW shape and packed after).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def pack(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) (latent height and width), as FluxPipeline._unpack_latents."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(latent_height: int, latent_width: int, dtype=F32) -> np.ndarray:
    """(H/2 * W/2, 3): each packed token's (0, row, column), as FluxPipeline._prepare_latent_image_ids."""
    h, w = latent_height // 2, latent_width // 2
    ids = np.zeros((h, w, 3), dtype=dtype)
    ids[..., 1] = np.arange(h, dtype=dtype)[:, None]
    ids[..., 2] = np.arange(w, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


class TransformerFeed:
    """An engine wrapper (everything but `run` goes to the transformer's engine) taking the loop's UNet feed."""

    def __init__(self, engine, kind: str):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "kind", kind)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    def run(self, feed):
        feed = dict(feed)
        sample = feed.pop("sample")
        if self.kind == "sd3":
            out = self._engine.run({"hidden_states": sample, **feed})
            return {"out_sample": out["out_hidden_states"]}
        _, _, h, w = sample.shape
        text = feed["encoder_hidden_states"]
        sequence = text.shape[1] if isinstance(text, np.ndarray) else self._sequence
        timestep = np.asarray(feed["timestep"])
        feed["timestep"] = timestep / timestep.dtype.type(1000)  # FluxPipeline: transformer(timestep=t / 1000)
        out = self._engine.run({"hidden_states": pack(sample), **feed, **self._positions(h, w, sequence)})
        return {"out_sample": unpack(out["out_hidden_states"], h, w)}

    def _positions(self, height: int, width: int, sequence: int) -> dict:
        """img_ids and txt_ids for a latent size and text length, made once per (size, length), not every step."""
        key = (height, width, sequence)
        cached = self.__dict__.get("_cached_positions")  # (key, value), replaced whole: safe across threads
        if cached is None or cached[0] != key:
            dtype = self._engine.input_dtypes.get("img_ids", np.dtype(F32))
            cached = (key, {"img_ids": image_ids(height, width, dtype), "txt_ids": np.zeros((sequence, 3), dtype=dtype)})
            object.__setattr__(self, "_cached_positions", cached)
        return cached[1]

    def device_resident(self, inputs):
        """The conditioning kept on the device; its text length noted (txt_ids), as a device value may not say."""
        if "encoder_hidden_states" in inputs:
            object.__setattr__(self, "_sequence", int(np.shape(inputs["encoder_hidden_states"])[1]))
        return self._engine.device_resident(inputs)


def adapt(engine, folder):
    """The denoiser engine of `folder` as the loop feeds it: a transformer wrapped, a UNet as it is."""
    from sdrt.engines.spec import transformer_kind

    kind = transformer_kind(folder.unet_config) if folder.denoiser == "transformer" else None
    return engine if kind is None else TransformerFeed(engine, kind)
