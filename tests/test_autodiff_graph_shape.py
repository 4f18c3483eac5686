"""The training-step graph's economies: folded scalings, the GELU pattern, reused LayerNorm statistics,
broadcast-free attention gradients, optimizer outputs written in place, kept IO bindings.

Each economy is checked for what it removes (structure) and for unchanged numbers (finite
differences in float64 via ``check_gradients``, or the same steps as without it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from graphprune.autodiff.composites import find_gelu_patterns
from graphprune.autodiff.gradient import build_gradients, forward_facts
from graphprune.autodiff.session import StepSession
from graphprune.autodiff.simplify import fold_constant_scalings
from graphprune.autodiff.step import build_training_step
from tests.gradcheck import check_gradients, make_model

RNG = np.random.default_rng(3)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


# ----- folded scalings -----------------------------------------------------------------------------
def test_a_chain_of_constant_scalings_becomes_one_mul():
    nodes = [helper.make_node("Mul", ["t", "a"], ["m"]), helper.make_node("Div", ["m", "b"], ["y"])]
    folded, inits = fold_constant_scalings(nodes, [_const("a", 3.0), _const("b", 2.0)], keep=["y"])
    assert [(n.op_type, n.input[0], n.output[0]) for n in folded] == [("Mul", "t", "y")]
    product = {i.name: numpy_helper.to_array(i) for i in inits}[folded[0].input[1]]
    assert product == pytest.approx(1.5)


def test_scalings_read_elsewhere_or_kept_are_not_folded():
    shared = [helper.make_node("Mul", ["t", "a"], ["m"]), helper.make_node("Mul", ["m", "b"], ["y"]),
              helper.make_node("Add", ["m", "y"], ["z"])]
    inits = [_const("a", 3.0), _const("b", 2.0)]
    assert [n.op_type for n in fold_constant_scalings(shared, inits, keep=["z"])[0]] == ["Mul", "Mul", "Add"]
    kept = shared[:2]
    assert len(fold_constant_scalings(kept, inits, keep=["m", "y"])[0]) == 2
    not_scalar = [helper.make_node("Mul", ["t", "v"], ["m"]), helper.make_node("Mul", ["m", "b"], ["y"])]
    assert len(fold_constant_scalings(not_scalar, [_const("v", [1.0, 2.0]), _const("b", 2.0)], keep=["y"])[0]) == 2


# ----- exact GELU as one pattern --------------------------------------------------------------------
def _gelu_model(order: str, extra_reader: bool = False):
    """``y = x * (erf(x / sqrt 2) + 1) * 0.5`` as exporters write it (two orders of the final Muls)."""
    nodes = [helper.make_node("Div", ["x", "root2"], ["u"]), helper.make_node("Erf", ["u"], ["r"]),
             helper.make_node("Add", ["r", "one"], ["e"])]
    if order == "xe_h":
        nodes += [helper.make_node("Mul", ["x", "e"], ["p"]), helper.make_node("Mul", ["p", "half"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "half"], ["p"]), helper.make_node("Mul", ["p", "e"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, None)]
    if extra_reader:  # E read elsewhere: the pattern must not claim it
        nodes.append(helper.make_node("Mul", ["e", "e"], ["e2"]))
        outputs.append(helper.make_tensor_value_info("e2", T.FLOAT, None))
    inits = [_const("root2", math.sqrt(2.0)), _const("one", 1.0), _const("half", 0.5)]
    return make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [3, 5])], outputs, inits)


@pytest.mark.parametrize("order", ["xe_h", "xh_e"])
def test_exported_gelu_is_one_pattern_with_exact_gradients(order):
    model = _gelu_model(order)
    assert len(find_gelu_patterns(model, forward_facts(model).constants)) == 1
    ops = [n.op_type for n in build_gradients(model, "y", ["x"]).nodes]
    assert "Neg" not in ops and ops.count("Exp") == 1 and ops.count("Mul") == 4  # seed is Expand, not Mul
    x = RNG.standard_normal((3, 5)).astype(np.float32) * 2
    check_gradients(model, {"x": x}, ["x"])


def test_gelu_whose_inner_tensor_is_read_elsewhere_uses_the_per_op_rules():
    model = _gelu_model("xe_h", extra_reader=True)
    assert find_gelu_patterns(model, forward_facts(model).constants) == {}
    check_gradients(model, {"x": RNG.standard_normal((3, 5)).astype(np.float32)}, ["x"])


# ----- attention MatMul, LayerNorm statistics, optimizer outputs -------------------------------------
def test_batched_matmul_with_shared_symbolic_dims_needs_no_runtime_reduction():
    dims = ["batch", 2, "seq", 4]
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                       [helper.make_tensor_value_info("a", T.FLOAT, dims),
                        helper.make_tensor_value_info("b", T.FLOAT, ["batch", 2, 4, "seq"])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)])
    ops = {n.op_type for n in build_gradients(model, "y", ["a", "b"]).nodes}
    assert not ops & {"NonZero", "ReduceSum"}
    feeds = {"a": RNG.standard_normal((2, 2, 3, 4)).astype(np.float32),
             "b": RNG.standard_normal((2, 2, 4, 3)).astype(np.float32)}
    check_gradients(model, feeds, ["a", "b"])


def test_product_of_transposed_views_transposes_its_gradient_not_its_operands():
    # Attention's scores: both operands are Transposes of [batch, seq, heads, d] projections.
    model = make_model([helper.make_node("Transpose", ["q"], ["a"], perm=[0, 2, 1, 3]),
                        helper.make_node("Transpose", ["k"], ["b"], perm=[0, 2, 3, 1]),
                        helper.make_node("MatMul", ["a", "b"], ["y"])],
                       [helper.make_tensor_value_info("q", T.FLOAT, ["batch", "seq", 2, 4]),
                        helper.make_tensor_value_info("k", T.FLOAT, ["batch", "seq", 2, 4])],
                       [helper.make_tensor_value_info("y", T.FLOAT, None)])
    nodes = build_gradients(model, "y", ["q", "k"]).nodes
    assert not any(n.op_type == "Transpose" and n.input[0] in ("a", "b") for n in nodes)
    feeds = {name: RNG.standard_normal((2, 3, 2, 4)).astype(np.float32) for name in ("q", "k")}
    check_gradients(model, feeds, ["q", "k"])


def _layer_norm_conv_model():
    """x -> Conv(1x1 weight [4, 3, 1, 1]) -> flatten -> LayerNormalization -> squared-sum loss."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("LayerNormalization", ["f", "s", "bias"], ["n"], axis=-1),
             helper.make_node("Mul", ["n", "n"], ["q"]), helper.make_node("ReduceMean", ["q"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "s"),
             numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "bias")]
    return make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", 3, 2, 2])],
                      [helper.make_tensor_value_info("loss", T.FLOAT, [])], inits)


def test_step_reuses_layer_norm_statistics_and_writes_weights_in_their_shape():
    step = build_training_step(_layer_norm_conv_model(), "loss", ["w", "s", "bias"])
    graph = step.step_model.graph
    norm = next(n for n in graph.node if n.op_type == "LayerNormalization")
    assert len(norm.output) == 3 and all(norm.output)
    # Statistics are read, not recomputed from the input; mean(g s xhat) is a MatMul: one ReduceMean left.
    assert not any(n.op_type == "ReduceMean" and "f" in n.input for n in graph.node)
    assert sum(n.op_type == "ReduceMean" and "LayerNormalization" in n.name for n in graph.node) == 1
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert {producers[step.updates[name]] for name in step.weights} == {"Sub"}  # no Reshape copy
    eval_norm = next(n for n in step.eval_model.graph.node if n.op_type == "LayerNormalization")
    assert len(eval_norm.output) == 1  # the eval model is the forward as it was


def test_kept_bindings_follow_swaps_and_reloaded_weights():
    step = build_training_step(_layer_norm_conv_model(), "loss", ["w", "s", "bias"])
    x = RNG.standard_normal((5, 3, 2, 2)).astype(np.float32)
    first, second = StepSession(step, threads=1), StepSession(step, threads=1)
    losses = [first.train_step({"x": x[: 5 - i % 2]}, 0.01)[0] for i in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    second.load_weights(first.weights())  # same weights, fresh optimizer state: same first loss
    assert second.train_step({"x": x}, 0.01)[0] == pytest.approx(first.eval_step({"x": x})[0], rel=1e-6)
    first.load_weights(second.weights())
    assert first.eval_step({"x": x})[0] == pytest.approx(second.eval_step({"x": x})[0], rel=1e-6)


# ----- the loss graph ------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, expected", [("batch", "batch"), (4, "graphprune_batch")])
def test_loss_targets_share_a_symbolic_batch_dim_so_the_loss_needs_no_runtime_reduction(batch, expected):
    from graphprune.training.losses import LOSS_NAME, LossSpec, add_loss_graph

    inits = [numpy_helper.from_array(RNG.standard_normal((3, 5)).astype(np.float32), "w")]
    output = helper.make_tensor_value_info("logits", T.FLOAT, [batch, 5])
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["logits"])],
                       [helper.make_tensor_value_info("x", T.FLOAT, [batch, 3])], [output], inits)
    add_loss_graph(model.graph, LossSpec("logits", "ce", None, 0.0, 1.0), output, 17)
    targets = next(vi for vi in model.graph.input if vi.name == "graphprune.train/targets")
    assert targets.type.tensor_type.shape.dim[0].dim_param == expected
    ops = [n.op_type for n in build_gradients(model, LOSS_NAME, ["w"]).nodes]
    assert "NonZero" not in ops  # no run-time broadcast reduction (a renamed symbolic batch needed one)
    x, labels = RNG.standard_normal((4, 3)).astype(np.float32), np.eye(5, dtype=np.float32)[[0, 2, 1, 4]]
    check_gradients(model, {"x": x, "graphprune.train/targets": labels}, ["w"])
