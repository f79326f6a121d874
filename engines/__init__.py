"""sdrt.engines: run one network from its file behind one small interface (the ground floor)."""

from sdrt.engines.base import Engine
from sdrt.engines.errors import BackendNotInstalledError, EngineError, SdrtError
from sdrt.engines.spec import NetworkSpec, TensorSpec

__all__ = [
    "BackendNotInstalledError",
    "Engine",
    "EngineError",
    "NetworkSpec",
    "SdrtError",
    "TensorSpec",
    "create_engine",
]


def create_engine(path, spec=None, provider="cpu", **options) -> Engine:
    """Open the network stored at `path` with the backend named by `provider`."""
    from sdrt.engines.providers import create_engine as _create

    return _create(path, spec=spec, provider=provider, **options)
