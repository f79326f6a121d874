"""Fuse the exported scaled-dot-product attention into onnxruntime's MultiHeadAttention (com.microsoft).

torch.onnx.export(dynamo=True, opset 18) decomposes F.scaled_dot_product_attention into

    Q   = Transpose[0,2,1,3](Reshape(q_proj))                                   [B, H, S, D]
    K^T = Reshape(Transpose[0,2,1](Reshape(Transpose[0,2,1,3](Reshape(k_proj)))))  [B, H, D, S_kv]
    P   = Softmax(MatMul(Mul(Q, c), Mul(K^T, c)), axis=-1)                      c = sqrt(scale)
    out = Reshape(Transpose[0,2,1,3](MatMul(P, V)))                             [B, S, H*D]

(V like Q), which onnxruntime's FusionAttentionUnet does not match: attention stays unfused and every
call materializes the B x H x S x S_kv scores (at 512 px SD 1.5, 2 x 8 x 4096 x 4096 floats = 1 GiB per
self-attention, several times over for the Mul and Softmax outputs). `fuse_attention` rewrites each
such core into one MultiHeadAttention(query=q_proj, key=k_proj, value=v_proj; num_heads=H,
scale=c*c). Its CPU kernel (contrib_ops/cpu/bert/multihead_attention.cc) runs MLAS's tiled
flash attention, which never holds the score matrix, whenever there is no key padding mask, attention
bias, past/present key-value or causal flag (our case), the L2 cache size is known (blocks of
Bc = L2 / (16 * (D + Dv)) keys, Br = min(Bc, D + Dv) queries) and ORT_DISABLE_FLASH_ATTENTION is
unset; measured on onnxruntime 1.32 for fp32 and fp16 alike (one 2 x 8 x 4096 x 4096 attention, D = 40:
peak RSS 167 MiB fused against 4.4 GiB unfused, and 2.3 GiB with the flash path disabled). Its CUDA
kernels are flash / memory-efficient attention. bench/attention.py measures the SD 1.5 UNet.

A match is proven, not assumed; a Softmax whose surroundings differ in anything is left alone:
- op types and Transpose perms as above, Softmax over the last axis, both Mul constants scalar and equal;
- each of the core's intermediate tensors (scores, P, the scaled Q and K^T, MatMul(P, V) and its
  transpose) has exactly one consumer, the next node of the core, so nothing else needs them;
- shapes, from the value_info the exporter writes: the projections are [b, s, H*D] with one batch b,
  their "split heads" Reshapes give [b, ?, H, D] with constant H and D (so ? = s: a Reshape keeps the
  element count), and the output Reshape gives [b, ?, H*Dv]. Sequence lengths are not compared: the
  exporter writes equal lengths as different expressions (up blocks' "(2*((h-1)//8)+2)*..." against
  "4*(((h-1)//8)+1)*...");
- the K^T chain of Reshapes and Transposes is replayed on symbolic axes (its Reshape shapes are
  computed from Shape/Slice/Concat, which we evaluate) and must amount to swapping K's last two axes.
Dead nodes (the old core, the Shape arithmetic feeding it), initializers and value_info are then removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
SPLIT_HEADS_PERM = [0, 2, 1, 3]
MAX_KEY_CHAIN = 8  # Reshape/Transpose nodes between K (heads split) and K^T; the exporter uses 3


@dataclass(frozen=True)
class AttentionMatch:
    """One attention core found from its Softmax: MultiHeadAttention's inputs, attributes and output."""

    query: str
    key: str
    value: str
    num_heads: int
    scale: float
    output_node: onnx.NodeProto  # the final Reshape [b, s, H, Dv] -> [b, s, H*Dv], replaced by the fused node


class _Graph:
    """Read-only lookups over a graph: producers, consumers, small constants, value_info shapes."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        self.shapes = {v.name: _dims(v) for v in [*graph.input, *graph.value_info, *graph.output]}

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer_is(self, name: str, node: onnx.NodeProto) -> bool:
        users = self.consumers.get(name, [])
        return name not in self.outputs and len(users) == 1 and users[0] is node

    def constant(self, name: str, max_size: int = 64) -> np.ndarray | None:
        """The value of a small initializer or Constant node output, else None."""
        if name in self.initializers:
            tensor = self.initializers[name]
            if int(np.prod(tensor.dims)) > max_size or tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(tensor)
        node = self.node(name, "Constant")
        if node is not None and node.attribute and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            return value if value.size <= max_size else None
        return None

    def shape(self, name: str) -> list | None:
        """Dims from value_info (int, symbol name, or None when unknown), or None without shape info."""
        return self.shapes.get(name)


def _dims(value: onnx.ValueInfoProto) -> list | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _known_equal(a, b) -> bool:
    """Two dims proven equal: both known and identical (the same int, or the same symbol)."""
    return a is not None and a == b


# -- the three inputs -----------------------------------------------------------------------------


def _split_heads(g: _Graph, name: str) -> tuple[str, int, int] | None:
    """`name` = Transpose[0,2,1,3](Reshape(proj)) with proj [b, s, H*D] -> [b, s, H, D]: (proj, H, D)."""
    transpose = g.node(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != SPLIT_HEADS_PERM:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None:
        return None
    proj, split = g.shape(reshape.input[0]), g.shape(reshape.output[0])
    if proj is None or split is None or len(proj) != 3 or len(split) != 4:
        return None
    heads, head_size = split[2], split[3]
    if not (isinstance(heads, int) and isinstance(head_size, int) and heads > 0 and head_size > 0):
        return None
    if not (_known_equal(proj[0], split[0]) and proj[2] == heads * head_size):
        return None  # same batch and H*D, so (same element count) the same sequence length
    return reshape.input[0], heads, head_size


def _scaled(g: _Graph, name: str) -> tuple[str, np.ndarray] | None:
    """`name` = Mul(x, c) with c a scalar constant (either side): (x, c)."""
    mul = g.node(name, "Mul")
    if mul is None:
        return None
    for data, factor in ((0, 1), (1, 0)):
        value = g.constant(mul.input[factor])
        if value is not None and value.size == 1 and np.issubdtype(value.dtype, np.floating):
            return mul.input[data], value.reshape(())
    return None


def _shape_tensor(g: _Graph, name: str, ranks: dict[str, int]) -> list | None:
    """Evaluate a 1-D int64 shape tensor built from constants, Shape, Slice and Concat. Entries are ints or
    ("dim", tensor, axis) symbols; `ranks` gives the rank of tensors whose Shape is taken. None if unknown."""
    value = g.constant(name)
    if value is not None:
        return [int(v) for v in np.ravel(value)] if value.dtype == np.int64 and value.ndim <= 1 else None
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Shape" and node.input[0] in ranks:
        dims = [("dim", node.input[0], axis) for axis in range(ranks[node.input[0]])]
        return dims[_attr(node, "start", 0):_attr(node, "end", len(dims))]
    if node.op_type == "Concat" and _attr(node, "axis") == 0:
        parts = [_shape_tensor(g, part, ranks) for part in node.input]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op_type == "Slice" and len(node.input) == 3:  # no axes/steps: axis 0, step 1
        data = _shape_tensor(g, node.input[0], ranks)
        start, end = (g.constant(i) for i in node.input[1:])
        if data is None or start is None or end is None or start.size != 1 or end.size != 1:
            return None
        return data[int(start.ravel()[0]):int(end.ravel()[0])]  # Python slicing clamps as ONNX does
    return None


def _regroup(groups: list[tuple], target: list, origin: str, origin_shape: list) -> list[tuple] | None:
    """A Reshape replayed on axis groups. `groups` lists, per current axis, the origin axes it spans, in
    row-major order; a Reshape can only regroup consecutive origin axes (one target dim of -1 spans what
    the others leave). Target dims are origin-axis symbols or ints equal to a known origin dim."""
    sequence = [axis for group in groups for axis in group]
    if target.count(-1) > 1 or len(target) > len(sequence):
        return None
    result, pos = [], 0
    for i, dim in enumerate(target):
        if dim == -1:
            width = len(sequence) - pos - (len(target) - i - 1)
            if width < 1:
                return None
            result.append(tuple(sequence[pos:pos + width]))
            pos += width
            continue
        if pos >= len(sequence):
            return None
        axis = sequence[pos]
        if dim != ("dim", origin, axis) and not (isinstance(dim, int) and dim > 0 and dim == origin_shape[axis]):
            return None
        result.append((axis,))
        pos += 1
    return result if pos == len(sequence) else None


def _transposed_key(g: _Graph, name: str) -> str | None:
    """`name` = K with its last two axes swapped, through Reshapes and Transposes: the name of K
    (a split-heads output), else None."""
    chain, current = [], name
    while _split_heads(g, current) is None:
        node = g.producer.get(current)
        if node is None or node.op_type not in ("Reshape", "Transpose") or len(chain) == MAX_KEY_CHAIN:
            return None
        chain.append(node)
        current = node.input[0]
    origin, origin_shape = current, g.shape(current) or [None] * 4
    groups = [(axis,) for axis in range(4)]
    for node in reversed(chain):
        if node.op_type == "Transpose":
            perm = list(_attr(node, "perm", range(len(groups) - 1, -1, -1)))
            if sorted(perm) != list(range(len(groups))):
                return None
            groups = [groups[p] for p in perm]
        else:
            target = _shape_tensor(g, node.input[1], {origin: 4})
            if target is None or (0 in target and _attr(node, "allowzero", 0) == 0):
                return None  # 0 = "copy the input dim": not produced by the exporter, not handled
            groups = _regroup(groups, target, origin, origin_shape)
            if groups is None:
                return None
    return origin if groups == [(0,), (1,), (3,), (2,)] else None


# -- the core -------------------------------------------------------------------------------------


def match_attention(g: _Graph, softmax: onnx.NodeProto) -> AttentionMatch | None:
    """The attention core around `softmax` (see the module docstring), or None when any condition fails."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = g.node(softmax.input[0], "MatMul")
    users = g.consumers.get(softmax.output[0], [])
    if scores is None or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None
    weighted = users[0]
    transpose = _single_user(g, weighted.output[0], "Transpose")
    output = _single_user(g, transpose.output[0], "Reshape") if transpose is not None else None
    if output is None or list(_attr(transpose, "perm", [])) != SPLIT_HEADS_PERM:
        return None
    scaled_q, scaled_k = _scaled(g, scores.input[0]), _scaled(g, scores.input[1])
    if scaled_q is None or scaled_k is None or scaled_q[1] != scaled_k[1]:
        return None
    inner = [(scores.output[0], softmax), (softmax.output[0], weighted), (scores.input[0], scores),
             (scores.input[1], scores)]
    if not all(g.only_consumer_is(tensor, node) for tensor, node in inner):
        return None
    key_heads = _transposed_key(g, scaled_k[0])
    q, k, v = _split_heads(g, scaled_q[0]), _split_heads(g, key_heads) if key_heads else None, \
        _split_heads(g, weighted.input[1])
    if q is None or k is None or v is None or q[1] != k[1] or q[1] != v[1] or q[2] != k[2]:
        return None
    batch = g.shape(q[0])[0]
    if not (_known_equal(batch, g.shape(k[0])[0]) and _known_equal(batch, g.shape(v[0])[0])):
        return None
    merged = g.shape(output.output[0])
    if merged is None or len(merged) != 3 or not _known_equal(merged[0], batch) or merged[2] != v[1] * v[2]:
        return None  # [b, s_q, H, Dv] -> [b, s_q, H*Dv]
    scale = float(scaled_q[1]) ** 2
    return AttentionMatch(query=q[0], key=k[0], value=v[0], num_heads=q[1], scale=scale, output_node=output)


def _single_user(g: _Graph, name: str, op_type: str) -> onnx.NodeProto | None:
    users = g.consumers.get(name, [])
    if name in g.outputs or len(users) != 1 or users[0].op_type != op_type:
        return None
    return users[0]


def fuse_attention(model: onnx.ModelProto, log=None) -> int:
    """Replace every matching attention core of the model's main graph by one MultiHeadAttention node,
    in place; return how many were fused. Adds the com.microsoft opset import when it fuses any."""
    graph = model.graph
    g = _Graph(graph)
    matches = [m for m in (match_attention(g, n) for n in graph.node if n.op_type == "Softmax") if m is not None]
    if not matches:
        return 0
    for i, match in enumerate(matches):
        fused = helper.make_node("MultiHeadAttention", [match.query, match.key, match.value],
                                 list(match.output_node.output), name=f"sdrt_attention_{i}", domain=MS_DOMAIN,
                                 num_heads=match.num_heads, scale=match.scale)
        match.output_node.CopyFrom(fused)  # same place in the node list: still topologically sorted
    remove_dead_nodes(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if log is not None:
        log(f"fused {len(matches)} attention(s) into {MS_DOMAIN} MultiHeadAttention")
    return len(matches)


# -- cleanup --------------------------------------------------------------------------------------


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read, which may come from the outer graph."""
    names = set()
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs is used, then unused initializers and stale value_info;
    return how many nodes were removed. The node list must be topologically sorted."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    removed = len(graph.node) - len(keep)
    if removed:
        kept = [onnx.NodeProto() for _ in keep]
        for copy, node in zip(kept, reversed(keep)):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(kept)
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]
    produced = {out for node in graph.node for out in node.output}
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name not in produced:
            del graph.value_info[i]
    return removed
