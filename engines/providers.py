"""Pick a backend from a provider name: onnxruntime providers, or native TensorRT."""

from __future__ import annotations

from sdrt.engines.base import Engine
from sdrt.engines.errors import BackendNotInstalledError


def create_engine(path, spec=None, provider="cpu", **options) -> Engine:
    if isinstance(provider, str) and provider.lower() == "tensorrt":
        raise BackendNotInstalledError(
            "the native TensorRT backend is not available in this build; use provider='tensorrt-ep' "
            "(onnxruntime's TensorRT provider, extra sdrt[gpu]) or 'cuda'"
        )
    from sdrt.engines.onnxruntime import OrtEngine, SessionOptions

    session_options = options.pop("session_options", None)
    if options:
        session_options = SessionOptions(**options)
    return OrtEngine(path, spec=spec, provider=provider, options=session_options)
