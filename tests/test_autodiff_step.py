"""The training step (forward, loss, gradients, optimizer update in one ONNX model) against torch.optim."""

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper

from graphprune.autodiff.optimizers import OptimizerConfig
from graphprune.autodiff.session import StepSession
from graphprune.autodiff.step import build_training_step
from graphprune.errors import UserError
from tests.gradcheck import make_model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 5)).astype(np.float32)
B = RNG.standard_normal((5,)).astype(np.float32)
X = RNG.standard_normal((8, 4)).astype(np.float32)
Y = RNG.standard_normal((8, 5)).astype(np.float32)


def _regression(extra_nodes=(), weight_dtype=T.FLOAT):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]),
             *extra_nodes,
             helper.make_node("Sub", ["y", "t"], ["d"]), helper.make_node("Mul", ["d", "d"], ["s"]),
             helper.make_node("ReduceMean", ["s"], ["loss"], keepdims=0)]
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 4]), helper.make_tensor_value_info("t", T.FLOAT, ["batch", 5])]
    outputs = [helper.make_tensor_value_info("loss", T.FLOAT, []), helper.make_tensor_value_info("y", T.FLOAT, ["batch", 5])]
    inits = [helper.make_tensor("w", T.FLOAT, W.shape, W.ravel()), helper.make_tensor("b", T.FLOAT, B.shape, B.ravel())]
    return make_model(nodes, inputs, outputs, inits, opset=13)


CONFIGS = [
    OptimizerConfig("adamw"),
    OptimizerConfig("adamw", weight_decay=0.1),
    OptimizerConfig("adamw", clip_grad_norm=0.5),
    OptimizerConfig("sgd", momentum=0.0),
    OptimizerConfig("sgd", momentum=0.9, weight_decay=0.01),
    OptimizerConfig("sgd", momentum=0.9, nesterov=True, clip_grad_norm=1.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-wd{c.weight_decay}-clip{c.clip_grad_norm}-n{c.nesterov}")
def test_steps_match_torch_optimizers(config):
    torch = pytest.importorskip("torch")
    session = StepSession(build_training_step(_regression(), "loss", ["w", "b"], config), threads=1)
    tw, tb = torch.tensor(W, requires_grad=True), torch.tensor(B, requires_grad=True)
    if config.kind == "adamw":
        opt = torch.optim.AdamW([tw, tb], lr=0.01, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD([tw, tb], lr=0.01, momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=config.nesterov)
    for _ in range(6):
        loss, output = session.train_step({"x": X, "t": Y}, 0.01)
        opt.zero_grad()
        expected = ((torch.tensor(X) @ tw + tb - torch.tensor(Y)) ** 2).mean()
        expected.backward()
        if config.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_([tw, tb], config.clip_grad_norm)
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        assert output.shape == (8, 5)
    weights = session.weights()
    np.testing.assert_allclose(weights["w"], tw.detach().numpy(), atol=2e-6)
    np.testing.assert_allclose(weights["b"], tb.detach().numpy(), atol=2e-6)


def test_training_lowers_the_loss_at_any_batch_size_and_eval_does_not_update():
    session = StepSession(build_training_step(_regression(), "loss", ["w", "b"]))
    before = session.eval_step({"x": X, "t": Y})[0]
    assert session.eval_step({"x": X, "t": Y})[0] == before
    for size in (8, 3, 1, 8, 5) * 10:
        session.train_step({"x": X[:size], "t": Y[:size]}, 0.05)
    assert session.eval_step({"x": X, "t": Y})[0] < 0.5 * before


def test_non_finite_loss_discards_the_update():
    session = StepSession(build_training_step(_regression(), "loss", ["w", "b"]))
    before = session.weights()
    bad = X.copy()
    bad[0, 0] = np.inf
    loss, _ = session.train_step({"x": bad, "t": Y}, 0.01)
    assert not np.isfinite(loss)
    after = session.weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_weights_replaces_the_device_buffers():
    session = StepSession(build_training_step(_regression(), "loss", ["w", "b"]))
    start = session.weights()
    session.train_step({"x": X, "t": Y}, 0.1)
    session.load_weights(start)
    assert all(np.array_equal(start[k], v) for k, v in session.weights().items())


def test_steps_leave_the_callers_arrays_alone():
    step = build_training_step(_regression(), "loss", ["w", "b"])
    initial = {k: v.copy() for k, v in step.initial.items()}
    session = StepSession(step)
    saved = session.weights()
    kept = {k: v.copy() for k, v in saved.items()}
    session.load_weights(saved)
    for _ in range(3):  # the weights are double-buffered: two steps reach every buffer
        session.train_step({"x": X, "t": Y}, 0.1)
    assert all(np.array_equal(kept[k], saved[k]) for k in kept)
    assert all(np.array_equal(initial[k], step.initial[k]) for k in initial)
    assert not np.array_equal(session.weights()["w"], kept["w"])


def test_op_without_rule_is_refused_by_name():
    model = _regression()
    # y -> Det (no gradient rule) -> added back onto y: the loss depends on the Det node.
    model.graph.node.insert(2, helper.make_node("Det", ["y"], ["det"], name="the_det"))
    model.graph.node.insert(3, helper.make_node("Add", ["y", "det"], ["y2"]))
    model.graph.node[4].input[0] = "y2"
    with pytest.raises(UserError, match=r"^op Det \(node 'the_det'\) has no gradient rule"):
        build_training_step(model, "loss", ["w", "b"])


def test_non_float_weight_and_missing_loss_are_refused():
    model = _regression()
    model.graph.initializer.append(helper.make_tensor("steps", T.INT64, [1], [3]))
    with pytest.raises(UserError, match="'steps' has dtype int64"):
        build_training_step(model, "loss", ["w", "steps"])
    with pytest.raises(UserError, match="no output 'nope'"):
        build_training_step(model, "nope", ["w"])
    with pytest.raises(UserError, match="adamw or sgd"):
        build_training_step(model, "loss", ["w"], OptimizerConfig("lion"))


def test_flush_denormals_sets_ftz_daz_for_the_block_only():
    from graphprune.autodiff.fpenv import _libm, flush_denormals

    tiny = np.array([1e-40], np.float32)
    assert (tiny * np.float32(0.5))[0] != 0  # denormal arithmetic, as IEEE says
    with flush_denormals():
        inside = (tiny * np.float32(0.5))[0]
    after = (tiny * np.float32(0.5))[0]
    if _libm() is None:
        pytest.skip("flush-to-zero is only set on x86-64 glibc")
    assert inside == 0 and after != 0
