"""Inputs copied into an engine's fixed device buffers once, and not again while a buffer still holds them.

An engine whose inputs live at fixed device addresses (onnxruntime with fixed shapes or CUDA graphs,
the native TensorRT backend) cannot bind a value kept elsewhere on the device: a captured CUDA graph
reads the addresses it was captured with. So its `Engine.device_resident` returns `Resident` values,
and the engine copies one into the input's buffer only when that buffer holds something else
(`BufferContents`). Over a generation with one UNet call per step, the text conditioning is then
copied once; when two conditionings take turns in one buffer (classifier-free guidance run as two
calls), each call copies its own in, which keeps the buffer's address, and so a captured graph, valid.
"""

from __future__ import annotations

import numpy as np


class Resident:
    """A host array meant to stay in an engine's input buffer across calls; reads as that array elsewhere."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype, copy=False)


class BufferContents:
    """Which `Resident` each input buffer holds now."""

    def __init__(self):
        self._held: dict[str, Resident] = {}

    def needs_copy(self, name: str, value) -> bool:
        """Whether `value` must be copied into buffer `name`; records that the buffer will hold it."""
        if isinstance(value, Resident):
            if self._held.get(name) is value:
                return False
            self._held[name] = value
        else:
            self._held.pop(name, None)
        return True

    def forget(self) -> None:
        """The buffers were reallocated or overwritten: nothing they held can be assumed."""
        self._held.clear()
