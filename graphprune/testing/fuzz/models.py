"""The small valid models and sample files every fuzz family starts from (defects are edits of these)."""

from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_model(batch="N", channels: int = 3, opset: int = 17, seed: int = 0,
               edit: Optional[Callable[[dict], None]] = None) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm on [batch, channels, 8, 8].

    ``edit`` receives the parts (``nodes``, ``inits``, ``inputs``, ``outputs``, ``value_info``) before
    the graph is made: structural defects are small edits of this one model.
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3

    inits = {
        "c1.w": w(4, channels, 3, 3), "c1.b": w(4),
        "bn.s": np.ones(4, np.float32), "bn.b": np.zeros(4, np.float32),
        "bn.m": np.zeros(4, np.float32), "bn.v": np.ones(4, np.float32),
        "c2.w": w(4, 4, 3, 3), "c2.b": w(4),
        "fc.w": w(10, 4), "fc.b": w(10),
    }
    parts = {
        "nodes": [
            helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["h1"], name="conv1", pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("BatchNormalization", ["h1", "bn.s", "bn.b", "bn.m", "bn.v"], ["h2"], name="bn"),
            helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
            helper.make_node("Conv", ["h3", "c2.w", "c2.b"], ["h4"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["h4"], ["h5"], name="gap"),
            helper.make_node("Flatten", ["h5"], ["h6"], name="flatten"),
            helper.make_node("Gemm", ["h6", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
        ],
        "inits": [numpy_helper.from_array(v, k) for k, v in inits.items()],
        "inputs": [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, 8, 8])],
        "outputs": [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        "value_info": [],
        "opset": opset,
    }
    if edit:
        edit(parts)
    graph = helper.make_graph(parts["nodes"], "fuzz", parts["inputs"], parts["outputs"], parts["inits"],
                              value_info=parts["value_info"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", parts["opset"])], ir_version=8)


def scalar_input_model(int_input: bool = False) -> onnx.ModelProto:
    """A voice-activity-like MLP with a rank-0 int64 input ``sr`` beside ``x`` [N, 16] (``tokens`` int64 optional)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "srf"], ["xs"]),
        helper.make_node("MatMul", ["xs", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    if int_input:  # an integer input per sample (token ids) feeding a Gather
        inits.append(numpy_helper.from_array(rng.standard_normal((20, 4)).astype(np.float32), "emb"))
        nodes += [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("Add", ["y", "e"], ["y2"])]
        nodes[-1].output[0] = "out"
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]))
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])]
    else:
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(nodes, "vad", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def good_x(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


