"""sdrt.export.split_gelu: diffusers' GEGLU feed-forward, exported by torch.onnx (dynamo, opset 18), becomes
one BiasSplitGelu at the widths onnxruntime's CUDA kernel has, with the same outputs (checked on the CPU
through sdrt.export.lowering); a pattern that differs, or another width, is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from sdrt.export.split_gelu import SUPPORTED_WIDTHS, fuse_bias_split_gelu

torch = pytest.importorskip("torch")


def export_feed_forward(dim: int) -> onnx.ModelProto:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    module = FeedForward(dim, activation_fn="geglu").eval()
    dynamic = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    program = torch.onnx.export(module, (torch.randn(2, 16, dim),), dynamo=True, opset_version=18,
                                input_names=["x"], output_names=["y"], dynamic_shapes=(dynamic,), verbose=False)
    return program.model_proto


@pytest.fixture(scope="module")
def geglu() -> onnx.ModelProto:
    return export_feed_forward(320)  # SD 1.5's first block: projection to 2 x 1280


def copy_of(model) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def run(model, x) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_geglu_becomes_one_bias_split_gelu_with_the_same_outputs(geglu):
    from sdrt.export.lowering import lower_for_cpu

    fused = copy_of(geglu)
    assert fuse_bias_split_gelu(fused) == 1
    onnx.checker.check_model(fused)
    assert ops(fused) == ["MatMul", "BiasSplitGelu", "MatMul", "Add"]  # Add, Split and the gelu's 6 ops are gone
    (node,) = [n for n in fused.graph.node if n.op_type == "BiasSplitGelu"]
    assert node.domain == "com.microsoft"
    bias = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}[node.input[1]]
    assert bias.shape == (2560,) and 2560 in SUPPORTED_WIDTHS
    lowered = copy_of(fused)
    lower_for_cpu(lowered)
    for batch, tokens in ((2, 16), (1, 77)):
        x = np.random.default_rng(batch).standard_normal((batch, tokens, 320), dtype=np.float32)
        reference = run(geglu, x)
        np.testing.assert_allclose(run(lowered, x), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_widths_without_a_cuda_kernel_stay_unfused():
    model = export_feed_forward(32)  # 2 x 128: the tiny test UNets' width
    assert fuse_bias_split_gelu(model) == 0 and "Split" in ops(model)


def set_constant(model, value, new):
    for t in model.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.size == 1 and abs(float(array.ravel()[0]) - value) < 1e-6:
            t.CopyFrom(numpy_helper.from_array(np.full_like(array, new), t.name))
            return
    raise AssertionError(f"no constant {value}")


def add_output(model, op_type):
    name = next(n.output[0] for n in model.graph.node if n.op_type == op_type)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))


@pytest.mark.parametrize("mutation", [
    lambda m: set_constant(m, 0.5, 0.6),                       # not gelu
    lambda m: set_constant(m, 2 ** 0.5, 2.0),                  # not erf(x / sqrt 2)
    lambda m: add_output(m, "Erf"),                            # an intermediate used elsewhere
    lambda m: add_output(m, "Split"),                          # the left half used elsewhere
], ids=["half", "sqrt2", "erf-used", "left-used"])
def test_a_pattern_that_differs_is_left_alone(geglu, mutation):
    model = copy_of(geglu)
    mutation(model)
    assert fuse_bias_split_gelu(model) == 0 and "BiasSplitGelu" not in ops(model)
