"""Stand-ins for Instance/Group/Batch normalization, and LayerNormalization with the outputs its gradient needs."""

from __future__ import annotations

import numpy as np
import onnx

from graphprune.training.standins.builder import standin


@standin("InstanceNormalization")
def _instance_norm(b):
    scale, bias = b.node.input[1], b.node.input[2]
    rank = b.known_rank()
    normalized = b.normalize(b.x, list(range(2, rank)), b.attr("epsilon", 1e-5))
    affine = b.op("Mul", normalized, b.channel_shaped(scale, rank))
    b.op("Add", affine, b.channel_shaped(bias, rank), out=b.y)


@standin("GroupNormalization")
def _group_norm(b):
    scale, bias = b.node.input[1], b.node.input[2]
    rank = b.known_rank()
    groups = int(b.attr("num_groups", 1))
    # [N, C, ...] -> [N, G, C/G * ...]: Shape/Slice keep N without Reshape's copy-dim zeros.
    batch = b.op("Slice", b.op("Shape", b.x), b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64)))
    grouped_shape = b.op("Concat", batch, b.const(np.array([groups, -1], np.int64)), axis=0)
    normalized = b.normalize(b.op("Reshape", b.x, grouped_shape), [2], b.attr("epsilon", 1e-5))
    if b.opset >= 21:  # opset 21: one scale/bias per channel
        restored = b.op("Reshape", normalized, b.op("Shape", b.x))
        affine = b.op("Mul", restored, b.channel_shaped(scale, rank))
        b.op("Add", affine, b.channel_shaped(bias, rank), out=b.y)
    else:  # opset 18: one scale/bias per group, applied in the grouped layout
        affine = b.op("Add", b.op("Mul", normalized, b.channel_shaped(scale, 3)), b.channel_shaped(bias, 3))
        b.op("Reshape", affine, b.op("Shape", b.x), out=b.y)


@standin("BatchNormalization")
def _batch_norm(b):
    """Inference-form BatchNorm with frozen running statistics and trainable scale / bias.

    Frozen statistics are the usual choice for fine-tuning on little data: batch statistics of small
    batches are noisy, and a per-channel affine map (scale, bias) can absorb any shift the pruning
    caused, so nothing is lost by not updating mean/var.  The trained model is used exactly as it was
    trained (same normalization at train and inference time).
    """
    scale, bias, mean, var = b.node.input[1:5]
    rank = b.known_rank()
    mean_value, var_value = b.constants.get(mean), b.constants.get(var)
    eps = b.attr("epsilon", 1e-5)
    shape = [-1] + [1] * (rank - 2)
    if mean_value is not None and var_value is not None:
        inv_std = (1.0 / np.sqrt(var_value.astype(np.float64) + eps)).astype(np.float32).reshape(shape)
        centered = b.op("Sub", b.x, b.const(mean_value.astype(np.float32).reshape(shape)))
        normalized = b.op("Mul", centered, b.const(inv_std))
    else:  # statistics computed in the graph: same formula with ops
        centered = b.op("Sub", b.x, b.channel_shaped(mean, rank))
        std = b.op("Sqrt", b.op("Add", b.channel_shaped(var, rank), b.const(np.float32(eps))))
        normalized = b.op("Div", centered, std)
    affine = b.op("Mul", normalized, b.channel_shaped(scale, rank))
    b.op("Add", affine, b.channel_shaped(bias, rank), out=b.y)


@standin("LayerNormalization")
def _layer_norm(b):
    # The gradient needs the saved mean and inverse std-dev, optional outputs exporters leave out.
    outputs = list(b.node.output) + [""] * (3 - len(b.node.output))
    outputs[1] = outputs[1] or b.fresh("mean")
    outputs[2] = outputs[2] or b.fresh("inv_std")
    node = onnx.NodeProto()
    node.CopyFrom(b.node)
    del node.output[:]
    node.output.extend(outputs)
    b.nodes.append(node)
