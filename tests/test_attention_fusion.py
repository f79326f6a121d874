"""sdrt.export.attention: the exported attention becomes onnxruntime's MultiHeadAttention, every one of
the tiny UNets' and VAEs', with the same outputs as the unfused graph on onnxruntime's CPU provider;
a core that differs in any checked condition (a perm, the scale, the Softmax axis, the K^T chain, an
extra consumer) is left unfused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper, numpy_helper

from sdrt.export.attention import MS_DOMAIN, fuse_attention, remove_dead_nodes

# Two shapes: batch 2 with a non-square latent, and batch 1 with another non-square latent and a
# cross-attention sequence (11 tokens) different from any self-attention length.
SHAPES = [{"batch": 2, "sequence": 77, "latent_height": 8, "latent_width": 12, "height": 64, "width": 96},
          {"batch": 1, "sequence": 11, "latent_height": 16, "latent_width": 8, "height": 128, "width": 64}]
RTOL = 1e-5


def load(folder, name) -> onnx.ModelProto:
    return onnx.load(str(folder / name / "model.onnx"))


def count(model, op_type) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def axis(dims, name) -> int:
    if "/" in name:  # a UNet's lower resolutions ("latent_height/2"): stride-2 convs round up
        base, k = name.split("/")
        return -(-dims[base] // int(k))
    return dims[name]


def feeds(folder, name):
    spec = json.loads((folder / "sdrt.json").read_text())["components"][name]["spec"]
    for seed, dims in enumerate(SHAPES):
        rng = np.random.default_rng(seed)
        feed = {}
        for t in spec["inputs"]:
            shape = tuple(d if isinstance(d, int) else axis(dims, d) for d in t["shape"])
            if t["name"] == "timestep":
                feed[t["name"]] = rng.integers(0, 1000, shape).astype(np.float32)
            else:
                feed[t["name"]] = rng.standard_normal(shape, dtype=np.float32)
        yield feed


def run(model, feed) -> dict:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def assert_same_outputs(reference, fused, folder, name):
    for feed in feeds(folder, name):
        ref, got = run(reference, feed), run(fused, feed)
        for out in ref:
            err = float(np.max(np.abs(got[out] - ref[out])))
            assert err <= RTOL * float(np.max(np.abs(ref[out]))), (name, out, err)


def fused_copy(model) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, fuse_attention(copy)


@pytest.mark.parametrize("flavour,name", [("sd1", "unet"), ("sd1", "vae_decoder"), ("sd1", "vae_encoder"),
                                          ("sd2", "unet")])
def test_every_attention_is_fused_and_matches(exported, flavour, name):
    folder = exported[flavour]
    reference = load(folder, name)
    softmaxes = count(reference, "Softmax")
    assert softmaxes == (8 if name == "unet" else 1)  # 2 per transformer block; the VAE's mid-block attention
    fused, n = fused_copy(reference)
    assert n == softmaxes == count(fused, "MultiHeadAttention")
    assert count(fused, "Softmax") == 0
    onnx.checker.check_model(fused)
    assert any(o.domain == MS_DOMAIN and o.version == 1 for o in fused.opset_import)
    assert remove_dead_nodes(fused.graph) == 0  # the old cores and their Shape arithmetic are gone
    assert len(fused.graph.node) < len(reference.graph.node)
    assert_same_outputs(reference, fused, folder, name)


@pytest.mark.parametrize("flavour,heads", [("sd1", 8), ("sd2", 4)])
def test_attributes_are_heads_and_scale(exported, flavour, heads):
    """The fused nodes carry the UNet's head count (sd1: 8 heads of 2 channels, sd2: 4 of 4; the attention
    blocks have 16 channels) and scale = 1/sqrt(head size), diffusers' default."""
    fused, _ = fused_copy(load(exported[flavour], "unet"))
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attrs) == 8 and {a["num_heads"] for a in attrs} == {heads}
    for a in attrs:
        assert a["scale"] == pytest.approx((16 / heads) ** -0.5, rel=1e-6)


# -- a core that differs is left alone --------------------------------------------------------------


def core(model, index=0) -> dict:
    """The nodes of the index-th attention core of an exported graph, by role."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"][index]
    scores = producer[softmax.input[0]]
    weighted = consumers[softmax.output[0]][0]
    k_mul = producer[scores.input[1]]
    key_swap = producer[producer[k_mul.input[0]].input[0]]  # Reshape(Transpose[0,2,1](...))
    return {"softmax": softmax, "q_mul": producer[scores.input[0]], "k_mul": k_mul, "key_swap": key_swap,
            "q_heads": producer[producer[scores.input[0]].input[0]],
            "out_transpose": consumers[weighted.output[0]][0]}


def set_perm(node, perm):
    for a in node.attribute:
        if a.name == "perm":
            a.CopyFrom(helper.make_attribute("perm", perm))


def change_scale(model, node):
    """Give one of the two scale Muls its own, different constant."""
    constants = {t.name for t in model.graph.initializer}
    (i,) = [i for i, name in enumerate(node.input) if name in constants]
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "sdrt_test_scale"))
    node.input[i] = "sdrt_test_scale"


def change_axis(model, node):
    node.attribute[0].CopyFrom(helper.make_attribute("axis", 2))


def add_output(model, node):
    model.graph.output.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))


MUTATIONS = {
    "q split-heads perm": lambda m, c: set_perm(c["q_heads"], [0, 1, 2, 3]),
    "output perm": lambda m, c: set_perm(c["out_transpose"], [0, 1, 2, 3]),
    "K^T chain not a transpose": lambda m, c: set_perm(c["key_swap"], [0, 1, 2]),
    "scale mismatch": lambda m, c: change_scale(m, c["k_mul"]),
    "softmax over another axis": lambda m, c: change_axis(m, c["softmax"]),
    "probabilities also an output": lambda m, c: add_output(m, c["softmax"]),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_differing_core_is_not_fused(exported, mutation):
    folder = exported["sd1"]
    mutated = load(folder, "unet")
    MUTATIONS[mutation](mutated, core(mutated, index=1))  # a cross-attention
    fused, n = fused_copy(mutated)
    assert n == 7 and count(fused, "Softmax") == 1
    if mutation != "q split-heads perm":  # the others still run: the same outputs as unfused
        assert_same_outputs(mutated, fused, folder, "unet")


def test_no_attention_no_change(exported):
    """The text encoder's causal attention (a mask Add before the Softmax) is not ours to fuse."""
    model = load(exported["sd1"], "text_encoder")
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before
