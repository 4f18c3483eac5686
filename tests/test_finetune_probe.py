"""The probe step of FineTunePass (training.probe): a weight whose own step overshoots is frozen, and
the others then train where training every weight made the loss worse."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.data import InputSet
from graphprune.passes import FineTunePass

# The first layer's output is multiplied by this before the second: an Adam step of lr on its
# weights moves the output ~GAIN * lr (the PP-OCRv3 recognizer's early stages after reconstruct).
_GAIN = 300.0


def _model(noise: float = 0.0):
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1.0 / (4 * _GAIN), (8, 16)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (16, 4)).astype(np.float32)
    if noise:
        w2 = (w2 + noise * np.random.default_rng(1).normal(0, 0.3, w2.shape)).astype(np.float32)
    w0 = (np.eye(8) + rng.normal(0, 0.05, (8, 8))).astype(np.float32)  # before w1: feeds the steep layer
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["x0"]),
             helper.make_node("MatMul", ["x0", "w1"], ["h"]),
             helper.make_node("Mul", ["h", "gain"], ["hg"]),
             helper.make_node("Tanh", ["hg"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w0, "w0"),
             numpy_helper.from_array(np.array(_GAIN, np.float32), "gain")]
    graph = helper.make_graph(nodes, "steep_first_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data():
    return InputSet({"x": np.random.default_rng(2).normal(0, 1, (160, 8)).astype(np.float32)})


@pytest.mark.parametrize("freeze,improves", [("auto", True), ("none", False)])
def test_prefix_through_the_overshooting_weight_is_frozen_and_the_rest_trains(freeze, improves):
    teacher, student = _model(), _model(noise=0.5)
    result = FineTunePass(data=_data(), teacher=teacher, epochs=2, batch_size=16, lr=1e-2, distill_loss="mse",
                          features="none", schedule="constant", freeze=freeze)(student)
    stats = result.stats
    # w0 does not overshoot alone but feeds w1: the prefix through w1 is frozen
    assert stats["frozen_weights"] == (["w0", "w1"] if freeze == "auto" else [])
    first = stats["history"][1]["val_loss"]
    if improves:
        assert first < 0.5 * stats["val_loss_before"]
        values = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
        np.testing.assert_array_equal(values["w1"], numpy_helper.to_array(student.graph.initializer[0]))
    else:  # every step of w1 overshoots: the loss rises and the pass keeps the input's weights
        assert first > stats["val_loss_before"] and stats["best_epoch"] == 0


def test_nothing_frozen_on_a_model_far_from_its_target():
    teacher, student = _model(), _model(noise=0.5)
    gain = next(i for i in student.graph.initializer if i.name == "gain")
    gain.CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), "gain"))
    result = FineTunePass(data=_data(), teacher=teacher, epochs=1, batch_size=16, lr=1e-2, distill_loss="mse",
                          features="none", freeze="auto")(student)
    assert result.stats["frozen_weights"] == []


def test_auto_by_default():
    result = FineTunePass(data=_data(), teacher=_model(), epochs=1, batch_size=16, lr=1e-2, distill_loss="mse",
                          features="none")(_model(noise=0.5))
    assert result.stats["frozen_weights"] == ["w0", "w1"]


def test_freeze_value_checked():
    from graphprune.errors import UserError

    with pytest.raises(UserError, match="freeze"):
        FineTunePass(data=_data(), teacher=_model(), freeze="all")


def test_named_weights_frozen():
    result = FineTunePass(data=_data(), teacher=_model(), epochs=1, batch_size=16, lr=1e-2, distill_loss="mse",
                          features="none", freeze=["w2"])(_model(noise=0.5))
    assert result.stats["frozen_weights"] == ["w2"]
    values = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    np.testing.assert_array_equal(values["w2"], numpy_helper.to_array(_model(noise=0.5).graph.initializer[1]))


def _split_model(gain: float, noise: float = 0.0, parts: int = 4, steep: float = 3.0):
    """The steep layer split into ``parts`` summed MatMuls, the first fed ``steep`` times the input:
    its step alone overshoots, each other part's stays below, their joint step crosses it."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1.0 / (4 * gain), (8, 16)).astype(np.float32) / parts
    w2 = rng.normal(0, 0.3, (16, 4)).astype(np.float32)
    if noise:
        w2 = (w2 + noise * np.random.default_rng(1).normal(0, 0.3, w2.shape)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "steep"], ["xs"]), helper.make_node("MatMul", ["xs", "w10"], ["h0"])]
    nodes += [helper.make_node("MatMul", ["x", f"w1{k}"], [f"h{k}"]) for k in range(1, parts)]
    nodes += [helper.make_node("Sum", [f"h{k}" for k in range(parts)], ["h"]),
              helper.make_node("Mul", ["h", "gain"], ["hg"]),
              helper.make_node("Tanh", ["hg"], ["t"]),
              helper.make_node("MatMul", ["t", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1 / (steep if k == 0 else 1), f"w1{k}") for k in range(parts)]
    inits += [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.array(gain, np.float32), "gain"),
              numpy_helper.from_array(np.array(steep, np.float32), "steep")]
    graph = helper.make_graph(nodes, "split_steep_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_joint_probe_finds_the_boundary_that_per_weight_probes_miss(monkeypatch):
    import sys

    from graphprune.training import probe

    module = sys.modules["graphprune.passes.finetune"]  # graphprune.passes.finetune is the wrapper
    seen = {}

    def spy(session, batches, lr, names=None):
        boundary = probe.freeze_boundary(session, batches, lr, names)
        # the same first step (Adam's bias-corrected step is the same on the same batch and weights)
        seen["per_weight"] = probe.overshooting_weights(session, batches[0], lr)
        return boundary

    monkeypatch.setattr(module, "freeze_boundary", spy)
    teacher, student = _split_model(5.0), _split_model(5.0, noise=0.5)
    runs = {freeze: FineTunePass(data=_data(), teacher=teacher, epochs=2, batch_size=16, lr=1e-2, distill_loss="mse",
                                 features="none", schedule="constant", freeze=freeze)(student).stats
            for freeze in ("auto", "none", ("w10",))}
    assert seen["per_weight"] == ["w10"]  # only the first part's own step raises the loss
    frozen = runs["auto"]["frozen_weights"]
    assert frozen[0] == "w10" and len(frozen) > 1 and set(frozen) < {"w10", "w11", "w12", "w13"}
    before = runs["auto"]["val_loss_before"]
    assert runs["auto"]["history"][1]["val_loss"] < 0.3 * before < runs["none"]["history"][1]["val_loss"]
    # the per-weight prefix alone (the former auto) is not enough
    assert runs["auto"]["history"][1]["val_loss"] < 0.5 * runs[("w10",)]["history"][1]["val_loss"]
