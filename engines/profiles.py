"""Shape profiles for compiled engines: the min/opt/max batch and image size a build must cover.

A TensorRT plan (native, or built by onnxruntime's TensorRT provider) runs only shapes inside the
optimization profile it was built with. `ProfileRange` says that range in the user's terms (images
per call, pixel height and width); the network's spec turns it into per-input (min, opt, max)
shapes. `dims_from_shapes` goes the other way: from the shapes of a feed to the values of the
spec's named axes, so an engine can tell whether a feed fits its profile and what its outputs'
shapes will be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from sdrt.engines.errors import EngineError
from sdrt.engines.spec import DOWNSCALES, HEIGHT, LATENT_HEIGHT, LATENT_TOKENS, LATENT_WIDTH, WIDTH, NetworkSpec

Range = tuple[int, int, int]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


class ProfileError(EngineError):
    """A shape profile is malformed (min > opt > max, wrong rank) or a feed does not fit it."""


def _range(name: str, value) -> Range:
    lo, opt, hi = (int(v) for v in value)
    if not 1 <= lo <= opt <= hi:
        raise ProfileError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")
    return lo, opt, hi


@dataclass(frozen=True)
class ProfileRange:
    """min/opt/max of the network batch and of the image height and width in pixels.

    `batch` is the batch the network sees: with classifier-free guidance the UNet runs twice the
    number of images.
    """

    batch: Range = (1, 1, 1)
    height: Range = (512, 512, 512)
    width: Range = (512, 512, 512)

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            object.__setattr__(self, name, _range(name, getattr(self, name)))

    @classmethod
    def static(cls, batch: int, height: int, width: int) -> "ProfileRange":
        """A profile for exactly one shape (the fastest plan, and the one CUDA graphs want)."""
        return cls((batch,) * 3, (height,) * 3, (width,) * 3)

    def dims(self, spec: NetworkSpec) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """The spec's named-axis values at min, opt and max."""
        return tuple(spec.dims(self.batch[k], self.height[k], self.width[k]) for k in range(3))

    def profile(self, spec: NetworkSpec) -> Profile:
        """(min, opt, max) shape per input of `spec`."""
        return spec.profile(*self.dims(spec))

    def covers(self, batch: int, height: int, width: int) -> bool:
        return all(lo <= v <= hi for v, (lo, _, hi) in
                   ((batch, self.batch), (height, self.height), (width, self.width)))

    def to_json(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}


def canonical_profile(profile: Mapping[str, tuple]) -> list:
    """A profile as sorted, JSON-able lists, checked: same rank and min <= opt <= max per axis."""
    out = []
    for name in sorted(profile):
        lo, opt, hi = (tuple(int(d) for d in shape) for shape in profile[name])
        if not len(lo) == len(opt) == len(hi):
            raise ProfileError(f"profile of {name}: min/opt/max have different ranks {lo}, {opt}, {hi}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ProfileError(f"profile of {name}: need min <= opt <= max on every axis, got {lo}, {opt}, {hi}")
        out.append([name, list(lo), list(opt), list(hi)])
    return out


def profile_fits(profile: Mapping[str, tuple], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every input shape lies inside the profile's [min, max] box."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or not all(a <= s <= c for a, s, c in zip(lo, shape, hi)):
            return False
    return True


def dims_from_shapes(spec: NetworkSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The values of the spec's named axes in a feed, checked for consistency.

    Pixel and latent sizes are derived from each other through the spec's VAE scale factor, so a
    UNet feed also gives the pixel size and a decoder feed the latent size.
    """
    dims: dict[str, int] = {}
    for t in spec.inputs:
        if t.name not in shapes:
            raise ProfileError(f"{spec.name}: the feed lacks input {t.name!r}")
        shape = tuple(shapes[t.name])
        if len(shape) != len(t.shape):
            raise ProfileError(f"{spec.name}.{t.name}: expected rank {len(t.shape)} {t.shape}, got shape {shape}")
        for axis, size in zip(t.shape, shape):
            if isinstance(axis, int):
                if axis != size:
                    raise ProfileError(f"{spec.name}.{t.name}: expected shape {t.shape}, got {shape}")
            elif dims.setdefault(axis, size) != size:
                raise ProfileError(f"{spec.name}: axis {axis!r} is {dims[axis]} in one input and {size} in "
                                   f"{t.name!r}; inputs must agree")
    f = spec.vae_scale_factor
    for pixel, latent in ((HEIGHT, LATENT_HEIGHT), (WIDTH, LATENT_WIDTH)):
        if latent in dims and pixel not in dims:
            dims[pixel] = dims[latent] * f
        elif pixel in dims and latent not in dims:
            dims[latent] = dims[pixel] // f
        if latent not in dims:
            continue
        for k in DOWNSCALES:  # the lower resolutions follow from the latent size (stride-2 convs round up)
            axis, size = f"{latent}/{k}", -(-dims[latent] // k)
            if dims.setdefault(axis, size) != size:
                raise ProfileError(f"{spec.name}: axis {axis!r} is {dims[axis]}, but a {latent} of {dims[latent]} "
                                   f"makes it {size}; the residuals must match the latents")
    if LATENT_HEIGHT in dims and LATENT_WIDTH in dims:  # Flux's packed tokens follow from the latent size
        tokens = (dims[LATENT_HEIGHT] // 2) * (dims[LATENT_WIDTH] // 2)
        if dims.setdefault(LATENT_TOKENS, tokens) != tokens:
            raise ProfileError(f"{spec.name}: {dims[LATENT_TOKENS]} latent tokens, but a {dims[LATENT_HEIGHT]}x"
                               f"{dims[LATENT_WIDTH]} latent makes {tokens}")
    return dims
