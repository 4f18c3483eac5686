"""Which weights fine-tuning trains (a registry by op type), and writing trained values back.

Trainable: the weights of Conv/ConvTranspose/Gemm/MatMul (and the bias ``Add`` right after them) and the
scale/bias of normalization layers, when they are float32 constants.  Everything else (BatchNorm
running statistics, shapes, lookup tables, quantized weights) stays frozen.  Weights stored in
``Constant`` nodes are trained as initializers of the same name and written back into the
``Constant`` nodes, so the output graph keeps the input's structure.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.errors import UserError
from graphprune.training.qdq import FakeQuantWeight

__all__ = ["TrainableWeights", "find_trainable", "TRAINABLE_INPUTS", "write_back", "constants_to_initializers"]

# op type -> the input positions that hold trainable weights (when they are float constants).
TrainableRule = Callable[[onnx.NodeProto, Dict[str, onnx.NodeProto]], Sequence[int]]
TRAINABLE_INPUTS: Dict[str, TrainableRule] = {}


def _rule(*op_types: str):
    def register(fn: TrainableRule) -> TrainableRule:
        for op in op_types:
            TRAINABLE_INPUTS[op] = fn
        return fn

    return register


@_rule("Conv", "ConvTranspose")
def _conv_inputs(node, producers):
    return (1, 2)


@_rule("Gemm")
def _gemm_inputs(node, producers):
    return (0, 1, 2)  # A is a weight only when constant (rare); the constant check sorts it out


@_rule("MatMul")
def _matmul_inputs(node, producers):
    return (0, 1)


@_rule("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")
def _norm_inputs(node, producers):
    return (1, 2)  # scale and bias; BatchNorm's running mean/var (3, 4) stay frozen


@_rule("Add")
def _bias_add_inputs(node, producers):
    # Exporters write Linear layers as MatMul + Add(bias): the bias belongs to the layer.
    return tuple(
        1 - i for i, name in enumerate(node.input[:2])
        if name in producers and producers[name].op_type in ("MatMul", "Conv", "ConvTranspose", "Gemm")
    )


@dataclasses.dataclass
class TrainableWeights:
    """The weights to train, by name, and where each one lives in the input model."""

    names: List[str]
    in_constant_nodes: List[str]  # the subset stored as Constant nodes in the input model
    fake_quant: Dict[str, FakeQuantWeight] = dataclasses.field(default_factory=dict)  # int8 weights trained as float

    def count(self, graph: onnx.GraphProto) -> int:
        values = {init.name: init for init in graph.initializer}
        return sum(int(np.prod(values[n].dims)) for n in self.names if n in values)


def constants_to_initializers(graph: onnx.GraphProto) -> List[str]:
    """Turn float ``Constant`` nodes of the main graph into initializers (in place); returns their names."""
    keep, converted = [], []
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and node.attribute
            and node.attribute[0].name == "value"
            and node.attribute[0].t.data_type == onnx.TensorProto.FLOAT
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            converted.append(node.output[0])
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return converted


def find_trainable(graph: onnx.GraphProto, from_constants: Sequence[str] = ()) -> TrainableWeights:
    """The trainable float32 initializers of ``graph`` (after ``constants_to_initializers``).

    Initializers that are also graph inputs (overridable at run time) are not weights.
    """
    fed = {vi.name for vi in graph.input}
    floats = {
        init.name for init in graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT and init.name not in fed
    }
    producers = ir.producer_map(graph)
    names: List[str] = []
    for node in graph.node:
        rule = TRAINABLE_INPUTS.get(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx"):
            continue
        for index in rule(node, producers):
            source = _weight_source(node.input[index], producers) if index < len(node.input) else ""
            if source in floats and source not in names:
                names.append(source)
    constants = set(from_constants)
    return TrainableWeights(names=names, in_constant_nodes=[n for n in names if n in constants])


def _weight_source(name: str, producers: Dict[str, onnx.NodeProto]) -> str:
    """The float weight behind ``name``: itself, or the input of a QuantizeLinear -> DequantizeLinear pair."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return name
    q = producers.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else name


def write_back(model: onnx.ModelProto, values: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers / ``Constant`` nodes named in ``values`` hold the new values.

    Nothing else changes: node names, tensor names, op types and every other weight stay as they were.
    """
    result = ir.clone(model)
    remaining = dict(values)
    for index, init in enumerate(result.graph.initializer):
        if init.name in remaining:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            new = numpy_helper.from_array(remaining.pop(init.name).astype(dtype), init.name)
            result.graph.initializer[index].CopyFrom(new)
    for node in result.graph.node:
        if node.op_type == "Constant" and node.output[0] in remaining:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(remaining.pop(node.output[0]).astype(np.float32)))
    if remaining:
        raise UserError(f"trained weights not found in the model: {', '.join(sorted(remaining))}")
    return result
