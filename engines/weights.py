"""Which ONNX initializer holds each torch module's weight, and the initializers' values, read from the file.

Adapters (LoRA, textual inversion) change module weights by their torch names (`down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q`); an exported graph keeps them as initializers under other names and
layouts. torch's dynamo exporter folds `linear`'s transpose into a new initializer (`val_219`, [in, out], read
by a MatMul) and keeps convolution and embedding weights under their parameter names; the older TorchScript
exporter (optimum's folders) names nodes after the module path (`/down_blocks.1/.../to_q/MatMul`). So the
map is read from the graph itself, for any folder and without the checkpoint:

- the module is the node's deepest module scope (dynamo's `pkg.torch.onnx.name_scopes` metadata), else the
  node name's path (TorchScript), else the initializer's own name minus `.weight`;
- the layout is the consuming node's: MatMul(x, W) holds W^T ("linear_t"), Gemm with transB holds W
  ("linear"), Conv holds W ("conv"), Gather(W, ids) an embedding table ("embedding").

Module paths are kept relative to the diffusers/transformers model: the exporter's wrapper attribute
(`unet.`, `text_encoder.`) and CLIP's `text_model.` are dropped. An initializer that several modules read
is recorded as shared, so that a change to one module is refused instead of silently changing the others.
Needs the `onnx` package (sdrt[lora]); the runtime imports this module only when an adapter is loaded.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.engines.errors import BackendNotInstalledError, EngineError

LAYOUTS = ("linear_t", "linear", "conv", "conv_nhwc", "packed_linear_t", "embedding")
PACKED = "sdrt.packed"  # metadata of a packed-projection MatMul (sdrt.export.packing): its modules, slot by slot
WRAPPER_PREFIXES = ("unet.", "text_encoder.", "text_model.", "transformer.", "controlnet.")


def import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise BackendNotInstalledError(
            "reading weights from an ONNX file (LoRA, textual inversion) needs the onnx package: "
            "pip install 'sdrt[lora]'"
        ) from e
    return onnx, numpy_helper


@dataclass(frozen=True)
class Target:
    """Where a module's weight lives: the initializer, its layout (LAYOUTS), shape and dtype. A packed projection
    (the gpu profile's Q/K/V in one MatMul, columns interleaved head by head: [C, heads, slots, H]) is one module's
    `slot` of `slots` in the initializer."""

    initializer: str
    layout: str
    shape: tuple[int, ...]
    dtype: np.dtype
    shared: bool = False  # other modules read the same initializer (not a packed projection's slots)
    slot: int = 0
    slots: int = 1
    heads: int = 1

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The weight's shape as the torch module holds it ([out, in] for a linear layer)."""
        if self.layout == "linear_t":
            return tuple(reversed(self.shape))
        if self.layout == "conv_nhwc":  # onnxruntime's NhwcConv: [out, kh, kw, in]
            return (self.shape[0], self.shape[3], self.shape[1], self.shape[2])
        if self.layout == "packed_linear_t":
            return (self.shape[1] // self.slots, self.shape[0])
        return self.shape

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "linear_t":
            return array.T
        if self.layout == "conv_nhwc":
            return array.transpose(0, 3, 1, 2)
        if self.layout == "packed_linear_t":
            c = array.shape[0]
            return array.reshape(c, self.heads, self.slots, -1)[:, :, self.slot, :].reshape(c, -1).T
        return array

    def from_torch(self, array: np.ndarray) -> np.ndarray:
        """A weight in torch's layout, in the initializer's layout and dtype (not for a packed slot)."""
        if self.layout == "packed_linear_t":
            raise ValueError("a packed projection's slot is part of an initializer: use add_delta")
        layout = {"linear_t": lambda a: a.T, "conv_nhwc": lambda a: a.transpose(0, 2, 3, 1)}.get(self.layout)
        return np.ascontiguousarray((array if layout is None else layout(array)).astype(self.dtype))

    def add_delta(self, out: np.ndarray, module, scale: float) -> None:
        """out (this initializer's value, float32) += the module's scaled change, in the initializer's layout."""
        if self.layout == "packed_linear_t":
            c = out.shape[0]
            d = module.delta(self.torch_shape, scale, transposed=True)  # [C, heads * H]
            out.reshape(c, self.heads, self.slots, -1)[:, :, self.slot, :] += d.reshape(c, self.heads, -1)
        elif self.layout == "conv_nhwc":
            out += module.delta(self.torch_shape, scale).transpose(0, 2, 3, 1)
        else:
            out += module.delta(self.torch_shape, scale, transposed=self.layout == "linear_t")


def canonical_module(path: str) -> str:
    """A module path relative to the model: wrapper attributes and CLIP's `text_model.` dropped."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix):], True
    return path


def _metadata(node, key: str) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == key), None)


def _module_of(node, weight: str) -> str | None:
    scopes = _metadata(node, "pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        if len(names) >= 2 and names[-2]:
            return canonical_module(names[-2])
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return canonical_module(".".join(part for part in node.name.strip("/").split("/")[:-1]))
    if weight.endswith(".weight"):
        return canonical_module(weight[: -len(".weight")])
    if node.op_type == "NhwcConv" and len(node.input) > 2 and node.input[2].endswith(".bias"):
        return canonical_module(node.input[2][: -len(".bias")])  # onnxruntime renamed the weight, not the bias
    return None


def _weight_input(node, initializers: dict) -> tuple[str, str] | None:
    """(initializer, layout) of a node that reads a weight, else None."""
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers:
        return node.input[1], "linear_t"
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in initializers:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return node.input[1], "linear" if trans_b else "linear_t"
    if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in initializers:
        return node.input[1], "conv"
    if node.op_type == "NhwcConv" and len(node.input) >= 2 and node.input[1] in initializers:
        return node.input[1], "conv_nhwc"
    if node.op_type == "Gather" and node.input and node.input[0] in initializers:
        return node.input[0], "embedding"
    return None


_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 16: None}  # 16: bfloat16, not handled


def _packed_targets(recorded: str, tensor) -> dict[str, Target]:
    """module -> its slot of a packed projection, from the MatMul's PACKED metadata ({"modules": [...], "heads"})."""
    try:
        info = json.loads(recorded)
        modules, heads = [str(m) for m in info["modules"]], int(info["heads"])
    except (ValueError, KeyError, TypeError):
        return {}
    dtype = _DTYPES.get(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    if dtype is None or len(shape) != 2 or heads < 1 or shape[1] % (heads * len(modules)):
        return {}
    return {canonical_module(m): Target(tensor.name, "packed_linear_t", shape, np.dtype(dtype), slot=i,
                                        slots=len(modules), heads=heads)
            for i, m in enumerate(modules) if m}


class WeightFile:
    """The weights of one ONNX file: `targets` (module path -> Target) and `read(names)` (initializer values).

    Only the map is kept in memory: values are read when asked, from the external-data file (a seek and a read
    per tensor) or, for weights stored inside the .onnx file, by parsing it again."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        model = self._load()
        tensors = {t.name: t for t in model.graph.initializer}
        readers: dict[str, set[str]] = {}
        found: dict[str, tuple[str, str]] = {}
        packed: dict[str, Target] = {}
        for node in model.graph.node:
            hit = _weight_input(node, tensors)
            if hit is None:
                continue
            recorded = _metadata(node, PACKED) if hit[1] == "linear_t" else None
            if recorded is not None:  # one MatMul for several modules (sdrt.export.packing)
                packed.update(_packed_targets(recorded, tensors[hit[0]]))
                continue
            module = _module_of(node, hit[0])
            if module is None:
                continue
            readers.setdefault(hit[0], set()).add(module)
            found.setdefault(module, hit)
        self.targets: dict[str, Target] = {}
        for module, (name, layout) in found.items():
            tensor = tensors[name]
            dtype = _DTYPES.get(tensor.data_type)
            if dtype is None:
                continue  # integer (quantized) or bfloat16 weights: not adaptable here
            self.targets[module] = Target(name, layout, tuple(int(d) for d in tensor.dims), np.dtype(dtype),
                                          shared=len(readers[name]) > 1)
        self.targets.update(packed)
        self.quantized = any(n.op_type in ("DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
                                           "ConvInteger", "DynamicQuantizeLinear") for n in model.graph.node)

    def _load(self):
        onnx, _ = import_onnx()
        try:
            return onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # a truncated or foreign file
            raise EngineError(f"could not read the ONNX graph {self.path}: {e}") from e

    def read_each(self, names):
        """(name, value) of each initializer in `names`, one at a time (the caller may keep or drop each)."""
        _, numpy_helper = import_onnx()
        names = set(names)
        seen = set()
        for tensor in self._load().graph.initializer:
            if tensor.name in names:
                seen.add(tensor.name)
                yield tensor.name, self._read_external(tensor) if tensor.data_location == 1 \
                    else numpy_helper.to_array(tensor).copy()
        missing = sorted(names - seen)
        if missing:
            raise EngineError(f"{self.path} has no initializers {missing[:5]}")

    def read(self, names) -> dict[str, np.ndarray]:
        """The stored values of these initializers (external data read from its file, checked to lie in the
        model's folder)."""
        _, numpy_helper = import_onnx()
        names = set(names)
        out = {}
        for tensor in self._load().graph.initializer:
            if tensor.name in names:
                out[tensor.name] = self._read_external(tensor) if tensor.data_location == 1 \
                    else numpy_helper.to_array(tensor)
        missing = sorted(names - set(out))
        if missing:
            raise EngineError(f"{self.path} has no initializers {missing[:5]}")
        return out

    def _read_external(self, tensor) -> np.ndarray:
        info = {e.key: e.value for e in tensor.external_data}
        folder = self.path.parent.resolve()
        location = (folder / info.get("location", "")).resolve()
        if folder not in location.parents:
            raise EngineError(f"{self.path}: initializer {tensor.name} points outside the model's folder "
                              f"({info.get('location')!r}); refusing to read it")
        dtype = np.dtype(_DTYPES.get(tensor.data_type) or np.float32)
        shape = tuple(int(d) for d in tensor.dims)
        offset = int(info.get("offset", 0))
        count = int(np.prod(shape, dtype=np.int64))
        with open(location, "rb") as f:
            f.seek(offset)
            data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise EngineError(f"{location} is shorter than initializer {tensor.name} needs (truncated file?)")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


_CACHE: dict[tuple, WeightFile] = {}


def weight_file(path: str | os.PathLike) -> WeightFile:
    """The WeightFile of `path`, read once per (path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = WeightFile(path)
    return _CACHE[key]
