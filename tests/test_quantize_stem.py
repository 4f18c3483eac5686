"""Space-to-depth stems: the rewrite keeps the integer arithmetic, ORT fuses it, and it refuses what it cannot express."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.ir import clone
from graphprune.quantization.cost import estimate_costs
from graphprune.quantization.rules import GraphView
from graphprune.quantization.stem import space_to_depth_stems, stem_check
from graphprune.runtime import make_session, run
from graphprune.shapes import concrete_shapes


def _qdq_stem(k=7, stride=2, pads=None, size=32, cin=3, cout=8, per_channel=True):
    """x[1,cin,size,size] -> Q -> DQ -> Conv(k x k, stride; int8 weights, int32 bias) -> Relu -> Q -> DQ."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(cout, cin, k, k)).astype(np.int8)
    ws = (rng.random(cout) * 0.01 + 0.001).astype(np.float32) if per_channel else np.float32(0.004)
    xs = np.float32(0.02)
    pads = [k // 2] * 4 if pads is None else pads
    inits = [
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.asarray(ws), "w_scale"),
        numpy_helper.from_array(np.zeros(cout, np.int8) if per_channel else np.int8(0), "w_zp"),
        numpy_helper.from_array(np.asarray(xs), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zp"),
        numpy_helper.from_array(rng.integers(-500, 500, size=cout).astype(np.int32), "b_q"),
        numpy_helper.from_array((xs * np.broadcast_to(ws, (cout,))).astype(np.float32), "b_scale"),
        numpy_helper.from_array(np.float32(0.05), "y_scale"),
        numpy_helper.from_array(np.uint8(0), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_DQ", axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], name="b_DQ", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["c"], name="stem", kernel_shape=[k, k],
                         strides=[stride, stride], pads=pads),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "y_scale", "y_zp"], ["r_q"], name="r_Q"),
        helper.make_node("DequantizeLinear", ["r_q", "y_scale", "y_zp"], ["y"], name="r_DQ"),
    ]
    out = [(size + pads[i] + pads[i + 2] - k) // stride + 1 for i in range(2)]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, cout, *out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _rewrite(model):
    copy = clone(model)
    shapes = {"x": tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)}
    return copy, space_to_depth_stems(copy, shapes)


def _outputs(model, x):
    return run(make_session(model), {"x": x})["y"]


@pytest.mark.parametrize(
    "k, pads, size, per_channel",
    [(7, None, 32, True), (5, None, 32, True), (5, None, 16, False), (7, [3, 2, 2, 3], 32, True), (6, [2, 3, 3, 2], 16, True)],
)
def test_rewrite_gives_identical_outputs(k, pads, size, per_channel):
    """Same int8 weights, same scales, same integer sums: ORT's outputs match bit for bit."""
    before = _qdq_stem(k=k, pads=pads, size=size, per_channel=per_channel)
    after, rewritten = _rewrite(before)
    assert rewritten == ["stem"]
    onnx.checker.check_model(after, full_check=True)
    conv = next(n for n in after.graph.node if n.op_type == "Conv")
    strides = next(a for a in conv.attribute if a.name == "strides").ints
    assert list(strides) == [1, 1]
    names = {n.name for n in after.graph.node}
    assert not names & {"x_Q", "x_DQ", "w_DQ"}  # the old input pair and weight are gone
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(before, x), _outputs(after, x))


def test_ort_fuses_the_rewritten_stem_into_qlinearconv_on_12_channels(tmp_path):
    after, _ = _rewrite(_qdq_stem())
    path = os.path.join(tmp_path, "opt.onnx")
    make_session(after, optimized_model_path=path)
    optimized = onnx.load(path)
    ops = [n.op_type for n in optimized.graph.node]
    assert "QLinearConv" in ops and "SpaceToDepth" in ops and "Conv" not in ops
    conv = next(n for n in optimized.graph.node if n.op_type == "QLinearConv")
    weight = next(t for t in optimized.graph.initializer if t.name == conv.input[3])
    assert list(weight.dims) == [8, 12, 4, 4]


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(stride=1), "stride is not 2"),
        (dict(cin=8), "8 input channels"),
        (dict(size=31), "odd input size"),
        (dict(k=3), "reduction length 27 < 64"),
    ],
)
def test_refusals_leave_the_model_unchanged(kwargs, reason):
    before = _qdq_stem(**kwargs)
    conv = next(n for n in before.graph.node if n.op_type == "Conv")
    w = numpy_helper.to_array(before.graph.initializer[0])
    x_shape = tuple(d.dim_value for d in before.graph.input[0].type.tensor_type.shape.dim)
    assert reason in stem_check(conv, x_shape, w.shape)
    after, rewritten = _rewrite(before)
    assert rewritten == []
    assert after == before


def test_cost_model_prices_a_7x7_rgb_stem_faster_in_int8_only_when_rewritable():
    """The stride-2 7x7 RGB stem pays in int8 as a SpaceToDepth stem; at stride 1, or 3x3, it stays slower."""

    def float_stem(stride, k=7):
        w = numpy_helper.from_array(np.zeros((16, 3, k, k), np.float32), "w")
        conv = helper.make_node("Conv", ["x", "w"], ["y"], name="stem", kernel_shape=[k, k], strides=[stride] * 2, pads=[k // 2] * 4)
        graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 64, 64])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
        model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
        shapes = concrete_shapes(model)
        return estimate_costs(model, shapes, GraphView.of(model).constants)["stem"]

    strided, plain, small = float_stem(2), float_stem(1), float_stem(2, k=3)
    assert strided.int8_ns < strided.float_ns and "SpaceToDepth" in strided.note
    assert plain.int8_ns > plain.float_ns
    assert small.int8_ns > small.float_ns  # 3x3/2: 349 us int8 even rewritten vs 243 us fp32
