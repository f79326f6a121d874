"""Pictures in and out of the APIs: base64 / uploaded bytes -> PIL images (checked), PNGs with the A1111 infotext."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from sdrt.runtime.errors import InvalidInputError


def png(image: Image.Image, parameters: str | None = None) -> bytes:
    """The image as PNG bytes, with `parameters` in a "parameters" text chunk (as sdrt generate writes it)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64_png(image: Image.Image, parameters: str | None = None) -> str:
    return base64.b64encode(png(image, parameters)).decode("ascii")


def from_bytes(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """A picture from an upload, decoded in memory; InvalidInputError naming the field if unreadable or too big."""
    if not data:
        raise InvalidInputError(f"{field} is empty; send a PNG, JPEG or WebP picture")
    try:
        picture = Image.open(io.BytesIO(data))
        if picture.width * picture.height > max_pixels:
            raise InvalidInputError(f"{field} is {picture.width}x{picture.height}, over this server's limit of "
                                    f"{max_pixels} pixels (sdrt serve --max-pixels)")
        picture.load()
    except Image.DecompressionBombError:
        raise InvalidInputError(f"{field} claims a huge picture (a decompression bomb?); refused") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInputError(f"{field} is not a picture sdrt can read ({type(e).__name__}: {e}); send a PNG, "
                                "JPEG or WebP") from None
    return picture


def from_base64(text, field: str, max_pixels: int) -> Image.Image:
    """A picture from base64 text, with or without a data: URL prefix (A1111 takes both)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{field} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{field} is not valid base64") from None
    return from_bytes(data, field, max_pixels)
