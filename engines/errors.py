"""The error types every sdrt layer raises: one base class, so applications can catch sdrt's errors."""


class SdrtError(Exception):
    """Base class of every error sdrt raises on purpose (bad input, missing files, missing extras)."""


class EngineError(SdrtError):
    """A network file could not be loaded or run."""


class BackendNotInstalledError(EngineError):
    """The backend asked for is not installed; the message names the extra to install."""
