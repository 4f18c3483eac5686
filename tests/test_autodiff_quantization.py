"""QuantizeLinear/DequantizeLinear gradients (straight-through estimator) against torch's fake quantization.

Finite differences cannot check these rules (rounding makes the true derivative zero almost
everywhere), so the gradient graph's values are compared with the explicit STE formula
``dx = dy * [qmin <= round(x / scale) + zero_point <= qmax]`` and with torch's ``fake_quantize_*``
autograd.  Inputs sit well away from rounding ties, so float32 evaluation order cannot flip a level.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from graphprune.autodiff.gradient import build_gradients
from graphprune.autodiff.registry import VJP_RULES
from graphprune.errors import UserError
from tests.gradcheck import graph_gradients, loss_model, make_model, reference_evaluator

RNG = np.random.default_rng(0)
RANGES = {T.INT8: (-128, 127), T.UINT8: (0, 255), T.INT16: (-32768, 32767), T.UINT16: (0, 65535),
          T.INT4: (-8, 7), T.UINT4: (0, 15)}


def _levels(shape, scale, zero_point, qtype, spread=1.4):
    """Values at random quantization levels (offset 0.1-0.4 from a level, never near a tie), a share
    of them beyond the integer range on both sides so the clipping mask is exercised."""
    qmin, qmax = RANGES[qtype]
    width = (qmax - qmin) * spread
    level = np.floor(RNG.uniform(qmin - (width - (qmax - qmin)) / 2, qmax + (width - (qmax - qmin)) / 2, shape))
    offset = RNG.uniform(0.1, 0.4, shape) * RNG.choice([-1, 1], shape)
    return ((level - zero_point + offset) * scale).astype(np.float32)


def _mask(x, scale, zero_point, qtype):
    qmin, qmax = RANGES[qtype]
    level = np.round(x / scale) + zero_point
    return ((level >= qmin) & (level <= qmax)).astype(np.float32)


def _qdq_nodes(x, scale, zero_point, out, **attrs):
    inputs = [x, scale] + ([zero_point] if zero_point else [])
    return [helper.make_node("QuantizeLinear", inputs, [out + "_q"], **attrs),
            helper.make_node("DequantizeLinear", [out + "_q"] + inputs[1:], [out], **attrs)]


def _ours(model, feeds, wrt, runtime):
    """(gradients by name, the loss weights R of each output) from graphprune's gradient graph."""
    lossy = loss_model(model, feeds) if runtime == "reference" else _ort_loss_model(model, feeds)
    weights = {i.name[len("check/R/"):]: numpy_helper.to_array(i) for i in lossy.graph.initializer
               if i.name.startswith("check/R/")}
    graph = graph_gradients(lossy, wrt)
    if runtime == "ort":
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(None, feeds)[1:]
    else:
        values = reference_evaluator(graph).run(None, feeds)[1:]
    return dict(zip(wrt, values)), weights


def _ort_loss_model(model, feeds):
    """``loss_model``'s ``loss = sum(y * R)`` with the forward pass run in onnxruntime (the reference
    evaluator has no opset-13 DequantizeLinear)."""
    (output,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    y = model.graph.output[0].name
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph.initializer.append(_tensor(f"check/R/{y}", np.random.default_rng(0).standard_normal(output.shape)
                                     .astype(np.float32)))
    graph.node.extend([helper.make_node("Mul", [y, f"check/R/{y}"], ["check/weighted"]),
                       helper.make_node("ReduceSum", ["check/weighted"], ["check/loss"], keepdims=0)])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("check/loss", T.FLOAT, []))
    return result


def _tensor(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


# ----- the rule alone: Q -> DQ on a tensor ------------------------------------------------------------

PER_TENSOR = [  # output type, zero point (None: absent), opset, runtimes
    (T.UINT8, 7, 11, ["ort"]),  # the reference evaluator has no DequantizeLinear before opset 19
    (T.INT8, 3, 13, ["ort"]),
    (T.UINT8, 128, 19, ["ort", "reference"]),
    (T.UINT8, None, 19, ["ort", "reference"]),
    (T.INT16, -7, 21, ["ort", "reference"]),
    (T.UINT16, 300, 21, ["ort", "reference"]),
    (T.INT4, 1, 21, ["ort", "reference"]),
    (T.UINT4, 8, 21, ["ort", "reference"]),
]


@pytest.mark.parametrize("qtype,zero_point,opset,runtimes", PER_TENSOR,
                         ids=[f"{T.DataType.Name(q)}-zp{z}-opset{o}" for q, z, o, _ in PER_TENSOR])
def test_per_tensor_mask(qtype, zero_point, opset, runtimes):
    scale = np.float32(0.05)
    x = _levels((3, 40), scale, zero_point or 0, qtype)
    inits = [_tensor("s", scale)]
    if zero_point is not None:
        inits.append(_tensor("z", np.asarray(zero_point, helper.tensor_dtype_to_np_dtype(qtype))))
    nodes = _qdq_nodes("x", "s", "z" if zero_point is not None else None, "y")
    # (Symbolic batch from opset 13: below it the loss's own broadcast reduction needs static dims.)
    batch = "batch" if opset >= 13 else 3
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [batch, 40])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=opset)
    mask = _mask(x, scale, zero_point or 0, qtype)
    assert 0 < mask.mean() < 1  # both clipped and passing elements
    for runtime in runtimes:
        grads, weights = _ours(model, {"x": x}, ["x"], runtime)
        np.testing.assert_array_equal(grads["x"], weights["y"] * mask, err_msg=runtime)


@pytest.mark.parametrize("qtype,zero_point", [(T.INT8, 3), (T.UINT8, 128), (T.UINT8, 0)])
def test_per_tensor_against_torch(qtype, zero_point):
    torch = pytest.importorskip("torch")
    scale = np.float32(0.05)
    x = _levels((4, 30), scale, zero_point, qtype)
    inits = [_tensor("s", scale), _tensor("z", np.asarray(zero_point, helper.tensor_dtype_to_np_dtype(qtype)))]
    model = make_model(_qdq_nodes("x", "s", "z", "y"), [helper.make_tensor_value_info("x", T.FLOAT, [4, 30])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=19)
    grads, weights = _ours(model, {"x": x}, ["x"], "ort")
    tx = torch.tensor(x, requires_grad=True)
    qmin, qmax = RANGES[qtype]
    (torch.fake_quantize_per_tensor_affine(tx, float(scale), zero_point, qmin, qmax)
     * torch.tensor(weights["y"])).sum().backward()
    np.testing.assert_array_equal(grads["x"], tx.grad.numpy())


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
def test_per_axis_against_torch(axis):
    torch = pytest.importorskip("torch")
    shape = (6, 5)
    dim = shape[axis]
    scale = RNG.uniform(0.02, 0.1, dim).astype(np.float32)
    zero_point = RNG.integers(-5, 5, dim).astype(np.int8)
    view = [1, 1]
    view[axis] = -1
    x = _levels(shape, scale.reshape(view), zero_point.reshape(view), T.INT8)
    inits = [_tensor("s", scale), _tensor("z", zero_point)]
    model = make_model(_qdq_nodes("x", "s", "z", "y", axis=axis), [helper.make_tensor_value_info("x", T.FLOAT, shape)],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=21)
    for runtime in ("ort", "reference"):
        grads, weights = _ours(model, {"x": x}, ["x"], runtime)
        tx = torch.tensor(x, requires_grad=True)
        zero = torch.tensor(zero_point, dtype=torch.int32)
        fq = torch.fake_quantize_per_channel_affine(tx, torch.tensor(scale), zero, axis % 2, -128, 127)
        (fq * torch.tensor(weights["y"])).sum().backward()
        np.testing.assert_array_equal(grads["x"], tx.grad.numpy(), err_msg=runtime)


@pytest.mark.parametrize("qtype", [T.INT8, T.INT4])
def test_blocked_scales(qtype):
    shape, block = (4, 6), 4  # the last block of each row is partial (6 = 4 + 2)
    scale = RNG.uniform(0.05, 0.2, (4, 2)).astype(np.float32)
    zero_point = RNG.integers(-2, 2, (4, 2)).astype(np.int8)
    full_scale, full_zero = np.repeat(scale, block, axis=1)[:, :6], np.repeat(zero_point, block, axis=1)[:, :6]
    x = _levels(shape, full_scale, full_zero, qtype)
    inits = [_tensor("s", scale), numpy_helper.from_array(zero_point, "z")]
    if qtype == T.INT4:
        inits[1] = helper.make_tensor("z", T.INT4, zero_point.shape, zero_point.ravel().tolist())
    model = make_model(_qdq_nodes("x", "s", "z", "y", axis=1, block_size=block),
                       [helper.make_tensor_value_info("x", T.FLOAT, shape)],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=21)
    mask = _mask(x, full_scale, full_zero, qtype)
    assert 0 < mask.mean() < 1
    for runtime in ("ort", "reference"):
        grads, weights = _ours(model, {"x": x}, ["x"], runtime)
        np.testing.assert_array_equal(grads["x"], weights["y"] * mask, err_msg=runtime)


# ----- QDQ models: the gradient reaches the float weights ---------------------------------------------

def _qdq_matmul(opset=21):
    """x (uint8 per-tensor QDQ) @ w (int8 per-channel QDQ along its output axis) + b."""
    w_scale = RNG.uniform(0.01, 0.03, 4).astype(np.float32)
    w = _levels((5, 4), w_scale, 0, T.INT8, spread=1.1)
    x_scale, x_zero = np.float32(0.02), np.uint8(128)
    x = _levels((3, 5), x_scale, 128, T.UINT8, spread=1.1)
    nodes = (_qdq_nodes("x", "xs", "xz", "xq") + _qdq_nodes("w", "ws", "wz", "wq", axis=1)
             + [helper.make_node("MatMul", ["xq", "wq"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])])
    inits = [_tensor("w", w), _tensor("ws", w_scale), _tensor("wz", np.zeros(4, np.int8)),
             _tensor("xs", x_scale), _tensor("xz", x_zero), _tensor("b", RNG.standard_normal(4).astype(np.float32))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 5])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=opset)
    return model, x, w, (x_scale, int(x_zero)), w_scale


def test_qdq_matmul_against_torch():
    torch = pytest.importorskip("torch")
    model, x, w, (x_scale, x_zero), w_scale = _qdq_matmul()
    grads, weights = _ours(model, {"x": x}, ["x", "w", "b"], "ort")
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    xq = torch.fake_quantize_per_tensor_affine(tx, float(x_scale), x_zero, 0, 255)
    zero = torch.zeros(4, dtype=torch.int32)
    wq = torch.fake_quantize_per_channel_affine(tw, torch.tensor(w_scale), zero, 1, -128, 127)
    ((xq @ wq) * torch.tensor(weights["y"])).sum().backward()
    np.testing.assert_allclose(grads["w"], tw.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["b"], weights["y"].sum(0), rtol=1e-5)
    assert (tw.grad.numpy() == 0).any() and (tx.grad.numpy() == 0).any()  # the clipped entries stop


def test_qdq_conv_weight_per_channel():
    torch = pytest.importorskip("torch")
    if "Conv" not in VJP_RULES:
        pytest.skip("no Conv gradient rule registered yet")
    w_scale = RNG.uniform(0.01, 0.03, 3).astype(np.float32)
    w = _levels((3, 2, 3, 3), w_scale.reshape(3, 1, 1, 1), 0, T.INT8, spread=1.1)
    x = RNG.standard_normal((2, 2, 5, 5)).astype(np.float32)
    nodes = _qdq_nodes("w", "ws", "wz", "wq", axis=0) + [helper.make_node("Conv", ["x", "wq"], ["y"], pads=[1] * 4)]
    inits = [_tensor("w", w), _tensor("ws", w_scale), _tensor("wz", np.zeros(3, np.int8))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 2, "h", "w"])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=21)
    grads, weights = _ours(model, {"x": x}, ["w"], "ort")
    tw = torch.tensor(w, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.int32)
    wq = torch.fake_quantize_per_channel_affine(tw, torch.tensor(w_scale), zero, 0, -128, 127)
    (torch.nn.functional.conv2d(torch.tensor(x), wq, padding=1) * torch.tensor(weights["y"])).sum().backward()
    np.testing.assert_allclose(grads["w"], tw.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_scales_and_zero_points_stay_frozen():
    model, *_ = _qdq_matmul()
    lossy = loss_model(model, {"x": _qdq_matmul()[1]})
    grads = build_gradients(lossy, "check/loss", ["w", "ws", "xs"])
    assert grads.grads["w"] is not None and grads.grads["ws"] is None and grads.grads["xs"] is None


def test_float8_output_is_refused():
    nodes = _qdq_nodes("x", "s", "z", "y")
    inits = [_tensor("s", np.float32(0.1)), helper.make_tensor("z", T.FLOAT8E4M3FN, [], [0.0])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)], inits, opset=19)
    with pytest.raises(UserError, match="QuantizeLinear.*FLOAT8E4M3FN"):
        build_gradients(model, "y", ["x"])
