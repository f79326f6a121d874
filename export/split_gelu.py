"""Fuse the U-Net's GEGLU feed-forward into onnxruntime's BiasSplitGelu (com.microsoft, CUDA only; gpu profile).

diffusers' GEGLU (`hidden, gate = proj(x).chunk(2, -1); hidden * gelu(gate)`) exports (dynamo, opset 18) as

    y = Add(MatMul(x, W), b)                      [B, S, D]
    left, right = Split(y, axis=-1, num_outputs=2)
    out = Mul(left, Mul(right, Mul(0.5, Add(Erf(Div(right, sqrt 2)), 1))))

which onnxruntime's FusionBiasSplitGelu (written for the older exporter's Slice pattern) does not match.
`fuse_bias_split_gelu` rewrites it into BiasSplitGelu(MatMul(x, W), b): one kernel instead of eight
elementwise ones over the feed-forward's widest activation. The CUDA kernel only exists for
D in {2560, 5120, 10240} (half-widths 1280, 2560, 5120: SD 1.5/2.x's 320/640/1280-channel blocks and SDXL's
640/1280), so other widths are left unfused. Every match is checked as in sdrt.export.attention: the op
types, the constants (0.5, 1, sqrt 2 within 1e-6), the Split of the last axis into two equal halves, and
that each intermediate tensor feeds nothing but the next node of the pattern.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from sdrt.export.attention import MS_DOMAIN, _attr, _Graph, remove_dead_nodes

SUPPORTED_WIDTHS = (2560, 5120, 10240)  # onnxruntime's CUDA BiasSplitGelu (contrib_ops/cuda/diffusion)


def _constant_is(g: _Graph, name: str, value: float) -> bool:
    constant = g.constant(name, max_size=1)
    return constant is not None and constant.size == 1 and abs(float(constant.ravel()[0]) - value) <= 1e-6


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a two-input node one of whose inputs is `name`."""
    if len(node.input) == 2 and name in node.input:
        return node.input[1] if node.input[0] == name else node.input[0]
    return None


def _is_gelu_of(g: _Graph, gelu: str, right: str) -> bool:
    """gelu = Mul(right, Mul(0.5, Add(Erf(Div(right, sqrt 2)), 1))), any operand order; inner tensors used once."""
    outer = g.node(gelu, "Mul")
    inner = _other(outer, right) if outer is not None else None
    half_mul = g.node(inner, "Mul") if inner is not None else None
    if half_mul is None or not g.only_consumer_is(half_mul.output[0], outer):
        return False
    add = next((g.node(i, "Add") for i in half_mul.input if _constant_is(g, _other(half_mul, i) or "", 0.5)), None)
    if add is None or not g.only_consumer_is(add.output[0], half_mul):
        return False
    erf = next((g.node(i, "Erf") for i in add.input if _constant_is(g, _other(add, i) or "", 1.0)), None)
    if erf is None or not g.only_consumer_is(erf.output[0], add):
        return False
    div = g.node(erf.input[0], "Div")
    return (div is not None and g.only_consumer_is(div.output[0], erf) and div.input[0] == right
            and _constant_is(g, div.input[1], math.sqrt(2)))


def match_geglu(g: _Graph, split: onnx.NodeProto) -> tuple[str, str, onnx.NodeProto] | None:
    """(MatMul output, bias, the final Mul) of a GEGLU around `split`, or None."""
    shape = g.shape(split.input[0])
    if shape is None or len(split.output) != 2 or not isinstance(shape[-1], int) or shape[-1] not in SUPPORTED_WIDTHS:
        return None
    if _attr(split, "axis", 0) not in (-1, len(shape) - 1):
        return None
    if len(split.input) > 1 and split.input[1]:
        sizes = g.constant(split.input[1])
        if sizes is None or sizes.tolist() != [shape[-1] // 2] * 2:
            return None
    elif _attr(split, "num_outputs", 2) != 2:
        return None
    add = g.node(split.input[0], "Add")
    if add is None or not g.only_consumer_is(add.output[0], split):
        return None
    for data, bias in ((0, 1), (1, 0)):
        matmul, bias_name = g.node(add.input[data], "MatMul"), add.input[bias]
        if matmul is not None and bias_name in g.initializers and list(g.initializers[bias_name].dims) == [shape[-1]]:
            break
    else:
        return None
    if not g.only_consumer_is(matmul.output[0], add):
        return None
    left, right = split.output
    users = g.consumers.get(left, [])
    if left in g.outputs or len(users) != 1 or users[0].op_type != "Mul":
        return None
    final = users[0]
    gelu = _other(final, left)
    if gelu is None or not g.only_consumer_is(gelu, final) or right in g.outputs:
        return None
    if len(g.consumers.get(right, [])) != 2 or not _is_gelu_of(g, gelu, right):
        return None  # right feeds exactly the Div and the outer Mul of its gelu
    return matmul.output[0], bias_name, final


def fuse_bias_split_gelu(model: onnx.ModelProto, log=None) -> int:
    """Replace every GEGLU of supported width in the main graph by BiasSplitGelu, in place; return how many."""
    graph = model.graph
    g = _Graph(graph)
    matches = [m for m in (match_geglu(g, n) for n in graph.node if n.op_type == "Split") if m is not None]
    for i, (projected, bias, final) in enumerate(matches):
        final.CopyFrom(helper.make_node("BiasSplitGelu", [projected, bias], list(final.output),
                                        name=f"sdrt_bias_split_gelu_{i}", domain=MS_DOMAIN))
    if matches:
        remove_dead_nodes(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if log is not None and matches:
        log(f"fused {len(matches)} GEGLU feed-forward(s) into {MS_DOMAIN} BiasSplitGelu")
    return len(matches)

