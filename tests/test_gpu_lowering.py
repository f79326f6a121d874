"""sdrt.export.lowering: the gpu profile's CUDA-only ops rewritten into standard ONNX, so that the fused
graphs run on the CPU provider. Every network of the tiny sd1/sd2 gpu folders (fp32 and fp16), lowered,
matches the unfused fp32 export within the optimize tolerance; each lowering, on one node, matches a
NumPy reference written from the op's documented semantics. No GPU needed."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper, numpy_helper

from sdrt.engines.fallback import FALLBACKS_KEY
from sdrt.export.attention import MS_DOMAIN
from sdrt.export.lowering import LOWERINGS, cpu_contrib_ops, lower_for_cpu
from sdrt.export.optimize import compare_files, networks, optimize_folder, validation_shapes

NORM_CONV = {"GroupNorm", "SkipGroupNorm", "NhwcConv"}
GPU_FUSED = {"unet": NORM_CONV, "vae_decoder": NORM_CONV, "vae_encoder": NORM_CONV, "text_encoder": set()}
UNIT_TOLERANCE = {np.float32: 1e-5, np.float16: 2e-3}  # one op: fp16 rounding of the output and the inputs


@pytest.fixture(scope="module")
def gpu_folders(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {(flavour, precision): optimize_folder(exported[flavour], root / f"{flavour}-{precision}", "gpu",
                                                  precision, log=lambda m: None)
            for flavour in ("sd1", "sd2") for precision in ("fp32", "fp16")}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_lowered_gpu_folder_matches_the_export(gpu_folders, exported, tmp_path, flavour, precision):
    src, out = exported[flavour], gpu_folders[flavour, precision]
    manifest = json.loads((out / "sdrt.json").read_text())
    specs = networks(manifest)
    # (file in the gpu folder, the export's component it stands for, its precision)
    files = [(name, name, precision) for name in specs]
    files += [(record["path"].split("/")[0], name, record["precision"])
              for name, record in manifest.get(FALLBACKS_KEY, {}).items()]
    for target, name, file_precision in files:
        model = onnx.load(str(out / target / "model.onnx"))
        counts = lower_for_cpu(model)
        assert GPU_FUSED[name] <= counts.keys(), (target, counts)
        assert {n.op_type for n in model.graph.node if n.domain == MS_DOMAIN} <= cpu_contrib_ops(), target
        lowered = tmp_path / target / "model.onnx"
        lowered.parent.mkdir()
        onnx.save(model, str(lowered))
        report = compare_files(src / name / "model.onnx", lowered, specs[name], validation_shapes(manifest, name),
                               file_precision)  # raises ValidationError on a miss
        worst = max(c["max_abs"] / max(1.0, c["max_ref"]) for c in report["checks"])
        print(f"{flavour} {precision} {target}: lowered {counts}, worst error {worst:.3g} of max(1, max|ref|)")


def run_lowered(op_type: str, inputs: dict, attrs: dict, outputs: int = 1, initializers: tuple = ()) -> list:
    """One com.microsoft node over `inputs` (name -> array; `initializers` are stored in the graph), lowered
    and run on the CPU provider."""
    values = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in inputs.items() if k not in initializers]
    names = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op_type, list(inputs), names, domain=MS_DOMAIN, **attrs)
    x = next(iter(inputs.values()))  # every output has the first input's dtype and rank
    dtype = helper.np_dtype_to_tensor_dtype(x.dtype)
    results = [helper.make_tensor_value_info(n, dtype, [None] * x.ndim) for n in names]
    graph = helper.make_graph([node], "one_op", values, results,
                              [numpy_helper.from_array(inputs[k], k) for k in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    assert lower_for_cpu(model) == {op_type: 1}
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v for k, v in inputs.items() if k not in initializers})


def assert_close(got: np.ndarray, ref: np.ndarray, dtype) -> None:
    assert got.dtype == dtype and got.shape == ref.shape
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert err <= UNIT_TOLERANCE[dtype] * max(1.0, float(np.max(np.abs(ref)))), err


def group_norm_ref(s: np.ndarray, gamma, beta, groups: int, epsilon: float, silu: bool) -> np.ndarray:
    """GroupNorm on NHWC: normalize each group of C/groups channels over H, W and its channels (biased variance)."""
    n, h, w, c = s.shape
    g = s.astype(np.float64).reshape(n, h * w, groups, c // groups)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + epsilon)
    y = g.reshape(s.shape) * gamma + beta
    return y / (1 + np.exp(-y)) if silu else y


def conv_nhwc_ref(x, w, b, strides, pads, dilations, group) -> np.ndarray:
    """Conv of x [N, H, W, C] by w [M, kH, kW, C/group]; pads = (top, left, bottom, right) as in ONNX."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    m, kh, kw, cg = w.shape
    (sh, sw), (dh, dw), mg = strides, dilations, m // group
    oh, ow = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1, (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], oh, ow, m))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            for g in range(group):
                out[..., g * mg:(g + 1) * mg] += patch[..., g * cg:(g + 1) * cg] @ w[g * mg:(g + 1) * mg, i, j].T
    return out + b


DTYPES = [np.float32, np.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [0, 1])
@pytest.mark.parametrize("channels_last", [1, 0])
def test_group_norm(dtype, silu, channels_last):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 3, 12)) * 3 + rng.standard_normal(12) * 2).astype(dtype)  # NHWC, uneven means
    gamma, beta = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    ref = group_norm_ref(x, gamma, beta, 3, 1e-5, silu)
    feed = x if channels_last else x.transpose(0, 3, 1, 2)
    attrs = {"groups": 3, "activation": silu, "epsilon": 1e-5, "channels_last": channels_last}
    (y,) = run_lowered("GroupNorm", {"X": feed, "gamma": gamma, "beta": beta}, attrs, initializers=("gamma",))
    assert_close(y if channels_last else y.transpose(0, 2, 3, 1), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip_shape,bias,outputs", [((2, 5, 3, 12), True, 2), ((2, 1, 1, 12), False, 1),
                                                     ((2, 12), True, 2)])
def test_skip_group_norm(dtype, skip_shape, bias, outputs):
    """s = x + skip (+ bias), the second output, normalized with SiLU; skip of x's shape, [N, 1, 1, C] or [N, C]."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, 12)).astype(dtype)
    skip = (rng.standard_normal(skip_shape) * 2).astype(dtype)
    gamma, beta = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    inputs = {"X": x, "gamma": gamma, "beta": beta, "skip": skip}
    s = x.astype(np.float64) + skip.reshape(2, -1, 1, 12) if len(skip_shape) == 2 else x.astype(np.float64) + skip
    if bias:
        inputs["bias"] = rng.standard_normal(12).astype(dtype)
        s = s + inputs["bias"]
    got = run_lowered("SkipGroupNorm", inputs, {"groups": 4, "activation": 1, "epsilon": 1e-6}, outputs)
    assert_close(got[0], group_norm_ref(s, gamma, beta, 4, 1e-6, True), dtype)
    if outputs == 2:
        assert_close(got[1], s, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_initializer", [True, False])
@pytest.mark.parametrize("strides,pads,dilations,group", [((2, 2), (1, 0, 1, 1), (1, 1), 2),
                                                          ((1, 1), (1, 1, 1, 1), (1, 2), 1)])
def test_nhwc_conv(dtype, weight_initializer, strides, pads, dilations, group):
    """A 3x2 kernel, so that a weight read in the wrong layout gives other numbers."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 6, 4)).astype(dtype)
    w = (rng.standard_normal((6, 3, 2, 4 // group)) * 0.3).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    attrs = {"group": group, "strides": strides, "pads": pads, "dilations": dilations, "kernel_shape": [3, 2]}
    (y,) = run_lowered("NhwcConv", {"X": x, "W": w, "B": b}, attrs, initializers=("W",) if weight_initializer else ())
    assert_close(y, conv_nhwc_ref(x, w, b, strides, pads, dilations, group), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_split_gelu(dtype):
    rng = np.random.default_rng(3)
    x, bias = rng.standard_normal((2, 5, 16)).astype(dtype), rng.standard_normal(16).astype(dtype)
    s = x.astype(np.float64) + bias
    left, right = s[..., :8], s[..., 8:]
    ref = left * 0.5 * right * (1 + np.vectorize(math.erf)(right / math.sqrt(2)))
    (y,) = run_lowered("BiasSplitGelu", {"X": x, "bias": bias}, {}, initializers=("bias",))
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_add(dtype):
    rng = np.random.default_rng(4)
    x, bias, skip = (rng.standard_normal(shape).astype(dtype) for shape in ((2, 5, 8), (8,), (2, 5, 8)))
    (y,) = run_lowered("BiasAdd", {"X": x, "bias": bias, "skip": skip}, {})
    assert_close(y, x.astype(np.float64) + bias + skip, dtype)


def test_unknown_gpu_only_op_is_refused_and_cpu_ops_are_kept():
    """GatedRelativePositionBias has CUDA kernels only and no lowering; QuickGelu runs on the CPU as is."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("QuickGelu", ["x"], ["y"], domain=MS_DOMAIN)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", 1, [2, 4])]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    assert lower_for_cpu(model) == {} and [n.op_type for n in model.graph.node] == ["QuickGelu"]
    model.graph.node.append(helper.make_node("GatedRelativePositionBias", ["y"], ["z"], domain=MS_DOMAIN))
    with pytest.raises(ValueError, match=r"GatedRelativePositionBias.*knows.*" + ".*".join(sorted(LOWERINGS))):
        lower_for_cpu(model)
    assert [n.op_type for n in model.graph.node] == ["QuickGelu", "GatedRelativePositionBias"]  # left as it was
