"""The `sdrt` command: export, generate, info (and more as they land).

`sdrt export` imports sdrt.export lazily, so everything else runs on the base install (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sdrt.engines.errors import SdrtError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
        return lo, hi
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like LO,HI (noise levels sigma, e.g. 0.28,5.42), got {text!r}") \
            from None


def _scheduler(text: str) -> str:
    """A scheduler name as sdrt, stable-diffusion.cpp or A1111 write it -> sdrt's (sdrt.runtime.reproduce)."""
    from sdrt.runtime.errors import InvalidInputError
    from sdrt.runtime.reproduce import scheduler_name

    try:
        return scheduler_name(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scheduler_names() -> str:
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    return ", ".join(SCHEDULER_NAMES)


def _given(parser: argparse.ArgumentParser, argv: list) -> set:
    """The dests of generate's options given on the command line (not defaults): what --from-png leaves alone."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    saved = [(action, action.default) for action in sub._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(given)) - {"words"}


def _canny(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
        return low, high
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like LOW,HIGH (integers, e.g. 100,200), got {text!r}") from None


# The Python API's argument names -> the options that set them, for messages (InvalidInputError names the former).
OPTIONS = {"clip_skip": "--clip-skip", "num_inference_steps": "--steps", "guidance_scale": "--guidance", "guidance_interval": "--guidance-interval",
           "num_images_per_prompt": "--num-images", "negative_prompt_2": "--negative-2", "negative_prompt": "--negative",
           "prompt_2": "--prompt-2", "prompt_3": "--prompt-3", "negative_prompt_3": "--negative-3",
           "max_sequence_length": "--max-sequence-length", "true_cfg_scale": "--true-cfg", "denoising_end": "--high-noise-frac", "denoising_start": "--high-noise-frac",
           "loras": "--lora", "controlnet_conditioning_scale": "--control-scale",
           "control_guidance_start": "--control-start", "control_guidance_end": "--control-end",
           "control_image": "--control-image", "guess_mode": "--guess-mode", "guidance_rescale": "--guidance-rescale",
           "eta": "--eta", "seed": "--seed", "strength": "--strength", "height": "--size", "width": "--size"}


def _in_cli_terms(message: str) -> str:
    """An API error message prefixed with the option that sets the argument it names first (guidance_scale:
    --guidance)."""
    for name, option in OPTIONS.items():
        if message.startswith((name + " ", name + "=", name + "[")):  # guidance_interval[0] ...
            return f"{option}: {message}"
    return message


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it (or there is none to say);
    lines never break inside a hyphenated name (dpm++2m-sde-karras)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default is not argparse.SUPPRESS \
                and action.nargs != 0:  # flags (store_true...) are off unless given
            text += " (default: none)" if action.default is None else " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), as every other sdrt error; --help with every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_export(args) -> int:
    try:
        from sdrt.export.api import export_pipeline
    except ImportError as e:
        raise SdrtError(
            f"sdrt export needs the export extra ({e.name} is not installed): "
            "pip install torch==2.13.0 && pip install 'sdrt[export]'"
        ) from e
    components = None if args.components is None else args.components.split(",")
    export_pipeline(args.source, args.output, opset=args.opset, components=components, force=args.force,
                    config=args.config, original_config=args.original_config, prediction_type=args.prediction_type)
    return 0


def cmd_optimize(args) -> int:
    try:
        from sdrt.export.optimize import optimize_folder
    except ImportError as e:
        raise SdrtError(
            f"sdrt optimize needs the export extra ({e.name} is not installed): pip install 'sdrt[export]'"
        ) from e
    optimize_folder(args.folder, args.output, profile=args.optimize, precision=args.precision, force=args.force)
    return 0


def cmd_deepcache(args) -> int:
    try:
        import onnx  # noqa: F401  (build time only)
    except ImportError as e:
        raise SdrtError("sdrt deepcache needs onnx: pip install 'sdrt[lora]' (or 'sdrt[export]')") from e
    from sdrt.export.deepcache import split_unet

    split_unet(args.folder, log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_export_taesd(args) -> int:
    try:
        from sdrt.export.taesd import export_taesd
    except ImportError as e:
        raise SdrtError(
            f"sdrt export-taesd needs the export extra ({e.name} is not installed): "
            "pip install torch==2.13.0 && pip install 'sdrt[export]'"
        ) from e
    export_taesd(args.source, args.folder, opset=args.opset, force=args.force, encoder=not args.decoder_only)
    return 0


def cmd_export_controlnet(args) -> int:
    try:
        from sdrt.export.controlnet import export_controlnet
    except ImportError as e:
        raise SdrtError(
            f"sdrt export-controlnet needs the export extra ({e.name} is not installed): "
            "pip install torch==2.13.0 && pip install 'sdrt[export]'"
        ) from e
    export_controlnet(args.source, args.output, opset=args.opset, force=args.force, log=print)
    return 0


def cmd_quantize(args) -> int:
    import importlib.util

    try:
        for module in ("onnx", "onnxruntime.quantization"):  # imported late by sdrt.export.quantize: ask first
            if importlib.util.find_spec(module) is None:
                raise ImportError(name=module)
        from sdrt.export.quantize import quantize_folder
    except ImportError as e:
        raise SdrtError(
            f"sdrt quantize needs the export extra ({e.name} is not installed): pip install 'sdrt[export]' "
            "(or only onnx: pip install onnx)"
        ) from e
    quantize_folder(args.folder, args.output, mode=args.mode, components=args.components.split(","),
                    calibration=args.calibration_prompts, calibration_steps=args.calibration_steps,
                    force=args.force)
    return 0


def cmd_info(args) -> int:
    from sdrt.runtime.info import describe, format_info

    info = describe(args.folder, verify="sha256")
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _second_prompts(args, pipe) -> dict:
    """--prompt-2 / --negative-2 (SDXL's second text encoder, SD3's CLIP-G, Flux's T5), --prompt-3 / --negative-3
    (SD3's T5), --max-sequence-length and --true-cfg (SD3, Flux): refused, naming the option, for a model without
    them."""
    from sdrt.runtime.errors import InvalidInputError

    taken = getattr(pipe, "prompt_arguments", ())
    given = {}
    for option, name, value in (("--prompt-2", "prompt_2", args.prompt_2), ("--negative-2", "negative_prompt_2",
                                                                             args.negative_2),
                                ("--prompt-3", "prompt_3", args.prompt_3), ("--negative-3", "negative_prompt_3",
                                                                             args.negative_3)):
        if value is None:
            continue
        if name not in taken:
            encoders = "a second text encoder (SDXL, SD3, Flux)" if name.endswith("_2") else "a third (SD3's T5)"
            raise InvalidInputError(f"{option} needs a model with {encoders}; {args.folder} has none, so leave it out")
        given[name] = value
    family = getattr(pipe, "family", "")
    for option, name, value, families in (
            ("--max-sequence-length", "max_sequence_length", args.max_sequence_length, ("stable-diffusion-3", "flux")),
            ("--true-cfg", "true_cfg_scale", args.true_cfg, ("flux",))):
        if value is None:
            continue
        if family not in families:
            raise InvalidInputError(f"{option} applies to {' and '.join(f.upper() if f != 'stable-diffusion-3' else 'SD3' for f in families)} "
                                    f"models; {args.folder} is a {family} model, so leave it out")
        given[name] = value
    return given


def _lora(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (the scale after the last colon, when it is a number; default 1.0)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _loras(args) -> tuple[str, dict]:
    """The prompt without its `<lora:NAME:WEIGHT>` tags, and {file: scale} from --lora and the tags (names found
    in --lora-dir)."""
    from sdrt.runtime.errors import InvalidInputError
    from sdrt.runtime.lora import extract_tags, find_in_dir

    prompt, tags = extract_tags(args.prompt)
    if args.lora_dir is not None and not os.path.isdir(args.lora_dir):
        raise InvalidInputError(f"--lora-dir {args.lora_dir} is not a folder; give the folder that holds "
                                "NAME.safetensors")
    if tags and args.lora_dir is None:
        raise InvalidInputError(f"the prompt names LoRAs ({', '.join(f'<lora:{n}>' for n, _ in tags)}); give "
                                "--lora-dir DIR, the folder that holds NAME.safetensors")
    loras: dict[str, float] = {}
    for path, scale in [*(args.lora or []), *((str(find_in_dir(args.lora_dir, n)), w) for n, w in tags)]:
        loras[path] = loras.get(path, 0.0) + scale
    return prompt, loras


def _control(args) -> tuple[dict, dict]:
    """--controlnet/--control-image/--control-scale/--control-start/--control-end/--guess-mode/--canny as
    (pipeline options, call arguments); both empty without --controlnet. Checked before anything is opened."""
    from sdrt.runtime.errors import InvalidInputError

    nets = args.controlnet or []
    if not nets:
        given = [flag for flag, value in (("--control-image", args.control_image), ("--control-scale",
                 args.control_scale), ("--control-start", args.control_start), ("--control-end", args.control_end),
                 ("--guess-mode", args.guess_mode), ("--canny", args.canny),
                 ("--alternate-controlnet", args.alternate_controlnet)) if value]
        if given:
            raise InvalidInputError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with "
                                    "--controlnet FOLDER (an export of sdrt export-controlnet)")
        return {}, {}
    if args.refiner is not None:
        raise InvalidInputError("--controlnet does not combine with --refiner (the refiner has no ControlNet); "
                                "leave one out")
    images = args.control_image or []
    if len(images) not in (1, len(nets)):
        raise InvalidInputError(f"{len(nets)} --controlnet take {len(nets)} --control-image (one per ControlNet, "
                                f"in the same order; or one for all), got {len(images)}")
    call = {}
    for flag, key, values in (("--control-scale", "controlnet_conditioning_scale", args.control_scale),
                              ("--control-start", "control_guidance_start", args.control_start),
                              ("--control-end", "control_guidance_end", args.control_end)):
        if not values:
            continue
        if len(values) not in (1, len(nets)):
            raise InvalidInputError(f"{flag} was given {len(values)} times for {len(nets)} --controlnet: give it "
                                    "once (for all) or once per ControlNet")
        call[key] = values[0] if len(values) == 1 else list(values)
    pictures = [_read_picture(path, "--control-image") for path in images]
    if args.canny_thresholds is not None and not args.canny:
        raise InvalidInputError("--canny-thresholds applies only with --canny")
    if args.canny:
        from sdrt.runtime.control import canny

        low, high = args.canny_thresholds or (100, 200)
        pictures = [canny(picture, low, high) for picture in pictures]
    pictures = pictures * len(nets) if len(pictures) == 1 else pictures
    call["control_image"] = pictures[0] if len(nets) == 1 else pictures
    if args.guess_mode:
        call["guess_mode"] = True
    options = {"controlnet": list(nets)}
    if args.alternate_controlnet:
        if not args.low_memory:
            raise InvalidInputError("--alternate-controlnet applies with --low-memory (it makes the ControlNets and "
                                    "the UNet take turns in memory)")
        options["alternate_controlnet"] = True
    return options, call


def cmd_generate(args) -> int:
    """--auto-memory: a run refused for memory (before anything ran) is tried again with --low-memory and a tiled
    VAE (256 px tiles unless --tile-size is given)."""
    from sdrt.runtime.errors import InsufficientMemoryError

    from sdrt.runtime import reproduce

    reproduce.resolve_arguments(args)  # FOLDER PROMPT or -m/-p, --from-png, a random seed: before any work
    prompt = args.prompt
    try:
        return _generate(args)
    except InsufficientMemoryError as e:
        if not args.auto_memory or (args.low_memory and args.tile_size is not None):
            raise
        args.prompt, args.low_memory = prompt, True
        args.tile_size = args.tile_size or 256
        print(f"sdrt generate: note: {str(e).split('; try ')[0]}; --auto-memory: trying again with --low-memory "
              f"--tile-size {args.tile_size}", file=sys.stderr)
        return _generate(args)


def _generate(args) -> int:
    from sdrt.runtime import image as imageio
    from sdrt.runtime.core.request import integer
    from sdrt.runtime.errors import InvalidInputError

    imageio.check_output_path(args.output, "-o/--output")  # before any work
    integer("num_images_per_prompt", args.num_images)  # (--num-images) before its files are named
    paths = imageio.numbered_paths(args.output, args.num_images)
    for path in {str(p): p for p in paths}.values():  # one folder and format: the first and the names taken
        if path == paths[0] or os.path.lexists(path):
            imageio.check_output_path(path, "-o/--output")
    if args.quality is not None and imageio.output_format(paths[0]) == "PNG":
        raise InvalidInputError(f"--quality applies to .jpg/.jpeg and .webp output; {paths[0]} is a PNG (lossless)")
    written_prompt = args.prompt
    args.prompt, loras = _loras(args)
    # Each image its own seed (seed, seed+1, ...), as A1111 and sd.cpp: every file is reproducible on its own.
    seeds = [args.seed + k for k in range(args.num_images)]
    common = dict(
        negative_prompt=args.negative, num_images_per_prompt=args.num_images,
        seed=seeds if len(seeds) > 1 else seeds[0], rng=args.rng, output_type="pil", progress=not args.quiet,
    )
    if loras:
        common["loras"] = loras
    # Defaults: the pipeline's, as diffusers (steps 50, LCM 4; guidance SD 7.5, SDXL 5.0, LCM 8.5).
    for name, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance),
                        ("guidance_interval", args.guidance_interval), ("clip_skip", args.clip_skip),
                        ("guidance_rescale", args.guidance_rescale), ("eta", args.eta)):
        if value is not None:
            common[name] = value
    if args.refiner is None and args.high_noise_frac is not None:
        raise InvalidInputError("--high-noise-frac applies only with --refiner (where the base hands over)")
    scheduler = _scheduler_override(args)  # --scheduler-config / --scheduler-option, checked before any engine
    control_options, control_call = _control(args)
    if control_options:
        from sdrt.runtime.controlnet import control_pipeline
    if args.image is None:
        if args.strength is not None:
            raise InvalidInputError("--strength applies only with --image (img2img)")
        if args.mask is not None:
            raise InvalidInputError("--mask applies only with --image, the picture to inpaint")
        from sdrt.runtime.families import text_to_image_pipeline

        options = dict(provider=args.provider, scheduler=args.scheduler, allow_fallback=args.allow_fallback,
                       vae=args.vae, verify=args.verify, **_memory_options(args), **_engine_flags(args),
                       **_prompt_options(args))
        if control_options:  # the control image goes as image=, diffusers' name in ControlNet txt2img
            pipe = control_pipeline(args.folder, "txt2img", **options, **control_options)
            control_call["image"] = control_call.pop("control_image")
        else:
            pipe = text_to_image_pipeline(args.folder, **options)
        if scheduler is not None:
            pipe.scheduler = scheduler
        width, height = args.size if args.size else (None, None)
        if args.refiner is None:
            result = pipe(args.prompt, height=height, width=width, **common, **control_call,
                          **_second_prompts(args, pipe))
        else:
            from sdrt.runtime.families import image_to_image_pipeline

            result = _base_and_refiner(args, pipe, (), dict(height=height, width=width), common,
                                       image_to_image_pipeline, ())
    else:
        if args.size is not None:
            raise InvalidInputError("--size does not apply with --image: the output has the image's size")
        from sdrt.runtime.families import image_to_image_pipeline, inpaint_pipeline

        picture = _as_rgb(_read_picture(args.image, "--image"))
        mask = None if args.mask is None else _read_picture(args.mask, "--mask")
        options = dict(provider=args.provider, scheduler=args.scheduler, allow_fallback=args.allow_fallback,
                       vae=args.vae, verify=args.verify, **_memory_options(args), **_engine_flags(args),
                       **_prompt_options(args))
        strength = {} if args.strength is None else {"strength": args.strength}  # default: the pipeline's
        factory, mask_arg = (image_to_image_pipeline, ()) if mask is None else (inpaint_pipeline, (mask,))
        if control_options:
            pipe = control_pipeline(args.folder, "img2img" if mask is None else "inpaint", **options,
                                    **control_options)
        else:
            pipe = factory(args.folder, **options)
        if scheduler is not None:
            pipe.scheduler = scheduler
        if getattr(pipe.core.family, "resizes_pictures", False):
            # SD3 / Flux img2img and inpainting make the picture the model's size unless told: here it keeps its size
            m = pipe.folder.pixel_multiple
            strength.update(height=max(m, picture.height // m * m), width=max(m, picture.width // m * m))
        if args.refiner is None:
            result = pipe(args.prompt, picture, *mask_arg, **strength, **common, **control_call,
                          **_second_prompts(args, pipe))
        else:  # the refiner takes the base's latents, with the same mask
            result = _base_and_refiner(args, pipe, (picture, *mask_arg), strength, common, factory, mask_arg)
    for image, params, path in zip(result.images, result.parameters, paths):
        if written_prompt != args.prompt and params.startswith(args.prompt):  # A1111 keeps the tags in the prompt
            params = written_prompt + params[len(args.prompt):]
        imageio.save_image(image, path, parameters=params, quality=args.quality)
        print(path)
    t = result.timings
    calls = "" if t["unet_evaluations"] == t["steps"] else f", {t['unet_evaluations']} UNet evaluations"
    seeds = f"seed {result.seed}" if len(set(result.seeds)) <= 1 else \
        f"seeds {result.seeds[0]}-{result.seeds[-1]}"
    seeds += " (random)" if getattr(args, "random_seed", False) else ""
    print(f"{seeds}; text encoder {t['text_encoder']:.2f} s, UNet {t['unet']:.2f} s "
          f"({t['steps']} steps{calls}), VAE decode {t['vae_decoder']:.2f} s", file=sys.stderr)
    return 0


def _scheduler_override(args):
    """The scheduler made from the folder's scheduler_config.json with --scheduler-config (a whole file instead)
    and --scheduler-option KEY=VALUE (each over it), as diffusers users edit that file; None without them."""
    if args.scheduler_config is None and not args.scheduler_option:
        return None
    from sdrt.runtime.config import ModelFolder
    from sdrt.runtime.schedulers import load_scheduler
    from sdrt.runtime.schedulers.overrides import merged

    folder = ModelFolder.open(args.folder, verify="none")  # configs only: the files are verified when loaded
    return load_scheduler(merged(folder.scheduler_config, args.scheduler_config, args.scheduler_option),
                          name=args.scheduler)


def _base_and_refiner(args, base, inputs: tuple, options: dict, common: dict, refiner_pipeline, mask_arg: tuple):
    """SDXL's ensemble of expert denoisers, as diffusers documents it: the base runs the first --high-noise-frac
    of the schedule (denoising_end) on `inputs` (nothing, the picture, or the picture and mask) and hands its
    latents to the refiner (made by `refiner_pipeline`: img2img, or inpainting with the same mask), which runs
    the rest (denoising_start)."""
    from sdrt.runtime.errors import InvalidInputError

    if not getattr(base, "uses_text_encoder_2", False):
        raise InvalidInputError(f"--refiner needs an SDXL base model; {args.folder} is not one")
    fraction = 0.8 if args.high_noise_frac is None else args.high_noise_frac
    refiner = refiner_pipeline(args.refiner, verify=args.verify, provider=args.provider, scheduler=args.scheduler,
                               allow_fallback=args.allow_fallback, **_memory_options(args), **_engine_flags(args),
                               **_prompt_options(args))
    if not getattr(refiner, "uses_text_encoder_2", False):
        raise InvalidInputError(f"--refiner must be an SDXL refiner (or SDXL) folder; {args.refiner} is not one")
    latents = base(args.prompt, *inputs, **options, **{**common, "output_type": "latent"}, denoising_end=fraction,
                   **_second_prompts(args, base))
    # The refiner's one encoder reads PROMPT (diffusers pairs the prompts with the encoders a folder has).
    # LoRAs change the base's networks; the refiner's differ (a base LoRA would not fit them).
    refined = refiner(args.prompt, latents.images, *mask_arg, denoising_start=fraction,
                      **{**common, "seed": latents.seeds if len(latents.seeds) > 1 else latents.seed,
                         "num_images_per_prompt": len(latents.seeds), "loras": None})
    for key in ("text_encoder", "unet", "steps", "unet_evaluations"):
        refined.timings[key] += latents.timings[key]
    return refined


def _engine_flags(args) -> dict:
    """--no-io-binding and --cuda-graph as engine options (io_binding left out: its default is the provider's)."""
    if args.cuda_graph and args.no_io_binding:
        from sdrt.runtime.errors import InvalidInputError

        raise InvalidInputError("--cuda-graph needs IO binding (the graph reads fixed device buffers): drop "
                                "--no-io-binding")
    flags = {"cuda_graph": args.cuda_graph}
    if args.no_io_binding:
        flags["io_binding"] = False
    flags.update(_openvino_flags(args))
    if getattr(args, "cache_interval", 1) != 1:
        flags["cache_interval"] = args.cache_interval
    loras = getattr(args, "lora", None) or getattr(args, "lora_dir", None)  # generate only
    if loras and args.provider.lower() in ("tensorrt", "trt"):
        flags["refit"] = True  # LoRA weights reach native TensorRT plans by refitting them
    return flags


def _openvino_flags(args) -> dict:
    """--precision, --performance-hint and --threads as OpenVINO engine options (only with --provider openvino)."""
    given = {name: value for name, value in (("precision", args.precision), ("performance_hint",
             args.performance_hint), ("num_threads", args.threads)) if value is not None}
    if given and args.provider.split(":")[0].strip().lower() != "openvino":
        from sdrt.runtime.errors import InvalidInputError

        flags = ", ".join("--" + {"num_threads": "threads"}.get(k, k).replace("_", "-") for k in given)
        raise InvalidInputError(f"{flags} {'applies' if len(given) == 1 else 'apply'} only to --provider "
                                f"openvino[:DEVICE] (the OpenVINO backend), not {args.provider}")
    return given


def _memory_options(args) -> dict:
    """--low-memory, --tile-size and --tile-overlap as pipeline options (tile overlap defaults to a quarter tile)."""
    from sdrt.runtime.errors import InvalidInputError
    from sdrt.runtime.tiling import Tiling

    if args.tile_size is None:
        if args.tile_overlap is not None:
            raise InvalidInputError("--tile-overlap needs --tile-size (tiled VAE is off without it)")
        return {"low_memory": args.low_memory}
    overlap = args.tile_overlap if args.tile_overlap is not None else args.tile_size // 32 * 8
    return {"low_memory": args.low_memory, "vae_tiling": Tiling(args.tile_size, overlap)}


def _prompt_options(args) -> dict:
    return {"emphasis": args.emphasis}


def _read_picture(path: str, option: str):
    """The picture at path, read into memory (the file is closed); InvalidInputError naming the option if unreadable."""
    from PIL import Image

    from sdrt.runtime.errors import InvalidInputError

    try:
        with Image.open(path) as opened:
            return opened.copy()
    except Image.DecompressionBombError as e:  # a header claiming a huge picture: never decoded
        raise InvalidInputError(f"{option} {path} declares more pixels than Pillow's limit of "
                                f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb, or a picture far too large): "
                                f"{e}") from e
    except (OSError, ValueError, SyntaxError) as e:  # unreadable, truncated, or a malformed header
        raise InvalidInputError(f"cannot read {option} {path}: {e}") from e


def _as_rgb(picture):
    """An --image file in another mode, made RGB as A1111 does with what users upload: transparency flattened onto
    white, grayscale / palette / CMYK converted, 16- and 32-bit grayscale scaled to 8 bits (Pillow would clip it).
    The Python API takes RGB only, and says so."""
    if picture.mode == "RGB":
        return picture
    from PIL import Image

    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        values = np.asarray(picture, dtype=np.float64)
        top = 65535.0 if picture.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        picture = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if picture.mode == "P":
        picture = picture.convert("RGBA")
    if picture.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return picture.convert("RGB")


def cmd_demo(args) -> int:
    from sdrt.runtime import image as imageio
    from sdrt.runtime.demo import run_demo

    imageio.check_output_path(args.output, "-o/--output")  # before any work
    run_demo(args.output, model=args.model, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
             scheduler=args.scheduler, provider=args.provider)
    print(args.output)
    return 0


def cmd_bench(args) -> int:
    from sdrt.runtime import bench

    width, height = args.size if args.size else (None, None)
    settings = bench.BenchSettings(
        provider=args.provider, steps=args.steps, width=width, height=height, batch=args.batch,
        guidance=args.guidance, scheduler=args.scheduler, runs=args.runs, warmup=args.warmup, seed=args.seed,
        cold_start=not args.no_cold_start, allow_fallback=args.allow_fallback, verify=args.verify,
        **_engine_flags(args),
    )
    if args.out is not None:
        out = Path(args.out)
        if str(args.out).strip() == "":
            raise SdrtError("--out is empty; give the folder for the results")
        if out.exists() and not out.is_dir():
            raise SdrtError(f"--out {out} is a file; give a folder (created if missing) for the results")
        parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SdrtError(f"--out {out}: {parent} cannot be written (permission denied)")
    elif args.plot and not os.access(".", os.W_OK | os.X_OK):
        raise SdrtError("--plot without --out writes the chart in the working folder, which cannot be written; "
                        "give --out FOLDER")
    result = bench.run_bench(args.folder, settings, progress=not args.quiet)
    markdown = bench.to_markdown(result)
    print(markdown)
    stem = bench.result_stem("bench", result["machine"], result["provider_used"], result["model"])
    if args.out:
        chart = bench.bench_chart(result) if args.plot else None
        for path in bench.write_results(result, args.out, stem, markdown, chart):
            print(path, file=sys.stderr)
    elif args.plot:  # the chart beside the results printed: in the working folder
        chart = Path(f"{stem}.png")
        bench.plot_chart(chart, **bench.bench_chart(result))
        print(chart, file=sys.stderr)
    return 0


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuda-graph", action="store_true",
                        help="run the UNet with fixed input buffers and a captured CUDA graph (cuda / tensorrt-ep "
                             "providers, or native tensorrt); another image size runs without it, with a warning")
    parser.add_argument("--no-io-binding", action="store_true",
                        help="turn off IO binding, which on a GPU keeps the text conditioning on the device for "
                             "the whole generation (on by default for cuda and tensorrt-ep)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "f16"), default=None,
                        help="--provider openvino: the compute precision (default auto: bf16 on a CPU with AMX or "
                             "AVX-512-BF16, else fp32; a GPU's own default)")
    parser.add_argument("--performance-hint", choices=("latency", "throughput"), default=None,
                        help="--provider openvino: OpenVINO's performance hint (default latency)")
    parser.add_argument("--threads", type=int, default=None,
                        help="--provider openvino: inference threads (default: OpenVINO's, every core)")
    parser.add_argument("--cache-interval", type=int, default=1, metavar="N",
                        help="step caching (DeepCache): run the whole UNet every N steps and only its shallow branch "
                             "on the cached deep features between (needs `sdrt deepcache FOLDER` first; default 1: off)")


def cmd_serve(args) -> int:
    from sdrt.serve.cli import serve  # fastapi and uvicorn are imported there, when the server starts

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdrt", description="Stable Diffusion inference runtime (ONNX, no torch)")
    from sdrt.runtime import sdrt_version

    p.add_argument("--version", action="version", version=f"sdrt {sdrt_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("export", help="export a diffusers checkpoint folder or a single-file .safetensors checkpoint "
                                      "to a validated ONNX folder (needs sdrt[export])")
    e.add_argument("source", help="a local diffusers pipeline folder, or a single-file checkpoint (.safetensors in the "
                                  "original SD layout, as A1111/ComfyUI use: SD 1.x, 2.x, SDXL base/refiner, "
                                  "inpainting); .ckpt/.pt pickles are refused")
    e.add_argument("--config", metavar="FOLDER",
                   help="single file: take the configs (UNet, VAE, text encoders, scheduler, tokenizers) from this "
                        "diffusers folder of the same architecture instead of the standard ones sdrt ships (for "
                        "smaller or modified models; its weights are not read)")
    e.add_argument("--original-config", metavar="YAML",
                   help="single file: its original LDM config (the .yaml A1111 keeps beside a checkpoint)")
    e.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the scheduler's prediction type (a single SD 2.x file is taken as v_prediction, "
                        "as diffusers does; SD 2.x-base and 2.x inpainting files predict epsilon)")
    e.add_argument("output", help="the folder to create")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the lowest that works)")
    e.add_argument("--components",
                   help="comma-separated subset of text_encoder,text_encoder_2 (SDXL),unet,vae_decoder,vae_encoder")
    e.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    e.set_defaults(func=cmd_export)

    o = sub.add_parser("optimize", help="fuse (cpu or gpu profile) and optionally fp16-convert an exported folder")
    o.add_argument("folder", help="a folder written by `sdrt export` (fp32, not yet optimized)")
    o.add_argument("output", help="the folder to create")
    o.add_argument("--optimize", choices=("cpu", "gpu"), default="cpu", help="fusion profile (default cpu)")
    o.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="weights precision (default fp32)")
    o.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    o.set_defaults(func=cmd_optimize)

    q = sub.add_parser("quantize", help="int8-quantize the UNet and text encoder for the CPU (validated vs fp32)")
    q.add_argument("folder", help="an fp32 folder written by `sdrt export` (or its `sdrt optimize --optimize cpu`)")
    q.add_argument("output", help="the folder to create")
    q.add_argument("--mode", choices=("dynamic", "static", "qdq"), default="static",
                   help="dynamic: MatMul/Gemm only; static (default): also Conv, calibrated; qdq: all calibrated")
    q.add_argument("--components", default="unet,text_encoder", help="comma-separated (default unet,text_encoder)")
    q.add_argument("--calibration-prompts", type=int, default=4,
                   help="pipeline runs recorded for calibration, from a built-in prompt list (default 4)")
    q.add_argument("--calibration-steps", type=int, default=4, help="denoising steps per calibration run")
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate images from a prompt",
                       usage="sdrt generate [FOLDER] [PROMPT] [options]  (or -m FOLDER -p PROMPT)",
                       description="Generate images with an exported model folder. Flags of stable-diffusion.cpp "
                                   "and A1111 work too: -m, -p, -n, --cfg-scale, -W/-H, -s, --sampling-method, -b.")
    g.add_argument("words", nargs="*", metavar="FOLDER PROMPT",
                   help="the exported model folder, then the prompt (or give them as -m and -p)")
    g.add_argument("-m", "--model", dest="folder", default=None, metavar="FOLDER",
                   help="the exported model folder (instead of the first positional argument)")
    g.add_argument("-p", "--prompt", dest="prompt", default=None,
                   help="the prompt (instead of the second positional argument)")
    g.add_argument("--from-png", default=None, metavar="PICTURE",
                   help="make a picture sdrt wrote again: its parameters (PNG text, or JPEG/WebP EXIF) give the "
                        "prompt, seed, size, steps, scheduler and every other option; flags given as well override "
                        "them (a LoRA is found by name in --lora-dir; a ControlNet or img2img picture must be given)")
    g.add_argument("-o", "--output", default="out.png",
                   help="the file to write: .png, .jpg/.jpeg (see --quality) or .webp, with the parameters inside "
                        "(PNG text chunk, JPEG/WebP EXIF UserComment, as A1111); a missing folder is made. Several "
                        "images: %%d or %%03d in the name numbers them from 0 (as stable-diffusion.cpp), else "
                        "NAME-0.png, NAME-1.png...")
    g.add_argument("--quality", type=int, default=None, metavar="1-100",
                   help="JPEG/WebP quality (default 90)")
    g.add_argument("-n", "--negative", "--negative-prompt", dest="negative", default=None,
                   help="negative prompt (what to steer away from)")
    g.add_argument("--prompt-2", default=None, help="the prompt for the second text encoder: SDXL's and SD3's "
                                                   "CLIP-G, Flux's T5 (default: PROMPT)")
    g.add_argument("--negative-2", default=None, help="SDXL, SD3, Flux: the negative prompt for the second text encoder")
    g.add_argument("--prompt-3", default=None, help="SD3: the prompt for T5 (default: PROMPT)")
    g.add_argument("--negative-3", default=None, help="SD3: the negative prompt for T5")
    g.add_argument("--max-sequence-length", type=int, default=None, metavar="TOKENS",
                   help="SD3, Flux: the T5 tokens read from the prompt (default: the pipeline's, SD3 256, Flux 512)")
    g.add_argument("--true-cfg", type=float, default=None, metavar="SCALE",
                   help="Flux: classifier-free guidance at SCALE with --negative (two transformer runs per step; "
                        "--guidance is Flux dev's distilled guidance)")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the pipeline's, as diffusers: 50; LCM 4; SD3, Flux 28)")
    g.add_argument("--guidance", "--cfg-scale", dest="guidance", type=float, default=None,
                   help="guidance scale (default: the pipeline's, as diffusers: SD 7.5, SDXL 5.0, LCM 8.5, SD3 7.0; "
                        "Flux dev's distilled guidance 3.5; Flux schnell takes none)")
    g.add_argument("--guidance-rescale", type=float, default=None,
                   help="rescale the guided prediction toward the prompt's standard deviation, in [0, 1] "
                        "(Lin et al. 2023; for zero-SNR v-prediction models, e.g. 0.7; default 0: off)")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM's eta: the share of fresh noise at each step, in [0, 1] (default 0)")
    g.add_argument("--guidance-interval", type=_interval, default=None, metavar="LO,HI",
                   help="apply classifier-free guidance only at steps whose noise level sigma is in [LO, HI] "
                        "(Kynkaanniemi et al. 2024, e.g. 0.28,5.42); the other steps run the prompt alone, at half "
                        "the UNet cost")
    g.add_argument("--emphasis", choices=("original", "none"), default="original",
                   help="original (default): read PROMPT in A1111's syntax, (word:1.2) [word] BREAK, any length, "
                        "in chunks of 75 tokens; none: literal text cut at 77 tokens, as diffusers")
    g.add_argument("--clip-skip", type=int, default=None,
                   help="take the prompt's embeddings this many text-encoder layers earlier (diffusers' clip_skip)")
    g.add_argument("--lora", type=_lora, action="append", default=None, metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors file (kohya/A1111, diffusers/PEFT, LoHa/LoKr) at SCALE (default 1); "
                        "repeatable")
    g.add_argument("--lora-dir", default=None,
                   help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors (the tags are removed "
                        "from the prompt)")
    g.add_argument("--controlnet", action="append", default=None, metavar="FOLDER",
                   help="guide the layout with a ControlNet exported by sdrt export-controlnet (checked against the "
                        "base); repeatable, one --control-image each")
    g.add_argument("--control-image", action="append", default=None, metavar="PICTURE",
                   help="the ControlNet's control image (edges, depth, pose, segmentation...), resized to the output; "
                        "txt2img's size defaults to it; repeatable, in --controlnet order (one image serves all)")
    g.add_argument("--control-scale", type=float, action="append", default=None, metavar="SCALE",
                   help="ControlNet strength (default: the pipeline's, as diffusers: 1.0; img2img 0.8; inpainting "
                        "0.5); once for all, or once per --controlnet")
    g.add_argument("--control-start", type=float, action="append", default=None, metavar="FRACTION",
                   help="the share of the steps after which the ControlNet starts acting (default 0)")
    g.add_argument("--control-end", type=float, action="append", default=None, metavar="FRACTION",
                   help="the share of the steps after which it stops (default 1)")
    g.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: the ControlNets see the prompt's half only, with residuals ramped "
                        "from 0.1 to 1 (recognises the content without a prompt; use guidance 3-5)")
    g.add_argument("--alternate-controlnet", action="store_true",
                   help="with --low-memory: the ControlNets and the UNet take turns in memory at every UNet call "
                        "(the lowest peak; each network is reloaded every step, much slower). By default "
                        "--low-memory keeps the ControlNets beside the UNet during denoising")
    g.add_argument("--canny", action="store_true",
                   help="turn each --control-image into canny edges first (OpenCV: pip install 'sdrt[control]')")
    g.add_argument("--canny-thresholds", type=_canny, default=None, metavar="LOW,HIGH",
                   help="with --canny: the hysteresis thresholds (default 100,200, as controlnet_aux)")
    g.add_argument("--scheduler-config", metavar="FILE.json",
                   help="a scheduler_config.json to use instead of the folder's (diffusers' format and checks)")
    g.add_argument("--scheduler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="set one scheduler option over the folder's config, as diffusers' from_config(config, "
                        "KEY=VALUE): timestep_spacing=trailing, use_karras_sigmas=true, rescale_betas_zero_snr=true, "
                        "prediction_type=v_prediction... (repeatable)")
    g.add_argument("--scheduler", "--sampling-method", "--sampler", dest="scheduler", type=_scheduler, default=None,
                   help="the sampler (default: the folder's scheduler_config.json): " + _scheduler_names() +
                        " (stable-diffusion.cpp's names work too: euler_a, dpm++2m...; and A1111's: 'Euler a', "
                        "'DPM++ 2M Karras', PLMS...)")
    g.add_argument("-s", "--seed", type=int, default=None,
                   help="the random seed (default, and -1: a random one, printed and recorded in the file). "
                        "Several images take seed, seed+1, ... (each file reproducible on its own)")
    g.add_argument("--size", type=_size, default=None,
                   help="WIDTHxHEIGHT, e.g. 512x512 (default: the model's, e.g. 512x512 for SD 1.5)")
    g.add_argument("-W", "--width", type=int, default=None,
                   help="the width in px, instead of --size's (default: the model's)")
    g.add_argument("-H", "--height", type=int, default=None,
                   help="the height in px, instead of --size's (default: the model's)")
    g.add_argument("--num-images", "-b", "--batch-count", "--batch", dest="num_images", type=int, default=1,
                   help="how many images (one batch; each its own seed)")
    g.add_argument("--image", default=None, help="img2img: start from this picture (RGB); the output has its size")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img: how far to move from --image, in (0, 1] (default: the pipeline's, as diffusers: "
                        "0.8, SDXL 0.3; with --mask 1.0, SDXL 0.9999); runs that share of --steps")
    g.add_argument("--mask", default=None,
                   help="inpainting: repaint the white part of --image given by this mask (same size; black is kept)")
    g.add_argument("--refiner", default=None,
                   help="SDXL: an exported refiner folder; the base runs the first --high-noise-frac of the steps, "
                        "the refiner the rest on its latents (diffusers' ensemble of expert denoisers); also with "
                        "--image (img2img) and --image --mask (inpainting)")
    g.add_argument("--high-noise-frac", type=float, default=None,
                   help="with --refiner: the share of the schedule the base denoises, in (0, 1) (default 0.8)")
    g.add_argument("--vae", choices=("full", "taesd"), default="full",
                   help="taesd: decode (and encode) with the tiny VAE added by `sdrt export-taesd`: much faster, "
                        "less detail")
    g.add_argument("--rng", choices=("torch", "numpy"), default="torch",
                   help="noise stream: torch (same image as diffusers for a seed; A1111's CPU) or numpy")
    g.add_argument("--provider", default="cpu",
                   help="cpu, cuda[:N], tensorrt-ep (onnxruntime's TensorRT provider), tensorrt (native, needs "
                        "sdrt[tensorrt]) or an onnxruntime provider name")
    g.add_argument("--allow-fallback", action="store_true",
                   help="if the provider is missing or fails to build, use the next one (tensorrt -> cuda -> cpu) "
                        "with a warning, instead of stopping")
    _add_engine_flags(g)
    g.add_argument("--low-memory", action="store_true",
                   help="one network in memory at a time, guidance halves one after the other: a lower peak RSS, "
                        "the same image, a slightly slower run")
    g.add_argument("--tile-size", type=int, default=None,
                   help="VAE decode (and encode) in tiles of this many px (a multiple of 8, e.g. 256): less memory "
                        "for big images; blended tiles differ slightly from a whole decode")
    g.add_argument("--auto-memory", action="store_true",
                   help="if the run would not fit in memory, switch to --low-memory and a tiled VAE instead of "
                        "stopping (the memory check runs before any network)")
    g.add_argument("--tile-overlap", type=int, default=None,
                   help="px shared by neighbouring tiles, blended (a multiple of 8; default a quarter of --tile-size)")
    g.add_argument("--verify", choices=("size", "sha256", "none"), default="size",
                   help="check the folder's files against sdrt.json first: size (default, instant), sha256 (every "
                        "byte; remembered per file until it changes, so it costs once), none")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="draw a grid of shapes with the bundled trained demo model")
    d.add_argument("-o", "--output", default="demo.png", help="the grid's file (.png, .jpg or .webp)")
    d.add_argument("--model", default=None, help="an exported folder (default: the bundled demo model)")
    d.add_argument("--steps", type=int, default=20, help="denoising steps")
    d.add_argument("--guidance", type=float, default=3.0, help="guidance scale (the demo model follows prompts well at 3-7)")
    d.add_argument("-s", "--seed", type=int, default=0, help="the random seed")
    d.add_argument("--scheduler", type=_scheduler, default=None,
                   help="override the model's scheduler: " + _scheduler_names())
    d.add_argument("--provider", default="cpu", help="cpu, cuda[:N], tensorrt-ep or an onnxruntime provider name")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time each stage, cold start and memory of an exported folder")
    b.add_argument("folder", help="an exported model folder")
    b.add_argument("--provider", default="cpu", help="cpu, cuda, tensorrt-ep or an onnxruntime provider name")
    b.add_argument("--allow-fallback", action="store_true",
                   help="if the provider is missing or fails, use the next one (cuda -> cpu) with a warning; the "
                        "result records the provider that ran")
    _add_engine_flags(b)
    b.add_argument("--steps", type=int, default=10, help="denoising steps per run")
    b.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the model's size)")
    b.add_argument("--batch", "--num-images", "-b", "--batch-count", dest="batch", type=int, default=1,
                   help="images per prompt (one batch), as generate --num-images")
    b.add_argument("--guidance", type=float, default=7.5, help="guidance scale; <= 1 runs without CFG")
    b.add_argument("--scheduler", "--sampling-method", dest="scheduler", type=_scheduler, default=None,
                   help="override the folder's scheduler: " + _scheduler_names())
    b.add_argument("--runs", type=int, default=3, help="measured runs (median, p10, p90)")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    b.add_argument("-s", "--seed", type=int, default=0, help="the random seed")
    b.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start measurement")
    b.add_argument("--verify", choices=("size", "sha256", "none"), default="size",
                   help="check the folder's files against sdrt.json first (as sdrt generate --verify)")
    b.add_argument("--out", default=None, help="folder for <date>-<machine> JSON + markdown (+ PNG)")
    b.add_argument("--plot", action="store_true",
                   help="also write a PNG chart: in --out, or without it in the working folder")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    dc = sub.add_parser("deepcache", help="write the UNet's step-caching graphs (full + deep feature, shallow "
                        "branch) into an exported folder, for --cache-interval (needs onnx)")
    dc.add_argument("folder", help="a folder written by `sdrt export` (or sdrt optimize / quantize), updated in place")
    dc.set_defaults(func=cmd_deepcache)

    t = sub.add_parser("export-taesd", help="add a tiny VAE (TAESD) to an exported folder, for --vae taesd "
                       "(needs sdrt[export])")
    t.add_argument("source", help="a diffusers AutoencoderTiny folder, e.g. a download of madebyollin/taesd")
    t.add_argument("folder", help="a folder written by `sdrt export`, updated in place")
    t.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    t.add_argument("--decoder-only", action="store_true", help="skip the encoder (img2img with --vae taesd needs it)")
    t.add_argument("--force", action="store_true", help="replace a tiny VAE the folder already has")
    t.set_defaults(func=cmd_export_taesd)

    c = sub.add_parser("export-controlnet", help="export a diffusers ControlNetModel folder to a validated ONNX "
                       "folder, for sdrt generate --controlnet (needs sdrt[export])")
    c.add_argument("source", help="a diffusers ControlNetModel folder (config.json + "
                   "diffusion_pytorch_model.safetensors), e.g. a download of lllyasviel/sd-controlnet-canny")
    c.add_argument("output", help="the folder to create")
    c.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    c.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    c.set_defaults(func=cmd_export_controlnet)

    i = sub.add_parser("info", help="describe an exported folder and verify its files")
    i.add_argument("folder", help="an exported model folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=cmd_info)
    from sdrt.serve.cli import add_arguments as serve_arguments  # no web framework imported here

    v = sub.add_parser("serve", help="serve models over HTTP (OpenAI Images and A1111 APIs, continuous batching; "
                       "needs sdrt[serve])")
    serve_arguments(v)
    v.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # generate's FOLDER PROMPT may stand after options (argparse leaves them over)
        if args.command != "generate" or any(word.startswith("-") and word != "-" for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.words = [*args.words, *extra]
    if getattr(args, "from_png", None):
        args.explicit = _given(parser, argv)
    import warnings

    # Warnings as one line each, in sdrt's voice (not Python's file:line and source line).
    warnings.formatwarning = lambda message, category, *rest, **kw: f"sdrt {args.command}: warning: {message}\n"
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except BrokenPipeError:  # `sdrt info --json | head`: the reader has what it wanted; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SdrtError as e:
        print(f"sdrt {args.command}: error: {_in_cli_terms(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
