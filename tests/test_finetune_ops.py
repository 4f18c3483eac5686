"""Models whose ops onnxruntime-training could not differentiate now fine-tune as they are, on plain onnxruntime.

HardSwish, Mish, Softplus, HardSigmoid, InstanceNormalization, ConvTranspose, Resize and MaxPool on
dynamic spatial dims once needed stand-ins or fixed shapes; they train through their own gradient
rules, and the written model keeps every op, name and dynamic dim.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.data import InputSet
from graphprune.passes import FineTunePass
from graphprune.runtime import make_session


def _model(nodes, inits, x_shape, y_shape, opset):
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 9 else 4
    return model


def _activation_zoo_net() -> onnx.ModelProto:
    """Conv-InstanceNorm-HardSwish-Conv-Mish-Softplus-HardSigmoid-LRN-GlobalMaxPool-Gemm; conv2's weight a Constant."""
    rng = np.random.default_rng(5)
    w = lambda *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32))  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("InstanceNormalization", ["c1", "in_s", "in_b"], ["n1"], name="inorm"),
        helper.make_node("HardSwish", ["n1"], ["a1"], name="hswish"),
        helper.make_node("Constant", [], ["w2"], name="w2_const", value=w(8, 8, 3, 3)),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Mish", ["c2"], ["a2"], name="mish"),
        helper.make_node("Softplus", ["a2"], ["a3"], name="softplus"),
        helper.make_node("HardSigmoid", ["a3"], ["a4"], name="hsigmoid"),
        helper.make_node("LRN", ["a4"], ["a5"], name="lrn", size=3),
        helper.make_node("GlobalMaxPool", ["a5"], ["p"], name="gmp"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(numpy_helper.to_array(w(8, 3, 3, 3)), "w1"),
             numpy_helper.from_array(np.ones(8, np.float32), "in_s"), numpy_helper.from_array(np.zeros(8, np.float32), "in_b"),
             numpy_helper.from_array(numpy_helper.to_array(w(5, 8)), "fc"), numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 5], 18)  # Mish needs 18


def test_model_with_ops_onnxruntime_training_lacked_fine_tunes_and_keeps_its_ops():
    model = _activation_zoo_net()
    rng = np.random.default_rng(6)
    data = InputSet({"x": rng.standard_normal((96, 3, 8, 8)).astype(np.float32)})
    labels = rng.integers(0, 5, 96)
    result = FineTunePass(data=data, labels=labels, epochs=6, lr=1e-2, val_split=0)(model)
    stats = result.stats
    assert stats["history"][-1]["train_loss"] < stats["history"][1]["train_loss"]
    assert [(n.name, n.op_type) for n in result.model.graph.node] == [(n.name, n.op_type) for n in model.graph.node]
    assert len(result.model.graph.initializer) == len(model.graph.initializer)  # w2 stayed a Constant node
    onnx.checker.check_model(result.model, full_check=True)
    make_session(result.model).run(None, {"x": data.arrays["x"][:2]})


def test_opset_9_model_trains_on_a_converted_copy_and_keeps_its_opset():
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["c", "x"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("w", (3, 3, 3, 3)), ("fc", (4, 3)), ("fc_b", (4,)))]
    model = _model(nodes, inits, ["N", 3, 6, 6], ["N", 4], 9)
    model.ir_version = 4
    data = InputSet({"x": rng.standard_normal((48, 3, 6, 6)).astype(np.float32)})
    result = FineTunePass(data=data, labels=rng.integers(0, 4, 48), epochs=3, lr=1e-2, val_split=0)(model)
    assert result.modified
    assert result.model.opset_import[0].version == 9
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    onnx.checker.check_model(result.model, full_check=True)


def test_decoder_with_conv_transpose_and_resize_trains_its_transposed_kernel():
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="down", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["u1"], name="up", strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Resize", ["u1", "", "scales"], ["u2"], name="resize", mode="linear"),
        helper.make_node("Resize", ["u2", "", "half"], ["u3"], name="resize_back", mode="nearest"),
        helper.make_node("Conv", ["u3", "w2"], ["y"], name="head", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("w1", (6, 3, 3, 3)), ("wt", (6, 4, 2, 2)), ("bt", (4,)), ("w2", (2, 4, 3, 3)))]
    inits.append(numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales"))
    inits.append(numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "half"))
    model = _model(nodes, inits, ["N", 3, 8, 8], ["N", 2, 16, 16], 17)
    data = InputSet({"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)})
    targets = rng.standard_normal((16, 2, 16, 16)).astype(np.float32)
    result = FineTunePass(data=data, labels=targets, epochs=5, lr=1e-2, batch_size=8, val_split=0)(model)
    assert result.stats["loss"] == "mse on labels"
    assert result.stats["history"][-1]["train_loss"] < result.stats["history"][1]["train_loss"]
    after = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert not np.array_equal(after["wt"], numpy_helper.to_array(inits[1]))
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]


def test_dynamic_spatial_dims_with_maxpool_train_at_several_image_sizes():
    rng = np.random.default_rng(14)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["m"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    w = numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w")
    model = _model(nodes, [w], ["N", 3, "H", "W"], ["N", 5], 17)
    for size in (12, 9):
        data = InputSet({"x": rng.standard_normal((8, 3, size, size)).astype(np.float32)})
        result = FineTunePass(data=data, labels=rng.integers(0, 5, 8), epochs=1, batch_size=4, val_split=0)(model)
        assert result.modified and result.stats["steps"] == 2
        assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", "W"]
