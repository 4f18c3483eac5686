"""Small models written inline for the foundation tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def conv_model(dynamic_batch: bool = True, constant_weights: bool = False, seed: int = 0, width: int = 4) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(width) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(5): class scores."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(width).astype(np.float32)
    fc = rng.standard_normal((5, width)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    arrays = {"w": w, "b": b, "fc": fc}
    inits = []
    if constant_weights:
        consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in arrays.items()]
        nodes = consts + nodes
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    batch = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        nodes,
        "conv_model",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_model(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)
