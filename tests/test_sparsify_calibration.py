"""Layer-input statistics: im2col rows reproduce the Conv, norms and Hessians match a direct computation."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.runtime import make_session, run
from graphprune.sparsity.calibration import collect_layer_inputs
from graphprune.sparsity.patches import from_weight_matrix, input_rows, layer_form, weight_matrix
from graphprune.sparsity.targets import find_weights


def _conv(cin, cout, kernel, spatial, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin // attrs.get("group", 1)) + kernel).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", cin] + spatial)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cin,cout,kernel,attrs", [
    (4, 6, (3, 3), dict(pads=[1, 1, 1, 1])),
    (4, 6, (3, 2), dict(strides=[2, 1], pads=[0, 1, 2, 0], dilations=[1, 2])),
    (6, 4, (3, 3), dict(group=2, auto_pad="SAME_UPPER", strides=[2, 2])),
    (4, 4, (3, 3), dict(group=4, auto_pad="SAME_LOWER")),
    (4, 6, (3,), dict(pads=[1, 0])),
])
def test_weight_matrix_times_input_rows_is_the_conv(cin, cout, kernel, attrs):
    spatial = [7, 6][:len(kernel)]
    model = _conv(cin, cout, kernel, spatial, **attrs)
    x = np.random.default_rng(1).standard_normal([2, cin] + spatial).astype(np.float32)
    y = run(make_session(model), {"x": x})["y"]
    w = numpy_helper.to_array(model.graph.initializer[0])
    form, reason = layer_form(model.graph.node[0], w.shape)
    assert reason is None
    mat = weight_matrix(w, form, 1)  # [g, Cout/g, K]
    rows = input_rows(x, form)       # [g, P, K]
    out = np.concatenate([rows[g] @ mat[g].T for g in range(form.groups)], axis=1)  # [P, Cout]
    expected = np.moveaxis(y, 1, -1).reshape(-1, cout)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(from_weight_matrix(mat, w.shape, form, 1), w)


def _mlp() -> onnx.ModelProto:
    """x[N,S,8] -> MatMul(8x6) and Gemm-free; MatMul sharing its input with a second one (Q/K-like)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("a_w", (8, 6)), ("b_w", (8, 5)), ("c_w", (6, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "a_w"], ["a"], name="a"),
             helper.make_node("MatMul", ["x", "b_w"], ["b"], name="b"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "c_w"], ["c"], name="c")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_norms_and_hessians_sum_every_row_of_every_batch():
    model = _mlp()
    x = np.random.default_rng(2).standard_normal((5, 4, 8)).astype(np.float32)
    targets, _ = find_weights(model)
    before = model.SerializeToString()
    stats = collect_layer_inputs(model, targets, InputSet({"x": x}), want=("norms", "hessian"), batch_size=2)
    assert model.SerializeToString() == before  # the extra outputs are removed again
    rows = x.reshape(-1, 8)
    np.testing.assert_allclose(stats["a_w"].sq_norms, (rows ** 2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(stats["a_w"].hessian[0], rows.T @ rows, rtol=1e-4, atol=1e-4)
    assert stats["a_w"].hessian is stats["b_w"].hessian  # one shared input, one set of sums
    hidden = np.maximum(rows @ numpy_helper.to_array(model.graph.initializer[0]), 0)
    np.testing.assert_allclose(stats["c_w"].hessian[0], hidden.T @ hidden, rtol=1e-4, atol=1e-3)
    assert stats["c_w"].rows == 20


def test_a_hessian_over_the_cap_is_skipped_with_the_reason_and_norms_stay():
    model = _mlp()
    x = np.ones((2, 4, 8), dtype=np.float32)
    targets, _ = find_weights(model)
    stats = collect_layer_inputs(model, targets, InputSet({"x": x}), want=("norms", "hessian"), max_hessian_bytes=200)
    assert stats["a_w"].hessian is None and "per-layer cap" in stats["a_w"].reason
    assert stats["c_w"].hessian is not None  # 6 x 6 floats fit
    assert stats["a_w"].sq_norms is not None


def test_unknown_statistic_and_empty_data_are_refused():
    model = _mlp()
    targets, _ = find_weights(model)
    with pytest.raises(UserError, match="unknown statistic"):
        collect_layer_inputs(model, targets, InputSet({"x": np.ones((1, 4, 8), np.float32)}), want=("mean",))
    with pytest.raises(UserError, match="needs samples"):
        collect_layer_inputs(model, targets, InputSet({"x": np.ones((0, 4, 8), np.float32)}))
