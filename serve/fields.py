"""Reading an API request's JSON or form fields: typed, named in the API's own terms, InvalidInputError otherwise."""

from __future__ import annotations

import math

from sdrt.runtime.errors import InvalidInputError

MISSING = object()


async def json_object(request) -> dict:
    """A request's body as a JSON object, else InvalidInputError (not JSON, nested past Python's recursion limit,
    or not an object)."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise InvalidInputError("the body must be a JSON object (Content-Type: application/json)") from None
    if not isinstance(body, dict):
        raise InvalidInputError("the body must be a JSON object")
    return body


def get(body: dict, name: str, kind: type, default=None, *, minimum=None, maximum=None, form: bool = False):
    """body[name] as `kind` (int, float, str, bool), or `default` when absent or null. Form fields (strings) are
    converted; JSON fields must already have the type (an int is taken as a float)."""
    value = body.get(name, None)
    if value is None or (form and value == ""):
        return default
    if form and isinstance(value, str) and kind is not str:
        try:
            value = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
        except (ValueError, KeyError):
            raise InvalidInputError(f"{name} must be {_a(kind)}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise InvalidInputError(f"{name} must be {_a(kind)}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be <= {maximum}, got {value}")
    return value


def _a(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, kind.__name__)


def size(text, name: str = "size") -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto" / absent: the model's) -> (width, height)."""
    if text is None or text == "auto":
        return None, None
    if not isinstance(text, str):
        raise InvalidInputError(f"{name} must be a string such as '512x512', got {text!r}")
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"{name} must look like '512x512' (WIDTHxHEIGHT) or 'auto', got {text!r}") from None
    if width < 1 or height < 1:
        raise InvalidInputError(f"{name} must be positive, got {text!r}")
    return width, height
