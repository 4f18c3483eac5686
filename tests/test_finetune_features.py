"""Distillation that recovers: feature matching, heads behind Identity, run-time Reshape ranks, early stopping."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.passes import FineTunePass
from graphprune.passes.finetune import probability_head
from graphprune.runtime import make_session, run_samples
from graphprune.training.features import pick_features
from graphprune.training.loop import TrainConfig, train_loop


def _residual_net(seed: int = 0, mid: int = 16, opset: int = 13) -> onnx.ModelProto:
    """x[N,3,8,8] -> stem(8) -> Relu -> Conv(mid) -> Relu -> Conv(8) -> Add(stem) -> GAP -> flatten by a
    run-time Reshape target -> MatMul+Add -> Softmax -> Identity (Paddle's tail): ``mid`` is the pruned width."""
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32))  # noqa: E731
    inits = {"ws": w(8, 3, 3, 3), "w1": w(mid, 8, 3, 3), "w2": w(8, mid, 3, 3), "fc": w(8, 4), "fb": w(4)}
    for name, tensor in inits.items():
        tensor.name = name
    nodes = [
        helper.make_node("Conv", ["x", "ws"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["s"]),
        helper.make_node("Conv", ["s", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "s"], ["block"]),
        helper.make_node("GlobalAveragePool", ["block"], ["pool"]),
        helper.make_node("Shape", ["pool"], ["shape"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", onnx.TensorProto.INT64, [1], [0])),
        helper.make_node("Gather", ["shape", "zero"], ["n"]),
        helper.make_node("Constant", [], ["minus1"], value=helper.make_tensor("minus1", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["n", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["pool", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Identity", ["probs"], ["save_infer_model/scale_0.tmp_1"]),
    ]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", onnx.TensorProto.FLOAT, ["N", 4])],
                              list(inits.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _pruned(teacher: onnx.ModelProto, keep: int = 4) -> onnx.ModelProto:
    """``teacher`` with only the first ``keep`` channels of its middle conv (names and other widths kept)."""
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for index, init in enumerate(student.graph.initializer):
        value = numpy_helper.to_array(init)
        if init.name == "w1":
            value = value[:keep]
        elif init.name == "w2":
            value = value[:, :keep]
        student.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, init.name))
    return student


def _data(n: int = 96, seed: int = 1) -> InputSet:
    return InputSet({"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)})


def test_probability_head_is_found_behind_identity():
    assert probability_head(_residual_net(), "save_infer_model/scale_0.tmp_1", 2) == ("logits", "softmax")


def test_pick_features_keeps_shared_tensors_that_pruning_changed():
    teacher = _residual_net()
    probe = _data(4).arrays
    names = pick_features(_pruned(teacher), teacher, probe, exclude=["logits"])
    # the stem and its Relu are untouched by pruning, c1/r1 changed width, pool and mm are too small
    # to describe a stage (8 and 4 values a sample): c2 and the residual sum are what is left to match
    assert names == ["c2", "block"]
    assert pick_features(_pruned(teacher), teacher, probe, exclude=["logits"], limit=1) == ["block"]
    assert pick_features(teacher, teacher, probe) == []  # nothing changed, nothing to match


@pytest.mark.parametrize("opset", [11, 13])
def test_feature_distillation_trains_a_pruned_net_with_a_runtime_reshape(opset):
    teacher = _residual_net(opset=opset)
    student = _pruned(teacher)
    data = _data()
    result = FineTunePass(data=data, teacher=teacher, epochs=4, lr=1e-2, max_features=2, batchnorm="keep")(student)
    stats = result.stats
    assert stats["features"] == ["c2", "block"]
    assert "relative MSE on 2 intermediate features" in stats["loss"] and "softmax head" in stats["loss"]
    assert stats["val_loss_best"] < 0.7 * stats["val_loss_before"]
    out = run_samples(make_session(result.model), data)["save_infer_model/scale_0.tmp_1"]
    ref = run_samples(make_session(teacher), data)["save_infer_model/scale_0.tmp_1"]
    before = run_samples(make_session(student), data)["save_infer_model/scale_0.tmp_1"]
    assert np.abs(out - ref).mean() < 0.7 * np.abs(before - ref).mean()


def test_features_none_and_named_features():
    teacher = _residual_net()
    student = _pruned(teacher)
    plain = FineTunePass(data=_data(), teacher=teacher, epochs=1, features="none", batchnorm="keep")(student)
    assert plain.stats["features"] == [] and "features" not in plain.stats["loss"]
    named = FineTunePass(data=_data(), teacher=teacher, epochs=1, features=["block"], batchnorm="keep")(student)
    assert named.stats["features"] == ["block"]
    with pytest.raises(UserError, match="no tensor 'nope'"):
        FineTunePass(data=_data(), teacher=teacher, epochs=1, features=["nope"])(student)
    with pytest.raises(UserError, match="features 'all'"):
        FineTunePass(data=_data(), teacher=teacher, features="all")


class _WorseningSession:
    """A stand-in session whose validation loss rises after the first epoch."""

    def __init__(self):
        self.evals = 0

    def train_step(self, feeds, lr):
        return 1.0, np.zeros((len(feeds["i"]), 1), np.float32)

    def eval_step(self, feeds):
        self.evals += 1
        return float(self.evals), np.zeros((len(feeds["i"]), 1), np.float32)

    def weights(self):
        return {"w": np.array([float(self.evals)])}


def test_patience_stops_when_validation_stops_improving():
    session = _WorseningSession()
    idx = np.arange(8)
    outcome = train_loop(session, TrainConfig(epochs=10, batch_size=4, patience=2), lambda i: {"i": i},
                         lambda out, i: None, idx, idx)
    assert outcome.best_epoch == 0 and len(outcome.history) == 3 and outcome.planned_epochs == 10
    with pytest.raises(UserError, match="patience"):
        TrainConfig(patience=0).check()


def _bn_chain(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> Conv -> BN -> y, with BN statistics that describe nothing."""
    rng = np.random.default_rng(seed)
    inits = []
    for name, shape in (("w1", (6, 3, 3, 3)), ("w2", (5, 6, 3, 3))):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name))
    for bn, c in (("b1", 6), ("b2", 5)):
        for part, value in (("s", rng.uniform(0.5, 2, c)), ("o", rng.standard_normal(c)), ("m", rng.standard_normal(c) * 3),
                            ("v", rng.uniform(0.1, 5, c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{bn}{part}"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "b1s", "b1o", "b1m", "b1v"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "b2s", "b2o", "b2m", "b2v"], ["y"])]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_batchnorm_recalibration_describes_the_recalibrated_earlier_layers():
    from graphprune.training.batchnorm import recalibrate_batchnorm
    from graphprune.training.features import _with_outputs

    data = _data(48)
    model, count = recalibrate_batchnorm(_bn_chain(), data)
    assert count == 2
    out = run_samples(make_session(_with_outputs(model, ["n1", "y"])), data)
    params = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, bn in (("n1", "b1"), ("y", "b2")):
        # with the statistics of its own (recalibrated) input, each BN outputs mean = offset, std = |scale|
        flat = np.moveaxis(out[name], 1, 0).reshape(out[name].shape[1], -1)
        np.testing.assert_allclose(flat.mean(axis=1), params[f"{bn}o"], atol=1e-3)
        np.testing.assert_allclose(flat.std(axis=1), np.abs(params[f"{bn}s"]), rtol=1e-3)


def test_cli_features_and_patience(tmp_path, capsys):
    from graphprune.cli import main

    teacher, student = tmp_path / "teacher.onnx", tmp_path / "student.onnx"
    onnx.save(_residual_net(), teacher)
    onnx.save(_pruned(_residual_net()), student)
    data = tmp_path / "x.npz"
    np.savez(data, x=_data(64).arrays["x"])
    out = tmp_path / "out.onnx"
    base = ["finetune", str(student), "-o", str(out), "--data", str(data), "--teacher", str(teacher)]
    assert main(base + ["--epochs", "2", "--patience", "1", "--features", "block", "--batchnorm", "keep"]) == 0
    text = capsys.readouterr().out
    assert "features matched to the teacher: block" in text and out.exists()
    for bad, message in ((["--patience", "0"], "--patience must be >= 1"), (["--feature-weight", "-1"], "--feature-weight"),
                         (["--max-features", "x"], "--max-features 'x' is not an integer")):
        out.unlink(missing_ok=True)
        assert main(base + bad) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_normalization_statistics_are_not_features():
    from graphprune.training.features import _float_node_outputs

    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]), helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("Sqrt", ["sq"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["normed"]), helper.make_node("Add", ["normed", "x"], ["out"])]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", 4])])
    assert _float_node_outputs(helper.make_model(graph)) == ["sq", "normed", "out"]
