"""Inpainting masks as diffusers' StableDiffusionInpaintPipeline prepares them, with Pillow and NumPy.

`preprocess` is VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
.preprocess on PIL masks: resize (lanczos) in the mask's own mode, then grey, then 0/1 at 0.5:
white (>= 128) is repainted, black is kept. `to_latent_size` is the nearest-neighbour resize to
the latents. For `padding_mask_crop`, `crop_region`, `resize_and_fill` and `apply_overlay` are
VaeImageProcessor's get_crop_region, _resize_and_fill and apply_overlay.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.image import RESAMPLE

MASK_MODES = ("1", "L", "RGB")


def as_mask(mask, index: int = 0) -> Image.Image:
    """A PIL mask from a PIL image (1, L, RGB or P without transparency) or an HW / HWC uint8 array."""
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 or not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] in (1, 3))):
            raise InvalidInputError(
                f"mask {index}: arrays must be HW or HWC (1 or 3 channels) uint8, 255 = repaint, got shape "
                f"{mask.shape} and dtype {mask.dtype}"
            )
        return Image.fromarray(mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask)
    if not isinstance(mask, Image.Image):
        raise InvalidInputError(f"mask {index}: expected a PIL image or a uint8 array, got {type(mask).__name__}")
    if mask.mode in MASK_MODES:
        return mask
    if mask.mode == "P" and "transparency" not in mask.info:
        return mask.convert("RGB")
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        raise InvalidInputError(
            f"mask {index} has transparency (mode {mask.mode}); masks are read from their grey levels "
            "(white = repaint, black = keep): pass mask.getchannel('A') if the alpha is the mask, or "
            "mask.convert('L') to drop it"
        )
    raise InvalidInputError(f"mask {index} has mode {mask.mode}; pass a 1, L or RGB image (mask.convert('L'))")


def preprocess(masks: list[Image.Image], height: int, width: int, crop: tuple | None = None) -> np.ndarray:
    """PIL masks -> N1HW float32 of 0 and 1 (1 = repaint), each resized to height x width.

    crop: (x1, y1, x2, y2) to cut out first, then resize keeping the aspect ratio and fill the rest
    (diffusers' resize_mode="fill", which padding_mask_crop uses).
    """
    planes = []
    for mask in masks:
        if crop is not None:
            mask = resize_and_fill(mask.crop(crop), width, height)
        else:
            mask = mask.resize((width, height), resample=RESAMPLE)
        planes.append(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    planes = np.stack(planes)[:, None]
    return np.where(planes < 0.5, np.float32(0), np.float32(1))  # VaeImageProcessor.binarize


def to_latent_size(mask: np.ndarray, factor: int) -> np.ndarray:
    """N1HW pixel mask -> N1(H/f)(W/f): torch.nn.functional.interpolate(mode="nearest") at an integer factor."""
    return np.ascontiguousarray(mask[:, :, ::factor, ::factor])


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around the mask's non-black pixels, padded by `pad` and widened to width:height."""
    plane = np.asarray(mask.convert("L"))
    h, w = plane.shape
    cols, rows = np.flatnonzero(plane.any(axis=0)), np.flatnonzero(plane.any(axis=1))
    if len(cols) == 0:
        raise InvalidInputError("padding_mask_crop needs a mask with something to repaint; this mask is all black")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    # Widen the short side to the processing aspect ratio, shifted back inside the picture.
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside width x height keeping the aspect ratio, centred; the bands left over repeat the edge rows/cols."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover width x height keeping the aspect ratio, centred, the excess cut off."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def apply_overlay(mask: Image.Image, original: Image.Image, generated: Image.Image,
                  crop: tuple[int, int, int, int]) -> Image.Image:
    """Paste `generated` (the inpainted crop) back into `original` at `crop`, keeping the unmasked pixels."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    x1, y1, x2, y2 = crop
    base = Image.new("RGBA", (width, height))
    base.paste(resize_and_crop(generated, x2 - x1, y2 - y1), (x1, y1))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")
