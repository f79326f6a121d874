"""Making an image again from its parameters text (`sdrt generate --from-png`), and the sampler names of other tools.

A picture written by sdrt carries A1111's "infotext" (sdrt.runtime.image.format_parameters: a PNG text chunk, or
the EXIF UserComment of a JPEG/WebP). `generate_settings` turns it back into `sdrt generate`'s options (argparse
dests), so that the same folder, sdrt version and provider make the same pixels; `scheduler_name` reads the
sampler names of stable-diffusion.cpp (`euler_a`, `dpm++2m`) and A1111 (`DPM++ 2M Karras`, or `DPM++ 2M` with
`Schedule type: Karras`) as sdrt's registry names.
"""

from __future__ import annotations

import re
import secrets
import warnings

from sdrt.runtime import image as imageio
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers import FLOW_SCHEDULER_NAMES, SCHEDULER_NAMES

# Names with no spelling rule from sdrt's: A1111's PLMS is diffusers' PNDM; k-diffusion's k_ prefix.
_ALIASES = {"plms": "pndm", "euler-ancestral": "euler-a", "uni-pc": "unipc", "lms-discrete": "lms"}
_SCHEDULES = {"karras": "-karras", "default": "", "discrete": "", "automatic": "", "uniform": ""}


def scheduler_name(text: str, schedule: str | None = None) -> str:
    """sdrt's name for a sampler written as sdrt (`dpm++2m-karras`), stable-diffusion.cpp (`euler_a`, `dpm++2m`)
    or A1111 (`Euler a`, `DPM++ 2M SDE Karras`) write it; `schedule`: A1111's "Schedule type" (Karras...).
    InvalidInputError listing sdrt's names for one it does not run."""
    key = re.sub(r"[\s_]+", "-", str(text).strip().lower())
    key = re.sub(r"^k-", "", key).replace("dpmpp", "dpm++").replace("dpm++-", "dpm++")
    key = _ALIASES.get(key, key)
    if schedule is not None:
        suffix = _SCHEDULES.get(schedule.strip().lower())
        if suffix is None:
            raise InvalidInputError(f"schedule type {schedule!r} is not one sdrt runs (Karras, or the sampler's "
                                    "own); sdrt's schedulers: " + ", ".join(SCHEDULER_NAMES))
        key = key if key.endswith(suffix) else key + suffix
    if key in FLOW_SCHEDULER_NAMES:  # flow-matching models' (SD3, Flux); "euler" there is flow-euler too
        return key
    if key not in SCHEDULER_NAMES:
        raise InvalidInputError(f"unknown scheduler {text!r}; sdrt runs: {', '.join(SCHEDULER_NAMES)}; for SD3 and "
                                f"Flux {', '.join(FLOW_SCHEDULER_NAMES)} (and "
                                "stable-diffusion.cpp's and A1111's names for them: euler_a, dpm++2m, 'DPM++ 2M "
                                "Karras', PLMS...)")
    return key


def _number(label: str, value: str, kind=float):
    try:
        return kind(value)
    except ValueError:
        raise InvalidInputError(f"the picture's parameters have {label}: {value!r}, not a number") from None


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _pair(label: str, value: str, separator: str) -> tuple[float, float]:
    """Two numbers written A{separator}B ("0.28-5.42", "1e-05-20.0", "512x768", "256/64")."""
    found = re.fullmatch(f"\\s*({_NUMBER})\\s*{re.escape(separator)}\\s*({_NUMBER})\\s*", value)
    if found is None:
        raise InvalidInputError(f"the picture's parameters have {label}: {value!r}; expected A{separator}B")
    return _number(label, found[1]), _number(label, found[2])


def generate_settings(prompt: str, negative: str, settings: dict) -> tuple[dict, dict]:
    """(options, facts) from a parsed parameters text: `options` maps sdrt generate's argparse dests to values
    (only what the text says); `facts` holds what the caller checks against its own run (model, model hash,
    version, LoRAs, ControlNets, whether a picture was the start)."""
    options: dict = {"prompt": prompt}
    if negative:
        options["negative"] = negative
    readers = {
        "Steps": ("steps", lambda v: _number("Steps", v, int)),
        "CFG scale": ("guidance", lambda v: _number("CFG scale", v)),
        "Seed": ("seed", lambda v: _number("Seed", v, int)),
        "RNG": ("rng", lambda v: {"cpu": "torch"}.get(v.lower(), v.lower())),  # A1111's CPU: torch's stream
        "Guidance interval": ("guidance_interval", lambda v: _pair("Guidance interval", v, "-")),
        "Guidance rescale": ("guidance_rescale", lambda v: _number("Guidance rescale", v)),
        "Eta": ("eta", lambda v: _number("Eta", v)),
        "Clip skip": ("clip_skip", lambda v: _number("Clip skip", v, int) - 1 or None),  # A1111's 1: no skip
        "Emphasis": ("emphasis", str.lower),
        "Prompt 2": ("prompt_2", str),
        "Negative prompt 2": ("negative_2", str),
        "Prompt 3": ("prompt_3", str),
        "Negative prompt 3": ("negative_3", str),
        "Max sequence length": ("max_sequence_length", lambda v: _number("Max sequence length", v, int)),
        "True cfg scale": ("true_cfg", lambda v: _number("True cfg scale", v)),
        "Denoising strength": ("strength", lambda v: _number("Denoising strength", v)),
        "Cache interval": ("cache_interval", lambda v: _number("Cache interval", v, int)),
        "Low memory": ("low_memory", lambda v: v.lower() == "true"),
        "Alternate controlnet": ("alternate_controlnet", lambda v: v.lower() == "true"),
        "Guess mode": ("guess_mode", lambda v: v.lower() == "true"),
    }
    for label, (dest, read) in readers.items():
        if label in settings:
            options[dest] = read(settings[label])
    if "Sampler" in settings:
        options["scheduler"] = scheduler_name(settings["Sampler"], settings.get("Schedule type"))
    if "Scheduler options" in settings:  # "key=value; key=value": sdrt generate's --scheduler-option, each
        options["scheduler_option"] = [item.strip() for item in settings["Scheduler options"].split(";")
                                       if item.strip()]
    if "Size" in settings:
        width, height = (int(v) for v in _pair("Size", settings["Size"], "x"))
        options["size"] = (width, height)
    if "VAE tiling" in settings:
        size, overlap = (int(v) for v in _pair("VAE tiling", settings["VAE tiling"], "/"))
        options["tile_size"], options["tile_overlap"] = size, overlap
    if "Denoising start" in settings:  # the refiner's half of an SDXL ensemble
        options["high_noise_frac"] = _number("Denoising start", settings["Denoising start"])
    known = {*readers, "Sampler", "Schedule type", "Scheduler options", "Size", "VAE tiling", "Denoising start",
             "Mask padding"}
    facts = {key: settings[label] for key, label in (
        ("model", "Model"), ("model_hash", "Model hash"), ("version", "Version"), ("loras", "Loras"),
        ("lora_hashes", "Lora hashes"), ("controlnet", "Controlnet"),
        ("refiner", "Denoising start"), ("vae", "VAE"), ("provider", "Provider"), ("precision", "Precision"))
        if label in settings}
    ignored = [label for label in settings if label not in known and label not in _FACTS]
    if ignored:  # another tool's settings (A1111's hires fix, extensions...): the image will differ
        warnings.warn(f"the picture's parameters hold settings sdrt does not take, left out: {', '.join(ignored)}")
    return options, facts


_FACTS = {"Model", "Model hash", "Version", "Loras", "Lora hashes", "Controlnet", "VAE", "Provider", "Precision"}


def loras(text: str) -> dict[str, float]:
    """{name: scale} from a "Loras" value ("style_a:0.8, style_b:1")."""
    found = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, scale = item.rpartition(":")
        found[name or item] = _number("Loras", scale) if name else 1.0
    return found


def controlnets(text: str) -> list[tuple[str, float, float, float]]:
    """[(name, scale, start, end)] from a "Controlnet" value ("canny (scale 0.75, 0-1), depth (scale 1, 0-0.5)")."""
    return [(name, float(scale), float(start), float(end)) for name, scale, start, end in
            re.findall(r"\s*(.+?) \(scale ([-\d.e]+), ([\d.e-]+?)-([\d.e]+)\)(?:,|$)", text)]


def resolve_arguments(args) -> None:
    """sdrt generate's arguments completed before any work: FOLDER and PROMPT from the positional words or
    -m/-p; --from-png's settings wherever no flag was given (`args.explicit`: the dests given); -W/-H into
    --size; a random seed for --seed -1 or none (args.random_seed; recorded in the files)."""
    words = list(args.words)
    explicit = set(getattr(args, "explicit", ()))
    settings = None
    if args.from_png is not None:
        text = imageio.read_parameters(args.from_png)
        if text is None:
            raise InvalidInputError(f"--from-png {args.from_png} holds no generation parameters (no PNG "
                                    "'parameters' text, no EXIF UserComment); give a picture sdrt or A1111 wrote")
        prompt, negative, fields = imageio.parse_parameters(text)
        settings, facts = generate_settings(prompt, negative, fields)
    if args.folder is None:
        if not words:
            made = f" ({args.from_png} was made with {facts['model']})" if settings and "model" in facts else ""
            raise InvalidInputError(f"give the model folder{made}: sdrt generate FOLDER PROMPT, or -m FOLDER")
        args.folder = words.pop(0)
    if args.prompt is None and words:
        args.prompt = words.pop(0)
        explicit.add("prompt")
    if words:
        raise InvalidInputError(f"unexpected arguments {' '.join(map(repr, words))}: sdrt generate takes FOLDER "
                                "and PROMPT (quote a prompt of several words)")
    if settings is not None:
        _apply(args, settings, facts, explicit)
    if args.prompt is None:
        raise InvalidInputError("give a prompt: sdrt generate FOLDER PROMPT, or -p PROMPT (or --from-png PICTURE)")
    if args.width is not None or args.height is not None:
        width, height = args.size or (None, None)
        args.size = (width if args.width is None else args.width,  # -W 0 is refused, not the default
                     height if args.height is None else args.height)
    args.random_seed = args.seed is None or args.seed == -1  # as A1111 and stable-diffusion.cpp
    if args.random_seed:
        args.seed = secrets.randbelow(2**32)


def _apply(args, settings: dict, facts: dict, explicit: set) -> None:
    """--from-png's settings on args, under the flags given; refusals for what a picture cannot carry."""
    source = args.from_png
    for dest, value in settings.items():
        if dest == "scheduler_option" and ({"scheduler_option", "scheduler_config"} & explicit
                                           or not hasattr(args, dest)):
            continue  # the options given (or a whole config file) replace the picture's
        if dest not in explicit and not (dest == "size" and {"image", "width", "height"} & explicit):
            setattr(args, dest, value)
    if args.rng not in ("torch", "numpy"):
        raise InvalidInputError(f"{source} was made with the random stream {args.rng!r}, which sdrt does not draw "
                                "(torch: A1111's CPU; numpy); give --rng torch or numpy to make another image")
    if "strength" in settings and args.image is None:
        raise InvalidInputError(f"{source} was made from a picture (denoising strength {settings['strength']:g}): "
                                "give it again as --image PICTURE (and --mask MASK for inpainting)")
    if "refiner" in facts and args.refiner is None:
        raise InvalidInputError(f"{source} is the refiner's output of an SDXL ensemble (from {facts['refiner']} of "
                                "the schedule): give the base folder and --refiner REFINER_FOLDER")
    if "controlnet" in facts:
        nets = controlnets(facts["controlnet"])
        if not args.controlnet:
            raise InvalidInputError(f"{source} was made with ControlNet ({facts['controlnet']}): give --controlnet "
                                    "FOLDER and --control-image PICTURE again")
        if len(nets) == len(args.controlnet):
            for dest, k in (("control_scale", 1), ("control_start", 2), ("control_end", 3)):
                if dest not in explicit:
                    setattr(args, dest, [net[k] for net in nets])
    if "vae" in facts and "vae" not in explicit:
        if facts["vae"] == "taesd":
            args.vae = "taesd"
        else:
            warnings.warn(f"{source} was decoded with the VAE {facts['vae']!r}; sdrt decodes with the folder's")
    if "loras" in facts and "lora" not in explicit:
        from sdrt.runtime.lora import extract_tags, find_in_dir

        wanted = loras(facts["loras"])
        for name, scale in extract_tags(args.prompt)[1]:  # <lora:NAME:W> tags stay in the prompt
            wanted[name] = wanted.get(name, 0.0) - scale
        wanted = {name: scale for name, scale in wanted.items() if abs(scale) > 1e-9}
        if wanted and args.lora_dir is None:
            raise InvalidInputError(f"{source} was made with the LoRAs {facts['loras']}: give --lora-dir DIR (the "
                                    "folder that holds NAME.safetensors), or --lora FILE:SCALE")
        args.lora = [(str(find_in_dir(args.lora_dir, name)), scale) for name, scale in wanted.items()] or None
    _check_model(args, facts)


def _check_model(args, facts: dict) -> None:
    """Warnings when the folder or sdrt is not the one that made the picture (the image will then differ)."""
    from sdrt.runtime import sdrt_version
    from sdrt.runtime.config import ModelFolder
    from sdrt.runtime.core.generate import unet_hash

    if "model_hash" in facts:
        folder = args.refiner if "refiner" in facts else args.folder  # the refiner wrote an ensemble's picture
        here = unet_hash(ModelFolder.open(folder, verify="none"))
        if here != facts["model_hash"]:
            warnings.warn(f"{args.from_png} was made with the model {facts.get('model', '?')} (hash "
                          f"{facts['model_hash']}); {folder} has the hash {here}: the image will differ")
    made = (facts.get("provider", "cpu"), facts.get("precision"))
    here = (args.provider, getattr(args, "precision", None))
    if made != here:  # not set from the picture: the machine may not have that provider
        warnings.warn(f"{args.from_png} was made with --provider {made[0]}"
                      + (f" --precision {made[1]}" if made[1] else "") + f"; this run uses {here[0]}"
                      + (f" --precision {here[1]}" if here[1] else "") + ": the last bits may differ")
    version = f"sdrt {sdrt_version()}"
    if "version" in facts and facts["version"] != version:
        warnings.warn(f"{args.from_png} was made with {facts['version']}; this is {version}: the image may differ")
