"""Pictures in and out: VAE tensors <-> uint8 / PIL images as diffusers' VaeImageProcessor makes them, PNG output.

The VAE decoder gives NCHW floats in [-1, 1]; `to_uint8` / `to_unit` / `to_pil` turn them into what
diffusers' pipelines return for output_type="pil" / "np". `from_pil` is the other way, for the VAE
encoder (img2img). `save_image` writes a PNG, JPEG or WebP atomically with the generation parameters
where AUTOMATIC1111's web UI writes and reads them (a PNG "parameters" text chunk, the EXIF UserComment),
as `format_parameters` formats them; `read_parameters` and `parse_parameters` read them back.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdrt.runtime.errors import InvalidInputError, OutputWriteError

# diffusers' VaeImageProcessor(resample="lanczos"), the default every Stable Diffusion pipeline uses.
RESAMPLE = Image.Resampling.LANCZOS


def to_unit(images: np.ndarray) -> np.ndarray:
    """NCHW floats in [-1, 1] -> NHWC float32 in [0, 1], as diffusers' output_type="np".

    Arithmetic runs in the input's dtype (float16 stays float16 until the end), as torch does in
    VaeImageProcessor.postprocess. NaN stays NaN.
    """
    images = _check_nchw_float(images)
    unit = np.clip(images * 0.5 + 0.5, 0, 1)  # VaeImageProcessor.denormalize
    return np.ascontiguousarray(unit.transpose(0, 2, 3, 1), dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """NCHW floats in [-1, 1] -> NHWC uint8, bit-identical to diffusers' output_type="pil".

    diffusers rounds `unit * 255` half to even in float32 (numpy's round). NaN has no uint8 value:
    it raises InvalidInputError (diffusers silently makes it 0, a black image; NaN from a VAE
    usually means float16 overflow).
    """
    unit = to_unit(images)
    nan_count = int(np.isnan(unit).sum())
    if nan_count:
        raise InvalidInputError(
            f"images hold {nan_count} NaN values, which have no pixel value; a float16 VAE that overflowed "
            "gives them: decode in float32, or use a VAE fixed for float16"
        )
    return (unit * 255).round().astype(np.uint8)


def to_pil(images_uint8: np.ndarray) -> list[Image.Image]:
    """NHWC (or HWC) uint8 -> PIL images: 1 channel L, 3 RGB, 4 RGBA. The images do not share the array's memory."""
    array = np.asarray(images_uint8)
    if array.dtype != np.uint8:
        raise InvalidInputError(f"to_pil takes uint8 pixels (see to_uint8), got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(f"to_pil takes NHWC or HWC with 1, 3 or 4 channels, got shape {array.shape}")
    return [Image.fromarray(np.array(image[..., 0] if image.shape[-1] == 1 else image)) for image in array]


def from_pil(
    image: Image.Image | np.ndarray | list,
    height: int | None = None,
    width: int | None = None,
    vae_scale_factor: int = 8,
) -> np.ndarray:
    """RGB picture(s) -> NCHW float32 in [-1, 1] for the VAE encoder, as VaeImageProcessor.preprocess.

    image: a PIL image, an HWC uint8 RGB array, or a list of them (one batch, all resized to one size).
    height, width: the size to resize to (lanczos, as diffusers), multiples of vae_scale_factor;
    by default the first image's size rounded down to a multiple, as diffusers does.

    Modes: RGB is taken as is; P (palette) without transparency is converted to RGB, losslessly.
    Everything else is refused with InvalidInputError rather than guessed at: RGBA, LA and
    transparent palettes (how to flatten the alpha is the caller's choice: composite onto a
    background, then .convert("RGB")), and L, 1, I, F, CMYK, YCbCr, ... (call .convert("RGB") if
    that is what you mean). diffusers itself passes such images through unconverted and fails later
    in the VAE, or encodes palette indices as if they were grey levels. EXIF orientation is not
    applied: pass PIL.ImageOps.exif_transpose(image) for camera pictures.
    """
    pictures, height, width = _pictures_and_size(image, height, width, vae_scale_factor)
    # Filled in place, NCHW from the start: one float copy of the batch (a large picture must not take four).
    pixels = np.empty((len(pictures), 3, height, width), dtype=np.float32)
    for index, picture in enumerate(pictures):
        pixels[index] = np.asarray(picture.resize((width, height), resample=RESAMPLE)).transpose(2, 0, 1)
    pixels /= 255.0  # VaeImageProcessor.pil_to_numpy, then normalize: 2 * (x / 255) - 1
    pixels *= 2.0
    pixels -= 1.0
    return pixels


def picture_size(image, height: int | None = None, width: int | None = None,
                 vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """(count, height, width) of the pixels from_pil would make, with its checks, converting no pixel: what a
    memory check needs before a large picture takes its float copy."""
    pictures, height, width = _pictures_and_size(image, height, width, vae_scale_factor)
    return len(pictures), height, width


def _pictures_and_size(image, height, width, vae_scale_factor: int) -> tuple[list, int, int]:
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise InvalidInputError("from_pil got an empty list of images")
    pictures = [as_rgb(item, index) for index, item in enumerate(images)]
    height = _vae_size("height", height, pictures[0].height, vae_scale_factor)
    width = _vae_size("width", width, pictures[0].width, vae_scale_factor)
    return pictures, height, width


# The formats sdrt writes, by file extension (no extension: PNG), and where each keeps the parameters: PNG in a
# "parameters" text chunk, JPEG and WebP in the EXIF UserComment, as AUTOMATIC1111's web UI writes and reads them.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_QUALITY = 90  # JPEG and WebP
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
_UNICODE = b"UNICODE\0"  # EXIF's character code for UTF-16 (big-endian, as piexif, which A1111 uses, writes it)


def output_format(path, option: str = "the output path") -> str:
    """The format a path's extension names (PNG without one); InvalidInputError for any other extension."""
    suffix = Path(path).suffix.lower()
    if suffix == "" or os.path.exists(path) and not os.path.isfile(path):  # no extension, a device or a pipe
        return "PNG"
    if suffix not in OUTPUT_FORMATS:
        raise InvalidInputError(f"{option} {path}: sdrt writes .png, .jpg/.jpeg and .webp (the format follows the "
                                f"extension), not {suffix}")
    return OUTPUT_FORMATS[suffix]


def check_output_path(path, option: str = "the output path") -> Path:
    """A path a file can be written at, checked before any work: not empty, not a directory, a format sdrt
    writes, in a folder that exists or can be made (save_image makes it) and can be written. Existing non-regular
    files (/dev/null, a FIFO) are written through, never replaced. InvalidInputError naming `option` otherwise."""
    if path is None or str(path).strip() == "":
        raise InvalidInputError(f"{option} is empty; give a file name such as out.png")
    if "\0" in str(path):
        raise InvalidInputError(f"{option} {str(path)!r} holds a NUL character, which no file name can")
    if str(path).endswith(("/", os.sep)) and not Path(path).exists():  # Path would drop the slash
        raise InvalidInputError(f"{option} {path} ends with a slash, which names a folder; give a file name "
                                f"such as {Path(path) / 'out.png'}")
    try:
        return _check_output_path(Path(path), option)
    except OSError as e:  # a name too long, a loop of links...: what the system says, before any work
        raise InvalidInputError(f"{option} {path} cannot be written ({e.strerror or e})") from e


def _check_output_path(path: Path, option: str) -> Path:
    if path.is_dir():
        raise InvalidInputError(f"{option} {path} is a directory; give a file name in it, such as {path / 'out.png'}")
    if path.exists() and not path.is_file():
        if not os.access(path, os.W_OK):
            raise InvalidInputError(f"{option} {path} cannot be written (permission denied)")
        return path  # a device or pipe: written through
    output_format(path, option)
    folder = path.resolve().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InvalidInputError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{option} {path}: the folder {existing} cannot be written (permission denied)")
    return path


def numbered_paths(path, count: int) -> list[Path]:
    """The paths of `count` images: `path` itself for one; with a printf-style %d (or %03d...) in the name, the
    image's index from 0 (as stable-diffusion.cpp's -o); else NAME-0.EXT, NAME-1.EXT..."""
    path = Path(path)
    if re.search(r"%0?\d*d", path.name):
        names = [re.sub(r"%(0?\d*)d", lambda m: f"{{:{m.group(1)}d}}".format(k), path.name) for k in range(count)]
        return [path.with_name(name) for name in names]
    if count == 1 or (path.exists() and not path.is_file()):
        return [path] * count
    return [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}") for k in range(count)]


def exif_parameters(parameters: str) -> bytes:
    """EXIF bytes holding `parameters` in the UserComment tag (UTF-16, as A1111 writes JPEG and WebP infotext)."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE + parameters.encode("utf-16-be")
    return exif.tobytes()


class ParametersImage(Image.Image):
    """A PIL image (as the pipelines return them) whose save() writes info["parameters"] where A1111 keeps it: a
    PNG "parameters" text chunk, the EXIF UserComment of a JPEG or WebP. A pnginfo= or exif= given to save wins.
    Pillow itself writes no `info` on save; images made from this one (copy, resize, convert) are plain
    Image.Image again (their info keeps the text: write them with save_image)."""

    def save(self, fp, format=None, **params):
        text = self.info.get("parameters")
        if isinstance(text, str):
            kind = format
            if kind is None:
                name = fp if isinstance(fp, (str, bytes, os.PathLike)) else getattr(fp, "name", None)
                suffix = os.path.splitext(os.fsdecode(name))[1].lower() if name else ""
                kind = Image.registered_extensions().get(suffix)
            if str(kind).upper() == "PNG" and "pnginfo" not in params:
                params["pnginfo"] = png_info(text)
            elif str(kind).upper() in ("JPEG", "WEBP") and "exif" not in params:
                params["exif"] = exif_parameters(text)
        return super().save(fp, format, **params)


def png_info(parameters: str | None) -> PngInfo:
    """A PngInfo holding `parameters` in a "parameters" text chunk (tEXt, or iTXt when not Latin-1, as PIL)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    return info


def attach_parameters(image: Image.Image, parameters: str) -> Image.Image:
    """Set image.info["parameters"]; a plain PIL image becomes a ParametersImage, so that image.save(path) writes
    them (as sdrt generate does)."""
    image.info["parameters"] = parameters
    if type(image) is Image.Image:
        image.__class__ = ParametersImage
    return image


def read_parameters(source) -> str | None:
    """The parameters text of a picture (a path or an open PIL image): a PNG's "parameters" text chunk, or the
    EXIF UserComment of a JPEG or WebP (A1111's places); None when it has none."""
    if not isinstance(source, Image.Image):
        try:
            with Image.open(source) as opened:
                opened.load()
                return read_parameters(opened)
        except (OSError, ValueError, SyntaxError) as e:
            raise InvalidInputError(f"cannot read {source}: {e}") from e
    if isinstance(source.info.get("parameters"), str):
        return source.info["parameters"]
    comment = source.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, str):
        return comment or None
    if not isinstance(comment, bytes) or not comment:
        return None
    head, body = comment[:8], comment[8:]
    if head == _UNICODE:
        little = len(body) >= 2 and body[0] != 0 and body[1] == 0  # some writers use UTF-16-LE
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    if head.rstrip(b"\0") in (b"ASCII", b""):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return comment.decode("utf-8", errors="replace")


# A1111's infotext settings: `Label: value` pairs, the values JSON-quoted when they hold , : or a newline.
_SETTING = re.compile(r'\s*(\w[\w \-/+.]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {label: value}) from a parameters text as format_parameters (and A1111's web UI)
    writes it: the prompt lines, "Negative prompt: ..." lines, and a last line of settings."""
    if not isinstance(text, str):
        raise InvalidInputError(f"parameters must be text, got {type(text).__name__}")
    lines = text.split("\n")
    settings = {}
    if len(_SETTING.findall(lines[-1])) >= 3:
        for label, value in _SETTING.findall(lines.pop()):
            if len(value) >= 2 and value[0] == value[-1] == '"':
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            settings[label.strip()] = value.strip() if isinstance(value, str) else value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip(" ")
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), settings


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike, parameters: str | None = None) -> None:
    """Write image as a PNG at path (whatever its extension), parameters in a "parameters" text chunk (see
    save_image)."""
    save_image(image, path, parameters, format="PNG")


def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike, parameters: str | None = None,
               quality: int | None = None, format: str | None = None) -> None:
    """Write image at path in the format its extension names (.png, .jpg/.jpeg, .webp; PNG without one), with
    `parameters` where A1111's web UI keeps them: a PNG "parameters" text chunk (tEXt, or iTXt when the text is
    not Latin-1, as PIL does), the EXIF UserComment of a JPEG or WebP. quality: JPEG/WebP, 1-100 (default 90).
    A missing folder is made.

    Atomic: the file is written to a temporary file in the same folder, flushed to disk, then renamed
    over path, so a reader never sees half a file. Devices and pipes are written through; a symlink's target
    gets the new file.
    """
    if isinstance(image, np.ndarray):
        pictures = to_pil(image)
        if len(pictures) != 1:
            raise InvalidInputError(f"save_image writes one image, got an array of {len(pictures)}")
        image = pictures[0]
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"save_image takes a PIL image or an HWC uint8 array, got {type(image).__name__}")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
        raise InvalidInputError(f"quality must be an integer in [1, 100], got {quality!r}")
    if "\0" in str(path):
        raise InvalidInputError(f"save_image: {str(path)!r} holds a NUL character, which no file name can")
    path = Path(path)
    format = format or output_format(path)
    options: dict = {}
    if format == "PNG":
        options["pnginfo"] = png_info(parameters)
    else:
        options["quality"] = DEFAULT_QUALITY if quality is None else quality
        if parameters is not None:
            options["exif"] = exif_parameters(parameters)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
    try:
        _write(image, path, format, options)
    except OSError as e:  # a full disk, a read-only or special file system (/sys, /proc): nothing is left
        if isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from e


def _write(image: Image.Image, path: Path, format: str, options: dict) -> None:
    if path.exists() and not path.is_file():  # a device or a pipe: written through, never renamed over
        with open(path, "wb") as file:
            image.save(file, format=format, **options)
        return
    if path.is_symlink():  # the link's target gets the new file; the link stays
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open applies the umask to 0o666, as a plain open() would; mkstemp would make the file 0o600.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(descriptor, "wb") as file:
            image.save(file, format=format, **options)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def format_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    scheduler: str,
    guidance_scale: float,
    seed: int | None,
    width: int,
    height: int,
    model: str | None = None,
    model_hash: str | None = None,
    **extra,
) -> str:
    """Generation parameters as AUTOMATIC1111's web UI writes them (its "infotext").

    "prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: m"
    The negative prompt line is left out when it is empty; None values are left out; extra keys
    become labels ("clip_skip" -> "Clip skip"); a value holding "," ":" or a newline is JSON-quoted.
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
    fields = {
        "Steps": steps,
        "Sampler": scheduler,
        "CFG scale": guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
    }
    for key, value in extra.items():
        label = key.replace("_", " ")
        fields[label[:1].upper() + label[1:]] = value
    settings = ", ".join(f"{label}: {_infotext_value(value)}" for label, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{settings}".strip()


def image_grid(images: list, cols: int) -> Image.Image:
    """Images of one size tiled left to right, top to bottom, `cols` per row (fewer if there are fewer)."""
    pictures = [item if isinstance(item, Image.Image) else _one_picture(item) for item in images]
    if not pictures:
        raise InvalidInputError("image_grid got no images")
    if not isinstance(cols, int) or cols < 1:
        raise InvalidInputError(f"cols must be a positive integer, got {cols!r}")
    sizes = {picture.size for picture in pictures}
    if len(sizes) != 1:
        raise InvalidInputError(f"image_grid needs images of one size, got sizes {sorted(sizes)}")
    cols = min(cols, len(pictures))
    rows = math.ceil(len(pictures) / cols)
    width, height = pictures[0].size
    grid = Image.new(pictures[0].mode, (cols * width, rows * height))
    for index, picture in enumerate(pictures):
        grid.paste(picture, box=(index % cols * width, index // cols * height))
    return grid


def _check_nchw_float(images) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(
            f"expected VAE output: NCHW floats in [-1, 1], got shape {array.shape} and dtype {array.dtype}"
        )
    return array


def _one_picture(array) -> Image.Image:
    pictures = to_pil(array)
    if len(pictures) != 1:
        raise InvalidInputError(f"expected one HWC image, got an array of {len(pictures)}")
    return pictures[0]


def as_rgb(image, index: int) -> Image.Image:
    """A PIL RGB image from a PIL image or an HWC uint8 array; see from_pil for the modes taken."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InvalidInputError(
                f"image {index}: arrays must be HWC uint8 RGB, got shape {image.shape} and dtype {image.dtype}"
            )
        return Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InvalidInputError(
            f"image {index}: expected a PIL image or an HWC uint8 array, got {type(image).__name__}"
        )
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        raise InvalidInputError(
            f"image {index} has transparency (mode {image.mode}); the VAE takes RGB: composite it onto a "
            "background of your choice, then .convert('RGB')"
        )
    raise InvalidInputError(
        f"image {index} has mode {image.mode}, not RGB; call image.convert('RGB') if it should be read as RGB"
    )


def _vae_size(name: str, value: int | None, image_size: int, vae_scale_factor: int) -> int:
    if value is None:
        value = image_size - image_size % vae_scale_factor  # as diffusers' get_default_height_width
        if value == 0:
            raise InvalidInputError(f"image {name} {image_size} is smaller than the VAE's factor {vae_scale_factor}")
        return value
    if not isinstance(value, int) or value <= 0 or value % vae_scale_factor:
        raise InvalidInputError(f"{name} must be a positive multiple of {vae_scale_factor}, got {value!r}")
    return value


def _infotext_value(value) -> str:
    """A value as the web UI writes it: whole floats without ".0", quoted when it holds , : or a newline."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text
