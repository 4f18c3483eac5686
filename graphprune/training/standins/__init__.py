"""Differentiable stand-ins for ops onnxruntime-training cannot differentiate, used only while training.

The gradient builders of onnxruntime-training 1.19 lack HardSigmoid, HardSwish, Softplus, Mish, Elu,
Selu, Celu, Softsign, PRelu, Sum, Mean, InstanceNormalization and GroupNormalization.  The training graph replaces
each such node by the same function written with ops that have gradients (Mul/Add/Clip/Relu/Exp/Log/
ReduceMean/Sqrt...); the inference model keeps the original node, and only trained weights are copied
back.  BatchNormalization is replaced too, by its inference form with *frozen* running statistics (see
``normalization._batch_norm``).  LayerNormalization has a gradient but needs its optional mean / inv-std outputs.

LRN (no gradient) becomes a channel-window average of squares, and nearest-neighbour Resize by
integer factors (whose gradient has no CPU kernel) a broadcast into blocks.

Each stand-in is a function registered by op type that writes nodes through a ``StandinBuilder``
(``builder``); it may return ``False`` to leave a node as it is.  They live by kind: ``elementwise``
(activations, Sum/Mean), ``normalization`` and ``spatial`` (LRN, Resize, ConvTranspose).
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Tuple

import onnx
from onnx import numpy_helper

# Importing the stand-in modules registers their functions in STANDINS.
from graphprune.training.standins import elementwise, normalization, spatial  # noqa: F401
from graphprune.training.standins.builder import STANDINS, StandinBuilder

__all__ = ["STANDINS", "StandinBuilder", "apply_standins"]


def apply_standins(graph: onnx.GraphProto, opset: int, shapes: Dict[str, Tuple[Optional[int], ...]]) -> Counter:
    """Replace, in place, every main-graph node that has a stand-in; returns counts by op type.

    Args:
        shapes: tensor name -> shape from shape inference (normalization and Resize stand-ins read it).
    """
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer
                 if init.data_type == onnx.TensorProto.FLOAT}
    replaced: Counter = Counter()
    nodes: List[onnx.NodeProto] = []
    for node in graph.node:
        standin = STANDINS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        # A multi-output node (training-mode BatchNorm) keeps its own op: the stand-ins write output 0.
        extra_outputs = node.op_type != "LayerNormalization" and any(node.output[1:])
        if standin is None or extra_outputs:
            nodes.append(node)
            continue
        builder = StandinBuilder(node, opset, constants, shapes)
        if standin(builder) is False:
            nodes.append(node)
            continue
        nodes.extend(builder.nodes)
        graph.initializer.extend(builder.initializers)
        replaced[node.op_type] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced
