"""Reconstruction's layer views (im2col equals ONNX Runtime's Conv) and the ``output`` criterion."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.passes import ReconstructPass, prune_channels
from graphprune.pruning import reconstruct as ridge
from graphprune.pruning.reconstruct import RidgeStats, choose_damp, conv_columns, conv_pads
from graphprune.runtime import make_session, run
from graphprune.testing.fixtures_cnn import mobilenet_v2


def _out(model, feed):
    session = make_session(model, threads=1)
    return run(session, feed)[session.get_outputs()[0].name]


@pytest.mark.parametrize("kernel, strides, dilations, pads, auto_pad, groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET", 1),
    ((3, 3), (2, 2), (1, 1), (0, 1, 1, 0), "NOTSET", 2),
    ((3, 2), (1, 2), (2, 1), (0, 0, 0, 0), "NOTSET", 1),
    ((3, 3), (2, 2), (1, 1), None, "SAME_UPPER", 4),
    ((3, 3), (2, 1), (1, 1), None, "SAME_LOWER", 1),
    ((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), "NOTSET", 1),
    ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0), "VALID", 2),
])
def test_conv_columns_times_weight_is_the_convolution(kernel, strides, dilations, pads, auto_pad, groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4 // groups) + kernel).astype(np.float32)
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations), group=groups)
    attrs.update(auto_pad=auto_pad) if auto_pad != "NOTSET" else attrs.update(pads=list(pads))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = _out(model, {"x": x})  # (N, O, H', W')
    explicit = conv_pads(x.shape[2:], kernel, strides, dilations, pads or [], auto_pad)
    cols = conv_columns(x, kernel, strides, dilations, explicit, groups)  # (G, N*P, Cg*k)
    per_group = w.reshape(groups, 8 // groups, -1).astype(np.float64)
    y = np.matmul(cols, per_group.transpose(0, 2, 1))  # (G, N*P, Og)
    n, _, *out = expected.shape
    y = y.reshape(groups, n, *out, 8 // groups)
    got = np.moveaxis(y, -1, 1).reshape(8, n, *out).swapaxes(0, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, strides, pads", [((3, 3), (2, 1), (1, 1, 1, 1)), ((1, 1), (1, 1), (0, 0, 0, 0))])
def test_conv_columns_at_positions_are_those_rows_of_the_full_columns(kernel, strides, pads):
    x = np.random.default_rng(3).standard_normal((3, 4, 7, 6))
    full = conv_columns(x, kernel, strides, (1, 1), pads, 2)  # (G, N*P, Cg*k)
    positions = np.array([0, 5, 9, 17])
    per_sample = full.shape[1] // 3
    expected = full.reshape(2, 3, per_sample, -1)[:, :, positions].reshape(2, -1, full.shape[2])
    np.testing.assert_array_equal(conv_columns(x, kernel, strides, (1, 1), pads, 2, positions), expected)


def test_wide_layers_choose_among_direct_solves_like_the_eigendecomposition(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 12))
    y = x @ rng.standard_normal((3, 12)).T + 0.3 * rng.standard_normal((400, 3))
    fit, held = RidgeStats(1, 12, 3, bias=True), RidgeStats(1, 12, 3, bias=True)
    fit.add(x[None, :300], y[None, :300])
    held.add(x[None, 300:], y[None, 300:])
    prior = np.zeros((1, 3, 13))
    by_eigh = choose_damp(fit, held, prior, ridge.WIDE_DAMPS)
    monkeypatch.setattr(ridge, "EIGH_MAX_DIM", 8)  # 13 columns are now "wide": one solve per damp
    by_solve = choose_damp(fit, held, prior)
    assert by_solve[0] == by_eigh[0] and by_solve[0] in ridge.WIDE_DAMPS
    np.testing.assert_allclose(by_solve[3], by_eigh[3], rtol=1e-8, atol=1e-10)
    assert by_solve[2] == pytest.approx(held.error(by_solve[3])) and by_solve[2] < by_solve[1]


def test_ridge_error_and_streaming_match_a_direct_solve():
    rng = np.random.default_rng(1)
    x, w_true = rng.standard_normal((300, 5)), rng.standard_normal((3, 5))
    y = x @ w_true.T + 0.1 * rng.standard_normal((300, 3))
    stats = RidgeStats(1, 5, 3, bias=False)
    for start in range(0, 300, 70):  # batches of unequal size sum to the same statistics
        stats.add(x[None, start:start + 70], y[None, start:start + 70])
    solution = stats.solve(np.zeros((1, 3, 5)), damp=0.0)[0]
    np.testing.assert_allclose(solution, np.linalg.lstsq(x, y, rcond=None)[0].T, rtol=1e-8, atol=1e-10)
    direct = np.sum((x @ solution.T - y) ** 2) / np.sum(y ** 2)
    assert stats.error(solution[None]) == pytest.approx(direct, rel=1e-8)
    candidates = stats.candidates(np.zeros((1, 3, 5)), [0.0, 1e6])
    np.testing.assert_allclose(candidates[0][0], solution, rtol=1e-6)
    assert np.abs(candidates[1]).max() < 1e-3  # a huge damp stays at the prior


@pytest.mark.slow  # 35 sequential rounds: ~3 s idle, 10 s on a loaded machine
def test_depthwise_separable_network_reconstructs_and_improves():
    model = mobilenet_v2(width=0.25, image=32, num_classes=10, dynamic_batch=True, seed=0)
    rng = np.random.default_rng(2)
    name = model.graph.input[0].name
    data = InputSet({name: rng.standard_normal((48, 3, 32, 32)).astype(np.float32)})
    held = {name: rng.standard_normal((16, 3, 32, 32)).astype(np.float32)}
    pruned = prune_channels(model, ratio=0.5)
    result = ReconstructPass(original=model, data=data)(pruned)
    assert result.modified and {e["op"] for e in result.stats["per_layer"]} >= {"Conv"}
    onnx.checker.check_model(result.model, full_check=True)
    ref = _out(model, held)
    err = lambda m: np.linalg.norm(_out(m, held) - ref) / np.linalg.norm(ref)  # noqa: E731
    assert err(result.model) < err(pruned)


def _matmul_ffn(hidden=12):
    """x[N, T, 8] -> MatMul -> Add(bias) -> Relu -> MatMul -> Add: the FFN shape of a transformer."""
    rng = np.random.default_rng(3)
    arrays = {"w1": rng.standard_normal((8, hidden)), "b1": rng.standard_normal(hidden),
              "w2": rng.standard_normal((hidden, 8)), "b2": rng.standard_normal(8)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmul_with_add_bias_is_refit_through_the_bias():
    model = _matmul_ffn()
    rng = np.random.default_rng(4)
    data = InputSet({"x": rng.standard_normal((64, 5, 8)).astype(np.float32)})
    held = {"x": rng.standard_normal((16, 5, 8)).astype(np.float32)}
    pruned = prune_channels(model, ratio=0.5)
    result = ReconstructPass(original=model, data=data)(pruned)
    assert [e["layer"] for e in result.stats["per_layer"]] == ["m2"]
    b2 = next(i for i in result.model.graph.initializer if i.name == "b2")
    assert not np.array_equal(numpy_helper.to_array(b2), numpy_helper.to_array(model.graph.initializer[3]))
    ref = _out(model, held)
    assert np.linalg.norm(_out(result.model, held) - ref) < np.linalg.norm(_out(pruned, held) - ref)


def test_output_criterion_drops_a_channel_that_never_fires():
    """Hidden unit 0 has the largest weights but its pre-activation is always negative (Relu: 0):
    l2 keeps it, the output error criterion removes it first."""
    model = _matmul_ffn(hidden=4)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w1[:, 0], b1[0] = 0.01, -100.0  # never fires on unit-scale inputs
    w2 = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w2[0] *= 50.0  # ... but has the largest weights of the group
    for i, value in ((0, w1), (1, b1), (2, w2)):
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, model.graph.initializer[i].name))
    data = InputSet({"x": np.random.default_rng(5).standard_normal((32, 5, 8)).astype(np.float32)})
    kept_columns = lambda m: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w1"))  # noqa: E731
    by_l2 = kept_columns(prune_channels(model, ratio=0.25, criterion="l2"))
    by_output = kept_columns(prune_channels(model, ratio=0.25, criterion="output", data=data))
    assert np.any(np.all(by_l2 == 0.01, axis=0))  # l2 kept the dead unit
    assert not np.any(np.all(by_output == 0.01, axis=0))  # the output criterion removed it
    with pytest.raises(UserError, match="needs calibration data"):
        prune_channels(model, ratio=0.25, criterion="output")
