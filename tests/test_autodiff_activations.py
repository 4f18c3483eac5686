"""Gradient rules of activations, Softmax/LogSoftmax, Gelu/Erf and Sin/Cos against finite differences and torch.

Every case builds a one-node model (some with symbolic dims), checks graphprune's gradient graph
against central finite differences in float64 and in onnxruntime float32 (``check_gradients``), and
against torch autograd of the same function (float64, ``|ours - torch| <= 1e-7 |torch| + 1e-10``).
Inputs keep a margin from the kinks of piecewise ops so that finite differences are valid there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graphprune.errors import UserError
from tests.gradcheck import check_gradients, graph_gradients, loss_model, make_model, to_double, torch_gradients

SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


def _away(x: np.ndarray, kinks, gap: float = 0.05) -> np.ndarray:
    """``x`` with every entry moved at least ``gap`` away from each kink."""
    x = x.astype(np.float64)
    for kink in kinks:
        near = np.abs(x - kink) < gap
        x[near] = kink + np.where(x[near] >= kink, gap, -gap)
    return x.astype(np.float32)


def _unary_model(op: str, shape, opset: int, dynamic: bool, **attrs):
    dims = [None if dynamic and i != 1 else d for i, d in enumerate(shape)]
    return make_model([helper.make_node(op, ["x"], ["y"], **attrs)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=opset)


def _assert_torch(ours, fn, feeds, wrt, rtol=1e-7):
    reference = torch_gradients(fn, feeds, wrt)
    for name in wrt:
        np.testing.assert_allclose(ours[name], reference[name], rtol=rtol, atol=1e-10, err_msg=name)


def _torch_rtol(op: str, attrs: dict) -> float:
    # ONNX's tanh-Gelu is defined with float32 constants (its function body), torch's with exact ones.
    return 1e-6 if op == "Gelu" and attrs.get("approximate") == "tanh" else 1e-7


def _hard_swish(x):
    # ONNX defines HardSwish by its function body, HardSigmoid with alpha = 1/6 as a float32
    # attribute; torch's hardswish divides by 6 exactly (3e-8 apart, visible in float64).
    import torch

    return x * torch.clamp(float(np.float32(1 / 6)) * x + 0.5, 0, 1)


def _torch_fn(op: str, attrs: dict):
    """The torch function of a unary ONNX activation with ``attrs``."""
    import torch
    import torch.nn.functional as F

    # Attributes are stored as float32: torch must use the same rounded values.
    attrs = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in attrs.items()}
    alpha = attrs.get("alpha")
    table = {
        "LeakyRelu": lambda x: F.leaky_relu(x, alpha if alpha is not None else 0.01),
        "ThresholdedRelu": lambda x: torch.where(x > (alpha if alpha is not None else 1.0), x, torch.zeros_like(x)),
        "HardSigmoid": lambda x: torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1),
        "HardSwish": _hard_swish,
        "Elu": lambda x: F.elu(x, alpha if alpha is not None else 1.0),
        "Selu": lambda x: attrs.get("gamma", SELU_GAMMA) * torch.where(
            x > 0, x, attrs.get("alpha", SELU_ALPHA) * torch.expm1(x)),
        "Celu": lambda x: F.celu(x, alpha if alpha is not None else 1.0),
        "Softplus": lambda x: F.softplus(x),
        "Softsign": lambda x: F.softsign(x),
        "Mish": lambda x: F.mish(x),
        "Swish": lambda x: x * torch.sigmoid((alpha if alpha is not None else 1.0) * x),
        "Erf": lambda x: torch.erf(x),
        "Gelu": lambda x: F.gelu(x, approximate=attrs.get("approximate", "none")),
        "Sin": lambda x: torch.sin(x),
        "Cos": lambda x: torch.cos(x),
        "Softmax": lambda x: F.softmax(x, dim=attrs.get("axis", -1)),
        "LogSoftmax": lambda x: F.log_softmax(x, dim=attrs.get("axis", -1)),
        "Hardmax": lambda x: F.one_hot(torch.argmax(x, dim=attrs.get("axis", -1)), x.shape[attrs.get("axis", -1)])
        .movedim(-1, attrs.get("axis", -1)).to(x.dtype) + 0 * x,
    }
    return table[op]


# (op, attributes, opset, kinks of the derivative, input scale)
UNARY_CASES = [
    ("LeakyRelu", {}, 17, [0.0], 1.0),
    ("LeakyRelu", {"alpha": 0.3}, 17, [0.0], 1.0),
    ("ThresholdedRelu", {}, 17, [1.0], 2.0),
    ("ThresholdedRelu", {"alpha": -0.4}, 17, [-0.4], 1.0),
    ("HardSigmoid", {}, 17, [-2.5, 2.5], 3.0),
    ("HardSigmoid", {"alpha": 0.5, "beta": 0.1}, 17, [-0.2, 1.8], 2.0),
    ("HardSwish", {}, 17, [-3.0, 3.0], 4.0),
    ("Elu", {}, 17, [0.0], 1.5),
    ("Elu", {"alpha": 0.4}, 17, [0.0], 1.5),
    ("Selu", {}, 17, [0.0], 1.5),
    ("Selu", {"alpha": 1.2, "gamma": 0.7}, 17, [0.0], 1.5),
    ("Celu", {}, 17, [0.0], 1.5),
    ("Celu", {"alpha": 0.5}, 17, [0.0], 1.5),
    ("Softplus", {}, 17, [], 3.0),
    ("Softsign", {}, 17, [0.0], 2.0),
    ("Mish", {}, 18, [], 3.0),
    ("Swish", {}, 24, [], 3.0),
    ("Swish", {"alpha": 0.6}, 24, [], 3.0),
    ("Erf", {}, 13, [], 1.5),
    ("Gelu", {}, 20, [], 2.5),
    ("Gelu", {"approximate": "tanh"}, 20, [], 2.5),
    ("Sin", {}, 17, [], 3.0),
    ("Cos", {}, 17, [], 3.0),
    ("Softmax", {}, 13, [], 2.0),
    ("Softmax", {"axis": 0}, 17, [], 2.0),
    ("Softmax", {"axis": 1}, 13, [], 2.0),
    ("Softmax", {"axis": -2}, 21, [], 2.0),
    ("LogSoftmax", {}, 13, [], 2.0),
    ("LogSoftmax", {"axis": 1}, 17, [], 2.0),
    ("LogSoftmax", {"axis": -3}, 21, [], 2.0),
    ("Hardmax", {"axis": 1}, 17, [], 1.0),
]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("op, attrs, opset, kinks, scale", UNARY_CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}-op{c[2]}"
                              for c in UNARY_CASES])
def test_unary_finite_differences(op, attrs, opset, kinks, scale, dynamic):
    rng = np.random.default_rng(1)
    x = _away(scale * rng.standard_normal((2, 3, 4)), kinks)
    model = _unary_model(op, x.shape, opset, dynamic, **attrs)
    check_gradients(model, {"x": x}, ["x"])


@pytest.mark.parametrize("op, attrs, opset, kinks, scale", UNARY_CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}-op{c[2]}"
                              for c in UNARY_CASES])
def test_unary_torch(op, attrs, opset, kinks, scale):
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = _away(scale * rng.standard_normal((3, 2, 5)), kinks)
    ours = check_gradients(_unary_model(op, x.shape, opset, False, **attrs), {"x": x}, ["x"], run_ort=False)
    _assert_torch(ours, _torch_fn(op, attrs), {"x": x}, ["x"], _torch_rtol(op, attrs))


def test_hardmax_gradient_is_zero():
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    ours = check_gradients(_unary_model("Hardmax", x.shape, 17, True), {"x": x}, ["x"])
    assert not ours["x"].any()


@pytest.mark.parametrize("opset, axis, shape", [(11, 1, (2, 3, 4)), (12, -2, (2, 3, 2, 2)), (11, 0, (3, 4))])
def test_softmax_before_opset_13_flattens(opset, axis, shape):
    # Before opset 13 Softmax normalizes over every axis from ``axis`` on (the input as a 2-D matrix).
    # onnx 1.23's reference evaluator applies the opset-13 meaning there, so this case is checked in
    # onnxruntime (float32) against torch.
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    for op in ("Softmax", "LogSoftmax"):
        graph = graph_gradients(loss_model(_unary_model(op, shape, opset, False, axis=axis), {"x": x}), ["x"])
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        ours = session.run(None, {"x": x})[1]

        def flat(x, op=op):
            rows = x.reshape(int(np.prod(shape[: axis % len(shape)])), -1)
            return (torch.softmax(rows, 1) if op == "Softmax" else torch.log_softmax(rows, 1)).reshape(shape)

        reference = torch_gradients(flat, {"x": x}, ["x"])["x"]
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * np.abs(reference).max(), err_msg=op)


def _prelu_model(x_shape, slope_shape, dynamic: bool, slope_initializer=None):
    dims = [None if dynamic and i != 1 else d for i, d in enumerate(x_shape)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    inits = []
    if slope_initializer is None:
        inputs.append(helper.make_tensor_value_info("slope", TensorProto.FLOAT, slope_shape))
    else:
        inits.append(helper.make_tensor("slope", TensorProto.FLOAT, slope_shape, slope_initializer.ravel()))
    return make_model([helper.make_node("PRelu", ["x", "slope"], ["y"])], inputs,
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


PRELU_CASES = [
    ((2, 3, 4, 5), (3, 1, 1)),  # per channel, as exported from torch
    ((2, 3, 4, 5), (1,)),  # one shared slope
    ((2, 3, 4, 5), ()),  # scalar slope
    ((2, 3, 4, 5), (5,)),  # numpy broadcast along the last axis
    ((2, 6), (6,)),  # per feature of a linear layer
    ((2, 3, 4), (2, 3, 4)),  # one slope per element
]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("x_shape, slope_shape", PRELU_CASES, ids=[f"{c[0]}-{c[1]}" for c in PRELU_CASES])
def test_prelu(x_shape, slope_shape, dynamic):
    rng = np.random.default_rng(5)
    x = _away(rng.standard_normal(x_shape), [0.0])
    slope = np.asarray(0.1 + 0.5 * rng.random(slope_shape), dtype=np.float32)
    ours = check_gradients(_prelu_model(x_shape, slope_shape, dynamic), {"x": x, "slope": slope}, ["x", "slope"])
    pytest.importorskip("torch")
    import torch

    _assert_torch(ours, lambda x, slope: torch.where(x > 0, x, slope * x), {"x": x, "slope": slope}, ["x", "slope"])


def test_prelu_slope_initializer():
    # The usual case: the slope is a weight (an initializer) trained along with the rest.
    rng = np.random.default_rng(6)
    x = _away(rng.standard_normal((2, 4, 3, 3)), [0.0])
    slope = (0.25 + 0.1 * rng.random((4, 1, 1))).astype(np.float32)
    check_gradients(_prelu_model(x.shape, slope.shape, True, slope), {"x": x}, ["x", "slope"])


def test_gelu_unknown_mode_is_refused():
    model = _unary_model("Gelu", (2, 3), 20, False, approximate="fast")
    with pytest.raises(UserError, match="Gelu"):
        graph_gradients(_loss_only(model), ["x"])


def _loss_only(model):
    """``model`` with a loss output, built without evaluating it (for rules refused at build time)."""
    result = to_double(model)
    graph = result.graph
    graph.node.append(helper.make_node("ReduceSum", ["y"], ["check/loss"], keepdims=0))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("check/loss", TensorProto.DOUBLE, []))
    return result


def test_chain_of_activations_dynamic():
    # Several rules in sequence, with dims unknown: the gradients compose through shared tensors.
    rng = np.random.default_rng(7)
    x = _away(2 * rng.standard_normal((3, 4, 5)), [0.0, -3.0, 3.0])
    nodes = [helper.make_node("HardSwish", ["x"], ["a"]),
             helper.make_node("Mish", ["a"], ["b"]),
             helper.make_node("Softmax", ["b"], ["c"], axis=1),
             helper.make_node("Gelu", ["x"], ["d"], approximate="tanh"),
             helper.make_node("Mul", ["c", "d"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, None])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=20)
    ours = check_gradients(model, {"x": x}, ["x"])
    pytest.importorskip("torch")
    import torch.nn.functional as F

    _assert_torch(ours, lambda x: F.softmax(F.mish(_hard_swish(x)), 1) * F.gelu(x, approximate="tanh"),
                  {"x": x}, ["x"], rtol=1e-6)


MAIN_OPS = ["Softmax", "LogSoftmax", "Gelu", "Mish", "HardSwish", "HardSigmoid", "Elu", "LeakyRelu"]


@settings(max_examples=15, deadline=None)
@given(op=st.sampled_from(MAIN_OPS),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       axis_seed=st.integers(0, 7),
       alpha=st.floats(0.05, 0.9),
       dynamic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_shapes_and_attributes(op, shape, axis_seed, alpha, dynamic, seed):
    rng = np.random.default_rng(seed)
    rank = len(shape)
    attrs, opset = {}, 18
    if op in ("Softmax", "LogSoftmax"):
        attrs["axis"] = axis_seed % (2 * rank) - rank
    elif op == "Gelu":
        attrs["approximate"], opset = ("tanh" if axis_seed % 2 else "none"), 20
    elif op in ("Elu", "LeakyRelu", "HardSigmoid"):
        attrs["alpha"] = alpha
    kinks = {"HardSwish": [-3.0, 3.0], "Elu": [0.0], "LeakyRelu": [0.0],
             "HardSigmoid": [-0.5 / alpha, 0.5 / alpha]}.get(op, [])
    x = _away(3 * rng.standard_normal(shape), kinks)
    dims = [None if dynamic else d for d in shape]
    model = make_model([helper.make_node(op, ["x"], ["y"], **attrs)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=opset)
    ours = check_gradients(model, {"x": x}, ["x"])
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    _assert_torch(ours, _torch_fn(op, attrs), {"x": x}, ["x"], _torch_rtol(op, attrs))


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_prelu_random_broadcasts(shape, data):
    # A slope shape that broadcasts to x: a suffix of x's shape with some dims set to 1.
    length = data.draw(st.integers(0, len(shape)))
    suffix = shape[len(shape) - length:]
    slope_shape = tuple(d if data.draw(st.booleans()) else 1 for d in suffix)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x = _away(rng.standard_normal(shape), [0.0])
    slope = rng.uniform(0.05, 0.6, slope_shape).astype(np.float32)
    dynamic = data.draw(st.booleans())
    ours = check_gradients(_prelu_model(tuple(shape), slope_shape, dynamic), {"x": x, "slope": slope}, ["x", "slope"])
    try:
        import torch
    except ImportError:
        return
    _assert_torch(ours, lambda x, slope: torch.where(x > 0, x, slope * x), {"x": x, "slope": slope}, ["x", "slope"])


def test_gelu_reference_values():
    # The exact derivative at a few points, independent of any framework: Phi(x) + x phi(x).
    x = np.array([[-2.0, -0.5, 0.0, 0.7, 3.0]], np.float32)
    ours = check_gradients(_unary_model("Gelu", x.shape, 20, False), {"x": x}, ["x"], seed=11)
    weights = np.random.default_rng(11).standard_normal(x.shape)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2)))
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(ours["x"], weights * (cdf + x * pdf), rtol=1e-12)
