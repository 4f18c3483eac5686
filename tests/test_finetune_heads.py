"""Models that end in Softmax or Sigmoid train on the logits behind the head, with losses that fit them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.data import InputSet
from graphprune.passes import FineTunePass
from graphprune.runtime import make_session, run_samples
from tests.test_finetune_support import digits, shrink_digits, subset


def _with_head(model: onnx.ModelProto, op: str, **attrs) -> onnx.ModelProto:
    """``model`` whose first output goes through ``op`` (the graph output keeps its name)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    out = result.graph.output[0].name
    for node in result.graph.node:
        node.output[:] = [o + "_logits" if o == out else o for o in node.output]
    result.graph.node.append(helper.make_node(op, [out + "_logits"], [out], name="head", **attrs))
    return result


def _accuracy(model, data, labels):
    return float((run_samples(make_session(model), data)["logits"].argmax(-1) == labels).mean())


def test_softmax_classifier_trains_on_its_logits_with_labels_and_distillation():
    model, train, labels, test, test_labels = digits()
    train, labels = subset(train, labels, 480)
    teacher = _with_head(model, "Softmax", axis=-1)
    student = _with_head(shrink_digits(model), "Softmax", axis=-1)
    before = _accuracy(student, test, test_labels)
    result = FineTunePass(data=train, labels=labels, teacher=teacher, epochs=8, lr=5e-3)(student)
    assert result.stats["loss"] == "0.5 x ce on labels + 0.5 x kl distillation, T=2 (on the logits of the softmax head)"
    assert _accuracy(result.model, test, test_labels) > max(before + 0.3, 0.85)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in student.graph.node]  # head kept


def test_distillation_without_labels_picks_the_epoch_by_validation_loss():
    model, train, labels, test, _ = digits()
    train, _ = subset(train, labels, 320)
    teacher = _with_head(model, "Softmax", axis=-1)
    result = FineTunePass(data=train, teacher=teacher, epochs=3, lr=5e-3)(_with_head(shrink_digits(model), "Softmax", axis=-1))
    history = result.stats["history"]
    assert all(record["val_metric"] is None for record in history)  # no agreement score to be fooled by
    best = min(history, key=lambda r: r["val_loss"])
    assert result.stats["best_epoch"] == best["epoch"] and best["val_loss"] < history[0]["val_loss"]


def _sigmoid_map_net(seed: int, scale: float) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> Conv(1 channel) -> Sigmoid -> y[N,1,8,8] (a detector's probability map)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["z"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["z"], ["y"])]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * scale).astype(np.float32), n)
             for n, s in (("w1", (6, 3, 3, 3)), ("w2", (1, 6, 3, 3)), ("b2", (1,)))]
    graph = helper.make_graph(nodes, "map", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_sigmoid_map_is_distilled_per_element_with_binary_cross_entropy():
    teacher, student = _sigmoid_map_net(1, 0.8), _sigmoid_map_net(2, 0.3)
    data = InputSet({"x": np.random.default_rng(3).standard_normal((96, 3, 8, 8)).astype(np.float32)})
    error = lambda m: float(np.abs(run_samples(make_session(m), data)["y"] - run_samples(make_session(teacher), data)["y"]).mean())  # noqa: E731
    before = error(student)
    result = FineTunePass(data=data, teacher=teacher, epochs=15, lr=2e-2, batch_size=16)(student)
    assert result.stats["loss"].startswith("bce distillation (on the logits of the sigmoid head)")
    assert error(result.model) < 0.5 * before
    # the reported distillation loss is a KL (teacher entropy removed): never negative
    assert min(r["val_loss"] for r in result.stats["history"]) >= -1e-6
