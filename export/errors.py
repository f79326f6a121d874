"""Errors the exporter raises: each says what was wrong and what to do."""

from sdrt.engines.errors import SdrtError


class ExportError(SdrtError):
    """The export could not be completed; nothing was written at the output path."""


class CheckpointError(ExportError):
    """The source is missing, not a diffusers folder, or its weights do not load cleanly."""


class UnsupportedModelError(ExportError):
    """A pipeline family or option this version of sdrt cannot export yet."""


class OutputExistsError(ExportError):
    """The output folder exists and --force was not given."""


class ValidationError(ExportError):
    """An exported network disagrees with its torch module beyond tolerance."""


class MissingExtraError(ExportError):
    """The export extra (torch, diffusers, transformers, onnx) is not installed."""
