"""Float layers stay float on ONNX Runtime: a per-axis DequantizeLinear in front of each, against ``WeightBiasQuantization``.

ONNX Runtime >= 1.21 runs the ``WeightBiasQuantization`` optimizer at its basic level, on by default.
It looks for a Conv, ConvTranspose or Gemm whose input comes from a DequantizeLinear with a
per-tensor (scalar) scale and whose weight is a float32 initializer, and quantizes that weight to
per-tensor int8 (and the bias to int32).  In a QDQ model a float layer reads a per-tensor
DequantizeLinear whenever its producer is int8, so layers kept float by ``--exclude``, the cost
model or the error budget would silently become int8 with coarser weights than any layer
graphprune quantizes.

The optimizer only fires on a scalar input scale.  So such a layer gets its own DequantizeLinear
with the same scale and zero point repeated along one axis of the input (the channels; any axis
of static size >= 2 will do): ``(q - zero_point) * scale`` element by element, the same floats as
before, and no match for the optimizer.  Models that run on ORT's default session options then
keep every float layer float; graphprune's own sessions also disable the optimizer
(``runtime.DISABLED_OPTIMIZERS``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.ir import consumer_map, get_attr, initializer_map, producer_map

__all__ = ["keep_float_layers_float", "WEIGHT_QUANTIZED_OPS"]

# The op types ``WeightBiasQuantization`` rewrites (onnxruntime/core/optimizer/qdq_transformer/
# weight_bias_quantization.cc).
WEIGHT_QUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def keep_float_layers_float(model: onnx.ModelProto, shapes: Dict[str, tuple]) -> List[str]:
    """Give every float layer that reads a per-tensor DequantizeLinear a per-axis one, in place.

    Args:
        model: a QDQ model (opset >= 13, where DequantizeLinear takes ``axis``); modified in place.
        shapes: tensor name -> shape (ints for static dims), for layers whose channel axis has one
            element and need another axis.

    Returns the names of the layers left exposed: no input axis of static size >= 2 (rare: a
    one-channel tensor of unknown spatial size).
    """
    graph = model.graph
    inits = initializer_map(graph)
    producers = producer_map(graph)
    readers = consumer_map(graph)
    outputs = {o.name for o in graph.output}
    exposed: List[str] = []
    added: List[Tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (new DequantizeLinear, the layer it feeds)
    for node in graph.node:
        dq = producers.get(node.input[0]) if node.input else None
        if not _is_float_layer(node, inits) or dq is None or not _per_tensor(dq, inits):
            continue
        axis = _spread_axis(node, inits, shapes)
        if axis is None:
            exposed.append(node.name)
            continue
        scale, zero_point = _spread(dq, inits, *axis, graph, node.name)
        if len(readers[dq.output[0]]) == 1 and dq.output[0] not in outputs:
            dq.input[1] = scale  # the layer is its only reader: spread this one
            if zero_point:
                dq.input[2] = zero_point
            _set_axis(dq, axis[0])
            continue
        own = helper.make_node("DequantizeLinear", [dq.input[0], scale] + ([zero_point] if zero_point else []),
                               [f"{dq.output[0]}/for_{node.name}"], name=f"{dq.name}/for_{node.name}", axis=axis[0])
        node.input[0] = own.output[0]
        added.append((own, node))
    _insert_before(graph, added, left=[own.input[0] for own, _ in added])
    return exposed


def _is_float_layer(node: onnx.NodeProto, inits) -> bool:
    """A layer the optimizer would quantize: its weight a float32 initializer (not a DequantizeLinear output)."""
    if node.op_type not in WEIGHT_QUANTIZED_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    weight = inits.get(node.input[1])
    return weight is not None and weight.data_type == onnx.TensorProto.FLOAT


def _per_tensor(dq: onnx.NodeProto, inits) -> bool:
    """A DequantizeLinear with one constant scale (the optimizer's IsScalar: shape [] or [1])."""
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) < 2:
        return False
    scale = inits.get(dq.input[1])
    return scale is not None and int(np.prod(scale.dims)) == 1 and len(scale.dims) <= 1


def _spread_axis(node: onnx.NodeProto, inits, shapes) -> Optional[Tuple[int, int]]:
    """(axis, size) of the layer's input to spread the scale over: the channels, else a static axis >= 2."""
    weight = list(inits[node.input[1]].dims)
    if node.op_type == "Conv":
        channel = (1, weight[1] * int(get_attr(node, "group", 1)))
    elif node.op_type == "ConvTranspose":
        channel = (1, weight[0])
    else:  # Gemm: A is [M, K] (transA: [K, M]); K from B ([K, N], transB: [N, K])
        k = weight[1] if get_attr(node, "transB", 0) else weight[0]
        channel = (0 if get_attr(node, "transA", 0) else 1, k)
    if channel[1] >= 2:
        return channel
    shape = shapes.get(node.input[0]) or ()
    return next(((axis, int(d)) for axis, d in enumerate(shape) if isinstance(d, int) and d >= 2), None)


def _spread(dq: onnx.NodeProto, inits, axis: int, size: int, graph: onnx.GraphProto, layer: str):
    """New initializers: the DequantizeLinear's scale (and zero point) repeated ``size`` times."""
    names = []
    for slot, role in ((1, "scale"), (2, "zero_point")):
        if len(dq.input) <= slot or not dq.input[slot]:
            names.append("")
            continue
        value = numpy_helper.to_array(inits[dq.input[slot]]).reshape(-1)
        tensor = numpy_helper.from_array(np.repeat(value, size), f"{dq.input[slot]}/{role}_for_{layer}")
        graph.initializer.append(tensor)
        names.append(tensor.name)
    return names[0], names[1]


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute("axis", axis)])


def _insert_before(graph: onnx.GraphProto, added, left) -> None:
    """Place each new DequantizeLinear just before the layer it feeds (topological order kept), and
    drop the shared ones they replaced when no reader is left."""
    if not added:
        return
    before = {layer.output[0]: own for own, layer in added}
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unread_shared = set(left)
    nodes = []
    for node in graph.node:
        if node.output and node.output[0] in before:
            nodes.append(before[node.output[0]])
        if node.op_type == "DequantizeLinear" and node.input[0] in unread_shared and node.output[0] not in read:
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
