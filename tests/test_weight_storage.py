"""weight_storage.compact: float16 constants, default attributes, duplicates, names of folded nodes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphprune.model_io import check_model
from graphprune.quantization.weight_storage import compact


def _storage_model(bias_values=None, extra_inits=()):
    """x -> Conv(int8 weight as Cast + Mul, float32 bias) -> Clip(two equal scalars... ) -> y."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (32, 4, 3, 3)).astype(np.int8)
    scale = (rng.random((32, 1, 1, 1)) / 100 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32) if bias_values is None else bias_values
    inits = [numpy_helper.from_array(q, "w_q8"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(bias, "b"), numpy_helper.from_array(np.float32(0), "lo"),
             numpy_helper.from_array(np.float32(0), "lo_again"), numpy_helper.from_array(np.float32(6), "hi"),
             *extra_inits]
    nodes = [helper.make_node("Cast", ["w_q8"], ["w_q8f"], name="w_Cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["w_q8f", "w_scale"], ["w"], name="w_Dequantize"),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", strides=[1, 1], dilations=[1, 1],
                              group=1, pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
             helper.make_node("Clip", ["r", "lo_again", "hi"], ["y"], name="clip2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _session(model, optimized=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_compact_stores_float16_merges_and_drops_defaults(tmp_path):
    before = _storage_model()
    after = onnx.ModelProto()
    after.CopyFrom(before)
    stats = compact(after)
    check_model(after, full=True)
    assert stats == {"float16_constants": 2, "merged_constants": 1, "default_attributes": 3,
                     "unnamed_constant_nodes": 2, "renamed_transients": 3}
    inits = {t.name: t for t in after.graph.initializer}
    # stored tensors keep their names, in float16; the 4-byte scalars are too small to pay for a Cast
    assert inits["b"].data_type == inits["w_scale"].data_type == TensorProto.FLOAT16
    assert inits["w_q8"].data_type == TensorProto.INT8 and inits["hi"].data_type == TensorProto.FLOAT
    assert "lo_again" not in inits
    expected = [("Cast", "", ["w_q8"], ["~0"]), ("Cast", "", ["w_scale"], ["~1"]), ("Mul", "", ["~0", "~1"], ["w"]),
                ("Cast", "", ["b"], ["~2"]), ("Conv", "conv", ["x", "w", "~2"], ["c"]),
                ("Clip", "clip", ["c", "lo", "hi"], ["r"]), ("Clip", "clip2", ["r", "lo", "hi"], ["y"])]
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in after.graph.node] == expected
    assert [a.name for a in after.graph.node[4].attribute] == ["pads"]  # strides, dilations, group: defaults
    x = {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    want, got = _session(before).run(None, x)[0], _session(after).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())  # float16 rounding: 2^-11
    assert not np.array_equal(got, want)
    # ORT folds every Cast and Mul at load: it runs the graph it ran before
    paths = [str(tmp_path / f"{k}.opt.onnx") for k in ("before", "after")]
    _session(before, paths[0]), _session(after, paths[1])
    ops = [[n.op_type for n in onnx.load(p).graph.node] for p in paths]
    assert ops[0] == ops[1] and "Cast" not in ops[1]


def test_compact_leaves_a_model_with_nothing_to_trim_unchanged():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")  # 8 values: a Cast costs more than float16 saves
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    before = model.SerializeToString()
    assert set(compact(model).values()) == {0}
    assert model.SerializeToString() == before


@pytest.mark.parametrize("values, why", [
    (np.full(32, 1e6, np.float32), "overflows float16"),
    (np.linspace(1e-7, 3e-7, 32).astype(np.float32), "subnormal float16: steps of 6e-8"),
])
def test_float16_refused_where_it_rounds_too_much(values, why):
    model = _storage_model(bias_values=values)
    compact(model)
    bias = next(t for t in model.graph.initializer if t.name == "b")
    assert bias.data_type == TensorProto.FLOAT, why
    assert np.array_equal(numpy_helper.to_array(bias), values)


def test_graph_inputs_and_outputs_keep_their_tensors():
    model = _storage_model()
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [32]))  # overridable bias
    compact(model)
    bias = next(t for t in model.graph.initializer if t.name == "b")
    assert bias.data_type == TensorProto.FLOAT and model.graph.node[3].input[2] == "b"
    assert model.graph.node[3].input[1] == "w"  # a weight a layer reads keeps its name


def test_a_graph_with_subgraphs_keeps_its_tensors_and_names():
    """An If branch reads the bias by name: retyping or renaming it would break the branch."""
    model = _storage_model()
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["bo"])], "branch", [],
                               [helper.make_tensor_value_info("bo", TensorProto.FLOAT, [32])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["b_out"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [32]))
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    stats = compact(model)
    assert stats["default_attributes"] == 3 and sum(stats.values()) == 3
    assert {t.name: t.SerializeToString() for t in model.graph.initializer} == before
    check_model(model, full=True)


@settings(max_examples=12, deadline=None)
@given(channels=st.integers(4, 40), inputs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_compact_keeps_outputs_and_the_runtime_graph(channels, inputs, seed):
    """Random widths and bias magnitudes: the checker passes, the model does not grow, outputs agree
    within float16 rounding (the graph ORT runs is compared in the first test)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (channels, inputs, 3, 3)).astype(np.int8)
    scale = (rng.random((channels, 1, 1, 1)) / 50 + 1e-4).astype(np.float32)
    bias = (rng.standard_normal(channels) * 10 ** rng.uniform(-3, 2)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["q"], ["qf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["qf", "s"], ["w"], name="dq"),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=1, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    after = onnx.ModelProto()
    after.CopyFrom(before)
    compact(after)
    check_model(after, full=True)
    assert after.ByteSize() <= before.ByteSize()
    x = {"x": rng.standard_normal((1, inputs, 6, 6)).astype(np.float32)}
    want, got = _session(before).run(None, x)[0], _session(after).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
