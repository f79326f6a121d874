"""Packed Q/K/V projections for MultiHeadAttention (the gpu optimize profile).

After sdrt.export.attention, each attention is MultiHeadAttention(query, key, value) over three
projections, each MatMul(x, W) with W an initializer [C, N*H] (plus Add(bias) in the VAE). The CUDA
kernels take the projections packed, which turns three GEMMs into one and feeds the fused
attention kernels the layout they read:

- self-attention (query, key and value projected from the same x):
  MatMul(x, W_qkv) -> Reshape [0, 0, N, 3, H] -> MultiHeadAttention(query=packed, key="", value="")
- cross-attention (key and value from the same context, e.g. the text embeddings):
  MatMul(ctx, W_kv) -> Reshape [0, 0, N, 2, H] -> MultiHeadAttention(query, key=packed, value="")

W_qkv interleaves the columns head by head: W_qkv.reshape(C, N, 3, H)[:, n, i] = W_i.reshape(C, N, H)[:, n]
(the layout onnxruntime's own FusionAttentionUnet writes); biases likewise. onnxruntime has no CPU
kernel for either packed form ("not implemented for CPU"), so the cpu profile never packs, and
`unpack_attention` rewrites packed nodes back into separate Q, K, V (Gather of each slot + Reshape)
so that a packed graph can be checked on the CPU provider (sdrt.export.lowering).

A projection is packed only when it is provably one: a MatMul with a 2-D weight initializer (and an
optional 1-D bias initializer in an Add), whose output feeds nothing but the attention; the
projections to pack read the same tensor and have weights of one shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdrt.engines.weights import PACKED, _module_of
from sdrt.export.attention import MS_DOMAIN, _attr, _Graph, remove_dead_nodes


@dataclass(frozen=True)
class Projection:
    """x = MatMul(source, weight) [+ bias], consumed only by one attention."""

    source: str
    weight: np.ndarray  # [C, N*H]
    bias: np.ndarray | None  # [N*H]
    module: str | None = None  # the torch module it came from (for LoRAs on the packed weight)


def _used_once(g: _Graph, name: str) -> bool:
    return name not in g.outputs and len(g.consumers.get(name, [])) == 1


def _projection(g: _Graph, name: str) -> Projection | None:
    node = g.producer.get(name)
    if node is None or not _used_once(g, name):
        return None
    bias = None
    if node.op_type == "Add":
        for data, constant in ((0, 1), (1, 0)):
            if node.input[constant] in g.initializers and node.input[data] in g.producer:
                value = numpy_helper.to_array(g.initializers[node.input[constant]])
                if value.ndim == 1 and _used_once(g, node.input[data]):
                    bias, node = value, g.producer[node.input[data]]
                    break
        else:
            return None
    if node.op_type != "MatMul" or node.input[1] not in g.initializers:
        return None
    weight = numpy_helper.to_array(g.initializers[node.input[1]])
    if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[1],)):
        return None
    return Projection(node.input[0], weight, bias, _module_of(node, node.input[1]))


def _pack(projections: list[Projection], heads: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The interleaved weight [C, N*k*H] (and bias) of k projections, or None when they cannot be packed."""
    first = projections[0]
    if any(p.source != first.source or p.weight.shape != first.weight.shape or p.weight.dtype != first.weight.dtype
           or (p.bias is None) != (first.bias is None) for p in projections):
        return None
    channels, width = first.weight.shape
    if width % heads:
        return None
    size = width // heads
    weight = np.stack([p.weight.reshape(channels, heads, size) for p in projections], axis=2)
    bias = None if first.bias is None else np.stack([p.bias.reshape(heads, size) for p in projections], axis=1)
    return weight.reshape(channels, -1), None if bias is None else bias.reshape(-1).astype(first.bias.dtype)


def _packed_nodes(name: str, source: str, weight: np.ndarray, bias: np.ndarray | None, heads: int, slots: int,
                  graph: onnx.GraphProto, modules: list) -> tuple[list[onnx.NodeProto], str]:
    """MatMul(source, weight) [+ bias] -> Reshape [0, 0, N, slots, H]: the nodes and the packed tensor's name. The
    MatMul records the modules slot by slot (engines.weights.PACKED), so that a LoRA finds their weights."""
    graph.initializer.append(numpy_helper.from_array(weight, f"{name}_weight"))
    graph.initializer.append(numpy_helper.from_array(
        np.array([0, 0, heads, slots, weight.shape[1] // (heads * slots)], np.int64), f"{name}_shape"))
    nodes = [helper.make_node("MatMul", [source, f"{name}_weight"], [f"{name}_matmul"], name=f"{name}_MatMul")]
    if all(modules):
        entry = nodes[0].metadata_props.add()
        entry.key, entry.value = PACKED, json.dumps({"modules": modules, "heads": heads})
    projected = f"{name}_matmul"
    if bias is not None:
        graph.initializer.append(numpy_helper.from_array(bias, f"{name}_bias"))
        nodes.append(helper.make_node("Add", [projected, f"{name}_bias"], [f"{name}_biased"], name=f"{name}_Add"))
        projected = f"{name}_biased"
    nodes.append(helper.make_node("Reshape", [projected, f"{name}_shape"], [f"{name}_packed"], name=f"{name}_Reshape"))
    return nodes, f"{name}_packed"


def _rebuild(graph: onnx.GraphProto, inserts: dict[int, list[onnx.NodeProto]]) -> None:
    """Put each list of new nodes right before the node at its index (the node list stays topologically sorted)."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(inserts.get(i, []))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    del graph.node[:]
    graph.node.extend(nodes)


def pack_attention(model: onnx.ModelProto, log=None) -> dict[str, int]:
    """Pack the projections of every MultiHeadAttention(query, key, value) of the main graph that allows it
    (see the module docstring), in place. Returns {"qkv": self-attentions packed, "kv": cross-attentions}."""
    graph = model.graph
    g = _Graph(graph)
    counts, inserts = {"qkv": 0, "kv": 0}, {}
    for i, node in enumerate(graph.node):
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.input) != 3 \
                or not all(node.input):
            continue
        heads = int(_attr(node, "num_heads", 0))
        q, k, v = (_projection(g, name) for name in node.input)
        qkv = _pack([q, k, v], heads) if heads and all(p is not None for p in (q, k, v)) else None
        kv = _pack([k, v], heads) if heads and qkv is None and k is not None and v is not None else None
        if qkv is not None:
            new, packed = _packed_nodes(f"sdrt_qkv_{i}", q.source, *qkv, heads, 3, graph, [q.module, k.module, v.module])
            node.input[:] = [packed, "", ""]
            counts["qkv"] += 1
        elif kv is not None:
            new, packed = _packed_nodes(f"sdrt_kv_{i}", k.source, *kv, heads, 2, graph, [k.module, v.module])
            node.input[:] = [node.input[0], packed, ""]
            counts["kv"] += 1
        else:
            continue
        inserts[i] = new
    if inserts:
        _rebuild(graph, inserts)
        remove_dead_nodes(graph)
    if log is not None and inserts:
        log(f"packed {counts['qkv']} self-attention QKV and {counts['kv']} cross-attention KV projections")
    return counts


def unpack_attention(model: onnx.ModelProto) -> int:
    """Rewrite every packed MultiHeadAttention (query [B, S, N, 3, H] with no key/value, or key [B, S, N, 2, H]
    with no value) into one with separate query, key and value [B, S, N*H], in place, so that onnxruntime's
    CPU provider can run it; returns how many were rewritten."""
    graph = model.graph
    inserts, count = {}, 0
    for i, node in enumerate(graph.node):
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
            continue
        inputs = list(node.input) + [""] * (3 - len(node.input))
        if inputs[0] and not inputs[1] and not inputs[2]:
            packed, slots, first = inputs[0], 3, 0
        elif inputs[1] and not inputs[2]:
            packed, slots, first = inputs[1], 2, 1
        else:
            continue
        name, new = f"sdrt_unpack_{i}", []
        flat = f"{name}_flat"
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat))
        for slot in range(slots):
            graph.initializer.append(numpy_helper.from_array(np.array(slot, np.int64), f"{name}_slot{slot}"))
            new.append(helper.make_node("Gather", [packed, f"{name}_slot{slot}"], [f"{name}_{slot}_heads"], axis=3,
                                        name=f"{name}_Gather{slot}"))
            new.append(helper.make_node("Reshape", [f"{name}_{slot}_heads", flat], [f"{name}_{slot}"],
                                        name=f"{name}_Reshape{slot}"))
            inputs[first + slot] = f"{name}_{slot}"
        node.input[:] = inputs[:3] + list(node.input[3:])
        inserts[i] = new
        count += 1
    if inserts:
        _rebuild(graph, inserts)
    return count
