"""Lower a gpu-profile graph so that onnxruntime's CPU provider can run it.

`sdrt optimize --optimize gpu` writes com.microsoft ops that only the CUDA provider has kernels for
(GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd, packed MultiHeadAttention).
`lower_for_cpu` rewrites each into standard ONNX ops with the op's documented semantics (the
contrib op schema and the onnxruntime fusion that writes it), computed in fp32 with the result cast
back to the tensor's own dtype, and unpacks packed attention (sdrt.export.packing). The lowered
graph runs on CPUExecutionProvider and can be compared with the unfused export.

What a match proves: the fusions matched the right subgraphs and wired the fused ops' inputs,
weights (NhwcConv's NHWC layout), attributes and outputs as the documented semantics require, and
the fp16 conversion around them keeps the accuracy. What it does not prove: that the CUDA kernels
compute those semantics (or their speed); only a run on the CUDA provider tests them.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdrt.export.attention import MS_DOMAIN, _attr
from sdrt.export.packing import unpack_attention


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


class _Builder:
    """The nodes replacing one fused node: fresh names under `prefix`, constants as initializers."""

    def __init__(self, graph: onnx.GraphProto, prefix: str):
        self.graph, self.prefix, self.nodes = graph, prefix, []
        self.initializers = {t.name: t for t in graph.initializer}

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs):
        """Append a node; its output name, or the list of names when it has several."""
        name = f"{self.prefix}_{len(self.nodes)}_{op_type}"
        names = [f"{name}_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value: np.ndarray) -> str:
        name = f"{self.prefix}_const{len(self.graph.initializer)}"
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def f32(self, name: str) -> str:
        return self.op("Cast", name, to=TensorProto.FLOAT)

    def cast_like(self, value: str, like: str, output: str) -> None:
        """Write `value` to the fused node's `output` with the dtype of its input `like`."""
        self.op("CastLike", value, like, outputs=[output])


def _group_norm(b: _Builder, node: onnx.NodeProto) -> None:
    """GroupNorm(X, gamma, beta) and SkipGroupNorm(X, gamma, beta, skip[, bias]) -> Y[, S]:
    S = X + skip (+ bias); Y = gamma * (S - mean) / sqrt(var + epsilon) + beta over each group of
    channels (var biased), then Y * sigmoid(Y) when activation = 1. X is NHWC when channels_last = 1
    (the default), else NCHW; skip is X's shape, [N, 1, 1, C] or [N, C]; gamma, beta and bias are [C].
    Computed on an [N, C, L] view (L = H*W), which broadcasts every allowed skip shape."""
    x, gamma, beta = (b.f32(name) for name in node.input[:3])
    channels_last = _attr(node, "channels_last", 1)
    groups, epsilon = _attr(node, "groups"), _attr(node, "epsilon", 1e-5)

    def ncl(t: str) -> str:
        if not channels_last:
            return b.op("Reshape", t, b.const(_i64(0, 0, -1)))
        shape = b.op("Concat", b.const(_i64(0, -1)), b.op("Shape", gamma), axis=0)
        return b.op("Transpose", b.op("Reshape", t, shape), perm=[0, 2, 1])

    def per_channel(t: str) -> str:
        return b.op("Reshape", t, b.const(_i64(-1, 1)))

    def write(t: str, output: str) -> None:
        t = b.op("Transpose", t, perm=[0, 2, 1]) if channels_last else t
        b.cast_like(b.op("Reshape", t, b.op("Shape", node.input[0])), node.input[0], output)

    s = ncl(x)
    if node.op_type == "SkipGroupNorm":
        s = b.op("Add", s, ncl(b.f32(node.input[3])))
        if len(node.input) > 4 and node.input[4]:
            s = b.op("Add", s, per_channel(b.f32(node.input[4])))
        if len(node.output) > 1 and node.output[1]:
            write(s, node.output[1])
    grouped = b.op("Reshape", s, b.const(_i64(0, groups, -1)))
    normalized = b.op("InstanceNormalization", grouped, b.const(np.ones(groups, np.float32)),
                      b.const(np.zeros(groups, np.float32)), epsilon=epsilon)
    y = b.op("Add", b.op("Mul", b.op("Reshape", normalized, b.op("Shape", s)), per_channel(gamma)), per_channel(beta))
    if _attr(node, "activation", 0):
        y = b.op("Mul", y, b.op("Sigmoid", y))
    write(y, node.output[0])


def _nhwc_conv(b: _Builder, node: onnx.NodeProto) -> None:
    """NhwcConv(X, W[, B]): Conv with its attributes on channels-last X and Y, W as [M, kH, kW, C/group]
    (onnxruntime's FusionNhwcConv writes the Conv weight transposed by (0, 2, 3, 1))."""
    x, weight = node.input[:2]
    initializer = b.initializers.get(weight)
    rank = len(initializer.dims) if initializer is not None else 4
    to_first, to_last = [0, rank - 1, *range(1, rank - 1)], [0, *range(2, rank), 1]
    if initializer is not None:
        weight = b.const(numpy_helper.to_array(initializer).transpose(to_first))
    else:
        weight = b.op("Transpose", weight, perm=to_first)
    inputs = [b.op("Transpose", b.f32(x), perm=to_first), b.f32(weight), *(b.f32(n) for n in node.input[2:] if n)]
    y = b.op("Conv", *inputs)
    b.nodes[-1].attribute.extend(node.attribute)
    b.cast_like(b.op("Transpose", y, perm=to_last), x, node.output[0])


def _bias_split_gelu(b: _Builder, node: onnx.NodeProto) -> None:
    """BiasSplitGelu(X [N, S, D], bias [D]) -> [N, S, D/2]: left * Gelu(right), with left and right the
    halves of X + bias along D (Gelu with erf)."""
    left, right = b.op("Split", b.op("Add", b.f32(node.input[0]), b.f32(node.input[1])), axis=-1,
                       num_outputs=2, outputs=2)
    erf = b.op("Erf", b.op("Mul", right, b.const(np.array(1 / np.sqrt(2), np.float32))))
    gelu = b.op("Mul", b.op("Mul", right, b.const(np.array(0.5, np.float32))),
                b.op("Add", erf, b.const(np.array(1, np.float32))))
    b.cast_like(b.op("Mul", left, gelu), node.input[0], node.output[0])


def _bias_add(b: _Builder, node: onnx.NodeProto) -> None:
    """BiasAdd(X [N, S, C], bias [C], skip [N, S, C]) = X + bias + skip."""
    x, bias, skip = (b.f32(name) for name in node.input[:3])
    b.cast_like(b.op("Add", b.op("Add", x, bias), skip), node.input[0], node.output[0])


LOWERINGS = {"GroupNorm": _group_norm, "SkipGroupNorm": _group_norm, "NhwcConv": _nhwc_conv,
             "BiasSplitGelu": _bias_split_gelu, "BiasAdd": _bias_add}
MIN_OPSET = 18  # Split's num_outputs


@functools.cache
def cpu_contrib_ops() -> frozenset[str]:
    """The com.microsoft op types the installed onnxruntime has CPU kernels for."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    return frozenset(k.op_name for k in ort_c.get_all_opkernel_def()
                     if k.domain == MS_DOMAIN and k.provider == "CPUExecutionProvider")


def lower_for_cpu(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite, in place, every com.microsoft node of the main graph that has no CPU kernel into standard
    ONNX ops, and unpack packed attention; returns how many nodes of each op type were rewritten
    ("MultiHeadAttention": packed ones unpacked). Raises ValueError, before changing anything, for a
    GPU-only op with no lowering here."""
    graph = model.graph
    gpu_only = {n.op_type for n in graph.node if n.domain == MS_DOMAIN and n.op_type not in cpu_contrib_ops()}
    if unknown := gpu_only - LOWERINGS.keys():
        raise ValueError(f"no CPU lowering for the GPU-only op(s) {sorted(unknown)}; "
                         f"sdrt.export.lowering knows {sorted(LOWERINGS)}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if gpu_only and opset < MIN_OPSET:
        raise ValueError(f"the graph's default opset is {opset}; lowering its GPU-only ops needs {MIN_OPSET} or later")
    counts: dict[str, int] = {}
    if unpacked := unpack_attention(model):
        counts["MultiHeadAttention"] = unpacked
    nodes, replaced_inputs = [], set()
    for i, node in enumerate(graph.node):
        if node.domain == MS_DOMAIN and node.op_type in gpu_only:
            builder = _Builder(graph, f"sdrt_lower_{i}")
            LOWERINGS[node.op_type](builder, node)
            nodes.extend(builder.nodes)
            replaced_inputs.update(node.input)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        else:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            nodes.append(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name in replaced_inputs and t.name not in used]
    for t in unused:  # the NHWC weights NhwcConv read
        graph.initializer.remove(t)
    return counts
