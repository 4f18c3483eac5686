"""Re-estimating BatchNormalization running statistics from samples (before fine-tuning a pruned model).

Removing channels changes the activations every later BatchNorm sees, so the stored running mean and
variance no longer describe them; re-estimating them from the training samples restores much of the
accuracy before the first gradient step.  One inference pass exposes every BatchNorm input at once
(statistics of later layers are taken with the earlier layers' old statistics: a one-pass
approximation that fine-tuning then absorbs).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.data import InputSet
from graphprune.errors import UserError

__all__ = ["recalibrate_batchnorm"]


def _stored_constants(model: onnx.ModelProto) -> set:
    """Names of tensors stored in the model: initializers (not fed) and Constant-node outputs.

    Paddle and other exporters write BatchNorm statistics as Constant nodes; they are recalibrated too."""
    fed = {vi.name for vi in model.graph.input}
    stored = {init.name for init in model.graph.initializer if init.name not in fed}
    stored.update(node.output[0] for node in model.graph.node
                  if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute
                  and node.attribute[0].name == "value")
    return stored


def _recalibratable(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    """Inference-mode BatchNorm nodes whose statistics are stored in the model."""
    stored = _stored_constants(model)
    return [
        node for node in model.graph.node
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and len(node.input) == 5
        and not any(node.output[1:]) and all(n in stored for n in node.input[3:5])
    ]


def recalibrate_batchnorm(model: onnx.ModelProto, data: InputSet, threads: Optional[int] = None) -> Tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose BatchNorm running statistics are those of ``data``; and how many were set.

    Returns the input model itself (and 0) when it has no BatchNorm with stored statistics.
    """
    from graphprune.runtime import make_session, run

    nodes = _recalibratable(model)
    if not nodes:
        return model, 0
    probe = ir.clone(model)
    known = {vi.name for vi in probe.graph.output}
    for name in dict.fromkeys(node.input[0] for node in nodes):
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(probe, threads=threads, optimization="basic")
    inputs = list(dict.fromkeys(node.input[0] for node in nodes))
    # Streamed per-channel sums (not stacked activations, which can take gigabytes).
    sums = {name: [0.0, 0.0, 0] for name in inputs}
    for feed in data.batches(64):
        for name, x in run(session, feed, inputs).items():
            x = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
            acc = sums[name]
            acc[0] = acc[0] + x.sum(axis=1)
            acc[1] = acc[1] + (x * x).sum(axis=1)
            acc[2] += x.shape[1]
    result = ir.clone(model)
    index = {init.name: i for i, init in enumerate(result.graph.initializer)}
    constants = {node.output[0]: node for node in result.graph.node if node.op_type == "Constant" and node.output}
    for node in nodes:
        total, squares, count = sums[node.input[0]]
        mean = total / count
        var = np.maximum(squares / count - mean * mean, 0.0)
        if not (np.isfinite(mean.astype(np.float32)).all() and np.isfinite(var.astype(np.float32)).all()):
            raise UserError(f"BatchNorm {node.name or node.output[0]!r}: statistics re-estimated from the data are not "
                            "finite (activations overflow float32); check the data or keep the statistics (--batchnorm keep)")
        for name, value in ((node.input[3], mean), (node.input[4], var)):
            tensor = numpy_helper.from_array(value.astype(np.float32), name)
            if name in index:
                result.graph.initializer[index[name]].CopyFrom(tensor)
            else:  # a Constant node keeps its place and name; only its value changes
                tensor.ClearField("name")
                constants[name].attribute[0].t.CopyFrom(tensor)
    return result, len(nodes)
