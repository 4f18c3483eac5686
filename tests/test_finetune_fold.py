"""Fine-tuning through BatchNorm folded into its Conv (training.fold): exact, reversible, and it trains
where a BatchNorm with a tiny running variance makes the stored weights untrainable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.data import InputSet
from graphprune.passes import FineTunePass
from graphprune.runtime import make_session
from graphprune.training.artifacts import prepare_for_training
from graphprune.training.fold import fold_batchnorms, unfold_values

# Channels 0-2 of the first BatchNorm see activations of variance ~1e-5 (their Conv weights are
# ~1e-3): their gain gamma / sqrt(var + eps) is ~300, as in the trained PP-OCR recognizer.
_TINY = 3


def _model(seed: int = 0, noise: float = 0.0, constants: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w1[:_TINY] *= 3e-3
    c1 = _conv_output(w1, _data(64).arrays["x"])
    weights = {
        "w1": w1, "g1": rng.uniform(0.5, 1.5, 8).astype(np.float32), "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "m1": c1.mean(axis=(0, 2, 3)).astype(np.float32), "v1": c1.var(axis=(0, 2, 3)).astype(np.float32),
        "w2": rng.normal(0, 0.2, (6, 8, 3, 3)).astype(np.float32), "cb2": rng.normal(0, 0.1, 6).astype(np.float32),
        "g2": rng.uniform(0.5, 1.5, 6).astype(np.float32), "b2": rng.normal(0, 0.1, 6).astype(np.float32),
        "m2": rng.normal(0, 0.1, 6).astype(np.float32), "v2": rng.uniform(0.5, 2, 6).astype(np.float32),
        "fc": rng.normal(0, 0.3, (6, 4)).astype(np.float32),
    }
    if noise:
        noisy = np.random.default_rng(seed + 100)
        for name in ("w2", "fc"):  # the tiny-variance channels are right: only later layers need training
            weights[name] = (weights[name] * (1 + noise * noisy.normal(0, 1, weights[name].shape))).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "cb2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["n2"]),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    if constants:  # Paddle's form: weights and statistics in Constant nodes
        consts = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v)) for n, v in weights.items()]
        nodes, inits = consts + nodes, []
    else:
        inits = [numpy_helper.from_array(v, n) for n, v in weights.items()]
    graph = helper.make_graph(nodes, "bn_tiny_var", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_output(w1: np.ndarray, x: np.ndarray) -> np.ndarray:
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1")])
    return make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).run(None, {"x": x})[0]


def _data(n: int = 96) -> InputSet:
    return InputSet({"x": np.random.default_rng(7).normal(0, 1, (n, 3, 12, 12)).astype(np.float32)})


def _run(model, x):
    return make_session(model).run(["y"], {"x": x})[0]


def _gains(model):
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return np.abs(values["g1"]) / np.sqrt(values["v1"] + 1e-5)


def test_fixture_has_extreme_batchnorm_gains():
    gains = _gains(_model())
    assert gains[:_TINY].min() > 100 and np.median(gains) < 100


def test_folded_training_graph_computes_the_same_and_unfolds_to_the_input():
    model, x = _model(), _data(8).arrays["x"]
    work, trainable = prepare_for_training(model)
    record = fold_batchnorms(work, trainable)
    assert len(record.folds) == 2 and record.removed_tensors == ["c1", "c2"]
    assert [n.op_type for n in work.graph.node].count("BatchNormalization") == 0
    assert {"w1", "w2", "fc"} <= set(trainable.names) and not {"g1", "b1", "g2", "b2"} & set(trainable.names)
    np.testing.assert_allclose(_run(work, x), _run(model, x), rtol=1e-4, atol=1e-5)
    folded = {i.name: numpy_helper.to_array(i) for i in work.graph.initializer if i.name in trainable.names}
    back = unfold_values(folded, record)
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in ("w1", "w2", "b1", "b2"):
        np.testing.assert_allclose(back[name], original[name], rtol=1e-5, atol=1e-6)
    assert "cb2" not in back  # the Conv bias stays as it was: the BatchNorm bias takes the change


def test_not_folded_when_the_conv_output_is_read_elsewhere():
    model = _model()
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    work, trainable = prepare_for_training(model)
    record = fold_batchnorms(work, trainable)
    assert [f.beta for f in record.folds] == ["b2"]


@pytest.mark.parametrize("constants", [False, True])
def test_folded_finetune_trains_and_writes_the_same_graph_back(constants):
    teacher, student, data = _model(), _model(noise=0.3, constants=constants), _data()
    common = dict(data=data, teacher=teacher, epochs=2, batch_size=16, features="none", batchnorm="keep")
    folded = FineTunePass(fold_batchnorm=True, **common)(student)
    plain = FineTunePass(**common)(student)
    f = folded.stats
    assert f["batchnorm_folded"] == 2 and plain.stats["batchnorm_folded"] == 0
    assert f["val_loss_before"] == pytest.approx(plain.stats["val_loss_before"], rel=1e-3)
    assert f["val_loss_best"] < 0.5 * f["val_loss_before"]
    # Written back unfolded: the same graph; gamma, the statistics and the Conv bias unchanged.
    assert [n.op_type for n in folded.model.graph.node] == [n.op_type for n in student.graph.node]
    before, after = _values(student), _values(folded.model)
    for name in ("g1", "m1", "v1", "g2", "m2", "v2", "cb2"):
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.array_equal(after["b2"], before["b2"]) and not np.array_equal(after["w1"], before["w1"])
    x = data.arrays["x"][:16]
    t = _run(teacher, x)
    assert np.mean((_run(folded.model, x) - t) ** 2) < 0.7 * np.mean((_run(student, x) - t) ** 2)


def _values(model):
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"})
    return values
