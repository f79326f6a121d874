"""The few CUDA runtime calls the native TensorRT backend needs, through cuda-python (never torch).

Device buffers, a stream, host <-> device copies and CUDA graph capture. cuda-python's calls return
(error, value...) tuples; `call` turns a failure into an EngineError naming the call. Imported
lazily: nothing here runs until a TensorRT engine is loaded.
"""

from __future__ import annotations

import numpy as np

from sdrt.engines.errors import BackendNotInstalledError, EngineError

INSTALL_HINT = "pip install 'sdrt[tensorrt]' (tensorrt and cuda-python)"


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise BackendNotInstalledError(f"cuda-python is not installed: {INSTALL_HINT}") from e
    return cudart


def succeeded(err) -> bool:
    """cudaSuccess is 0; cuda-python's error enums are IntEnum in recent releases, Enum in older ones."""
    return int(getattr(err, "value", err)) == 0


def call(result, what: str):
    """Check a cuda-python result tuple; return its value (None, one value, or a tuple of values)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if not succeeded(err):
        raise EngineError(f"CUDA call {what} failed: {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class DeviceBuffer:
    """A device allocation of `nbytes`, grown (never shrunk) on demand, freed by `free()`."""

    def __init__(self, cudart, nbytes: int = 0):
        self._cudart = cudart
        self.ptr = 0
        self.nbytes = 0
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> bool:
        """Make room for nbytes; True when the allocation (and so its address) changed."""
        if nbytes <= self.nbytes:
            return False
        self.free()
        self.ptr = int(call(self._cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))
        self.nbytes = int(nbytes)
        return True

    def free(self) -> None:
        if self.ptr:
            call(self._cudart.cudaFree(self.ptr), "cudaFree")
        self.ptr, self.nbytes = 0, 0


class Stream:
    """A CUDA stream with host <-> device copies and optional graph capture/replay."""

    def __init__(self, cudart):
        self._cudart = cudart
        self.handle = call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._graph = None
        self._graph_exec = None

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def upload(self, dst: DeviceBuffer, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        call(self._cudart.cudaMemcpyAsync(dst.ptr, array.ctypes.data, array.nbytes, kind, self.handle),
             "cudaMemcpyAsync (host to device)")

    def download(self, src: DeviceBuffer, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A new host array the caller owns, copied from `src` once the stream's work is done."""
        out = np.empty(shape, dtype=dtype)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        call(self._cudart.cudaMemcpyAsync(out.ctypes.data, src.ptr, out.nbytes, kind, self.handle),
             "cudaMemcpyAsync (device to host)")
        self.synchronize()
        return out

    def synchronize(self) -> None:
        call(self._cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    # -- CUDA graphs: capture the work `enqueue` puts on this stream once, replay it after -----------

    @property
    def has_graph(self) -> bool:
        return self._graph_exec is not None

    def capture(self, enqueue) -> None:
        """Record what `enqueue()` launches on this stream as a graph (it runs nothing while capturing)."""
        self.drop_graph()
        mode = self._cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        call(self._cudart.cudaStreamBeginCapture(self.handle, mode), "cudaStreamBeginCapture")
        try:
            ok = enqueue()
        finally:
            graph = call(self._cudart.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")
        if not ok:
            call(self._cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise EngineError("the TensorRT enqueue failed while capturing a CUDA graph")
        self._graph = graph
        self._graph_exec = call(self._cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def replay(self) -> None:
        call(self._cudart.cudaGraphLaunch(self._graph_exec, self.handle), "cudaGraphLaunch")

    def drop_graph(self) -> None:
        if self._graph_exec is not None:
            call(self._cudart.cudaGraphExecDestroy(self._graph_exec), "cudaGraphExecDestroy")
        if self._graph is not None:
            call(self._cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
        self._graph = self._graph_exec = None

    def destroy(self) -> None:
        self.drop_graph()
        if self.handle is not None:
            call(self._cudart.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None
