"""onnxruntime IO binding: inputs and outputs as OrtValues on the session's device, output buffers reused.

`BoundRunner` binds a feed (NumPy arrays, or OrtValues already on the device) and runs the session
with `run_with_iobinding`. Output OrtValues are allocated once per output shape and reused across
calls, when the network's spec gives output shapes; otherwise onnxruntime allocates them.

With `fixed=True` the inputs are copied into persistent OrtValues too (`update_inplace`), so every
call uses the same device addresses: what onnxruntime's CUDA graph capture needs. A `Resident`
input (sdrt.engines.resident) is copied in only when its buffer holds something else; an OrtValue
input is bound as it is, and must then stay at one address from call to call. The first feed's
shapes are the fixed ones; `accepts(shapes)` says whether a feed has them, and the engine sends
other shapes elsewhere (see OrtEngine).

The same code runs on the CPU provider (device "cpu"), where tests check it against plain
`session.run`; on CUDA it keeps tensors on the GPU between calls of `run_ortvalues`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sdrt.engines.errors import EngineError
from sdrt.engines.profiles import dims_from_shapes
from sdrt.engines.resident import BufferContents
from sdrt.engines.spec import NetworkSpec


class BoundRunner:
    def __init__(self, ort, session, device: str, output_dtypes: Mapping[str, np.dtype],
                 spec: NetworkSpec | None = None, fixed: bool = False, device_id: int = 0):
        self._ort = ort
        self.session = session
        self.device = device
        self.device_id = device_id
        self.output_dtypes = dict(output_dtypes)
        self.spec = spec
        self.fixed = fixed
        self.binding = session.io_binding()
        self.inputs: dict = {}  # name -> persistent OrtValue (fixed mode)
        self.contents = BufferContents()  # which Resident each persistent input holds (fixed mode)
        self.addresses: dict[str, int] = {}  # name -> the device address every call binds (fixed mode)
        self.outputs: dict = {}  # name -> reused OrtValue
        self.fixed_shapes: dict | None = None

    def accepts(self, shapes: Mapping[str, tuple]) -> bool:
        return not self.fixed or self.fixed_shapes is None or dict(shapes) == self.fixed_shapes

    def ortvalue(self, array: np.ndarray):
        """A new OrtValue on this runner's device holding a copy of `array`.

        On the CPU onnxruntime would wrap the array's own memory, and a fixed buffer's `update_inplace`
        would then overwrite the caller's array: copy it first."""
        array = np.array(array, order="C", copy=True) if self.device == "cpu" else np.ascontiguousarray(array)
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def _output_shapes(self, shapes: Mapping[str, tuple]) -> dict | None:
        if self.spec is None:
            return None
        try:
            dims = dims_from_shapes(self.spec, shapes)
            return {t.name: t.resolve(dims) for t in self.spec.outputs}
        except (KeyError, ValueError):  # an axis the inputs do not determine: let onnxruntime allocate
            return None

    def _bind_inputs(self, feed: Mapping, shapes: dict) -> None:
        for name, value in feed.items():
            if isinstance(value, self._ort.OrtValue):
                if self.fixed:
                    self._check_address(name, value.data_ptr())
                self.binding.bind_ortvalue_input(name, value)
            elif self.fixed:
                if self.contents.needs_copy(name, value):
                    self._copy_in(name, np.asarray(value))
            elif self.device == "cpu":
                self.binding.bind_cpu_input(name, np.asarray(value))
            else:
                self.binding.bind_ortvalue_input(name, self.ortvalue(np.asarray(value)))

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        """Fixed mode: copy `array` into the input's persistent OrtValue (made and bound on first use)."""
        held = self.inputs.get(name)
        if held is None:
            held = self.inputs[name] = self.ortvalue(array)
            self._check_address(name, held.data_ptr())
            self.binding.bind_ortvalue_input(name, held)
        else:
            held.update_inplace(np.ascontiguousarray(array))  # same address: a captured graph stays valid

    def _check_address(self, name: str, address: int) -> None:
        """Fixed mode: every call must bind `name` at the address of the first (a captured CUDA graph reads it)."""
        first = self.addresses.setdefault(name, address)
        if address != first:
            raise EngineError(
                f"input {name!r} moved to another device address, which a captured CUDA graph would not see "
                "(fixed_shapes / cuda_graph bind every input at one address): pass host arrays or the values "
                "of the engine's device_resident(), which are copied into the fixed buffers, or the same OrtValue "
                "every call")

    def _bind_outputs(self, shapes: dict) -> None:
        out_shapes = self._output_shapes(shapes)
        for name, dtype in self.output_dtypes.items():
            if out_shapes is None or name not in out_shapes:
                self.binding.bind_output(name, self.device, self.device_id)
                continue
            held = self.outputs.get(name)
            if held is None or tuple(held.shape()) != tuple(out_shapes[name]):
                held = self.outputs[name] = self._ort.OrtValue.ortvalue_from_shape_and_type(
                    list(out_shapes[name]), dtype, self.device, self.device_id)
            self.binding.bind_ortvalue_output(name, held)

    def run(self, feed: Mapping) -> dict:
        """Bind and run; return the output OrtValues (owned by this runner: the next call reuses them)."""
        shapes = {n: tuple(v.shape()) if isinstance(v, self._ort.OrtValue) else tuple(np.shape(v))
                  for n, v in feed.items()}
        if self.fixed and self.fixed_shapes is None:
            self.fixed_shapes = shapes
        if not self.fixed or not self.outputs:
            self._bind_outputs(shapes)
        self._bind_inputs(feed, shapes)
        if self.device != "cpu":
            self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        if self.device != "cpu":
            self.binding.synchronize_outputs()
        return dict(zip(self.output_dtypes, self.binding.get_outputs()))

    @staticmethod
    def to_host(value) -> np.ndarray:
        """A host array the caller owns (a copy even on the CPU, where numpy() shares the buffer)."""
        return np.array(value.numpy(), copy=True)
