"""The step model's linear layers as 2-D Gemms, with exact GELU's scalings moved into them (linear_gemm).

Checked for what the rewrite removes (the bias Adds, GELU's Div and final Mul), for the forward it
computes (the exported graph's outputs), for its gradients (finite differences in float64) and for
the training step it gives (the step without the rewrite, to float32 rounding).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import graphprune.autodiff.step as step_module
from graphprune.autodiff.gradient import forward_facts
from graphprune.autodiff.linear_gemm import linear_layers_as_gemm
from graphprune.autodiff.session import StepSession
from graphprune.autodiff.step import build_training_step
from tests.gradcheck import check_gradients, make_model, reference_evaluator

RNG = np.random.default_rng(7)
HIDDEN, FFN = 4, 6


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _ffn(order: str = "xe_h", divide: bool = True, x_read_elsewhere: bool = False) -> onnx.ModelProto:
    """x [n, s, 4] -> MatMul + bias -> exported exact GELU -> MatMul + bias -> mean of squares."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"])]
    nodes.append(helper.make_node("Div", ["h", "root2"], ["u"]) if divide else
                 helper.make_node("Mul", ["inv_root2", "h"], ["u"]))
    nodes += [helper.make_node("Erf", ["u"], ["r"]), helper.make_node("Add", ["r", "one"], ["e"])]
    if order == "xe_h":
        nodes += [helper.make_node("Mul", ["h", "e"], ["p"]), helper.make_node("Mul", ["p", "half"], ["g"])]
    elif order == "xh_e":
        nodes += [helper.make_node("Mul", ["h", "half"], ["p"]), helper.make_node("Mul", ["p", "e"], ["g"])]
    else:  # no final scaling
        nodes += [helper.make_node("Mul", ["h", "e"], ["g"])]
    nodes += [helper.make_node("MatMul", ["g", "w2"], ["m2"]), helper.make_node("Add", ["b2", "m2"], ["y"])]
    if x_read_elsewhere:  # the pre-activation also feeds the output: it must still be computed
        nodes.append(helper.make_node("ReduceSum", ["h"], ["hs"], keepdims=0))
        nodes.append(helper.make_node("Add", ["y", "hs"], ["y2"]))
    last = "y2" if x_read_elsewhere else "y"
    nodes += [helper.make_node("Mul", [last, last], ["sq"]),
              helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0)]
    inits = [_const("w1", RNG.standard_normal((HIDDEN, FFN))), _const("b1", RNG.standard_normal(FFN)),
             _const("w2", RNG.standard_normal((FFN, HIDDEN))), _const("b2", RNG.standard_normal(HIDDEN)),
             _const("root2", math.sqrt(2.0)), _const("inv_root2", 1 / math.sqrt(2.0)), _const("one", 1.0),
             _const("half", 0.5)]
    return make_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", "s", HIDDEN])],
                      [helper.make_tensor_value_info("loss", T.FLOAT, [])], inits)


def _rewritten(model: onnx.ModelProto) -> "tuple[onnx.ModelProto, int]":
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, linear_layers_as_gemm(copy, {}, forward_facts(copy))


def _alphas(model: onnx.ModelProto):
    return [helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Gemm"
            for a in n.attribute if a.name == "alpha"]


@pytest.mark.parametrize("order, divide", [("xe_h", True), ("xh_e", True), ("none", False)])
def test_gelu_scalings_move_into_the_gemms_with_exact_values_and_gradients(order, divide):
    model = _ffn(order, divide)
    rewritten, count = _rewritten(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert count == 2 and ops.count("Gemm") == 2 and "Div" not in ops and "MatMul" not in ops
    # Left between the Gemms: Erf, its Add, u * E (and the loss's Mul); the bias / c is a Mul on a vector.
    assert ops.count("Mul") == 3 and ops.count("Add") == 1
    h = 0.5 if order != "none" else 1.0
    assert _alphas(rewritten) == pytest.approx([1 / math.sqrt(2.0), math.sqrt(2.0) * h])
    x = RNG.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    before = reference_evaluator(model).run(None, {"x": x})[0]
    after = reference_evaluator(rewritten).run(None, {"x": x})[0]
    assert after == pytest.approx(before, rel=1e-5)
    check_gradients(rewritten, {"x": x}, ["x", "w1", "b1", "w2", "b2"])


def test_linear_layers_without_gelu_keep_their_bias_in_the_gemm_and_a_read_pre_activation_stays():
    model = _ffn(x_read_elsewhere=True)
    rewritten, count = _rewritten(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert count == 2 and "Div" in ops  # GELU kept whole: its input is read by the ReduceSum too
    assert _alphas(rewritten) == [1.0, 1.0]
    assert all(len(n.input) == 3 for n in rewritten.graph.node if n.op_type == "Gemm")  # bias in C
    x = RNG.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    assert reference_evaluator(rewritten).run(None, {"x": x})[0] == pytest.approx(
        reference_evaluator(model).run(None, {"x": x})[0], rel=1e-5)
    check_gradients(rewritten, {"x": x}, ["x", "w1", "b2"])


def test_matmul_of_two_activations_or_an_unknown_rank_is_left_alone():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["c"]), helper.make_node("ReduceSum", ["c"], ["loss"], keepdims=0)]
    model = make_model(nodes, [helper.make_tensor_value_info("a", T.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("b", T.FLOAT, [3, 4])],
                       [helper.make_tensor_value_info("loss", T.FLOAT, [])])
    assert _rewritten(model)[1] == 0


def test_training_step_with_the_rewrite_matches_the_step_without_it(monkeypatch):
    model = _ffn("xh_e")
    trainable = ["w1", "b1", "w2", "b2"]
    with_rewrite = build_training_step(model, "loss", trainable)
    assert any(n.op_type == "Gemm" and n.name.startswith("graphprune.step/gemm/")
               for n in with_rewrite.step_model.graph.node)
    monkeypatch.setattr(step_module, "linear_layers_as_gemm", lambda *args: 0)
    without = build_training_step(model, "loss", trainable)
    assert not any(n.name.startswith("graphprune.step/gemm/") for n in without.step_model.graph.node)
    x = RNG.standard_normal((3, 5, HIDDEN)).astype(np.float32)
    sessions = [StepSession(step, threads=1) for step in (with_rewrite, without)]
    for _ in range(3):
        losses = [session.train_step({"x": x}, 0.01)[0] for session in sessions]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    got, expected = (session.weights() for session in sessions)
    for name in trainable:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
