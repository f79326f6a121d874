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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.engines.errors import BackendNotInstalledError, EngineError

LAYOUTS = ("linear_t", "linear", "conv", "embedding")
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
    """Where a module's weight lives: the initializer, its layout (LAYOUTS), shape and dtype."""

    initializer: str
    layout: str
    shape: tuple[int, ...]
    dtype: np.dtype
    shared: bool = False  # other modules read the same initializer

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The weight's shape as the torch module holds it ([out, in] for a linear layer)."""
        return tuple(reversed(self.shape)) if self.layout == "linear_t" else self.shape

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.layout == "linear_t" else array

    def from_torch(self, array: np.ndarray) -> np.ndarray:
        """A weight in torch's layout, in the initializer's layout and dtype."""
        return np.ascontiguousarray((array.T if self.layout == "linear_t" else array).astype(self.dtype))


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
    if node.op_type == "Gather" and node.input and node.input[0] in initializers:
        return node.input[0], "embedding"
    return None


_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 16: None}  # 16: bfloat16, not handled


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
        for node in model.graph.node:
            hit = _weight_input(node, tensors)
            if hit is None:
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
