"""Positions the loss never reads are not computed: a constant-index Gather moved upstream (gather_pushdown).

Checked for where the Gather ends (which ops it crosses and where it must stop), for the values
(the exported graph's outputs), for the gradients (finite differences in float64) and, on a BERT
classifier, for the training step (the step without the rewrite).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import graphprune.autodiff.step as step_module
from graphprune.autodiff.gather_pushdown import gather_before_positionwise
from graphprune.autodiff.gradient import forward_facts
from graphprune.autodiff.optimizers import OptimizerConfig
from graphprune.autodiff.session import StepSession
from graphprune.autodiff.step import build_training_step
from graphprune.testing import bert_encoder
from graphprune.training.losses import LOSS_NAME, LossSpec, add_loss_graph
from tests.gradcheck import check_gradients, make_model, reference_evaluator

RNG = np.random.default_rng(11)


def _f(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _i(name, value):
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _pushed(model: onnx.ModelProto):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, gather_before_positionwise(copy, forward_facts(copy))


def _gather_inputs(model):
    return sorted(n.input[0] for n in model.graph.node if n.op_type == "Gather")


def _attention_block(reshape_shape=(0, 0, 2, 2), seq="s"):
    """x [n, s, 4] -> q, k, v heads -> softmax(q k^T) v -> merged -> LayerNorm(. + x) -> tanh -> [:, 0]."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q"]), n("MatMul", ["x", "wk"], ["k"]),
             n("Reshape", ["q", "heads"], ["q4"]), n("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
             n("Reshape", ["k", "heads"], ["k4"]), n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
             n("MatMul", ["qt", "kt"], ["scores"]), n("Softmax", ["scores"], ["p"], axis=-1),
             n("Reshape", ["x", "heads"], ["v4"]), n("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
             n("MatMul", ["p", "vt"], ["ctx"]), n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
             n("Reshape", ["ctx_t", "merge"], ["merged"]), n("Add", ["merged", "x"], ["res"]),
             n("LayerNormalization", ["res", "ln_s", "ln_b"], ["normed"], axis=-1),
             n("Tanh", ["normed"], ["act"]), n("Gather", ["act", "zero"], ["first"], axis=1),
             n("MatMul", ["first", "wo"], ["logits"])]
    inits = [_f("wq", (4, 4)), _f("wk", (4, 4)), _f("wo", (4, 3)), _f("ln_s", (4,)), _f("ln_b", (4,)),
             _i("heads", list(reshape_shape)), _i("merge", [0, 0, 4]), _i("zero", 0)]
    return make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", seq, 4])],
                      [helper.make_tensor_value_info("logits", T.FLOAT, ["n", 3])], inits)


def test_gather_moves_through_the_last_attention_block_and_stops_where_all_positions_are_read():
    model = _attention_block()
    pushed, moves = _pushed(model)
    assert moves >= 10
    ops = [n.op_type for n in pushed.graph.node]
    assert "Squeeze" in ops  # the scalar index's dropped axis
    # Gathers end on x (read whole by the key projection and the values) and on nothing computed later.
    assert set(_gather_inputs(pushed)) == {"x"}
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    expected = reference_evaluator(model).run(None, {"x": x})[0]
    assert reference_evaluator(pushed).run(None, {"x": x})[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    check_gradients(pushed, {"x": x}, ["x", "wq", "wk", "ln_s", "ln_b"])


def test_opset_12_scalar_index_squeezes_with_the_axes_attribute():
    nodes = [helper.make_node("Tanh", ["x"], ["a"]), helper.make_node("Gather", ["a", "zero"], ["y"], axis=1)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", "s", 4])],
                       [helper.make_tensor_value_info("y", T.FLOAT, ["n", 4])], [_i("zero", 0)], opset=12)
    pushed, moves = _pushed(model)
    assert moves == 1
    onnx.checker.check_model(pushed, full_check=True)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    assert reference_evaluator(pushed).run(None, {"x": x})[0] == pytest.approx(np.tanh(x[:, 0]), rel=1e-6)


def test_gather_stops_at_a_reshape_that_moves_the_axis_and_at_a_softmax_over_it():
    model = _attention_block(reshape_shape=(-1, 5, 2, 2), seq=5)  # the sequence axis not copied (0): stop there
    pushed, _ = _pushed(model)
    assert _gather_inputs(pushed) == ["q4", "x"]
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    assert reference_evaluator(pushed).run(None, {"x": x})[0] == pytest.approx(
        reference_evaluator(model).run(None, {"x": x})[0], rel=1e-5, abs=1e-6)
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=1),
             helper.make_node("Gather", ["p", "zero"], ["y"], axis=1)]
    over_axis = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", "s", 4])],
                           [helper.make_tensor_value_info("y", T.FLOAT, ["n", 4])], [_i("zero", 0)])
    assert _pushed(over_axis)[1] == 0


def test_broadcast_operands_are_read_whole_and_an_unknown_dim_blocks():
    nodes = [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
             helper.make_node("Gather", ["a", "rows"], ["y"], axis=1)]
    inits = [_f("scale", (1, 1, 4)), _f("bias", (4,)), _i("rows", [0, 2])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", "s", 4])],
                       [helper.make_tensor_value_info("y", T.FLOAT, ["n", 2, 4])], inits)
    pushed, moves = _pushed(model)
    assert moves == 2 and _gather_inputs(pushed) == ["x"] and "Squeeze" not in [n.op_type for n in pushed.graph.node]
    x = RNG.standard_normal((3, 4, 4)).astype(np.float32)
    assert reference_evaluator(pushed).run(None, {"x": x})[0] == pytest.approx(
        reference_evaluator(model).run(None, {"x": x})[0], rel=1e-6)
    other = make_model([helper.make_node("Add", ["x", "t"], ["a"]),
                        helper.make_node("Gather", ["a", "rows"], ["y"], axis=1)],
                       [helper.make_tensor_value_info("x", T.FLOAT, ["n", "s", 4]),
                        helper.make_tensor_value_info("t", T.FLOAT, ["n", "u", 4])],  # "u" may be 1: may broadcast
                       [helper.make_tensor_value_info("y", T.FLOAT, ["n", 2, 4])], [_i("rows", [0, 2])])
    assert _pushed(other)[1] == 0
    grid = make_model([helper.make_node("Tanh", ["x"], ["a"]), helper.make_node("Gather", ["a", "grid"], ["y"], axis=1)],
                      [helper.make_tensor_value_info("x", T.FLOAT, ["n", "s", 4])],
                      [helper.make_tensor_value_info("y", T.FLOAT, ["n", 1, 2, 4])], [_i("grid", [[0, 2]])])
    assert _pushed(grid)[1] == 0  # a 2-D index adds an axis: left where it is


def test_bert_classifier_step_with_the_rewrite_matches_the_step_without_it(monkeypatch):
    model = bert_encoder(layers=2, hidden=16, heads=2, ffn=32, vocab=50, max_positions=16)
    logits = model.graph.output[-1]
    add_loss_graph(model.graph, LossSpec(logits.name, "ce", None, 0.0, 1.0), logits, 17)
    trainable = [t.name for t in model.graph.initializer if "embeddings" not in t.name and t.data_type == T.FLOAT
                 and len(t.dims) >= 1 and t.name != "attention_scale"]
    # SGD: the key bias's true gradient is 0 (softmax ignores a shift shared by a row), and AdamW would
    # turn its rounding noise into lr-sized steps of random sign in both steps.
    sgd = OptimizerConfig("sgd", momentum=0.9)
    with_rewrite = build_training_step(model, LOSS_NAME, trainable, sgd)
    selected = [n for n in with_rewrite.step_model.graph.node if n.name.startswith("graphprune.step/select/")]
    assert any(n.op_type == "LayerNormalization" for n in selected)  # the last layer runs on one position
    monkeypatch.setattr(step_module, "gather_before_positionwise", lambda *args: 0)
    without = build_training_step(model, LOSS_NAME, trainable, sgd)
    feeds = {"input_ids": RNG.integers(0, 50, size=(3, 12)).astype(np.int64),
             "graphprune.train/targets": np.eye(2, dtype=np.float32)[[0, 1, 1]]}
    sessions = [StepSession(step, threads=1) for step in (with_rewrite, without)]
    for _ in range(3):
        losses = [session.train_step(feeds, 0.1)[0] for session in sessions]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    got, expected = (session.weights() for session in sessions)
    for name in with_rewrite.weights:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
