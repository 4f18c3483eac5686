"""prune --criterion wanda: channel importance |W| x ||X|| summed over the group's producer and consumer weights."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.cli import main
from graphprune.data import InputSet
from graphprune.passes.prune_channels import PruneChannelsPass


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N,8] -> MatMul(8x16) -> Relu -> MatMul(16x4): one group of 16 hidden neurons."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_wanda_keeps_the_neurons_with_the_largest_weight_times_input_norm():
    model = _mlp()
    w1, w2 = (numpy_helper.to_array(i) for i in model.graph.initializer)
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32) * np.geomspace(0.01, 10, 8).astype(np.float32)
    hidden = np.maximum(x @ w1, 0)
    rms = lambda a: np.sqrt((a.astype(np.float64) ** 2).mean(axis=0))  # noqa: E731
    producer = (np.abs(w1) * rms(x)[:, None]).sum(axis=0)   # sum_j |W1[j, c]| ||x_j||
    consumer = np.abs(w2).sum(axis=1) * rms(hidden)         # ||h_c|| sum_k |W2[c, k]|
    score = producer / producer.mean() + consumer / consumer.mean()
    expected = np.sort(np.argsort(score)[8:])

    result = PruneChannelsPass(ratio=0.5, criterion="wanda", data=InputSet({"x": x}))(model)
    kept_w1 = numpy_helper.to_array({i.name: i for i in result.model.graph.initializer}["w1"])
    assert kept_w1.shape == (8, 8)
    np.testing.assert_array_equal(kept_w1, w1[:, expected])
    l2 = PruneChannelsPass(ratio=0.5, criterion="l2")(model).model
    assert not np.array_equal(numpy_helper.to_array({i.name: i for i in l2.graph.initializer}["w1"]), kept_w1)


def test_cli_prune_wanda_without_data_exits_2(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_mlp(), str(path))
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--criterion", "wanda"]) == 2
    assert "--criterion wanda needs calibration data" in capsys.readouterr().err
    assert not out.exists()
