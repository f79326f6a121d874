"""Request: one frozen, validated description of a generation. All argument checking happens here, once.

Everything a user can get wrong in a call is refused here with InvalidInputError, before any engine
runs: wrong types (a string or None for guidance_scale, a NumPy Generator as generator, an int as
negative_prompt), NaN and infinite numbers (named: `guidance_scale=nan` would silently turn guidance
off), and out-of-range values. What depends on the model (sizes against the UNet's multiple, the
family's own arguments) is checked by the family and the tasks, still before any engine runs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.rng import GENERATOR_KINDS, PerImageGenerator, make_generator

OUTPUT_TYPES = ("pil", "np", "uint8", "latent")


def integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def real(name: str, value, low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False) -> float:
    """A finite real number in [low, high] (bounds open where asked); bools, strings, None, NaN and inf refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if open_low else value < low)
    above = high is not None and (value >= high if open_high else value > high)
    if below or above:
        if high is None:
            allowed = f"{'>' if open_low else '>='} {low:g}"
        else:
            allowed = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise InvalidInputError(f"{name} must be {allowed}, got {value}")
    return value


def _encodable(name: str, values) -> None:
    """Text the tokenizers can read: valid Unicode (no lone surrogates, which invalid UTF-8 on a command line
    becomes)."""
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(f"{name} is not valid text (invalid UTF-8 or a lone surrogate at character "
                                    f"{e.start}: {v[max(0, e.start - 10):e.end + 10]!r}); pass UTF-8") from None


def texts(name: str, value, count: int | None = None) -> tuple[str, ...] | None:
    """None, a string, or a non-empty list of strings (of `count` entries when given; a string fills them all)."""
    if value is None:
        return None
    if isinstance(value, str):
        _encodable(name, (value,))
        return (value,) * (count or 1)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{name} must be a string or a list of strings (not empty), got {value!r}")
    _encodable(name, value)
    if count is not None and len(value) != count:
        raise InvalidInputError(
            f"{name} has {len(value)} entries but prompt has {count}; give one per prompt, or a single string for all"
        )
    return tuple(value)


def text_or_texts(name: str, value) -> str | tuple[str, ...] | None:
    """None, a string (kept as given: SDXL treats "" as not given), or a list of strings."""
    if value is None or isinstance(value, str):
        if value is not None:
            _encodable(name, (value,))
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    _encodable(name, value)
    return tuple(value)


def pair(name: str, value) -> tuple[float, float] | None:
    """None, or two finite numbers >= 0 ((height, width) or (top, left))."""
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v) and v >= 0
            for v in value)):
        raise InvalidInputError(
            f"{name} must be a pair of numbers >= 0, finite ((height, width) or (top, left)), got {value!r}")
    return (value[0], value[1])


def guidance_interval(value) -> tuple[float, float] | None:
    """None, or (lo, hi): noise levels sigma between which classifier-free guidance applies."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidInputError(
            f"guidance_interval must be a pair (lo, hi) of noise levels sigma, e.g. (0.28, 5.42), got {value!r}"
        )
    lo, hi = real("guidance_interval[0]", value[0], 0.0), real("guidance_interval[1]", value[1], 0.0)
    if lo > hi:
        raise InvalidInputError(f"guidance_interval=({lo}, {hi}): lo must not exceed hi")
    return lo, hi


def per_controlnet(name: str, value, low: float, high: float | None = None):
    """A number, or a list of numbers (one per ControlNet), each in [low, high]."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInputError(f"{name} is an empty list; give a number or one per ControlNet")
        return tuple(real(f"{name}[{k}]", v, low, high) for k, v in enumerate(value))
    return real(name, value, low, high)


def fraction(name: str, value) -> float | None:
    """A denoising_start / denoising_end: None, or a number strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise InvalidInputError(
            f"{name} must be a number in (0, 1), the share of the schedule (e.g. 0.8 for the base and the refiner "
            f"of the SDXL ensemble), or None; got {value!r}"
        )
    return float(value)


def check_strength(strength) -> float:
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def check_generator(generator):
    """An sdrt generator (sdrt.runtime.rng.make_generator, or any object with randn(shape) -> ndarray)."""
    if generator is not None and not callable(getattr(generator, "randn", None)):
        raise InvalidInputError(
            f"generator must be an sdrt generator with randn(shape), e.g. sdrt.runtime.rng.make_generator(seed, "
            f"'torch'), got {type(generator).__name__}; or pass seed=INT instead (a NumPy Generator or a torch one "
            "cannot reproduce diffusers' stream)"
        )
    return generator


def _is_integer(value) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def seeds(value, batch: int):
    """None, an integer, or a list of one integer per image (each image its own generator, as diffusers' list of
    generators: image k is then the image of a run of one with seed value[k])."""
    if value is None or _is_integer(value):
        return value
    if isinstance(value, (list, tuple)) and value and all(_is_integer(v) for v in value):
        if len(value) != batch:
            raise InvalidInputError(f"seed has {len(value)} entries for {batch} images (prompts x "
                                    "num_images_per_prompt); give one per image, or one integer for the batch")
        return tuple(int(v) for v in value)
    raise InvalidInputError(f"seed must be an integer, a list of integers (one per image) or None, got {value!r}")


def generators(value, batch: int):
    """None, an sdrt generator, or a list of one per image (diffusers' list of generators)."""
    if not isinstance(value, (list, tuple)):
        return check_generator(value)
    if not value:
        raise InvalidInputError("generator is an empty list; give one generator per image, or one for the batch")
    for g in value:
        check_generator(g)
    if len(value) != batch:
        raise InvalidInputError(f"generator has {len(value)} entries for {batch} images (prompts x "
                                "num_images_per_prompt); give one per image, or one generator for the batch")
    return PerImageGenerator(value)


@dataclass(frozen=True)
class Request:
    """One generation, validated. Built by the facades from their diffusers-style arguments (None = not given)."""

    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...] | None = None  # None: not given (SDXL may then zero the negatives)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    height: int | None = None  # None: the task's or the model's default
    width: int | None = None
    num_images_per_prompt: int = 1
    eta: float = 0.0
    clip_skip: int | None = None  # use the text encoder's output this many layers before the usual one
    scheduler: str | None = None  # a registry name (sdrt.runtime.schedulers) for this run; None: the Generator's
    loras: Any = None  # {adapter name or .safetensors path: scale} for this run, on top of the pipeline's adapters
    seed: int | tuple[int, ...] | None = None  # a list: one seed per image (a generator each)
    generator: Any = None  # an sdrt generator, or a list of one per image
    rng: str = "torch"
    output_type: str = "pil"
    callback: Callable | None = None
    progress: bool = False
    # Task inputs.
    image: Any = None
    strength: float | None = None
    mask_image: Any = None
    padding_mask_crop: int | None = None
    denoising_start: float | None = None
    denoising_end: float | None = None
    # ControlNet (sdrt.runtime.tasks.control): per ControlNet, a value or a list of one per ControlNet.
    control_image: Any = None
    controlnet_conditioning_scale: Any = 1.0
    control_guidance_start: Any = 0.0
    control_guidance_end: Any = 1.0
    guess_mode: bool = False
    # Family inputs (SDXL): the second encoder's texts and the micro-conditioning.
    prompt_2: str | tuple[str, ...] | None = None
    negative_prompt_2: str | tuple[str, ...] | None = None
    micro_conditioning: dict = field(default_factory=dict)
    # Family inputs (SD3, Flux): the T5 texts' length, SD3's third encoder's texts, Flux's true CFG.
    prompt_3: str | tuple[str, ...] | None = None
    negative_prompt_3: str | tuple[str, ...] | None = None
    max_sequence_length: int | None = None  # None: the family's (SD3 256, Flux 512)
    true_cfg_scale: float = 1.0
    guidance_given: bool = True  # False: guidance_scale is the facade's default (Flux schnell refuses a given one)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        prompts = texts("prompt", self.prompt)
        if prompts is None:
            raise InvalidInputError("prompt must be a string or a list of strings (not empty), got None")
        set_("prompt", prompts)
        set_("negative_prompt", texts("negative_prompt", self.negative_prompt, len(prompts)))
        set_("prompt_2", text_or_texts("prompt_2", self.prompt_2))
        set_("negative_prompt_2", text_or_texts("negative_prompt_2", self.negative_prompt_2))
        set_("prompt_3", text_or_texts("prompt_3", self.prompt_3))
        set_("negative_prompt_3", text_or_texts("negative_prompt_3", self.negative_prompt_3))
        if self.max_sequence_length is not None:
            set_("max_sequence_length", integer("max_sequence_length", self.max_sequence_length))
        set_("true_cfg_scale", real("true_cfg_scale", self.true_cfg_scale, 0.0))
        set_("num_inference_steps", integer("num_inference_steps", self.num_inference_steps))
        set_("guidance_scale", real("guidance_scale", self.guidance_scale, 0.0))
        set_("guidance_rescale", real("guidance_rescale", self.guidance_rescale, 0.0, 1.0))
        set_("guidance_interval", guidance_interval(self.guidance_interval))
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                set_(name, integer(name, getattr(self, name)))
        set_("num_images_per_prompt", integer("num_images_per_prompt", self.num_images_per_prompt))
        set_("eta", real("eta", self.eta, 0.0, 1.0))
        if self.clip_skip is not None:
            set_("clip_skip", integer("clip_skip", self.clip_skip, 1))
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise InvalidInputError(f"scheduler must be a name such as 'euler-a' or None, got {self.scheduler!r}")
        from sdrt.runtime.adapters import check_loras

        set_("loras", check_loras(self.loras))
        set_("seed", seeds(self.seed, self.batch))
        set_("generator", generators(self.generator, self.batch))
        if self.rng not in GENERATOR_KINDS:
            raise InvalidInputError(f"rng must be one of {GENERATOR_KINDS}, got {self.rng!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {OUTPUT_TYPES}, got {self.output_type!r}")
        if self.callback is not None and not callable(self.callback):
            raise InvalidInputError(f"callback must be callable (step, timestep, latents), got {self.callback!r}")
        if not isinstance(self.progress, (bool, np.bool_)):
            raise InvalidInputError(f"progress must be True or False, got {self.progress!r}")
        if self.strength is not None:
            set_("strength", check_strength(self.strength))
        if self.padding_mask_crop is not None:
            set_("padding_mask_crop", integer("padding_mask_crop", self.padding_mask_crop, 0))
        set_("controlnet_conditioning_scale", per_controlnet("controlnet_conditioning_scale",
                                                             self.controlnet_conditioning_scale, 0.0))
        set_("control_guidance_start", per_controlnet("control_guidance_start", self.control_guidance_start, 0.0, 1.0))
        set_("control_guidance_end", per_controlnet("control_guidance_end", self.control_guidance_end, 0.0, 1.0))
        starts, ends = self.control_guidance_start, self.control_guidance_end
        if isinstance(starts, tuple) and isinstance(ends, tuple) and len(starts) != len(ends):
            raise InvalidInputError(f"control_guidance_start has {len(starts)} entries and control_guidance_end "
                                    f"{len(ends)}; give one per ControlNet")
        for k, (start, end) in enumerate(zip(starts if isinstance(starts, tuple) else [starts] * 99,
                                             ends if isinstance(ends, tuple) else [ends] * 99)):
            if start >= end:
                raise InvalidInputError(f"control_guidance_start {start} must be below control_guidance_end {end}"
                                        + (f" (ControlNet {k})" if isinstance(starts, tuple) else ""))
            if not isinstance(starts, tuple) and not isinstance(ends, tuple):
                break
        if not isinstance(self.guess_mode, (bool, np.bool_)):
            raise InvalidInputError(f"guess_mode must be True or False, got {self.guess_mode!r}")
        set_("denoising_start", fraction("denoising_start", self.denoising_start))
        set_("denoising_end", fraction("denoising_end", self.denoising_end))
        if self.denoising_start is not None and self.denoising_end is not None \
                and self.denoising_start >= self.denoising_end:
            raise InvalidInputError(
                f"denoising_start={self.denoising_start} must be below denoising_end={self.denoising_end}: the run "
                "would be empty"
            )

    @classmethod
    def from_arguments(cls, arguments: dict) -> Request:
        """A Request from a facade's call arguments (its `locals()`); names not in Request are micro-conditioning."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in arguments.items() if k in names}
        extra = {k: v for k, v in arguments.items() if k not in names and k != "self"}
        return cls(**known, micro_conditioning=extra)

    @property
    def batch(self) -> int:
        """Images made: prompts x images per prompt."""
        return len(self.prompt) * self.num_images_per_prompt

    def make_generator(self):
        """The generator given, or a new one from seed (a random seed when None) of the rng kind."""
        if self.generator is not None:
            return self.generator
        return make_generator(self.seed, self.rng)
