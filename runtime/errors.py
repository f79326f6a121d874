"""Errors the runtime raises for bad input, bad folders and failed generations."""

from sdrt.engines.errors import SdrtError


class InvalidInputError(SdrtError, ValueError):
    """An argument is out of range or inconsistent; the message says what is allowed."""


class ModelFolderError(SdrtError):
    """An exported model folder is missing, incomplete or corrupted."""


class UnsupportedConfigError(SdrtError):
    """A config option sdrt does not implement; refused rather than silently ignored."""


class GenerationError(SdrtError):
    """Generation failed part way (for example NaN in the UNet output)."""


class CancelledError(SdrtError):
    """The per-step callback asked to stop."""


class InsufficientMemoryError(SdrtError):
    """A generation would need more memory than the machine has: refused before it starts, with what would fit."""


class OutputWriteError(SdrtError, OSError):
    """An output file could not be written (a full disk, a read-only file system); nothing is left behind. Also
    an OSError, as the failure it wraps."""
