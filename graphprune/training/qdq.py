"""Quantization-aware fine-tuning of QDQ models: int8 weights trained in float through fake quantization.

A QDQ model stores each quantized weight as an int8 initializer read by a DequantizeLinear.  For
training, the weight becomes a float initializer (its dequantized value) feeding a QuantizeLinear with
the same scale and zero point, then the original DequantizeLinear: the forward computes exactly what
the QDQ model computes, and the gradient reaches the float weight through the straight-through
estimator of ``graphprune.autodiff.rules.quantization``.  After training, the float weights are
quantized again with their unchanged scales and written into the int8 initializers, so the model's
structure, scales and zero points stay as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["FakeQuantWeight", "unfold_quantized_weights", "requantize"]

_WEIGHT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_SUFFIX = "/graphprune.float"


@dataclasses.dataclass
class FakeQuantWeight:
    """One int8 weight trained as float: where it lives and how it quantizes."""

    int_name: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: np.dtype


def _broadcast(param: np.ndarray, axis: int, rank: int) -> np.ndarray:
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * rank
    shape[axis % rank] = param.size
    return param.reshape(shape)


def unfold_quantized_weights(graph: onnx.GraphProto) -> Dict[str, FakeQuantWeight]:
    """Rewrite int8 weight -> DequantizeLinear as float weight -> QuantizeLinear -> DequantizeLinear (in place).

    Returns the new float initializer's name -> its record.  int32 biases stay frozen (their scale is
    tied to the input's and the weight's scales)."""
    inits = {init.name: init for init in graph.initializer}
    fed = {vi.name for vi in graph.input}
    records: Dict[str, FakeQuantWeight] = {}
    added: List[onnx.TensorProto] = []
    quantizers: List[Tuple[int, onnx.NodeProto]] = []
    for position, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        source = inits.get(node.input[0])
        scale = inits.get(node.input[1])
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if source is None or scale is None or source.name in fed or source.data_type not in _WEIGHT_TYPES:
            continue
        if any(a.name == "block_size" and a.i for a in node.attribute):
            continue  # blocked quantization: left frozen
        values = numpy_helper.to_array(source)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale_v = numpy_helper.to_array(scale).astype(np.float32)
        zero_v = numpy_helper.to_array(zero) if zero is not None else np.zeros((), values.dtype)
        real = ((values.astype(np.float32) - _broadcast(zero_v.astype(np.float32), axis, values.ndim))
                * _broadcast(scale_v, axis, values.ndim)).astype(np.float32)
        float_name = source.name + _SUFFIX
        if float_name in records:
            node.input[0] = records[float_name].int_name + "/graphprune.q"
            continue
        added.append(numpy_helper.from_array(real, float_name))
        quantized = source.name + "/graphprune.q"
        q_inputs = [float_name, node.input[1]] + ([node.input[2]] if zero is not None else [])
        if zero is None:  # QuantizeLinear outputs uint8 without a zero point: give it the weight's type
            zero_name = source.name + "/graphprune.zero"
            added.append(numpy_helper.from_array(np.zeros((), values.dtype), zero_name))
            q_inputs.append(zero_name)
        quantizers.append((position, helper.make_node("QuantizeLinear", q_inputs, [quantized],
                                                      name=quantized, axis=axis)))
        node.input[0] = quantized
        records[float_name] = FakeQuantWeight(source.name, scale_v, zero_v, axis, values.dtype)
    for offset, (position, q_node) in enumerate(quantizers):
        graph.node.insert(position + offset, q_node)
    graph.initializer.extend(added)
    return records


def requantize(values: Dict[str, np.ndarray], records: Dict[str, FakeQuantWeight]) -> Dict[str, np.ndarray]:
    """``values`` with every trained float weight replaced by its int8 initializer's new contents."""
    result: Dict[str, np.ndarray] = {}
    for name, value in values.items():
        record = records.get(name)
        if record is None:
            result[name] = value
            continue
        info = np.iinfo(record.dtype)
        scale = _broadcast(record.scale, record.axis, value.ndim)
        zero = _broadcast(record.zero_point.astype(np.float32), record.axis, value.ndim)
        q = np.clip(np.rint(value / scale) + zero, info.min, info.max)  # rint: round half to even, as ONNX
        result[record.int_name] = q.astype(record.dtype)
    return result
