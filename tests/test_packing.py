"""sdrt.export.packing: the gpu profile's packed Q/K/V projections. Every self-attention of the tiny UNets
and VAEs gets one QKV GEMM, every cross-attention one KV GEMM, in the layout onnxruntime's CUDA kernels
read ([B, S, N, 3|2, H]); unpacked again (the CPU provider has no packed kernel) the graph gives the
fused graph's outputs; projections that are not provably packable are left alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_attention_fusion import assert_same_outputs, count, fused_copy, load

from sdrt.export.attention import MS_DOMAIN
from sdrt.export.packing import pack_attention, unpack_attention


def copy_of(model) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def packed_inputs(model) -> list[tuple[bool, bool, bool]]:
    return [tuple(bool(i) for i in n.input) for n in model.graph.node if n.op_type == "MultiHeadAttention"]


@pytest.mark.parametrize("flavour,name,qkv,kv", [("sd1", "unet", 4, 4), ("sd2", "unet", 4, 4),
                                                 ("sd1", "vae_decoder", 1, 0), ("sd1", "vae_encoder", 1, 0)])
def test_projections_are_packed_and_unpack_to_the_same_outputs(exported, flavour, name, qkv, kv):
    """UNet: 4 transformer blocks, each a self- and a cross-attention; VAE: one self-attention with biases."""
    fused, n = fused_copy(load(exported[flavour], name))
    packed = copy_of(fused)
    assert pack_attention(packed) == {"qkv": qkv, "kv": kv}
    onnx.checker.check_model(packed)
    assert sorted(packed_inputs(packed)) == sorted([(True, False, False)] * qkv + [(True, True, False)] * kv)
    assert count(packed, "MatMul") == count(fused, "MatMul") - 2 * qkv - kv  # 3 GEMMs -> 1, 2 -> 1
    reshapes = [numpy_helper.to_array(t).tolist() for t in packed.graph.initializer if t.name.endswith("_shape")
                and t.name.startswith(("sdrt_qkv_", "sdrt_kv_"))]
    assert sorted(r[3] for r in reshapes) == [2] * kv + [3] * qkv and all(r[:2] == [0, 0] for r in reshapes)
    unpacked = copy_of(packed)
    assert unpack_attention(unpacked) == n
    assert packed_inputs(unpacked) == [(True, True, True)] * n
    assert_same_outputs(fused, unpacked, exported[flavour], name)


def test_the_cpu_provider_cannot_run_packed_attention(exported):
    """Why the cpu profile never packs (and why unpack_attention exists): a canary for onnxruntime adding it."""
    packed, _ = fused_copy(load(exported["sd1"], "vae_decoder"))
    pack_attention(packed)
    spec = json.loads((exported["sd1"] / "sdrt.json").read_text())["components"]["vae_decoder"]["spec"]
    feed = {spec["inputs"][0]["name"]: np.zeros((1, 4, 8, 8), np.float32)}
    session = onnxruntime.InferenceSession(packed.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="not implemented for CPU"):
        session.run(None, feed)


# -- the layout, on one attention built here -------------------------------------------------------

B, S, C, HEADS, SIZE = 2, 5, 6, 3, 4


def single_attention(shared_kv_source=True, self_attention=True, bias=False, extra_use=False) -> onnx.ModelProto:
    """MultiHeadAttention over MatMul projections of x (and of ctx for cross-attention), random weights."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for role in "qkv":
        source = "x" if self_attention or role == "q" else ("ctx" if shared_kv_source or role == "k" else "ctx2")
        inits.append(numpy_helper.from_array(rng.standard_normal((C, HEADS * SIZE)).astype(np.float32), f"w{role}"))
        nodes.append(helper.make_node("MatMul", [source, f"w{role}"], [f"{role}_mm"]))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(HEADS * SIZE).astype(np.float32), f"b{role}"))
            nodes.append(helper.make_node("Add", [f"b{role}", f"{role}_mm"], [f"{role}_proj"]))
        else:
            nodes[-1].output[0] = f"{role}_proj"
    nodes.append(helper.make_node("MultiHeadAttention", ["q_proj", "k_proj", "v_proj"], ["y"], domain=MS_DOMAIN,
                                  num_heads=HEADS))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("k_proj", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, C]) for n in ("x", "ctx", "ctx2")]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])


def run(model, **feed) -> np.ndarray:
    names = {i.name for i in model.graph.input}
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def feeds():
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal((B, S, C)).astype(np.float32) for n in ("x", "ctx", "ctx2")}


@pytest.mark.parametrize("bias", [False, True])
def test_packed_qkv_slot_i_of_head_n_is_projection_i_of_head_n(bias):
    """The documented layout: packed[b, s, n, i, :] = projection_i(x)[b, s, n*H:(n+1)*H] (+ bias_i)."""
    model = single_attention(bias=bias)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pack_attention(model)
    (attention,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    model.graph.node.remove(attention)  # the CPU provider cannot run it: read its packed input instead
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(attention.input[0], TensorProto.FLOAT, None))
    x = feeds()["x"]
    packed = run(model, x=x, ctx=x, ctx2=x)
    assert packed.shape == (B, S, HEADS, 3, SIZE)
    for i, role in enumerate("qkv"):
        expected = x @ weights[f"w{role}"] + (weights[f"b{role}"] if bias else 0)
        np.testing.assert_allclose(packed[:, :, :, i, :], expected.reshape(B, S, HEADS, SIZE), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,expected", [
    ({}, {"qkv": 1, "kv": 0}),
    ({"bias": True}, {"qkv": 1, "kv": 0}),
    ({"self_attention": False}, {"qkv": 0, "kv": 1}),
    ({"self_attention": False, "shared_kv_source": False}, {"qkv": 0, "kv": 0}),  # K and V from different tensors
    ({"extra_use": True}, {"qkv": 0, "kv": 0}),  # K's projection is also a graph output
])
def test_only_provable_projections_are_packed(case, expected):
    model = single_attention(**case)
    reference = run(model, **feeds())
    assert pack_attention(model) == expected
    unpack_attention(model)
    np.testing.assert_allclose(run(model, **feeds()), reference, rtol=1e-5, atol=1e-6)


def test_a_wrong_interleave_would_be_caught():
    """The unpacked comparison the tests rely on fails when the packed columns are in another order."""
    model = single_attention()
    reference = run(model, **feeds())
    pack_attention(model)
    (weight,) = [t for t in model.graph.initializer if t.name.endswith("_weight")]
    # [q | k | v] blocks (np.concatenate of the three weights) instead of interleaved head by head
    swapped = numpy_helper.to_array(weight).reshape(C, HEADS, 3, SIZE).transpose(0, 2, 1, 3).reshape(C, -1)
    weight.CopyFrom(numpy_helper.from_array(swapped, weight.name))
    unpack_attention(model)
    assert np.abs(run(model, **feeds()) - reference).max() > 1e-2
