"""Gradient rules of normalization and reduction ops against finite differences and torch.

Every case checks graphprune's gradient graph against central finite differences in float64 and in
onnxruntime float32 (``check_gradients``), and against torch autograd of the same function written
with torch ops (float64, ``|ours - torch| <= 1e-7 |torch| + 1e-10``).  Models have static and
symbolic dims; reductions take their axes as attribute (opset 13/17) and as input (opset 18+).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graphprune.errors import UserError
from tests.gradcheck import (check_gradients, graph_gradients, loss_model, make_model, reference_evaluator,
                             to_double, torch_gradients)


def _info(name, shape, dynamic=False):
    """A float input; with ``dynamic`` every dim but the channel dim (1) is symbolic."""
    dims = None if shape is None else [None if dynamic and i != 1 else d for i, d in enumerate(shape)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _model(node, inputs, opset, initializers=()):
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output if o]
    return make_model([node], inputs, outputs, initializers, opset=opset)


def _assert_torch(ours, fn, feeds, wrt, rtol=1e-7):
    reference = torch_gradients(fn, feeds, wrt)
    for name in wrt:
        np.testing.assert_allclose(ours[name], reference[name], rtol=rtol, atol=1e-10, err_msg=name)


def _torch():
    return pytest.importorskip("torch")


def _f32(value: float) -> float:
    """An attribute as ONNX stores it (float32), for the torch side."""
    return float(np.float32(value))


def _standardized(x, axes, eps):
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    return (x - mean) / (var + eps).sqrt(), mean, 1 / (var + eps).sqrt()


def _per_channel(t, rank):
    return t.reshape([-1] + [1] * (rank - 2))


# ----- BatchNormalization -----------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (2, 3, 4, 4)], ids=str)
def test_batch_norm_inference(shape, dynamic):
    rng = np.random.default_rng(0)
    channels = shape[1]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32),
             "s": rng.standard_normal(channels).astype(np.float32),
             "b": rng.standard_normal(channels).astype(np.float32),
             "m": rng.standard_normal(channels).astype(np.float32),
             "v": rng.uniform(0.5, 2.0, channels).astype(np.float32)}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)
    inputs = [_info("x", shape, dynamic)] + [_info(k, (channels,)) for k in "sbmv"]
    wrt = ["x", "s", "b", "m", "v"]
    ours = check_gradients(_model(node, inputs, 15), feeds, wrt)
    _torch()
    eps = _f32(1e-3)
    rank = len(shape)
    _assert_torch(ours, lambda x, s, b, m, v: (x - _per_channel(m, rank)) / _per_channel((v + eps).sqrt(), rank)
                  * _per_channel(s, rank) + _per_channel(b, rank), feeds, wrt)


def test_batch_norm_inference_initializers_only_some_wanted():
    # Scale and bias are weights, the running statistics constants: only what is asked is built.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [3], v) for k, v in
             {"s": rng.standard_normal(3), "b": rng.standard_normal(3), "m": rng.standard_normal(3),
              "v": rng.uniform(0.5, 2, 3)}.items()]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    check_gradients(_model(node, [_info("x", x.shape, True)], 15, inits), {"x": x}, ["s", "b"])


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 3, 4)], ids=str)
def test_batch_norm_training_mode(shape):
    # Batch statistics: the gradient couples the samples of a batch (as torch's train mode does).
    rng = np.random.default_rng(2)
    channels = shape[1]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "s": rng.standard_normal(channels).astype(np.float32),
             "b": rng.standard_normal(channels).astype(np.float32)}
    inits = [helper.make_tensor("m", TensorProto.FLOAT, [channels], np.zeros(channels)),
             helper.make_tensor("v", TensorProto.FLOAT, [channels], np.ones(channels))]
    # Training mode has three outputs; the running statistics are state updates nothing differentiates.
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1,
                            epsilon=1e-2)
    inputs = [_info("x", shape, True), _info("s", (channels,)), _info("b", (channels,))]
    model = make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=15)
    ours = check_gradients(model, feeds, ["x", "s", "b"])
    torch = _torch()
    _assert_torch(ours, lambda x, s, b: torch.nn.functional.batch_norm(
        x, None, None, s, b, training=True, eps=_f32(1e-2)), feeds, ["x", "s", "b"])


def test_batch_norm_training_running_outputs_refused():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [3], np.ones(3)) for k in "sbmv"]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1)
    model = _model(node, [_info("x", x.shape)], 15, inits)
    with pytest.raises(UserError, match="BatchNormalization"):
        graph_gradients(loss_model(to_double(model), {"x": x.astype(np.float64)}), ["x"])


CHANNEL_NORMS = [("BatchNormalization", {}, 15), ("BatchNormalization", {"training_mode": 1}, 15),
                 ("InstanceNormalization", {}, 17), ("GroupNormalization", {"num_groups": 2}, 18),
                 ("GroupNormalization", {"num_groups": 2, "stash_type": 1}, 21)]


@pytest.mark.parametrize("shape", [(2, 4, 3), (2, 4, 2, 3)], ids=str)
@pytest.mark.parametrize("op, attrs, opset", CHANNEL_NORMS,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CHANNEL_NORMS])
def test_channel_norms_input_of_unknown_rank(op, attrs, opset, shape):
    # Shapes computed upstream can leave the rank unknown: the rules then work on an [N, C, -1] view.
    rng = np.random.default_rng(14)
    params = 2 if op == "GroupNormalization" and opset < 21 else 4
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "s": rng.standard_normal(params).astype(np.float32),
             "b": rng.standard_normal(params).astype(np.float32)}
    names, outputs, inits = ["x", "s", "b"], ["y"], []
    if op == "BatchNormalization":
        feeds.update(m=rng.standard_normal(4).astype(np.float32), v=rng.uniform(0.5, 2, 4).astype(np.float32))
        names += ["m", "v"]
        outputs += ["rm", "rv"] if attrs else []
    inputs = [_info("x", None)] + [_info(k, (feeds[k].size,)) for k in names[1:]]
    model = make_model([helper.make_node(op, names, outputs, **attrs)], inputs,
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=opset)
    wrt = names if op == "BatchNormalization" and not attrs else ["x", "s", "b"]
    unknown = check_gradients(model, feeds, wrt)
    # The same gradients as with the rank known.
    inputs[0] = _info("x", shape, True)
    known = check_gradients(make_model(model.graph.node, inputs, model.graph.output, opset=opset), feeds, wrt,
                            run_ort=False)
    for name in wrt:
        np.testing.assert_allclose(unknown[name], known[name], rtol=1e-12, atol=1e-14, err_msg=name)


# ----- LayerNormalization / RMSNormalization ---------------------------------------------------------

LAYER_NORM_CASES = [
    # (shape, axis, scale shape, with bias, with Mean/InvStdDev outputs)
    ((2, 3, 4), -1, (4,), True, False),
    ((2, 3, 4), -2, (3, 4), True, False),
    ((2, 3, 4), 1, (3, 4), False, False),
    ((2, 3, 4), 0, (2, 3, 4), True, False),
    ((2, 3, 4), -1, (4,), True, True),
    ((3, 5), -1, (5,), False, True),
    ((2, 3, 4), -2, (3, 1), True, False),  # a scale that broadcasts inside the normalized shape
]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape, axis, scale_shape, with_bias, with_stats", LAYER_NORM_CASES,
                         ids=[f"{c[0]}-axis{c[1]}-scale{c[2]}{'-bias' if c[3] else ''}{'-stats' if c[4] else ''}"
                              for c in LAYER_NORM_CASES])
def test_layer_norm(shape, axis, scale_shape, with_bias, with_stats, dynamic):
    rng = np.random.default_rng(4)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32),
             "s": rng.standard_normal(scale_shape).astype(np.float32)}
    inputs = [_info("x", shape, dynamic), _info("s", scale_shape)]
    if with_bias:
        feeds["b"] = rng.standard_normal(scale_shape).astype(np.float32)
        inputs.append(_info("b", scale_shape))
    outputs = ["y", "mean", "inv"] if with_stats else ["y"]
    node = helper.make_node("LayerNormalization", list(feeds), outputs, axis=axis, epsilon=1e-3)
    ours = check_gradients(_model(node, inputs, 17), feeds, list(feeds))
    _torch()
    axes = list(range(axis % len(shape), len(shape)))

    def layer_norm(x, s, b=None):
        xhat, mean, inv = _standardized(x, axes, _f32(1e-3))
        y = xhat * s + (b if b is not None else 0)
        return (y, mean, inv) if with_stats else y

    _assert_torch(ours, layer_norm, feeds, list(feeds))


def test_layer_norm_statistics_only():
    # Only InvStdDev reaches the loss: the gradient flows through the statistics alone.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean", "inv"])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [6], np.ones(6))]
    model = make_model([node, helper.make_node("Identity", ["inv"], ["out"])], [_info("x", x.shape, True)],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    ours = check_gradients(model, {"x": x}, ["x"])
    _torch()
    _assert_torch(ours, lambda x: _standardized(x, [1], _f32(1e-5))[2], {"x": x}, ["x"])


@pytest.mark.parametrize("shape, axis, scale_shape", [((2, 3, 8), -1, (8,)), ((2, 3, 4), 1, (3, 4)),
                                                      ((4, 5), -1, (1,))], ids=str)
def test_rms_norm(shape, axis, scale_shape):
    rng = np.random.default_rng(6)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32),
             "s": rng.standard_normal(scale_shape).astype(np.float32)}
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=axis, epsilon=1e-2)
    ours = check_gradients(_model(node, [_info("x", shape, True), _info("s", scale_shape)], 23), feeds, ["x", "s"])
    _torch()
    axes = list(range(axis % len(shape), len(shape)))
    _assert_torch(ours, lambda x, s: x / ((x * x).mean(dim=axes, keepdim=True) + _f32(1e-2)).sqrt() * s,
                  feeds, ["x", "s"])


# ----- Instance and group normalization -----------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 3, 4), (1, 2, 2, 3, 2)], ids=str)
def test_instance_norm(shape, dynamic):
    rng = np.random.default_rng(7)
    channels = shape[1]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "s": rng.standard_normal(channels).astype(np.float32),
             "b": rng.standard_normal(channels).astype(np.float32)}
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)
    inputs = [_info("x", shape, dynamic), _info("s", (channels,)), _info("b", (channels,))]
    ours = check_gradients(_model(node, inputs, 17), feeds, ["x", "s", "b"])
    torch = _torch()
    _assert_torch(ours, lambda x, s, b: torch.nn.functional.instance_norm(x, weight=s, bias=b, eps=_f32(1e-3)),
                  feeds, ["x", "s", "b"])


GROUP_NORM_CASES = [(18, 2, (2, 4, 3, 3)), (18, 1, (2, 4, 5)), (18, 4, (2, 4, 2, 2)),
                    (21, 2, (2, 4, 3, 3)), (21, 3, (2, 6, 5)), (21, 1, (1, 3, 2, 2, 2))]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("opset, groups, shape", GROUP_NORM_CASES,
                         ids=[f"opset{c[0]}-groups{c[1]}-{c[2]}" for c in GROUP_NORM_CASES])
def test_group_norm(opset, groups, shape, dynamic):
    # Opset 18-20: scale and bias per group; opset 21: per channel.
    rng = np.random.default_rng(8)
    params = groups if opset < 21 else shape[1]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "s": rng.standard_normal(params).astype(np.float32),
             "b": rng.standard_normal(params).astype(np.float32)}
    # stash_type written out so that the float64 check model stashes in float64 (``to_double`` retypes it).
    stash = {} if opset < 21 else {"stash_type": 1}
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-3, **stash)
    inputs = [_info("x", shape, dynamic), _info("s", (params,)), _info("b", (params,))]
    ours = check_gradients(_model(node, inputs, opset), feeds, ["x", "s", "b"])
    _torch()
    rank = len(shape)

    def group_norm(x, s, b):
        grouped = x.reshape(x.shape[0], groups, -1)
        xhat = _standardized(grouped, [2], _f32(1e-3))[0]
        if opset < 21:
            return (xhat * s[:, None] + b[:, None]).reshape(x.shape)
        return xhat.reshape(x.shape) * _per_channel(s, rank) + _per_channel(b, rank)

    _assert_torch(ours, group_norm, feeds, ["x", "s", "b"])


# ----- LRN, MeanVarianceNormalization, LpNormalization -----------------------------------------------

@pytest.mark.parametrize("size, alpha, beta, bias", [(1, 0.5, 0.75, 1.0), (3, 0.3, 0.6, 1.5), (5, 1e-2, 0.75, 2.0),
                                                     (2, 0.4, 0.7, 1.2), (4, 0.8, 1.1, 1.0)],
                         ids=["size1", "size3", "size5", "size2", "size4"])
def test_lrn(size, alpha, beta, bias):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 6, 3, 2)).astype(np.float32)
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)
    # onnxruntime's LRN kernel accepts odd sizes only: even sizes are checked in float64 alone.
    ours = check_gradients(_model(node, [_info("x", x.shape, True)], 17), {"x": x}, ["x"], run_ort=size % 2 == 1)
    torch = _torch()
    before, after = (size - 1) // 2, size // 2

    def lrn(x):
        padded = torch.nn.functional.pad(x * x, (0, 0, 0, 0, before, after))
        window = sum(padded[:, i: i + x.shape[1]] for i in range(size))
        return x / (_f32(bias) + _f32(alpha) / size * window) ** _f32(beta)

    _assert_torch(ours, lrn, {"x": x}, ["x"])
    if size % 2:
        _assert_torch(ours, lambda x: torch.nn.functional.local_response_norm(
            x, size, _f32(alpha), _f32(beta), _f32(bias)), {"x": x}, ["x"])


@pytest.mark.parametrize("axes", [None, [1], [2, 3], [-1], [0, 1, 2, 3]], ids=str)
def test_mean_variance_normalization(axes):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 4, 3)).astype(np.float32)
    attrs = {} if axes is None else {"axes": axes}
    node = helper.make_node("MeanVarianceNormalization", ["x"], ["y"], **attrs)
    ours = check_gradients(_model(node, [_info("x", x.shape, True)], 13), {"x": x}, ["x"])
    _torch()
    dims = [0, 2, 3] if axes is None else axes

    def mvn(x):
        centered = x - x.mean(dim=dims, keepdim=True)
        return centered / ((centered ** 2).mean(dim=dims, keepdim=True).sqrt() + 1e-9)

    _assert_torch(ours, mvn, {"x": x}, ["x"])


@pytest.mark.parametrize("p, axis, opset", [(2, -1, 17), (2, 1, 18), (2, 0, 17), (1, -1, 18), (1, 1, 17)], ids=str)
def test_lp_normalization(p, axis, opset):
    # (Opset 18 takes the norm's reduction axes as an input.)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    node = helper.make_node("LpNormalization", ["x"], ["y"], p=p, axis=axis)
    ours = check_gradients(_model(node, [_info("x", x.shape, True)], opset), {"x": x}, ["x"])
    torch = _torch()
    _assert_torch(ours, lambda x: torch.nn.functional.normalize(x, p=p, dim=axis, eps=0), {"x": x}, ["x"])


def test_lp_normalization_bad_p_refused():
    node = helper.make_node("LpNormalization", ["x"], ["y"], p=3)
    model = to_double(_model(node, [_info("x", (2, 3))], 17))
    model.graph.node.append(helper.make_node("ReduceSum", ["y"], ["check/loss"], keepdims=0))
    with pytest.raises(UserError, match="LpNormalization"):
        graph_gradients(model, ["x"])


@settings(max_examples=15, deadline=None)
@given(op=st.sampled_from(["LayerNormalization", "GroupNormalization", "InstanceNormalization",
                           "BatchNormalization"]),
       shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), data=st.data())
def test_normalization_random_shapes(op, shape, data):
    if op == "InstanceNormalization" and len(shape) < 3:
        shape = shape + [3]  # InstanceNormalization needs a spatial axis
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    rank, channels = len(shape), shape[1]
    epsilon = data.draw(st.sampled_from([1e-5, 1e-2, 0.5]))
    opset, attrs, param_shape, names, inits = 17, {"epsilon": epsilon}, (channels,), ["x", "s", "b"], []
    if op == "LayerNormalization":
        attrs["axis"] = data.draw(st.integers(-rank, rank - 1))
        param_shape = tuple(shape[attrs["axis"] % rank:])
    elif op == "GroupNormalization":
        groups = data.draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
        opset = data.draw(st.sampled_from([18, 21]))
        attrs.update(num_groups=groups, **({"stash_type": 1} if opset >= 21 else {}))
        param_shape = (groups if opset < 21 else channels,)
    elif op == "BatchNormalization":
        mean, var = rng.standard_normal(channels), rng.uniform(0.5, 2, channels)
        inits = [helper.make_tensor("m", TensorProto.FLOAT, [channels], mean),
                 helper.make_tensor("v", TensorProto.FLOAT, [channels], var)]
        names += ["m", "v"]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32),
             "s": rng.standard_normal(param_shape).astype(np.float32),
             "b": rng.standard_normal(param_shape).astype(np.float32)}
    node = helper.make_node(op, names, ["y"], **attrs)
    inputs = [_info("x", shape, data.draw(st.booleans())), _info("s", param_shape), _info("b", param_shape)]
    # Statistics over two elements make xhat = +-1 whatever x is: the gradient of x is then a float32
    # cancellation of O(1) terms, and finite differences of tiny variances need more room too.
    spatial = int(np.prod(shape[2:]))
    count = {"LayerNormalization": int(np.prod(shape[attrs.get("axis", 0) % rank:])),
             "GroupNormalization": channels // attrs.get("num_groups", 1) * spatial,
             "InstanceNormalization": spatial}.get(op, 3)
    ours = check_gradients(_model(node, inputs, opset, inits), feeds, ["x", "s", "b"], rtol=1e-4, atol=1e-6,
                           ort_rtol=2e-3 if count > 2 else 2e-2)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    eps = _f32(epsilon)

    def normalize(x, s, b):
        if op == "LayerNormalization":
            return _standardized(x, list(range(attrs["axis"] % rank, rank)), eps)[0] * s + b
        if op == "GroupNormalization":
            xhat = _standardized(x.reshape(x.shape[0], groups, -1), [2], eps)[0]
            if opset < 21:
                return (xhat * s[:, None] + b[:, None]).reshape(x.shape)
            return xhat.reshape(x.shape) * _per_channel(s, rank) + _per_channel(b, rank)
        if op == "InstanceNormalization":
            xhat = _standardized(x, list(range(2, rank)), eps)[0]
        else:
            xhat = (x - _per_channel(torch.tensor(np.float32(mean).astype(np.float64)), rank)) / _per_channel(
                torch.tensor(np.float32(var).astype(np.float64)) + eps, rank).sqrt()
        return xhat * _per_channel(s, rank) + _per_channel(b, rank)

    _assert_torch(ours, normalize, feeds, ["x", "s", "b"], rtol=1e-6)


# ----- Reductions ------------------------------------------------------------------------------

REDUCE_OPS = ["ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp",
              "ReduceLogSum", "ReduceProd", "ReduceSum", "ReduceMean"]


def _reduce_input(op: str, shape, rng) -> np.ndarray:
    x = rng.standard_normal(shape)
    if op in ("ReduceLogSum",):
        x = np.abs(x) + 0.2  # a positive sum
    elif op in ("ReduceL1", "ReduceProd"):
        x = np.sign(x) * (np.abs(x) + 0.3)  # away from 0, where |x| kinks and prod / x is undefined
    return x.astype(np.float32)


def _reduce_model(op, shape, axes, keepdims, opset, dynamic=False, noop=None):
    """``op`` over ``axes`` (None: attribute/input absent), as attribute before opset 18 (13 for
    ReduceSum) and as a constant input from then on."""
    attrs = {"keepdims": keepdims}
    if noop is not None:
        attrs["noop_with_empty_axes"] = noop
    inputs, inits = ["x"], []
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes is not None:
        if axes_as_input:
            inits.append(helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes))
            inputs.append("axes")
        else:
            attrs["axes"] = axes
    node = helper.make_node(op, inputs, ["y"], **attrs)
    return _model(node, [_info("x", shape, dynamic)], opset, inits)


def _torch_reduce(op, axes, keepdims, rank):
    import torch

    dims = list(range(rank)) if axes is None else [a % rank for a in axes]

    def fn(x):
        if op == "ReduceMax":
            y = torch.amax(x, dim=dims, keepdim=True)
        elif op == "ReduceMin":
            y = torch.amin(x, dim=dims, keepdim=True)
        elif op == "ReduceL1":
            y = x.abs().sum(dim=dims, keepdim=True)
        elif op == "ReduceL2":
            y = (x * x).sum(dim=dims, keepdim=True).sqrt()
        elif op == "ReduceSumSquare":
            y = (x * x).sum(dim=dims, keepdim=True)
        elif op == "ReduceLogSumExp":
            y = torch.logsumexp(x, dim=dims, keepdim=True)
        elif op == "ReduceLogSum":
            y = x.sum(dim=dims, keepdim=True).log()
        elif op == "ReduceProd":
            y = x
            for d in dims:
                y = y.prod(dim=d, keepdim=True)
        elif op == "ReduceSum":
            y = x.sum(dim=dims, keepdim=True)
        else:
            y = x.mean(dim=dims, keepdim=True)
        return y if keepdims else y.squeeze(tuple(dims)) if dims else y

    return fn


REDUCE_AXES = [([1], 1), ([0, -1], 0), (None, 0), (None, 1), ([-2], 0)]


@pytest.mark.parametrize("opset", [13, 18], ids=["opset13", "opset18"])
@pytest.mark.parametrize("axes, keepdims", REDUCE_AXES, ids=[f"axes{a}-keep{k}" for a, k in REDUCE_AXES])
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reductions(op, axes, keepdims, opset):
    rng = np.random.default_rng(12)
    shape = (2, 3, 4)
    x = _reduce_input(op, shape, rng)
    ours = check_gradients(_reduce_model(op, shape, axes, keepdims, opset, dynamic=opset == 18), {"x": x}, ["x"])
    _torch()
    _assert_torch(ours, _torch_reduce(op, axes, keepdims, len(shape)), {"x": x}, ["x"])


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reductions_noop_with_empty_axes(op):
    # noop_with_empty_axes=1 without axes: the op is elementwise (|x|, x^2, log x... or x itself).
    rng = np.random.default_rng(13)
    x = _reduce_input(op, (2, 3), rng)
    check_gradients(_reduce_model(op, x.shape, None, 1, 18, noop=1), {"x": x}, ["x"])
    # ... and with noop_with_empty_axes=0 the same node reduces every axis.
    check_gradients(_reduce_model(op, x.shape, None, 0, 18, dynamic=True, noop=0), {"x": x}, ["x"])


@pytest.mark.parametrize("op, reduce", [("ReduceMax", "amax"), ("ReduceMin", "amin")])
def test_reduce_max_min_ties_share_the_gradient(op, reduce):
    # Finite differences do not apply at ties; the rule splits the gradient equally, as torch does.
    torch = _torch()
    x = np.array([[1.0, 3.0, 3.0, -2.0], [-2.0, 0.5, -2.0, -2.0], [4.0, 4.0, 4.0, 4.0]], np.float32)
    model = _reduce_model(op, x.shape, [1], 0, 18, dynamic=True)
    lossy = loss_model(to_double(model), {"x": x.astype(np.float64)})
    ours = reference_evaluator(graph_gradients(lossy, ["x"])).run(None, {"x": x.astype(np.float64)})[1]
    reference = torch_gradients(lambda x: getattr(torch, reduce)(x, dim=1), {"x": x}, ["x"])["x"]
    np.testing.assert_allclose(ours, reference, rtol=1e-12)


def test_reduction_axes_computed_at_run_time_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    model = to_double(make_model([helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0),
                                  helper.make_node("ReduceSum", ["y"], ["check/loss"], keepdims=0)], [x, axes],
                                 [helper.make_tensor_value_info("check/loss", TensorProto.FLOAT, [])], opset=18))
    with pytest.raises(UserError, match="ReduceMax"):
        graph_gradients(model, ["x"])


@settings(max_examples=15, deadline=None)
@given(op=st.sampled_from(REDUCE_OPS), shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_reductions_random(op, shape, data):
    rank = len(shape)
    axes = data.draw(st.none() | st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank,
                                          unique_by=lambda a: a % rank))
    keepdims = data.draw(st.sampled_from([0, 1]))
    opset = data.draw(st.sampled_from([13, 17, 18, 20]))
    dynamic = data.draw(st.booleans())
    x = _reduce_input(op, shape, np.random.default_rng(data.draw(st.integers(0, 2**16))))
    if op == "ReduceProd":  # keep products of many factors well scaled
        x = (np.sign(x) * (0.7 + 0.6 * np.random.default_rng(0).random(shape))).astype(np.float32)
    ours = check_gradients(_reduce_model(op, tuple(shape), axes, keepdims, opset, dynamic), {"x": x}, ["x"])
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    _assert_torch(ours, _torch_reduce(op, axes, keepdims, rank), {"x": x}, ["x"])
